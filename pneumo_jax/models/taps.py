"""Cut points in a network: read a layer's output, or feed a stored one in its place.

A backbone names, per head scope, the parameter-free layer whose output is that head's whole input
(`Backbone.feature_taps`, e.g. InceptionV3's `Logits` → its average pool), and its blocks in order
(`Backbone.blocks`). When a phase trains only the layers above such outputs, the layers below
compute the same thing every time an image is seen in the same view, so a feature cache
(`pneumo_jax.training.feature_cache`) computes them once with `capture`, and the step then runs
the model under `substitute`: the tapped layers return the cached values, nothing reads the input
images, and XLA removes every layer below.
"""

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pneumo_jax.data import augment


def _matcher(taps: Mapping[str, str]):
  """(module) → the tap name whose regex its path matches fully, or None."""
  compiled = {name: re.compile(pattern) for name, pattern in taps.items()}

  def match(context: Any) -> str | None:
    if context.method_name != '__call__':
      return None
    path = '/'.join(context.module.path)
    return next((n for n, c in compiled.items() if c.fullmatch(path)), None)

  return match


def capture(
  model: nn.Module,
  variables: Any,
  images: jax.Array,
  taps: Mapping[str, str],
  names: Sequence[str],
  **apply_kwargs: Any,
) -> dict[str, jax.Array]:
  """The outputs of the tapped layers `names` for `images` (model.apply with `apply_kwargs`)."""
  match, out = _matcher({n: taps[n] for n in names}), {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    name = match(context)
    if name is not None:
      out[name] = y
    return y

  with nn.intercept_methods(record):
    model.apply(variables, images, **apply_kwargs)
  missing = set(names) - set(out)
  if missing:
    raise ValueError(f'no layer of {type(model).__name__} matches the taps {sorted(missing)}')
  return out


@contextlib.contextmanager
def substitute(features: Mapping[str, jax.Array] | None, taps: Mapping[str, str]) -> Iterator[None]:
  """Within: the tapped layers named in `features` return those values instead of computing.

  None: nothing is substituted (the uncached path), so callers need no branch.
  """
  if features is None:
    yield
    return
  match = _matcher({n: taps[n] for n in features})

  def replace(next_fun, args, kwargs, context):
    name = match(context)
    return next_fun(*args, **kwargs) if name is None else features[name]

  with nn.intercept_methods(replace):
    yield


def inputs(batch: Mapping[str, Any], image_size: int) -> jax.Array:
  """The float images a batch stands for: its uint8 images with their views applied
  (augment.from_batch), or, for a batch of cached features, zeros of the right shape: nothing
  reads them, so XLA drops them and the layers they feed."""
  if 'features' in batch:
    n = jax.tree.leaves(batch['features'])[0].shape[0]
    return jnp.zeros((n, image_size, image_size, 3), jnp.float32)
  return augment.from_batch(batch, image_size)
