"""The network as a `jax.export` artefact: predict's device half with the weights inside.

uint8 [N, S, S, 3] images (N symbolic) → float32 [N, C] probabilities, for CPU and CUDA: the
evaluation view (central crop, resize, scale), the network and its head's probabilities (a
multi-label run's: a sigmoid per finding, [N, F]), as `--mode predict` computes them from
`common.example`'s images. Calling it needs only jax.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from pneumo_jax import heads, sharding
from pneumo_jax.data import preprocess, stored_side
from pneumo_jax.evaluation import inference

PLATFORMS = ('cpu', 'cuda')  # What a clinic runs on; the artefacts pick theirs when called.


def serving_fn(
  config: ml_collections.ConfigDict,
  model: Any,
  variables: Any,
  temperature: float | Sequence[float] = 1.0,
) -> Callable[[jax.Array], jax.Array]:
  """uint8 [N, S, S, 3] images → float32 [N, C] probabilities under `variables`: the evaluation
  view and inference's jitted network, on a one-device mesh (an export split over 8 GPUs would
  need 8), with the logits divided by `temperature` (the run's calibration, as predict applies
  it: evaluation.calibration.scaled; 1 leaves them as they are; findings: one per finding, each
  dividing its sigmoid's logit)."""
  side = stored_side(config)
  view = preprocess.central_view(side, side, preprocess.eval_central_fraction(config.input))
  mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
  probs = inference.make_probs_fn(model, mesh, config.input.image_size)
  multilabel = heads.get(config.model.head).multilabel

  def serve(images: jax.Array) -> jax.Array:
    n = images.shape[0]
    views = {k: jnp.broadcast_to(v, (n, *v.shape)) for k, v in view.items()}
    p = probs(variables, {'image': images, **views})
    if np.all(np.asarray(temperature) == 1.0):
      return p
    finfo = jnp.finfo(p.dtype)
    if multilabel:
      q = jnp.clip(p, finfo.tiny, 1 - finfo.epsneg)
      logits = jnp.log(q) - jnp.log1p(-q)  # The finding's logit.
      return jax.nn.sigmoid(logits / jnp.asarray(temperature, p.dtype))
    logits = jnp.log(jnp.maximum(p, finfo.tiny))  # Up to a constant per row.
    return jax.nn.softmax(logits / temperature, axis=-1)

  return serve


def serialize(serve: Callable[[jax.Array], jax.Array], side: int) -> bytes:
  """`serve` exported for any batch of `side` × `side` RGB images, as `jax.export` bytes."""
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'n, {side}, {side}, 3'), jnp.uint8)
  return jax.export.export(jax.jit(serve), platforms=PLATFORMS)(spec).serialize()
