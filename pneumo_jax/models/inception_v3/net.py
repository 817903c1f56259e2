"""InceptionV3 in Flax Linen, variable-for-variable compatible with TF-Slim's `nets/inception_v3`.

Scope names, depths, paddings, batch-norm settings (no scale, epsilon 0.001, decay 0.9997, moving
variance updated with the unbiased batch variance as TF's fused kernel does) and the small-input
kernel reductions follow slim, so a converted slim checkpoint loads as is and the same regexes
address the same layers (`pneumo_jax.scopes`). Parameter paths drop slim's `InceptionV3/` prefix.

One extension: slim's aux head cannot run when Mixed_6e is smaller than its 5×5 pooling window
(inputs below 107 px), so here that window shrinks to fit, as slim already does for the head's
pool. Wherever slim itself runs, the two compute the same function.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pneumo_jax import heads
from pneumo_jax.errors import ConfigError
from pneumo_jax.models import layers
from pneumo_jax.models.layers import NormFactory

BN_EPSILON = 0.001
BN_DECAY = 0.9997
MIN_SIZE = 75  # The smallest input side the stem's VALID convolutions and pools accept.

# slim's conv2d default (variance_scaling_initializer(): He, fan-in, truncated normal).
_he_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


class ConvSpec(NamedTuple):
  """One slim `conv2d` + batch norm + activation; `depth` already scaled by the multiplier."""

  name: str
  depth: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: str = 'SAME'


class PoolSpec(NamedTuple):
  name: str
  kind: str  # 'max' | 'avg'
  window: tuple[int, int]
  stride: int
  padding: str


class MixedSpec(NamedTuple):
  name: str
  branches: tuple[tuple['Op', ...], ...]


# An op in a branch: a conv, a pool, or a pair of convs that run in parallel on the same input
# and are concatenated (Mixed_7b/7c's 1×3 / 3×1 forks).
Op = ConvSpec | PoolSpec | tuple[ConvSpec, ConvSpec]


def _architecture(depth: Callable[[int], int]) -> list[ConvSpec | PoolSpec | MixedSpec]:
  """slim's `inception_v3_base` as data: its endpoints in order, each named as in slim."""

  def conv(name, d, k, stride=1, padding='SAME'):
    return ConvSpec(name, depth(d), k, stride, padding)

  avg_3x3 = PoolSpec('AvgPool_0a_3x3', 'avg', (3, 3), 1, 'SAME')

  def mixed_5(b1_names, b3_depth):
    return (
      (conv('Conv2d_0a_1x1', 64, (1, 1)),),
      (conv(b1_names[0], 48, (1, 1)), conv(b1_names[1], 64, (5, 5))),
      (
        conv('Conv2d_0a_1x1', 64, (1, 1)),
        conv('Conv2d_0b_3x3', 96, (3, 3)),
        conv('Conv2d_0c_3x3', 96, (3, 3)),
      ),
      (avg_3x3, conv('Conv2d_0b_1x1', b3_depth, (1, 1))),
    )

  def mixed_6(c):
    return (
      (conv('Conv2d_0a_1x1', 192, (1, 1)),),
      (
        conv('Conv2d_0a_1x1', c, (1, 1)),
        conv('Conv2d_0b_1x7', c, (1, 7)),
        conv('Conv2d_0c_7x1', 192, (7, 1)),
      ),
      (
        conv('Conv2d_0a_1x1', c, (1, 1)),
        conv('Conv2d_0b_7x1', c, (7, 1)),
        conv('Conv2d_0c_1x7', c, (1, 7)),
        conv('Conv2d_0d_7x1', c, (7, 1)),
        conv('Conv2d_0e_1x7', 192, (1, 7)),
      ),
      (avg_3x3, conv('Conv2d_0b_1x1', 192, (1, 1))),
    )

  def mixed_7(b1_3x1_name):
    return (
      (conv('Conv2d_0a_1x1', 320, (1, 1)),),
      (
        conv('Conv2d_0a_1x1', 384, (1, 1)),
        (conv('Conv2d_0b_1x3', 384, (1, 3)), conv(b1_3x1_name, 384, (3, 1))),
      ),
      (
        conv('Conv2d_0a_1x1', 448, (1, 1)),
        conv('Conv2d_0b_3x3', 384, (3, 3)),
        (conv('Conv2d_0c_1x3', 384, (1, 3)), conv('Conv2d_0d_3x1', 384, (3, 1))),
      ),
      (avg_3x3, conv('Conv2d_0b_1x1', 192, (1, 1))),
    )

  max_1a = PoolSpec('MaxPool_1a_3x3', 'max', (3, 3), 2, 'VALID')
  return [
    conv('Conv2d_1a_3x3', 32, (3, 3), 2, 'VALID'),
    conv('Conv2d_2a_3x3', 32, (3, 3), 1, 'VALID'),
    conv('Conv2d_2b_3x3', 64, (3, 3), 1, 'SAME'),
    PoolSpec('MaxPool_3a_3x3', 'max', (3, 3), 2, 'VALID'),
    conv('Conv2d_3b_1x1', 80, (1, 1), 1, 'VALID'),
    conv('Conv2d_4a_3x3', 192, (3, 3), 1, 'VALID'),
    PoolSpec('MaxPool_5a_3x3', 'max', (3, 3), 2, 'VALID'),
    MixedSpec('Mixed_5b', mixed_5(('Conv2d_0a_1x1', 'Conv2d_0b_5x5'), 32)),
    MixedSpec('Mixed_5c', mixed_5(('Conv2d_0b_1x1', 'Conv_1_0c_5x5'), 64)),
    MixedSpec('Mixed_5d', mixed_5(('Conv2d_0a_1x1', 'Conv2d_0b_5x5'), 64)),
    MixedSpec(
      'Mixed_6a',
      (
        (conv('Conv2d_1a_1x1', 384, (3, 3), 2, 'VALID'),),
        (
          conv('Conv2d_0a_1x1', 64, (1, 1)),
          conv('Conv2d_0b_3x3', 96, (3, 3)),
          conv('Conv2d_1a_1x1', 96, (3, 3), 2, 'VALID'),
        ),
        (max_1a,),
      ),
    ),
    MixedSpec('Mixed_6b', mixed_6(128)),
    MixedSpec('Mixed_6c', mixed_6(160)),
    MixedSpec('Mixed_6d', mixed_6(160)),
    MixedSpec('Mixed_6e', mixed_6(192)),
    MixedSpec(
      'Mixed_7a',
      (
        (conv('Conv2d_0a_1x1', 192, (1, 1)), conv('Conv2d_1a_3x3', 320, (3, 3), 2, 'VALID')),
        (
          conv('Conv2d_0a_1x1', 192, (1, 1)),
          conv('Conv2d_0b_1x7', 192, (1, 7)),
          conv('Conv2d_0c_7x1', 192, (7, 1)),
          conv('Conv2d_1a_3x3', 192, (3, 3), 2, 'VALID'),
        ),
        (max_1a,),
      ),
    ),
    MixedSpec('Mixed_7b', mixed_7('Conv2d_0b_3x1')),
    MixedSpec('Mixed_7c', mixed_7('Conv2d_0c_3x1')),
  ]


