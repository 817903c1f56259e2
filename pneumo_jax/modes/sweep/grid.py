"""The list of trials: grid axes (`product`, `zip`, `folds`), trial names, and `expand`, which
loads a sweep config and checks every trial's overrides against it before anything runs.
"""

import builtins
import copy
import hashlib
import importlib.util
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import ml_collections

from pneumo_jax.errors import ConfigError, NotFoundError
from pneumo_jax.evaluation import metrics

Overrides = dict[str, Any]
# An axis: a list of override dicts, or {path: values, ...} standing for one axis per path.
Axis = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]

FOLD_KEY = 'dataset.fold'
_NUM_FOLDS_KEY = 'dataset.num_folds'
_MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]')  # Characters a trial's directory name replaces.


# ---------------------------------------------------------------- axes


def _merge(dicts: Sequence[Mapping[str, Any]]) -> Overrides:
  out: Overrides = {}
  for d in dicts:
    for k, v in d.items():
      if k in out:
        raise ConfigError(f'sweep axes both set {k!r}: combine its values in one axis instead')
      out[k] = v
  return out


def _as_axes(axis: Axis, combine) -> list[Overrides]:
  """A list of dicts passes through; {path: values} becomes its per-path axes, combined."""
  if isinstance(axis, Mapping):
    for k, values in axis.items():
      if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f'sweep axis {k!r} needs a list of values, got {values!r}')
    return combine(*([{k: v} for v in values] for k, values in axis.items()))
  if isinstance(axis, str) or not all(isinstance(d, Mapping) for d in axis):
    raise ConfigError(
      f'a sweep axis is a list of override dicts or a {{path: values}} dict, got {axis!r}'
    )
  return [dict(d) for d in axis]


def product(*axes: Axis) -> list[Overrides]:
  """Every combination of the axes' entries; the first axis varies slowest.

  `product({'schedule.learning_rate': [0.1, 0.01]}, folds(5))` gives 10 trials, each learning
  rate's five folds together. A dict with several paths is their own product, in order.
  """
  lists = [_as_axes(a, product) for a in axes]
  return [_merge(combo) for combo in itertools.product(*lists)]


def zip(*axes: Axis) -> list[Overrides]:
  """The axes' entries side by side: the i-th trial merges every axis's i-th entry.

  `zip({'schedule.name': ['fixed', 'warmup_cosine'], 'schedule.warmup_steps': [0, 500]})` gives
  two trials. All axes must have the same length.
  """
  lists = [_as_axes(a, zip) for a in axes]
  lengths = {len(x) for x in lists}
  if len(lengths) > 1:
    raise ConfigError(f'sweep.zip needs axes of one length, got lengths {[len(x) for x in lists]}')
  return [_merge(combo) for combo in builtins.zip(*lists, strict=True)]


def folds(k: int) -> list[Overrides]:
  """k-fold cross-validation: one trial per validation fold."""
  if not isinstance(k, int) or k < 2:
    raise ConfigError(f'sweep.folds needs an integer k >= 2, got {k!r}')
  return [{_NUM_FOLDS_KEY: k, FOLD_KEY: i} for i in range(k)]


# ---------------------------------------------------------------- naming trial directories


def canonical(overrides: Mapping[str, Any]) -> str:
  """The same text for the same overrides, whatever their order."""
  return json.dumps(sorted(overrides.items()), default=repr)


def _digest(overrides: Mapping[str, Any]) -> str:
  return hashlib.sha1(canonical(overrides).encode()).hexdigest()[:8]


