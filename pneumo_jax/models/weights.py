"""What every backbone's weight loader shares: the name/shape check and the orbax writer.

A loader builds a flat dict {'params/<path>': array, 'batch_stats/<path>': array}, checks it
against the model in one go (so a user sees every problem at once, not the first), and the result
is written as an orbax checkpoint that `ocp.StandardCheckpointer().restore(dir)` reads back
(`converters/`, and the cache of raw files given as `init_checkpoint`).
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pneumo_jax import atomic, scopes
from pneumo_jax.errors import NotFoundError, WeightsError


def model_shapes(model: nn.Module, image_size: int) -> dict[str, tuple[int, ...]]:
  """The model's variables at `image_size` as {'params/…' or 'batch_stats/…': shape}.

  Computed abstractly (`jax.eval_shape`), so nothing is initialised or compiled.
  """
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return {k: tuple(v.shape) for k, v in scopes.flatten(variables).items()}


def check_names_and_shapes(
  arrays: Mapping[str, Any], expected: Mapping[str, Sequence[int]], source: str
) -> None:
  """Raises one ValueError naming every unknown, missing and mis-shaped variable.

  Args:
    arrays: converted values, keyed like `model_shapes` ('params/Conv2d_1a_3x3/weights').
    expected: `model_shapes(...)` of the model they are meant for.
    source: the file they came from, quoted in the message.
  """
  unknown = sorted(set(arrays) - set(expected))
  missing = sorted(set(expected) - set(arrays))
  misshaped = sorted(
    f'{k}: {tuple(np.shape(arrays[k]))} in the file, model expects {tuple(expected[k])}'
    for k in set(arrays) & set(expected)
    if tuple(np.shape(arrays[k])) != tuple(expected[k])
  )
  if not (unknown or missing or misshaped):
    return
  lines = [f'{source} does not match the model:']
  for title, names in (
    ('unknown (not in the model)', unknown),
    ('missing (in the model, not in the file)', missing),
    ('wrong shape', misshaped),
  ):
    if names:
      lines.append(f'  {len(names)} {title}:')
      lines.extend(f'    {n}' for n in names)
  raise WeightsError('\n'.join(lines))


def save_variables(variables: Mapping[str, Any], out_dir: str, *, overwrite: bool = False) -> None:
  """Writes {'params': …, 'batch_stats': …} as an orbax checkpoint directory `out_dir`.

  Written through `atomic.atomic_folder`: an interrupted run never leaves a half-written
  `out_dir` (nor destroys the one it replaces).

  Raises:
    FileExistsError: `out_dir` exists and is not empty, and `overwrite` is False.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir} exists and is not empty; pass overwrite=True to replace it.')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f'{out_dir} exists and is not a directory.')
  with atomic.atomic_folder(out_dir) as written, ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(written, dict(variables), force=True)  # `written` is new and empty.


def hdf5_shapes(path: str) -> set[tuple[int, ...]] | None:
  """The shapes of every array in an HDF5 file (Keras weights), to tell architectures apart
  without loading them; None when `path` is not an HDF5 file."""
  try:
    import h5py
  except ImportError as e:
    raise WeightsError(f'reading {path} needs h5py: pip install "pneumo_jax[convert]"') from e
  if not (os.path.isfile(path) and h5py.is_hdf5(path)):
    return None
  shapes: set[tuple[int, ...]] = set()
  with h5py.File(path, 'r') as f:
    f.visititems(lambda _, obj: shapes.add(obj.shape) if isinstance(obj, h5py.Dataset) else None)
  return shapes


def require_file(path: str, formats: str) -> None:
  """Raises NotFoundError naming `path` and the `formats` a loader reads, if it is no file."""
  if not os.path.isfile(path):
    raise NotFoundError(f'{path} does not exist; give {formats}.')


def is_hdf5(path: str) -> bool:
  """HDF5's signature at offset 0 (Keras writes no user block); needs no h5py."""
  with open(path, 'rb') as f:
    return f.read(8) == b'\x89HDF\r\n\x1a\n'
