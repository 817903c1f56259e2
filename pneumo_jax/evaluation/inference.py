"""Batched, jitted, data-parallel inference shared by eval, predict and the training loop."""

import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from pneumo_jax import sharding
from pneumo_jax.errors import DatasetError


@functools.cache
def make_probs_fn(model: nn.Module, mesh: Mesh) -> Callable[[Any, jax.Array], jax.Array]:
  """jit(variables, images) → softmax probabilities, in float32, split over the mesh.

  Cached per (model, mesh), so evaluating every N training steps compiles once.
  """

  def probs(variables, images):
    logits, _ = model.apply(variables, images, train=False)
    return jax.nn.softmax(logits.astype(np.float32), axis=-1)

  return jax.jit(
    probs,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def predict(
  model: nn.Module,
  variables: Any,
  batches: Iterable[dict[str, np.ndarray]],
  mesh: Mesh | None = None,
) -> dict[str, np.ndarray]:
  """Runs the model over padded batches, dropping padding rows (`mask` False).

  Returns {'probs': [N, C]} plus every other per-example field the batches carry
  (e.g. 'label', 'index'), concatenated in order.
  """
  mesh = mesh or sharding.make_mesh()
  fn = make_probs_fn(model, mesh)
  variables = sharding.replicate(variables, mesh)
  out: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    keep = np.asarray(batch.get('mask', np.ones(len(batch['image']), bool)), bool)
    images = sharding.shard_batch({'image': batch['image']}, mesh)['image']
    out.setdefault('probs', []).append(np.asarray(jax.device_get(fn(variables, images)))[keep])
    for k, v in batch.items():
      if k not in ('image', 'mask'):
        out.setdefault(k, []).append(np.asarray(v)[keep])
  if not out:
    raise DatasetError('predict() got no batches: the split or input list is empty')
  return {k: np.concatenate(v) for k, v in out.items()}
