"""--mode train: `training.loop.train_and_evaluate`, and a closing line saying where results are."""

import os
from typing import Any

import ml_collections

from pneumo_jax import checkpoints
from pneumo_jax.evaluation import reports
from pneumo_jax.training import loop

NAME = 'train'
HELP = 'train, resume or find finished the run in WORKDIR (a sweep, for a config with get_sweep())'
FLAGS = ()  # --sweep_parallel is the sweep's, which __main__ runs in train's place.
NEEDS_WORKDIR = True

# The folders a run saves into, beside WORKDIR's own files (logs, base/, summary).
_OUTPUTS = (checkpoints.LATEST_DIR, checkpoints.BEST_DIR, 'tensorboard')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or finds finished) the run in WORKDIR; prints where its results are.

  First checks that WORKDIR and the folders it saves into can be written (a copy from read-only
  media, a full disk): otherwise the first checkpoint would fail after the steps before it.
  """
  reports.check_writable(workdir, '--workdir')
  for folder in _OUTPUTS:
    if os.path.lexists(os.path.join(workdir, folder)):
      reports.check_writable(os.path.join(workdir, folder), f"the run's {folder}/ folder")
  summary = loop.train_and_evaluate(config, workdir)
  metric, best = summary['metric'], summary['best'].get(summary['metric'])
  best = (
    f'best {metric} {best:.4g} at step {summary["best_step"]} ({workdir}/best)'
    if best is not None
    else 'no validation result'
  )
  print(
    f'Done: {summary["step"]} steps, {best}; curves in {workdir}/curves.png, metrics in '
    f'{workdir}/metrics.jsonl. Next: the same command with --mode eval --checkpoint best.'
  )
  return summary
