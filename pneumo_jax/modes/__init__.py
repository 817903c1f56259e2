"""The runnable modes, one module each, and `MODES`, the registry `pneumo_jax/__main__.py`
dispatches --mode through.

A mode module declares NAME (its --mode value), HELP (one line for --help), FLAGS (the shared
command-line flags its `run` takes, by keyword: 'inputs', 'checkpoint', 'split', …; the others are
refused with that mode), NEEDS_WORKDIR, and `run(config, workdir, **flags)`. A new mode is one
module and one entry in MODES. Inference modes restore through `common.restore` and batch through
`common.padded_batches`. `sweep` is no mode of its own: it runs many `train` runs, as trial
processes, when the config file defines get_sweep().
"""

from types import ModuleType

from pneumo_jax.modes import evaluate, explain, export, imagenet, predict, train

MODES: dict[str, ModuleType] = {
  m.NAME: m for m in (train, evaluate, predict, explain, export, imagenet)
}
