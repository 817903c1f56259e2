"""Hyper-parameter sweeps and k-fold cross-validation: many trials of one config, one table.

A sweep is a config file that defines `get_sweep()` next to `get_config()`: a list of override
dicts keyed by dotted config paths (`{'schedule.learning_rate': 0.01}`), built with `product`,
`zip` and `folds`. `run` trains every trial as its own `python -m pneumo_jax --nosweep` process
(a crash or leaked memory stays in its trial; a multi-process run's joined processes run the
trials inside themselves instead), in a sub-workdir named after its overrides, and
ranks them in WORKDIR/results.{csv,md}. Running the same command again skips finished trials,
resumes interrupted ones from their checkpoints and retries failed ones, so a sweep survives
restarts.

grid.py builds and checks the list of trials, runner.py runs them, report.py ranks them and
writes the tables.
"""

from pneumo_jax.modes.sweep.grid import expand, folds, is_sweep, product, zip
from pneumo_jax.modes.sweep.report import rank
from pneumo_jax.modes.sweep.runner import run

__all__ = ['expand', 'folds', 'is_sweep', 'product', 'rank', 'run', 'zip']
