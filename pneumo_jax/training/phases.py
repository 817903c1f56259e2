"""The training rules a config sets: its phases, which batch norms learn in each, which
variables no phase changes, and the loss's class weights.

A run is one phase (the top-level fields) or several named ones in `config.phases`, each
overriding a few fields. The loop, validation and the model card read them from here.
"""

import collections
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from pneumo_jax import scopes
from pneumo_jax.errors import ConfigError

# The fields a phase may override; the rest stay the run's.
PER_PHASE_FIELDS = (
  'num_steps',
  'trainable_scopes',
  'batch_norm',
  'schedule',
  'optimizer',
  'feature_cache',
)


class Phase(NamedTuple):
  """Steps (start, end] of the run, trained with `cfg` (the config with the phase's overrides)."""

  name: str
  start: int
  end: int
  cfg: ml_collections.ConfigDict


def resolve_phases(config: ml_collections.ConfigDict) -> list[Phase]:
  """config.phases, in config.phase_order → Phases; none → one phase from the top-level fields."""
  if not config.phases:
    if config.get('phase_order'):
      raise ConfigError(
        f'phase_order={config.phase_order!r} names phases, but config.phases is empty'
      )
    return [Phase('main', 0, config.num_steps, config)]
  phases, start = [], 0
  for name in _phase_names(config):
    overrides = config.phases[name]
    if 'num_steps' not in overrides or overrides.num_steps <= 0:
      raise ConfigError(f'config.phases.{name}.num_steps must be a positive number of steps')
    cfg = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
      if key not in PER_PHASE_FIELDS:
        raise ConfigError(
          f'config.phases.{name}.{key} is not a per-phase field; use num_steps, '
          'trainable_scopes, batch_norm, schedule, optimizer or feature_cache'
        )
      if isinstance(value, ml_collections.ConfigDict):
        cfg[key].update(value)
      else:
        cfg[key] = value
    phases.append(Phase(name, start, start + overrides.num_steps, cfg))
    start += overrides.num_steps
  return phases


def _phase_names(config: ml_collections.ConfigDict) -> list[str]:
  """The phases' names in the order they run. ml_collections sorts a ConfigDict's keys (copies
  and config.json too), so the order the phases were written in is lost: with several phases,
  config.phase_order gives it."""
  names = list(config.phases.keys())
  order = [n.strip() for n in config.get('phase_order', '').split(',') if n.strip()]
  if not order and len(names) == 1:
    return names
  example = ','.join(names)
  if not order:
    raise ConfigError(
      f'config.phases has {len(names)} phases ({", ".join(names)}): set phase_order to their '
      f'names in the order they run, e.g. --config.phase_order={example} (ml_collections sorts '
      "a ConfigDict's keys, so the order they are written in is lost)"
    )
  if sorted(order) != sorted(names):
    raise ConfigError(
      f'phase_order={config.phase_order!r} must name each of config.phases ({", ".join(names)}) '
      f'once, in the order they run, e.g. {example!r}'
    )
  return order


def phase_at(phases: list[Phase], step: int) -> Phase:
  """The phase that trains step `step + 1` (the last phase once every step is done)."""
  return next((p for p in phases if step < p.end), phases[-1])


def batch_norm_train(cfg: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The model's `batch_norm_train` for a phase, from `batch_norm`:

  'trainable' (default, the Keras rule): BN learns only inside the trainable scopes;
  'frozen': every BN runs in inference mode (Keras's advice once a pretrained base is unfrozen);
  'all': every BN normalises with batch statistics, as the seed's slim run did.
  """
  rule = cfg.batch_norm
  if rule == 'trainable':
    return scopes.parse(cfg.trainable_scopes)
  if rule == 'frozen':
    return ()
  if rule == 'all':
    return None
  raise ConfigError(f"config.batch_norm={rule!r} is unknown; use 'trainable', 'frozen' or 'all'")


def frozen_paths(variables: dict[str, Any], phases: list[Phase]) -> dict[str, set[str]]:
  """{'params', 'batch_stats'} → paths of the leaves no phase changes: params outside every
  phase's trainable scopes, moving statistics of the batch norms no phase trains. Checkpoints
  leave them out; they are kept once, in WORKDIR/base."""
  trained = trained_paths(variables['params'], phases)
  rules = [batch_norm_train(p.cfg) for p in phases]
  params = scopes.flatten(variables['params'])
  by_layer = collections.defaultdict(list)  # Layer path → its parameters' paths.
  for k in params:
    by_layer[k.rpartition('/')[0]].append(k)

  def learns(path: str) -> bool:
    """A batch norm's statistics at `P/<stat>` move when its rule matches a parameter under P/
    (every backbone decides by its own BN parameters' paths, e.g. `P/beta` or `P/bias`)."""
    own = by_layer.get(path.rpartition('/')[0])
    return not own or any(r is None or any(scopes.matches(r, k) for k in own) for r in rules)

  return {
    'params': set(params) - trained,
    'batch_stats': {k for k in scopes.flatten(variables['batch_stats']) if not learns(k)},
  }


def trained_paths(params: dict[str, Any], phases: list[Phase]) -> set[str]:
  """Paths of the parameters some phase of `phases` trains."""
  return {
    k
    for p in phases
    for k, t in scopes.flatten(scopes.mask(params, p.cfg.trainable_scopes)).items()
    if t
  }


def class_weights(
  cfg: ml_collections.ConfigDict, train_labels: np.ndarray, *, num_classes: int = 0
) -> np.ndarray | None:
  """The loss's class weights from the train split's labels: '' → none; 'balanced' →
  n / (k · count_c), scikit-learn's rule, over the k classes of labels [N] ([K]: at least
  `num_classes`, so a class no train image has still gets one), or for labels [N, F] (1, 0 and
  -1 ignored) per finding as its own binary task over the n examples whose label is used
  ([F, 2]: the weight of a negative and of a positive)."""
  if not cfg.class_weighting:
    return None
  if cfg.class_weighting != 'balanced':
    raise ConfigError(f"config.class_weighting={cfg.class_weighting!r}: use '' or 'balanced'")
  if train_labels.ndim == 2:
    counts = np.stack([np.sum(train_labels == 0, 0), np.sum(train_labels == 1, 0)], axis=-1)
  else:
    counts = np.bincount(train_labels, minlength=num_classes)
  n = counts.sum(-1, keepdims=True)
  return n / (counts.shape[-1] * np.maximum(counts, 1))
