"""Joining a multi-process run on JAX's own runtime (`jax.distributed`), and waiting for its lead.

The same command runs on every process. With --coordinator_address, --num_processes and
--process_id it joins that run; launched by a cluster manager that starts one task per process
(`srun` sets SLURM_STEP_NUM_TASKS, `mpirun` OMPI_COMM_WORLD_SIZE), jax.distributed's own
auto-detection finds the coordinator; otherwise it stays a single process. Process 0 leads: it
builds the dataset and writes metrics and reports; the others wait for it (`lead_first`).
"""

import os
import uuid
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from pneumo_jax.errors import ConfigError, UserError

# Set by the launchers jax.distributed auto-detects when they start more than one task.
_CLUSTER_SIZE_VARIABLES = ('SLURM_STEP_NUM_TASKS', 'OMPI_COMM_WORLD_SIZE')
_JOIN_TIMEOUT_S = 300  # How long a process waits for the others to join.
_TEXT_BYTES = 4096  # Longest path shared between processes.

T = TypeVar('T')


def launched_processes() -> int:
  """How many processes the cluster launcher started (1 when none did)."""
  return max([1, *(int(os.environ.get(v, '1')) for v in _CLUSTER_SIZE_VARIABLES)])


def initialize(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> bool:
  """Joins the run the flags (all three, or none) or the cluster launcher describe, if any;
  True when it did (False: a single process, nothing initialised).

  Must run before anything touches a device. CPU processes exchange collectives over gloo
  (XLA's CPU client has no other cross-process transport); GPUs use NCCL whatever this says.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ConfigError(
      '--coordinator_address, --num_processes and --process_id go together: give all three '
      '(the same address and count on every process, process ids 0 … N-1), or none'
    )
  if all(given) and not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id={process_id} must be in 0 … {num_processes - 1}')
  if not all(given) and launched_processes() == 1:
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=_JOIN_TIMEOUT_S,
    )
  except (RuntimeError, ValueError) as e:
    where = coordinator_address or 'the address the cluster launcher gives'
    raise ConfigError(
      f'could not join the multi-process run at {where} ({type(e).__name__}: {e}). Start every '
      'process within a few minutes of each other, with the same --coordinator_address '
      '(host:port of process 0, reachable from every host) and --num_processes'
    ) from e
  return True


def lead_first(what: str, fn: Callable[[], T]) -> T:
  """`fn()` on process 0, then on the others once it returned there: what process 0 creates
  (a dataset build) the others then find. When it fails on process 0, the others stop too,
  saying so, instead of waiting for it."""
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    try:
      result = fn()
    except BaseException:
      share_flag(False)
      raise
    share_flag(True)
    return result
  if not share_flag(False):
    raise UserError(f'process 0 failed {what}; its output says why')
  return fn()


def check_shared(directory: str, what: str) -> None:
  """Refuses a `directory` the processes do not all see (a disk local to each host): a
  multi-process run keeps one dataset and one set of checkpoints, which every process reads.

  Raises:
    ConfigError: naming `what` (the field or flag) and the processes that cannot see it.
  """
  if jax.process_count() == 1:
    return
  marker = ''
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, f'.shared-check-{uuid.uuid4().hex}')
    open(marker, 'w').close()
  marker = share_text(marker)
  # A collective: when it returns, every process has looked, so the marker can go.
  seen = multihost_utils.process_allgather(np.asarray(os.path.exists(marker)))
  if jax.process_index() == 0:
    os.remove(marker)
  if not seen.all():
    blind = ', '.join(str(i) for i in np.flatnonzero(~seen))
    raise ConfigError(
      f'{what} {directory} is not visible from process(es) {blind}: a multi-process run needs it '
      'on storage every host mounts at the same path (NFS, Lustre, GPFS, a cloud bucket mount)'
    )


def share_text(text: str) -> str:
  """Process 0's `text` (at most _TEXT_BYTES bytes of UTF-8), on every process."""
  if jax.process_count() == 1:
    return text
  raw = np.zeros(_TEXT_BYTES, np.uint8)
  encoded = text.encode()[:_TEXT_BYTES]
  raw[: len(encoded)] = np.frombuffer(encoded, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)
  return shared.tobytes().rstrip(b'\0').decode()


def share_flag(flag: bool) -> bool:
  """Process 0's `flag`, on every process (a collective: each waits for process 0's)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