# The body's top-level scopes in order, Conv2d_1a_3x3 … Mixed_7c (the names do not depend on depth).
BLOCKS = tuple(spec.name for spec in _architecture(lambda d: d))


def _reduced_kernel(x: jax.Array, kernel: tuple[int, int]) -> tuple[int, int]:
  """slim's `_reduced_kernel_size_for_small_input`: clip a window to the feature map."""
  return min(x.shape[1], kernel[0]), min(x.shape[2], kernel[1])


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: str, dtype: Any) -> jax.Array:
  """slim's conv2d without bias. A VALID window as large as the map (the aux head's 5×5 conv,
  a 1×1 conv on a 1×1 map) is computed as the matrix product it is: the same sums, whose
  backward pass XLA:CPU runs ~10× faster than a convolution's (the cached head-only step)."""
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if padding == 'VALID' and x.shape[1:3] == kernel.shape[:2]:
    n, out = x.shape[0], kernel.shape[-1]
    return (x.reshape(n, -1) @ kernel.reshape(-1, out)).reshape(n, 1, 1, out)
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(stride, stride),
    padding=padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


def _squeeze(x: jax.Array, scope: str) -> jax.Array:
  """slim's SpatialSqueeze, with a clear error where slim's reshape would fail."""
  if x.shape[1:3] != (1, 1):
    raise ConfigError(
      f'{scope} produced a {x.shape[1]}x{x.shape[2]} map instead of 1x1: the input image is '
      'larger than TF-Slim InceptionV3 supports (at most 346 px); use input.image_size <= 346.'
    )
  return x[:, 0, 0, :]


