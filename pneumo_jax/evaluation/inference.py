"""Batched, jitted, data-parallel inference shared by eval, predict and the training loop."""

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pneumo_jax import heads, sharding
from pneumo_jax.errors import DatasetError
from pneumo_jax.models import taps

# Batch fields the model reads; the others ride along per example.
MODEL_INPUTS = ('image', 'box', 'flip', 'colour', 'features')


@functools.cache
def make_probs_fn(
  model: nn.Module, mesh: Mesh, image_size: int, feature_taps: tuple[tuple[str, str], ...] = ()
) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
  """jit(variables, inputs) → class probabilities (the model's head's), in float32, split over
  the mesh.

  `inputs` holds uint8 images and their views (augmented on the device), or cached 'features'
  of the backbone's `feature_taps` (see models.taps). Cached per argument, so evaluating every N
  training steps compiles once.
  """

  def probs(variables, inputs):
    with taps.substitute(inputs.get('features'), dict(feature_taps)):
      logits, _ = model.apply(variables, taps.inputs(inputs, image_size), train=False)
    return heads.get(model.head).probs(logits.astype(np.float32))

  return jax.jit(
    probs,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def put_inputs(mesh: Mesh) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """A batch with its model inputs placed on the mesh (the rest stays on the host): the
  pipeline's `put`, so the transfer overlaps the previous batch's computation."""

  def put(batch: dict[str, Any]) -> dict[str, Any]:
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    return {**batch, **sharding.shard_batch(inputs, mesh)}

  return put


def predict(
  model: nn.Module,
  variables: Any,
  batches: Iterable[dict[str, Any]],
  mesh: Mesh | None = None,
  *,
  image_size: int,
  feature_taps: Mapping[str, str] | None = None,
  whole_batches: bool = False,
) -> dict[str, np.ndarray]:
  """Runs the model over padded batches, dropping padding rows (`mask` False).

  A batch holds the model's inputs (MODEL_INPUTS: uint8 images with their views, or cached
  'features' of `feature_taps`), as numpy arrays or already on the mesh, and per-example fields
  ('mask', 'label', 'index', …): this process's rows of each global batch
  (pipeline.eval_batches), or, with `whole_batches`, every process's (a list of files each
  process reads whole; each then feeds the model its own rows). Returns {'probs': [N, C]} plus
  every per-example field but 'mask', of every process's rows, in global batch order, the same
  on every process.
  """
  mesh = mesh or sharding.make_mesh()
  fn = make_probs_fn(model, mesh, image_size, tuple(sorted((feature_taps or {}).items())))
  variables = sharding.replicate(variables, mesh)
  probs, fields = [], {}
  for batch in batches:
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if whole_batches:
      inputs = jax.tree.map(sharding.own_rows, inputs)
    if not all(isinstance(v, jax.Array) for v in jax.tree.leaves(inputs)):
      inputs = put_inputs(mesh)(inputs)
    probs.append(np.asarray(jax.device_get(fn(variables, inputs))))  # Replicated: global rows.
    for k, v in batch.items():
      if k not in MODEL_INPUTS:
        fields.setdefault(k, []).append(np.asarray(v))
  if not probs:
    raise DatasetError('predict() got no batches: the split or input list is empty')
  out = {k: np.concatenate(v) for k, v in fields.items()}
  if not whole_batches and jax.process_count() > 1:
    out = {k: _gather_rows(v, len(probs)) for k, v in out.items()}
  keep = out.pop('mask').astype(bool) if 'mask' in out else slice(None)
  return {'probs': np.concatenate(probs)[keep], **{k: v[keep] for k, v in out.items()}}


def _gather_rows(local: np.ndarray, num_batches: int) -> np.ndarray:
  """Every process's rows of each batch ([batches × local rows, ...] here) → [batches × global
  rows, ...], in the order the global batches hold them (process 0's rows first)."""
  every = multihost_utils.process_allgather(local)  # [processes, batches × local rows, ...]
  every = every.reshape(every.shape[0], num_batches, -1, *local.shape[1:])
  return np.swapaxes(every, 0, 1).reshape(-1, *local.shape[1:])
