"""DenseNet-121 (Huang et al. 2017) in Flax Linen, with torchvision's names, and its variables
as the weight readers see them (`layer_table`: each layer's Keras name and shape).

Parameter paths are torchvision's module paths without `features.`, '/'-joined: `conv0/kernel`,
`norm0/{scale,bias}`, `denseblock1/denselayer1/{norm1,conv1,norm2,conv2}`,
`transition1/{norm,conv}`, …, `norm5`, `classifier/{kernel,bias}`; batch statistics sit at the
same paths as `mean`/`var`. So regexes read as the architecture does (`denseblock4,norm5`).
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pneumo_jax import heads
from pneumo_jax.errors import ConfigError
from pneumo_jax.models import layers
from pneumo_jax.models.layers import NormFactory

GROWTH_RATE = 32
BOTTLENECK = 4 * GROWTH_RATE  # conv1's width in every dense layer (torchvision's bn_size * k).
BLOCKS = (6, 12, 24, 16)
STEM_FEATURES = 64
BN_EPSILON = 1.001e-5  # Keras's (torchvision's 1e-5 differs far below the parity tolerance).
BN_DECAY = 0.9  # torchvision's momentum 0.1.
# conv0 (7×7/2, pad 3) and pool0 (3×3/2, pad 1) each map n to floor((n - 1) / 2) + 1, and the
# three 2×2/2 transitions need 8 rows after pool0: 29 → 15 → 8 → 4 → 2 → 1 (28 ends at 0).
MIN_SIZE = 29
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FORMATS = 'a Keras DenseNet121 .h5 or a torchvision densenet121 state dict (.pth)'

_he_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')  # torchvision's kaiming.


def _conv(
  m: Any, name: str, x: jax.Array, features: int, kernel: int, stride: int = 1, pad: int = 0
) -> jax.Array:
  """A bias-free conv submodule of `m`: float32 kernel, computed in `m.dtype`."""
  return nn.Conv(
    features,
    (kernel, kernel),
    stride,
    [(pad, pad)] * 2,
    use_bias=False,
    dtype=m.dtype,
    param_dtype=jnp.float32,
    kernel_init=_he_init,
    name=name,
  )(x)


class DenseLayer(nn.Module):
  """BN-ReLU-1×1 conv (128) → BN-ReLU-3×3 conv (32), concatenated after its input."""

  norm: NormFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _conv(self, 'conv1', self.norm(name='norm1')(x, train), BOTTLENECK, 1)
    y = _conv(self, 'conv2', self.norm(name='norm2')(y, train), GROWTH_RATE, 3, pad=1)
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
  """`num_layers` dense layers, `denselayer1`…: each adds 32 channels."""

  num_layers: int
  norm: NormFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(1, self.num_layers + 1):
      x = DenseLayer(self.norm, self.dtype, name=f'denselayer{i}')(x, train)
    return x


class Transition(nn.Module):
  """BN-ReLU-1×1 conv halving the channels, then 2×2/2 average pooling."""

  norm: NormFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _conv(self, 'conv', self.norm(name='norm')(x, train), x.shape[-1] // 2, 1)
    return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNet121(nn.Module):
  """torchvision's `densenet121`: returns (logits in float32, end_points).

  end_points: 'conv0' (after norm0, ReLU and pool0: denseblock1's input), 'denseblock1'–'4' and
  'transition1'–'3' (their outputs), 'norm5' (final BN + ReLU), 'PreLogits' (globally averaged
  features, [B, 1024], before dropout), 'Logits', 'Predictions'.
  """

  num_classes: int = 1000  # The classes K; the classifier has `heads.get(head).outputs(K)`.
  head: str = 'softmax'  # config.model.head (pneumo_jax.heads).
  dtype: Any = jnp.float32  # Compute dtype; parameters and batch statistics stay float32.
  activation: Callable[[jax.Array], jax.Array] = nn.relu  # Guided backprop swaps it.
  batch_norm_train: Sequence[str] | None = None
  # The moving averages' decay (torchvision's momentum 0.1 is a decay of 0.9).
  batch_norm_decay: float = BN_DECAY
  dropout_rate: float = 0.0
  # The pipeline feeds every backbone [-1, 1] pixels (inception preprocessing); 'imagenet'
  # converts them first to the per-channel mean/std normalisation the ImageNet (and folded
  # torchxrayvision) weights expect; 'none' takes the input as it comes (the parity tests).
  input_normalisation: str = 'none'

  @nn.compact
  def __call__(
    self, images: jax.Array, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if images.ndim != 4 or min(images.shape[1:3]) < MIN_SIZE:
      raise ConfigError(
        f'DenseNet-121 needs images [B, H, W, C] with H, W >= {MIN_SIZE}; got '
        f'{images.shape}: set input.image_size >= {MIN_SIZE}.'
      )
    # Batch norm as Keras's DenseNet121 (scale, epsilon) and torchvision's (unbiased moving
    # variance), each followed by the ReLU, so intercepting `norm5` gets the map the head pools.
    norm = layers.batch_norm_factory(
      self, epsilon=BN_EPSILON, use_scale=True, names=layers.FLAX_NAMES
    )
    end_points = {}
    if self.input_normalisation == 'imagenet':
      mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
      images = ((images.astype(jnp.float32) + 1.0) / 2.0 - mean) / std
    x = _conv(self, 'conv0', images, STEM_FEATURES, 7, stride=2, pad=3)
    x = norm(name='norm0')(x, train)
    x = end_points['conv0'] = nn.max_pool(x, (3, 3), (2, 2), [(1, 1)] * 2)
    for b, num_layers in enumerate(BLOCKS, 1):
      x = DenseBlock(num_layers, norm, self.dtype, name=f'denseblock{b}')(x, train)
      end_points[f'denseblock{b}'] = x
      if b < len(BLOCKS):
        x = Transition(norm, self.dtype, name=f'transition{b}')(x, train)
        end_points[f'transition{b}'] = x
    x = end_points['norm5'] = norm(name='norm5')(x, train)
    x = end_points['PreLogits'] = GlobalAvgPool(name='pool')(x)
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(
      heads.get(self.head).outputs(self.num_classes),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name='classifier',
    )(x).astype(jnp.float32)
    end_points['Logits'] = logits
    end_points['Predictions'] = heads.get(self.head).probs(logits)
    return logits, end_points


class GlobalAvgPool(nn.Module):
  """The classifier's whole input, as a named layer (no variables) that a feature cache taps."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32)


# Variables, as the weight readers see them. ---------------------------------------------


class Layer(NamedTuple):
  """A layer with variables: our path, kind ('conv' | 'norm' | 'dense'), Keras name, shape."""

  path: str
  kind: str
  keras: str
  shape: tuple[int, ...]  # conv: HWIO kernel; norm: (channels,); dense: (inputs, classes).


# Per kind: (collection, our name, Keras name, torchvision name), in Keras 3's `vars/<i>` order.
VARIABLES = {
  'conv': (('params', 'kernel', 'kernel', 'weight'),),
  'norm': (
    ('params', 'scale', 'gamma', 'weight'),
    ('params', 'bias', 'beta', 'bias'),
    ('batch_stats', 'mean', 'moving_mean', 'running_mean'),
    ('batch_stats', 'var', 'moving_variance', 'running_var'),
  ),
  'dense': (('params', 'kernel', 'kernel', 'weight'), ('params', 'bias', 'bias', 'bias')),
}


def layer_table(num_classes: int, in_channels: int = 3) -> list[Layer]:
  """Every layer with variables, in the order Keras's DenseNet121 creates them."""
  out = [
    Layer('conv0', 'conv', 'conv1_conv', (7, 7, in_channels, STEM_FEATURES)),
    Layer('norm0', 'norm', 'conv1_bn', (STEM_FEATURES,)),
  ]
  c = STEM_FEATURES
  for b, num_layers in enumerate(BLOCKS, 1):
    for i in range(1, num_layers + 1):
      p, k = f'denseblock{b}/denselayer{i}', f'conv{b + 1}_block{i}'
      out += [
        Layer(f'{p}/norm1', 'norm', f'{k}_0_bn', (c,)),
        Layer(f'{p}/conv1', 'conv', f'{k}_1_conv', (1, 1, c, BOTTLENECK)),
        Layer(f'{p}/norm2', 'norm', f'{k}_1_bn', (BOTTLENECK,)),
        Layer(f'{p}/conv2', 'conv', f'{k}_2_conv', (3, 3, BOTTLENECK, GROWTH_RATE)),
      ]
      c += GROWTH_RATE
    if b < len(BLOCKS):
      out += [
        Layer(f'transition{b}/norm', 'norm', f'pool{b + 1}_bn', (c,)),
        Layer(f'transition{b}/conv', 'conv', f'pool{b + 1}_conv', (1, 1, c, c // 2)),
      ]
      c //= 2
  return [
    *out,
    Layer('norm5', 'norm', 'bn', (c,)),
    Layer('classifier', 'dense', 'predictions', (c, num_classes)),
  ]


def expected_shapes(num_classes: int, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
  """{'params/…' or 'batch_stats/…': shape} of DenseNet121(num_classes) on such inputs."""
  shapes = {}
  for layer in layer_table(num_classes, in_channels):
    for collection, name, _, _ in VARIABLES[layer.kind]:
      bias = layer.kind == 'dense' and name == 'bias'
      shapes[f'{collection}/{layer.path}/{name}'] = (num_classes,) if bias else layer.shape
  return shapes
