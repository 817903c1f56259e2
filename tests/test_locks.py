"""Locks across processes: a busy workdir is refused, a dead holder's is not, builds run once."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pneumo_jax import locks
from pneumo_jax.errors import BusyError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(script: str, *args: str) -> subprocess.Popen:
  """A fresh interpreter running `script` (imports only what it needs) from the repository root."""
  return subprocess.Popen(
    [sys.executable, '-c', textwrap.dedent(script), *args],
    cwd=_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def wait_for(proc: subprocess.Popen, line: str) -> None:
  got = proc.stdout.readline().strip()
  assert got == line, (got, proc.stderr.read() if proc.poll() is not None else '')


_HOLD = """
    import sys, time
    from pneumo_jax import locks
    with locks.workdir_lock(sys.argv[1]):
      print('HELD', flush=True)
      time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
  """A live process holding tmp_path/work's lock; killed (if still alive) afterwards."""
  proc = start(_HOLD, str(tmp_path / 'work'))
  wait_for(proc, 'HELD')
  yield proc
  if proc.poll() is None:
    proc.kill()
  proc.communicate()


def test_busy_workdir_names_the_holder(tmp_path, holder):
  with pytest.raises(BusyError) as e, locks.workdir_lock(str(tmp_path / 'work')):
    pass
  message = str(e.value)
  assert f'is in use by process {holder.pid} on host ' in message
  assert 'locks.workdir_lock' not in message and '-c' in message  # The holder's command line.
  assert 'Ctrl-C' in message and '--workdir' in message
  # The holder may still lock its own sub-workdirs, as a sweep's trials do.
  with locks.workdir_lock(str(tmp_path / 'work' / 'trial')):
    pass


def test_lock_of_a_killed_process_does_not_block(tmp_path, holder, caplog):
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  lock_file = tmp_path / 'work' / locks.WORKDIR_LOCK
  assert json.loads(lock_file.read_text())['pid'] == holder.pid  # Left behind, stale.
  with locks.workdir_lock(str(tmp_path / 'work')):
    assert json.loads(lock_file.read_text())['pid'] == os.getpid()
  assert f'last held by process {holder.pid}' in caplog.text
  assert lock_file.read_text() == ''  # A clean release empties it.


def test_forked_child_does_not_keep_a_dead_parents_lock(tmp_path):
  proc = start(
    """
      import multiprocessing, sys, time
      from pneumo_jax import locks
      def work(started):  # Runs after the fork hooks: the child has closed its copy by now.
        started.set()
        time.sleep(120)
      with locks.workdir_lock(sys.argv[1]):
        context = multiprocessing.get_context('fork')
        started = context.Event()
        child = context.Process(target=work, args=(started,))
        child.start()  # As a grain or multiprocessing worker would be.
        started.wait()
        print(child.pid, flush=True)
        time.sleep(120)
  """,
    str(tmp_path / 'work'),
  )
  child = int(proc.stdout.readline())
  try:
    with pytest.raises(BusyError), locks.workdir_lock(str(tmp_path / 'work')):
      pass
    proc.kill()
    proc.wait()
    with locks.workdir_lock(str(tmp_path / 'work')):  # The orphaned child still runs.
      os.kill(child, 0)
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.kill(child, signal.SIGKILL)  # First: it holds the pipes communicate() reads to the end.
    proc.kill()
    proc.communicate()


def test_reentrant_in_one_thread_exclusive_across_threads(tmp_path):
  work = str(tmp_path / 'work')
  with locks.workdir_lock(work):
    with locks.workdir_lock(work):  # main.py and the training loop may both take it.
      pass
    errors = []

    def other():
      try:
        with locks.workdir_lock(work):
          pass
      except BusyError as e:
        errors.append(e)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 1 and f'process {os.getpid()}' in str(errors[0])
  with locks.workdir_lock(work):  # Released by the outer block.
    pass


def test_build_lock_waits_for_the_holder(tmp_path, caplog):
  data = str(tmp_path / 'data')
  proc = start(
    """
      import sys, time
      from pneumo_jax import locks
      with locks.build_lock(sys.argv[1]):
        print('HELD', flush=True)
        time.sleep(1.5)
  """,
    data,
  )
  try:
    wait_for(proc, 'HELD')
    began = time.monotonic()
    with caplog.at_level('INFO', logger='absl'), locks.build_lock(data):  # (test_folder_builder)
      waited = time.monotonic() - began
  finally:
    proc.kill()
    proc.communicate()
  assert waited > 0.5
  assert f'Waiting for process {proc.pid} on host' in caplog.text
  assert f'to finish building the dataset in {data}' in caplog.text


_DATASET_FOR = """
    import os, sys, time
    from absl import logging
    from configs import demo
    from pneumo_jax.data import dataset_for, folder_builder

    logging.set_verbosity(logging.INFO)
    log, go = sys.argv[2], sys.argv[3]
    build = folder_builder.ClassFolder._download_and_prepare

    def counted(self, *args, **kwargs):
      with open(log, 'a') as f:
        f.write(f'{os.getpid()}\\n')
      time.sleep(1)  # Widens the window in which the other process arrives.
      return build(self, *args, **kwargs)

    folder_builder.ClassFolder._download_and_prepare = counted
    config = demo.get_config()
    config.dataset.synthetic_images_per_class = 5
    config.dataset.synthetic_image_size = 32
    print('READY', flush=True)
    while not os.path.exists(go):
      time.sleep(0.01)
    builder = dataset_for(config, sys.argv[1])
    print(builder.data_dir, flush=True)
"""


def test_concurrent_runs_build_once(tmp_path):
  log, go = str(tmp_path / 'builds.log'), str(tmp_path / 'go')
  procs = [start(_DATASET_FOR, str(tmp_path / 'work'), log, go) for _ in range(2)]
  try:
    for proc in procs:
      wait_for(proc, 'READY')
    open(go, 'w').close()
    outputs = [proc.communicate(timeout=120) for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-3000:]
  built = {out.strip().splitlines()[-1] for out, _ in outputs}  # TFDS prints too.
  assert len(built) == 1 and os.path.isdir(built.pop())
  with open(log) as f:
    assert len(f.read().split()) == 1  # One build; the other run reused it.
  assert sum('Waiting for process' in err for _, err in outputs) == 1
  data = tmp_path / 'work' / 'data'
  assert sorted(os.listdir(data)) == ['.build.lock', 'class_folder', 'synthetic_stages']
