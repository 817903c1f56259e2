"""Advisory locks that keep two runs off one workdir, and two dataset builds off one data dir.

Each lock is `fcntl.flock` on a lock file. The kernel drops a flock when its holder's descriptor
closes, as a dying process's does (even on `kill -9`), so a dead holder never blocks: no pid to
probe, no timeout to guess. The file names the last holder (pid, host, command line, start time,
as JSON), rewritten by each holder and emptied on a clean release: a refused process can name the
holder, and one finding it free but not empty knows that its last holder died holding it.

The descriptor is close-on-exec and forked children (grain workers) close their copy, so a
sweep's trial processes lock their own sub-workdirs and a child outliving its parent does not
keep the lock. Within one thread the locks are re-entrant: code holding a lock may call code that
takes it again. On NFS the server keeps flocks across hosts, but a crashed client's lasts until
its lease ends (NFSv4: about 90 s), and `nolock`/`local_lock` mounts lock per host only. Where the
file system refuses locks (ENOLCK, EOPNOTSUPP), a warning says so and the run goes unprotected.
"""

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import jax
from absl import logging

from pneumo_jax import distributed
from pneumo_jax.errors import BusyError, UserError

WORKDIR_LOCK = '.lock'
BUILD_LOCK = '.build.lock'
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_MAX_COMMAND = 100  # Characters of the holder's command line shown in messages.

# Lock files this process holds: real path → (descriptor, owning thread).
_held: dict[str, tuple[int, int]] = {}


def _close_in_child() -> None:
  """Closes a forked child's copies; the parent's descriptor still holds the lock."""
  for fd, _ in _held.values():
    os.close(fd)
  _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/.lock for the block, creating the workdir if needed; never waits. In a
  multi-process run process 0 holds it, and the others stop with it when it is taken.

  Raises:
    BusyError: another live process holds it; the message names that process.
  """

  def busy(holder: str) -> str:
    return (
      f'{workdir} is in use by {holder}; wait for it to finish or stop it (Ctrl-C), '
      'or use another --workdir'
    )

  if not jax.distributed.is_initialized():
    with _locked(workdir, WORKDIR_LOCK, '--workdir', busy=busy):
      yield
    return
  with contextlib.ExitStack() as held:  # Process 0 holds it for all the run's processes.
    distributed.lead_first(
      'to lock the workdir',
      lambda: (
        jax.process_index() == 0
        and held.enter_context(_locked(workdir, WORKDIR_LOCK, '--workdir', busy=busy))
      ),
    )
    yield


@contextlib.contextmanager
def build_lock(data_dir: str) -> Iterator[None]:
  """Holds DATA_DIR/.build.lock for the block, waiting (with one log line) while another has it.

  Runs sharing a data dir so build each dataset once: the second waits, then finds it built.
  """

  def waiting(holder: str) -> None:
    logging.info('Waiting for %s to finish building the dataset in %s', holder, data_dir)

  with _locked(data_dir, BUILD_LOCK, 'dataset.data_dir', wait=waiting):
    yield


@contextlib.contextmanager
def _locked(
  folder: str,
  name: str,
  flag: str,
  *,
  busy: Callable[[str], str] | None = None,
  wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
  """Holds FOLDER/NAME: raises BusyError(busy(holder)) or calls wait(holder) and blocks if taken."""
  path = os.path.realpath(os.path.join(folder, name))
  held = _held.get(path)
  if held and held[1] == threading.get_ident():
    yield  # Re-entered: the outer block releases it.
    return
  try:
    os.makedirs(folder, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  except OSError as e:
    raise UserError(
      f'cannot create the lock file {path} ({e.strerror}): {flag} {folder!r} must '
      'be a folder this user can write to'
    ) from e
  try:
    if _lock(fd, path, folder, busy, wait):
      last = _read_holder(fd, retries=0)
      if last:
        logging.warning(
          '%s was last held by %s, which ended without releasing it (killed?); taking it over',
          path,
          _describe(last),
        )
      _write_holder(fd)
      _held[path] = (fd, threading.get_ident())
      try:
        yield
      finally:
        del _held[path]
        os.ftruncate(fd, 0)  # Released cleanly; closing the descriptor drops the lock.
    else:
      yield
  finally:
    os.close(fd)


def _lock(
  fd: int,
  path: str,
  folder: str,
  busy: Callable[[str], str] | None,
  wait: Callable[[str], None] | None,
) -> bool:
  """Takes the flock; False where the file system has no locks (then the run goes on unlocked)."""
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(_read_holder(fd, retries=20))
      if busy:
        raise BusyError(busy(holder)) from None
      wait(holder)
      fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C still interrupts the wait.
  except OSError as e:
    if e.errno not in _UNSUPPORTED:
      raise
    logging.warning(
      'Cannot lock %s on this file system (%s): nothing stops another run from '
      'using %s at the same time',
      path,
      e.strerror,
      folder,
    )
    return False
  return True


def _write_holder(fd: int) -> None:
  data = {
    'pid': os.getpid(),
    'host': socket.gethostname(),
    'command': shlex.join([os.path.basename(sys.executable), *sys.argv]),
    'started': time.time(),
  }
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(data).encode(), 0)


def _read_holder(fd: int, retries: int) -> dict | None:
  """The holder's record; retried a little, as a new holder empties the file before writing it."""
  for attempt in range(retries + 1):
    text = os.pread(fd, 65536, 0).decode(errors='replace')
    with contextlib.suppress(ValueError):
      found, _ = json.JSONDecoder().raw_decode(text)
      if isinstance(found, dict):
        return found
    if attempt < retries:
      time.sleep(0.05)
  return None


def _describe(holder: dict | None) -> str:
  """'process 1234 on host h (python main.py …, started 13:02)', from a holder's record."""
  if not holder:
    return 'another process (its lock file does not say which)'
  command = str(holder.get('command', '?'))
  if len(command) > _MAX_COMMAND:
    command = command[: _MAX_COMMAND - 1] + '…'
  started = float(holder.get('started', 0))
  today = time.strftime('%Y-%m-%d') == time.strftime('%Y-%m-%d', time.localtime(started))
  when = time.strftime('%H:%M' if today else '%Y-%m-%d %H:%M', time.localtime(started))
  return (
    f'process {holder.get("pid", "?")} on host {holder.get("host", "?")} '
    f'({command}, started {when})'
  )
