"""Stopping a training run cleanly on Ctrl-C or a scheduler's SIGTERM.

A cluster scheduler sends SIGTERM some time before it kills a job, and a person presses Ctrl-C:
either way the work since the last checkpoint should not be lost. While `StopOnSignal` is
active, the first SIGINT or SIGTERM only records itself; the loop finishes the step it is in,
saves a checkpoint (data iterator included) and raises `Stopped`. A second signal aborts at once.
"""

import os
import signal
import sys
import threading
import types

import jax
import numpy as np
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
  """Training stopped on a signal after saving step `step`; the message says how to resume."""

  def __init__(self, step: int, signum: int):
    super().__init__(f'stopped at step {step}; run the same command to resume')
    self.step, self.signum = step, signum


class StopOnSignal:
  """Context manager: `signum` is set by the first SIGINT/SIGTERM while inside it.

  Only the main thread can install handlers; elsewhere it does nothing (signum stays None).
  """

  def __init__(self) -> None:
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> 'StopOnSignal':
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
    return self

  def __exit__(self, *exc: object) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def agreed(self) -> int | None:
    """`signum` as the run's processes agree on it now (any process's signal stops them all at
    the same step); `signum` itself in a single-process run. A collective in a multi-process
    run: every process calls it at the same point."""
    if not jax.distributed.is_initialized():
      return self.signum
    return int(multihost_utils.process_allgather(np.asarray(self.signum or 0)).max()) or None

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self.signum is None:
      self.signum = signum
      print(
        f'\n{signal.Signals(signum).name}: stopping after this step or batch, with a checkpoint '
        'of the steps done (press Ctrl-C again to abort without saving).',
        file=sys.stderr,
        flush=True,
      )
      return
    print(
      f'{signal.Signals(signum).name} again: aborted without saving.', file=sys.stderr, flush=True
    )
    os._exit(128 + signum)
