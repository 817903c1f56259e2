"""The whole config checked at start-up, before any dataset build or compile.

Each rule names the field and the values it accepts. Where a later stage already knows what it
accepts (optimizer and schedule names, phases, batch-norm rules, split and grey window settings,
metrics), the check asks that stage on the config instead of keeping a second list.
"""

import ml_collections
import numpy as np

from pneumo_jax import heads, models, scopes
from pneumo_jax.data import folder_builder, pipeline, sources
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import metrics, operating_points
from pneumo_jax.training import optim, phases

_DTYPES = ('float32', 'bfloat16', 'float16')


def check(config: ml_collections.ConfigDict, devices: int | None = None) -> None:
  """Raises ConfigError (or DatasetError, for split settings) at the first field that cannot
  work. With `devices` (jax.device_count(); a sweep's parent passes None, as it must not claim
  the accelerator), batch sizes are checked against them too."""
  backbone = models.backbone_of(config)
  size = config.input.image_size
  if size < backbone.min_size:
    raise ConfigError(
      f"input.image_size={size} is below {backbone.name}'s minimum "
      f'{backbone.min_size} (it was trained at {backbone.default_size})'
    )
  stored = config.dataset.stored_size
  if stored is not None and stored < size:
    raise ConfigError(
      f'dataset.stored_size={stored} is below input.image_size={size}: the net would see '
      'upsampled images; set dataset.stored_size >= input.image_size, or None to derive it'
    )
  for field in ('batch_size', 'eval_batch_size'):
    value = config.input[field]
    if value < 1:
      raise ConfigError(f'input.{field}={value} must be at least 1')
  if devices:
    check_devices(config, devices)
  fraction = config.input.central_crop_fraction
  if fraction is not None and not 0.0 < fraction <= 1.0:
    raise ConfigError(
      f'input.central_crop_fraction={fraction} must be in (0, 1], or None to '
      'follow the training view'
    )
  workers = config.input.num_workers
  if workers != 'auto' and not (isinstance(workers, int) and workers >= 0):
    raise ConfigError(
      f"input.num_workers={workers!r} must be 'auto', 0 (read in the main process) or more"
    )
  if config.dataset.full_resolution and config.dataset.stored_size is not None:
    raise ConfigError(
      f'dataset.stored_size={config.dataset.stored_size} has no effect with '
      'dataset.full_resolution=True (records keep their size and are fitted to the default '
      'side when read): unset one of them'
    )
  task = sources.task_of(config.dataset)
  if heads.get(config.model.head).multilabel != (task == 'multilabel'):
    raise ConfigError(
      f'model.head={config.model.head!r} does not fit dataset.task={task!r}: findings '
      '(multilabel) train a sigmoid head, single-label classes softmax or ordinal; unset '
      'model.head to follow dataset.task'
    )
  if task == 'multilabel' and config.best_metric == 'kappa':
    raise ConfigError(
      "best_metric='kappa' is undefined with dataset.task='multilabel' (findings are not "
      'grades): use auc_macro (the default for findings) or one of '
      f'{sorted(set(metrics.HIGHER_IS_BETTER) - {"kappa"})}'
    )
  pipeline.check_class_balanced(config.input, task)
  if config.model.dtype not in _DTYPES:
    raise ConfigError(f'model.dtype={config.model.dtype!r}: use one of {list(_DTYPES)}')
  if config.best_metric not in metrics.HIGHER_IS_BETTER:
    raise ConfigError(
      f'best_metric={config.best_metric!r}: use one of {sorted(metrics.HIGHER_IS_BETTER)}'
    )
  operating_points.decision_point(config)
  scopes.parse(config.exclude_scopes)
  folder_builder.check_settings(config.dataset)
  phases.class_weights(config, np.arange(2))  # Checks the field only.
  for phase in phases.resolve_phases(config):
    where = f' (phase {phase.name!r})' if config.phases else ''
    if not scopes.parse(phase.cfg.trainable_scopes):
      raise ConfigError(
        f'trainable_scopes{where} is empty: nothing would train; give regexes '
        f"such as {backbone.head_scopes!r} (the head) or '.*' (everything)"
      )
    phases.batch_norm_train(phase.cfg)
    schedule = optim.make_schedule(phase.cfg.schedule, phase.end - phase.start)
    optim.make_optimizer(phase.cfg.optimizer, schedule, {}, backbone.weight_decay)


def check_devices(config: ml_collections.ConfigDict, devices: int) -> None:
  """The part of `check` that needs the device count, for callers that checked the rest before
  JAX could claim the accelerator."""
  if config.input.batch_size % devices:
    raise ConfigError(
      f'input.batch_size={config.input.batch_size} must be a multiple of the '
      f'{devices} devices the batch is split over'
    )
