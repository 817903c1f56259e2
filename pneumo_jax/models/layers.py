"""The batch norm both backbones share.

A backbone builds it once, as a factory (`batch_norm_factory`: its epsilon, scale and variable
names with the model's settings), and passes the factory down to its layers, as flax's own
examples pass `functools.partial(nn.BatchNorm, …)`. Where the backbones differ (TF-Slim's
InceptionV3 has no scale and epsilon 0.001; DenseNet-121 has a scale and Keras's epsilon) is an
argument of the factory.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pneumo_jax import scopes

# (name=…) → a BatchNorm: what a backbone hands its layers.
NormFactory = Callable[..., nn.Module]


class BatchNormNames(NamedTuple):
  """A batch norm's variable names: its parameters (scale, bias) and moving statistics."""

  scale: str
  bias: str
  mean: str
  var: str


SLIM_NAMES = BatchNormNames('gamma', 'beta', 'moving_mean', 'moving_variance')
FLAX_NAMES = BatchNormNames('scale', 'bias', 'mean', 'var')


class BatchNorm(nn.Module):
  """Batch norm over [B, H, W, C] that uses batch statistics only where training is asked for.

  With `train`, it normalises with the batch's statistics and updates its moving averages, unless
  `batch_norm_train` is given and the path of its bias matches none of those regexes
  (`pneumo_jax.scopes`): a frozen layer then runs in inference mode and its statistics stay
  untouched. Statistics are float32 whatever `dtype`; the moving variance takes the unbiased
  (n/(n-1)) batch variance while normalisation uses the biased one, as TF's fused kernel and
  torchvision both do. `activation`, if set, is applied to the output inside this module.
  """

  epsilon: float
  use_scale: bool
  names: BatchNormNames
  batch_norm_decay: float
  batch_norm_train: Sequence[str] | None = None
  dtype: Any = jnp.float32
  activation: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features, names = x.shape[-1], self.names
    shape = (features,)
    if self.use_scale:
      scale = self.param(names.scale, nn.initializers.ones, shape, jnp.float32)
    bias = self.param(names.bias, nn.initializers.zeros, shape, jnp.float32)
    moving_mean = self.variable('batch_stats', names.mean, lambda: jnp.zeros(shape, jnp.float32))
    moving_var = self.variable('batch_stats', names.var, lambda: jnp.ones(shape, jnp.float32))
    use_batch_stats = train and (
      self.batch_norm_train is None
      or scopes.matches(self.batch_norm_train, '/'.join(self.path) + '/' + names.bias)
    )
    x32 = x.astype(jnp.float32)
    if use_batch_stats:
      mean = jnp.mean(x32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        n = x.shape[0] * x.shape[1] * x.shape[2]
        unbiased = var * (n / max(n - 1, 1))
        decay = self.batch_norm_decay
        moving_mean.value = decay * moving_mean.value + (1 - decay) * mean
        moving_var.value = decay * moving_var.value + (1 - decay) * unbiased
    else:
      mean, var = moving_mean.value, moving_var.value
    inv = jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      inv = scale * inv
    y = ((x32 - mean) * inv + bias).astype(self.dtype)
    return y if self.activation is None else self.activation(y)


def batch_norm_factory(
  model: nn.Module, *, epsilon: float, use_scale: bool, names: BatchNormNames
) -> NormFactory:
  """The BatchNorm factory a backbone passes down: its own epsilon, scale and variable names,
  with the model's `batch_norm_decay`, `batch_norm_train`, `dtype` and `activation`."""
  return functools.partial(
    BatchNorm,
    epsilon=epsilon,
    use_scale=use_scale,
    names=names,
    batch_norm_decay=model.batch_norm_decay,
    batch_norm_train=model.batch_norm_train,
    dtype=model.dtype,
    activation=model.activation,
  )
