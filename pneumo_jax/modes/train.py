"""--mode train: `training.loop.train_and_evaluate`, and a closing line saying where results are."""

from typing import Any

import ml_collections

from pneumo_jax.training import loop


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or finds finished) the run in WORKDIR; prints where its results are."""
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