def short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each dotted path → its shortest tail of components that no other path ends with."""
  parts = {k: k.split('.') for k in keys}
  out = {}
  for k, p in parts.items():
    others = [q for j, q in parts.items() if j != k]
    n = next((n for n in range(1, len(p)) if all(q[-n:] != p[-n:] for q in others)), len(p))
    out[k] = '.'.join(p[-n:])
  return out


def readable(overrides: Mapping[str, Any], short: Mapping[str, str]) -> tuple[str, bool]:
  """'key=value,...' by short key, with unsafe characters replaced; and whether any were."""
  parts = [f'{short[k]}={_UNSAFE.sub("_", str(v))}' for k, v in overrides.items()]
  return ','.join(parts), any(_UNSAFE.search(str(v)) for v in overrides.values())


def trial_names(
  trials: Sequence[Mapping[str, Any]], common: Mapping[str, Any] | None = None
) -> list[str]:
  """Readable, file-system-safe, unique names, e.g. 'learning_rate=0.01,fold=0'.

  A name lists its trial's overrides by the shortest unambiguous key, so the same sweep always
  gets the same names. The command line's overrides (`common`, shared by every trial) add one
  digest of them to every name, so a changed command never reuses another's directories; a value
  with characters a file name cannot keep, or a name too long, ends in a digest of all its
  overrides instead.
  """
  keys = list(dict.fromkeys(k for t in trials for k in t))
  short = short_keys(keys)
  common = dict(common or {})
  names, seen = [], {}
  for t in trials:
    name, lossy = readable({k: t[k] for k in keys if k in t}, short)
    name = name or 'base'
    if lossy or len(name) > _MAX_NAME_CHARS:
      name = f'{name[:_MAX_NAME_CHARS]},{_digest({**common, **t})}'
    elif common:
      name = f'{name},{_digest(common)}'
    if name in seen:
      raise ConfigError(
        f'sweep trials {seen[name]} and {dict(t)} both get the name {name!r}; '
        'make their overrides differ'
      )
    seen[name] = dict(t)
    names.append(name)
  return names


# ---------------------------------------------------------------- loading and checking a sweep


def _load_module(config_file: str) -> ModuleType:
  path = config_file.split(':', 1)[0]
  if not os.path.isfile(path):
    raise NotFoundError(f'sweep config {path!r} does not exist')
  spec = importlib.util.spec_from_file_location('pneumo_jax_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def is_sweep(config_file: str) -> bool:
  """Whether the config file (may end in ':arg') defines get_sweep(): main.py's dispatch."""
  return hasattr(_load_module(config_file), 'get_sweep')


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str
) -> None:
  """Sets dotted-path `overrides` in `config`; an error names `where` they came from."""
  try:
    config.update_from_flattened_dict(dict(overrides))
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'overrides {dict(overrides)} from {where} do not fit the config: {e}') from e


def expand(
  config_file: str,
  overrides: Mapping[str, Any] | None = None,
) -> tuple[ml_collections.ConfigDict, list[Overrides]]:
  """The sweep's base config (with the command line's overrides) and its checked trials.

  Every trial's overrides are applied to a copy of the locked config here, so a misspelt path or
  a wrongly typed value fails before any process starts.
  """
  overrides = dict(overrides or {})
  module = _load_module(config_file)
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'{config_file} defines no get_sweep(): it is not a sweep config')
  config = module.get_config(*config_file.split(':', 1)[1:])  # ':arg' as config_flags passes it.
  config.lock()
  apply_overrides(config, overrides, 'the command line')
  if config.best_metric not in metrics.HIGHER_IS_BETTER:
    raise ConfigError(
      f'best_metric={config.best_metric!r} is not one of {sorted(metrics.HIGHER_IS_BETTER)}'
    )
  trials = module.get_sweep()
  if not trials or not all(isinstance(t, Mapping) for t in trials):
    raise ConfigError(f'{config_file}: get_sweep() must return a non-empty list of override dicts')
  for t in trials:
    clash = sorted(set(t) & set(overrides))
    if clash:
      raise ConfigError(f'{clash} are swept by {config_file}; drop them from the command line')
    if 'best_metric' in t:
      raise ConfigError(f'{config_file}: trials must share best_metric to be ranked together')
    apply_overrides(copy.deepcopy(config), t, f'{config_file} get_sweep()')
  if len({canonical(t) for t in trials}) < len(trials):
    raise ConfigError(f'{config_file}: get_sweep() lists the same trial twice')
  return config, [dict(t) for t in trials]