class ConvBN(nn.Module):
  """slim's conv2d under inception_v3_arg_scope: conv (no bias), then `norm` (the model's batch
  norm with its activation, scope `BatchNorm`)."""

  spec: ConvSpec
  norm: NormFactory
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = _he_init

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    s = self.spec
    kernel = self.param('weights', self.kernel_init, (*s.kernel, x.shape[-1], s.depth), jnp.float32)
    return self.norm(name='BatchNorm')(_conv(x, kernel, s.stride, s.padding, self.dtype), train)


class Conv(nn.Module):
  """slim's conv2d with a bias and no normaliser or activation (the logits layers)."""

  features: int
  kernel_init: Callable[..., jax.Array]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      'weights', self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param('biases', nn.initializers.zeros, (self.features,), jnp.float32)
    return _conv(x, kernel, 1, 'VALID', self.dtype) + bias.astype(self.dtype)


class Pool(nn.Module):
  """A parameter-free pooling layer, a module only so that it owns its slim scope name."""

  spec: PoolSpec

  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.spec
    strides = (s.stride, s.stride)
    if s.kind == 'max':
      return nn.max_pool(x, s.window, strides, s.padding)
    # TF's SAME average pooling divides by the number of valid (unpadded) inputs.
    return nn.avg_pool(x, s.window, strides, s.padding, count_include_pad=False)


def _conv_bn(
  spec: ConvSpec, norm: NormFactory, dtype: Any, x: jax.Array, train: bool, **kwargs: Any
) -> jax.Array:
  """A ConvBN submodule named after `spec` (called inside a compact method)."""
  return ConvBN(spec, norm, dtype, name=spec.name, **kwargs)(x, train)


class Branch(nn.Module):
  """One `Branch_<i>` of a Mixed block: its ops applied in sequence."""

  ops: tuple[Op, ...]
  norm: NormFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for op in self.ops:
      if isinstance(op, PoolSpec):
        x = Pool(op, name=op.name)(x)
      elif isinstance(op, ConvSpec):
        x = _conv_bn(op, self.norm, self.dtype, x, train)
      else:
        x = jnp.concatenate([_conv_bn(c, self.norm, self.dtype, x, train) for c in op], axis=-1)
    return x


class Mixed(nn.Module):
  """An Inception block: its branches see the same input and are concatenated on channels."""

  branches: tuple[tuple[Op, ...], ...]
  norm: NormFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return jnp.concatenate(
      [
        Branch(ops, self.norm, self.dtype, name=f'Branch_{i}')(x, train)
        for i, ops in enumerate(self.branches)
      ],
      axis=-1,
    )


class AuxLogits(nn.Module):
  """slim's auxiliary head on Mixed_6e; its conv is named after its (reduced) kernel size."""

  outputs: int
  depths: tuple[int, int]  # Conv2d_1b_1x1, Conv2d_2a_*; scaled by the caller.
  norm: NormFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    window = _reduced_kernel(x, (5, 5))  # slim keeps 5×5 here and fails on smaller maps.
    pool = PoolSpec('AvgPool_1a_5x5', 'avg', window, 3, 'VALID')
    x = Pool(pool, name=pool.name)(x)
    x = _conv_bn(ConvSpec('Conv2d_1b_1x1', self.depths[0], (1, 1)), self.norm, self.dtype, x, train)
    kh, kw = _reduced_kernel(x, (5, 5))
    spec = ConvSpec(f'Conv2d_2a_{kh}x{kw}', self.depths[1], (kh, kw), 1, 'VALID')
    init = nn.initializers.truncated_normal(0.01)
    x = _conv_bn(spec, self.norm, self.dtype, x, train, kernel_init=init)
    x = Conv(
      self.outputs, nn.initializers.truncated_normal(0.001), self.dtype, name='Conv2d_2b_1x1'
    )(x)
    return _squeeze(x, 'AuxLogits').astype(jnp.float32)


