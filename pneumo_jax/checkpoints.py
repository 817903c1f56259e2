"""Orbax checkpoints: the training state and data iterator, initialisation from pretrained weights.

Layout under WORKDIR: `checkpoints/<step>/{state,data}` (the last `keep_checkpoints`) and
`best/<step>/state` (the best by `config.best_metric`). `state` holds step, params, batch_stats,
opt_state and, with EMA on, ema_params, all keyed by the model's TF-Slim scope names.
"""

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from pneumo_jax import scopes

LATEST_DIR = 'checkpoints'
BEST_DIR = 'best'
LABELS_FILE = 'labels.txt'  # The class names, one a line, in output order.


def save_label_names(workdir: str, names: list[str]) -> None:
  """Keeps the class names with the run, so predict/explain need only the workdir."""
  with open(os.path.join(workdir, LABELS_FILE), 'w') as f:
    f.write(''.join(f'{n}\n' for n in names))


def load_label_names(workdir: str) -> list[str] | None:
  path = os.path.join(workdir, LABELS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().splitlines()


def manager(workdir: str, subdir: str = LATEST_DIR, keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, subdir)),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any],
         data_iterator: Any = None) -> None:
  """Saves `state` (and the grain iterator's position, when given) as checkpoint `step`."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  mngr.save(step, args=ocp.args.Composite(**items))


def restore(mngr: ocp.CheckpointManager, step: int, target: dict[str, Any],
            data_iterator: Any = None) -> dict[str, Any]:
  """Restores checkpoint `step` into the shapes/shardings of `target`; rewinds the iterator."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  items = {'state': ocp.args.StandardRestore(abstract)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  return mngr.restore(step, args=ocp.args.Composite(**items))['state']


def load_for_inference(workdir: str, checkpoint: str = 'latest',
                       use_ema: bool = True) -> tuple[dict[str, Any], int]:
  """({'params', 'batch_stats'}, step) from WORKDIR; EMA weights when present and `use_ema`.

  Args:
    checkpoint: 'latest', 'best', or a step number.
  """
  subdir = BEST_DIR if checkpoint == 'best' else LATEST_DIR
  mngr = manager(workdir, subdir)
  if checkpoint in ('latest', 'best'):
    step = mngr.latest_step()
  elif checkpoint.isdigit():
    step = int(checkpoint)
  else:
    raise ValueError(f'--checkpoint={checkpoint!r}: use latest, best or a step number')
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(
        f'no checkpoint {checkpoint!r} in {mngr.directory} (have: {mngr.all_steps() or "none"}); '
        'train first, or pass --checkpoint with one of the steps listed')
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  params = state.get('ema_params') if use_ema else None
  return {'params': params or state['params'], 'batch_stats': state['batch_stats']}, step


def _read_orbax(path: str) -> dict[str, Any]:
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def _convert(path: str, workdir: str) -> str:
  """Converts a raw TF-Slim `.ckpt` or Keras `.h5` once; returns the cached orbax directory."""
  out = os.path.join(workdir, 'converted', os.path.basename(path.rstrip('/')) + '_orbax')
  if not os.path.isdir(out):
    from converters import common  # TensorFlow/h5py only when converting.
    if path.endswith('.h5'):
      from converters import keras_to_orbax as conv
    else:
      from converters import slim_to_orbax as conv
    common.save_variables(conv.convert(path), out)
  logging.warning('Converted %s; the orbax copy is cached at %s (pass it as init_checkpoint '
                  'next time).', path, out)
  return out


def _is_raw(path: str) -> bool:
  return (path.endswith('.h5') or path.endswith('.ckpt') or os.path.exists(path + '.index')
          or (os.path.isfile(path) and not os.path.isdir(path)))


def load_init(init_checkpoint: str, variables: dict[str, Any], exclude_scopes: str,
              ignore_missing_vars: bool, workdir: str) -> dict[str, Any]:
  """Overwrites `variables` with a pretrained checkpoint, except under `exclude_scopes`.

  Every variable outside the excluded scopes must be in the checkpoint with the same shape, and
  every checkpoint variable outside them must exist in the model (`ignore_missing_vars` relaxes
  the first, as slim's flag does); all offenders are listed in one error.
  """
  path = os.path.expanduser(init_checkpoint)
  if not os.path.exists(path) and not os.path.exists(path + '.index'):
    raise FileNotFoundError(
        f'config.init_checkpoint={init_checkpoint!r} does not exist; give an orbax directory '
        '(converters/), a TF-Slim .ckpt or a Keras .h5')
  if _is_raw(path):
    path = _convert(path, workdir)
  loaded = _read_orbax(path)
  problems = []
  out = {}
  for collection in ('params', 'batch_stats'):
    want = scopes.flatten(variables[collection])
    have = scopes.flatten(loaded.get(collection, {}))
    merged = {}
    for k, v in want.items():
      name = f'{collection}/{k}'
      if scopes.matches(exclude_scopes, k):
        merged[k] = v
      elif k not in have:
        if not ignore_missing_vars:
          problems.append(f'missing in checkpoint: {name} {tuple(v.shape)}')
        merged[k] = v
      elif tuple(have[k].shape) != tuple(v.shape):
        problems.append(f'shape mismatch: {name} model {tuple(v.shape)} vs checkpoint '
                        f'{tuple(have[k].shape)}')
      else:
        merged[k] = np.asarray(have[k], dtype=v.dtype)
    problems += [f'not in model: {collection}/{k} {tuple(have[k].shape)}'
                 for k in have if k not in want and not scopes.matches(exclude_scopes, k)]
    out[collection] = scopes.unflatten(merged)
  if problems:
    raise ValueError(
        f'config.init_checkpoint={init_checkpoint!r} does not fit the model outside '
        f'config.exclude_scopes={exclude_scopes!r}:\n  ' + '\n  '.join(problems) +
        '\nAdd the offending scopes to config.exclude_scopes (e.g. Logits,AuxLogits for a new '
        'number of classes) or fix config.model.')
  return out