class Logits(nn.Module):
  """slim's head: average pool (kernel reduced for small inputs), dropout, 1×1 conv with bias.

  Returns (logits, PreLogits) with PreLogits [B, 1, 1, C] after dropout, as slim's endpoint.
  """

  outputs: int
  dropout_keep_prob: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    kh, kw = _reduced_kernel(x, (8, 8))
    # slim's avg_pool2d default stride is 2 outside the base network's arg_scope.
    pool = PoolSpec(f'AvgPool_1a_{kh}x{kw}', 'avg', (kh, kw), 2, 'VALID')
    x = Pool(pool, name=pool.name)(x)
    x = nn.Dropout(1.0 - self.dropout_keep_prob, deterministic=not train, name='Dropout_1b')(x)
    logits = Conv(self.outputs, _he_init, self.dtype, name='Conv2d_1c_1x1')(x)
    return _squeeze(logits, 'Logits').astype(jnp.float32), x


class InceptionV3(nn.Module):
  """TF-Slim's `inception_v3` (see MODEL_API.md): returns (logits, end_points) like slim.

  Logits are returned in float32 whatever `dtype`, so losses and metrics need no casts.
  """

  num_classes: int = 1001  # The classes K; the classifiers have `heads.get(head).outputs(K)`.
  head: str = 'softmax'  # config.model.head (pneumo_jax.heads).
  create_aux_logits: bool = True
  dropout_keep_prob: float = 0.8
  depth_multiplier: float = 1.0
  min_depth: int = 16
  dtype: Any = jnp.float32
  batch_norm_train: tuple[str, ...] | None = None
  batch_norm_decay: float = BN_DECAY  # slim's inception_v3_arg_scope(batch_norm_decay=…).
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  def _depth(self, d: int) -> int:
    return max(int(d * self.depth_multiplier), self.min_depth)

  @nn.compact
  def __call__(
    self, images: jax.Array, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if self.depth_multiplier <= 0:
      raise ConfigError(f'depth_multiplier must be > 0, got {self.depth_multiplier}.')
    if images.ndim != 4 or images.shape[1] < MIN_SIZE or images.shape[2] < MIN_SIZE:
      raise ConfigError(
        f'InceptionV3 needs images [B, H, W, C] with H, W >= {MIN_SIZE} (input.image_size); '
        f'got {images.shape}.'
      )
    # slim's batch_norm under inception_v3_arg_scope: no scale, its epsilon, the model's decay.
    norm = layers.batch_norm_factory(
      self, epsilon=BN_EPSILON, use_scale=False, names=layers.SLIM_NAMES
    )
    end_points = {}
    x = images
    for spec in _architecture(self._depth):
      if isinstance(spec, ConvSpec):
        x = _conv_bn(spec, norm, self.dtype, x, train)
      elif isinstance(spec, PoolSpec):
        x = Pool(spec, name=spec.name)(x)
      else:
        x = Mixed(spec.branches, norm, self.dtype, name=spec.name)(x, train)
      end_points[spec.name] = x

    outputs = heads.get(self.head).outputs(self.num_classes)
    if self.create_aux_logits and self.num_classes:
      depths = (self._depth(128), self._depth(768))
      aux = AuxLogits(outputs, depths, norm, self.dtype, name='AuxLogits')
      end_points['AuxLogits'] = aux(end_points['Mixed_6e'], train)

    logits, pre_logits = Logits(outputs, self.dropout_keep_prob, dtype=self.dtype, name='Logits')(
      x, train
    )
    end_points['PreLogits'] = pre_logits
    end_points['Logits'] = logits
    end_points['Predictions'] = heads.get(self.head).probs(logits)
    return logits, end_points
