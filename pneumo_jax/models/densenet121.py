"""DenseNet-121 (Huang et al. 2017) in Flax Linen, named as torchvision names it.

The backbone chest X-ray work standardised on (CheXNet; torchxrayvision's X-ray weights).
Parameter paths are torchvision's module paths without `features.`, '/'-joined: `conv0/kernel`,
`norm0/{scale,bias}`, `denseblock1/denselayer1/{norm1,conv1,norm2,conv2}`,
`transition1/{norm,conv}`, …, `denseblock4/denselayer16/…`, `norm5`, `classifier/{kernel,bias}`;
batch statistics sit at the same paths as `mean`/`var`. So regexes read as the architecture
does (`denseblock4,norm5`).

Every batch norm here feeds a ReLU, so one module owns both: intercepting `norm5` (Grad-CAM) gets
the rectified map the classifier pools. Batch norm: epsilon 1.001e-5 (Keras's; torchvision's 1e-5
scales each output by 1 + 5e-9 / (var + eps), far below the parity tolerance: the torchvision
test passes at 1e-6 with the mismatch), momentum 0.9 in Flax's convention (torchvision's
momentum=0.1), moving variance updated with the unbiased batch variance as torchvision does,
statistics in float32 whatever the compute dtype. `dropout_rate` applies to the pooled features
before the classifier (torchvision's per-layer `drop_rate` is 0 for its weights; not offered).

Weights: `load_weights` reads Keras's `DenseNet121` `.h5` (the legacy layout of the ImageNet
download `densenet121_weights_tf_dim_ordering_tf_kernels.h5`, whose old layer names `conv1/conv`,
`conv1/bn` and `fc1000` are accepted, or Keras 3's `.weights.h5`) and torchvision `densenet121`
state dicts (`.pth`), through h5py or torch alone: no Keras needed.

torchxrayvision's X-ray DenseNet-121 (18 pathologies, `conv0` [64, 1, 7, 7]) takes one grey
channel scaled to u = 1024 · (2q − 1) ∈ [−1024, 1024] (q: pixel in [0, 1]; its README averages
colour channels first), whereas this backbone's conv0 sees ImageNet's x_c = (q − m_c) / s_c on
three channels (m = 0.485, 0.456, 0.406; s = 0.229, 0.224, 0.225; the module converts the
pipeline's [-1, 1] pixels to that first, `input_normalisation`). By default the loader folds the
difference into the weights: an image's grey level is q̄ = mean_c(s_c x_c + m_c), so
u = Σ_c (2048 s_c / 3) x_c + (2048 m̄ − 1024): conv0's kernel becomes the 1-channel kernel times
2048 s_c / 3 on channel c, and the constant term times the kernel's sum is a per-channel bias that
norm0 absorbs (its moving mean is lowered by it; batch statistics absorb it by themselves). This
is exact for every conv0 output whose 7×7 window lies inside the image, not at the border: conv0
zero-pads by 3, and a zero means grey 0.5 to torchxrayvision but grey m_c here (0.449 on average:
u ≈ −104 instead of 0), so the outermost 1–2 rows and columns of conv0's output see a slightly
darker frame. Through the network's large receptive fields this moves the logits by 3.6e-4
relative at 224 px and 2.6e-3 at 61 px (tests/test_densenet121.py, random weights). Exact
everywhere instead: preprocess as torchxrayvision does (u on all three channels) and load with
`fold_xrv_normalisation=False`, which only spreads the kernel over the three channels, divided
by 3. Their released `.pt` files pickle whole models; `load_torch` wants the state dict.
"""

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pneumo_jax import scopes
from pneumo_jax.errors import ConfigError, NotFoundError, WeightsError
from pneumo_jax.models import weights
from pneumo_jax.models.backbone import Backbone

GROWTH_RATE = 32
BOTTLENECK = 4 * GROWTH_RATE  # conv1's width in every dense layer (torchvision's bn_size * k).
BLOCKS = (6, 12, 24, 16)
STEM_FEATURES = 64
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.9
# conv0 (7×7/2, pad 3) and pool0 (3×3/2, pad 1) each map n to floor((n - 1) / 2) + 1, and the
# three 2×2/2 transitions need 8 rows after pool0: 29 → 15 → 8 → 4 → 2 → 1 (28 ends at 0).
MIN_SIZE = 29
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FORMATS = 'a Keras DenseNet121 .h5 or a torchvision densenet121 state dict (.pth)'

_he_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')  # torchvision's kaiming.


class NormAct(nn.Module):
  """Batch norm then the activation, as every batch norm in DenseNet is followed by a ReLU.

  Uses batch statistics (and updates its moving averages) only when `train` is set and, if
  `batch_norm_train` is given, the path of its bias matches one of those regexes.
  """

  dtype: Any = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  batch_norm_train: Sequence[str] | None = None
  momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    use_batch_stats = train and (
      self.batch_norm_train is None
      or scopes.matches(self.batch_norm_train, '/'.join(self.path) + '/bias')
    )
    x32 = x.astype(jnp.float32)
    if use_batch_stats:
      mean = jnp.mean(x32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        n = int(np.prod(x.shape[:3]))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * (scale * jax.lax.rsqrt(var + BN_EPSILON)) + bias
    return self.activation(y.astype(self.dtype))


class _Settings(nn.Module):
  """The fields every part with batch norms needs (DenseNet121 declares its own, in its order)."""

  dtype: Any = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  batch_norm_train: Sequence[str] | None = None
  batch_norm_momentum: float = BN_MOMENTUM


def _settings(m: Any) -> dict[str, Any]:
  return dict(
    dtype=m.dtype,
    activation=m.activation,
    batch_norm_train=m.batch_norm_train,
    batch_norm_momentum=m.batch_norm_momentum,
  )


def _norm(m: Any, name: str, x: jax.Array, train: bool) -> jax.Array:
  """A NormAct submodule of `m` (called inside its compact method) with `m`'s settings."""
  return NormAct(m.dtype, m.activation, m.batch_norm_train, m.batch_norm_momentum, name=name)(
    x, train
  )


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


class DenseLayer(_Settings):
  """BN-ReLU-1×1 conv (128) → BN-ReLU-3×3 conv (32), concatenated after its input."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _conv(self, 'conv1', _norm(self, 'norm1', x, train), BOTTLENECK, 1)
    y = _conv(self, 'conv2', _norm(self, 'norm2', y, train), GROWTH_RATE, 3, pad=1)
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(_Settings):
  """`num_layers` dense layers, `denselayer1`…: each adds 32 channels."""

  num_layers: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(1, self.num_layers + 1):
      x = DenseLayer(**_settings(self), name=f'denselayer{i}')(x, train)
    return x


class Transition(_Settings):
  """BN-ReLU-1×1 conv halving the channels, then 2×2/2 average pooling."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _conv(self, 'conv', _norm(self, 'norm', x, train), x.shape[-1] // 2, 1)
    return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNet121(nn.Module):
  """torchvision's `densenet121`: returns (logits in float32, end_points).

  end_points: 'conv0' (after norm0, ReLU and pool0: denseblock1's input), 'denseblock1'–'4' and
  'transition1'–'3' (their outputs), 'norm5' (final BN + ReLU), 'PreLogits' (globally averaged
  features, [B, 1024], before dropout), 'Logits', 'Predictions'.
  """

  num_classes: int = 1000
  dtype: Any = jnp.float32  # Compute dtype; parameters and batch statistics stay float32.
  activation: Callable[[jax.Array], jax.Array] = nn.relu  # Guided backprop swaps it.
  batch_norm_train: Sequence[str] | None = None
  batch_norm_momentum: float = BN_MOMENTUM  # Flax's convention: 1 - torchvision's momentum.
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
    end_points = {}
    if self.input_normalisation == 'imagenet':
      mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
      images = ((images.astype(jnp.float32) + 1.0) / 2.0 - mean) / std
    x = _conv(self, 'conv0', images, STEM_FEATURES, 7, stride=2, pad=3)
    x = _norm(self, 'norm0', x, train)
    x = end_points['conv0'] = nn.max_pool(x, (3, 3), (2, 2), [(1, 1)] * 2)
    for b, num_layers in enumerate(BLOCKS, 1):
      x = DenseBlock(**_settings(self), num_layers=num_layers, name=f'denseblock{b}')(x, train)
      end_points[f'denseblock{b}'] = x
      if b < len(BLOCKS):
        x = Transition(**_settings(self), name=f'transition{b}')(x, train)
        end_points[f'transition{b}'] = x
    x = end_points['norm5'] = _norm(self, 'norm5', x, train)
    x = end_points['PreLogits'] = GlobalAvgPool(name='pool')(x)
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(
      self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='classifier'
    )(x).astype(jnp.float32)
    end_points['Logits'] = logits
    end_points['Predictions'] = jax.nn.softmax(logits, axis=-1)
    return logits, end_points


class GlobalAvgPool(nn.Module):
  """The classifier's whole input, as a named layer (no variables) that a feature cache taps."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32)


def create(model_cfg: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> DenseNet121:
  """DenseNet121 from `config.model`; `overrides` may set batch_norm_train and activation.

  `create_aux_logits` is accepted and ignored: DenseNet has no auxiliary head.
  """
  keep = model_cfg.dropout_keep_prob
  if not 0.0 < keep <= 1.0:
    raise ConfigError(f'model.dropout_keep_prob must be in (0, 1]; got {keep}.')
  overrides.pop('create_aux_logits', None)
  kwargs = dict(
    num_classes=num_classes,
    dtype=jnp.dtype(model_cfg.dtype),
    dropout_rate=1.0 - keep,
    batch_norm_momentum=model_cfg.batch_norm_decay,
    input_normalisation='imagenet',
  )
  return DenseNet121(**(kwargs | overrides))


# ---------------------------------------------------------------------------- weights


class _Layer(NamedTuple):
  """A layer with variables: our path, kind ('conv' | 'norm' | 'dense'), Keras name, shape."""

  path: str
  kind: str
  keras: str
  shape: tuple[int, ...]  # conv: HWIO kernel; norm: (channels,); dense: (inputs, classes).


# Per kind: (collection, our name, Keras name, torchvision name), in Keras 3's `vars/<i>` order.
_VARIABLES = {
  'conv': (('params', 'kernel', 'kernel', 'weight'),),
  'norm': (
    ('params', 'scale', 'gamma', 'weight'),
    ('params', 'bias', 'beta', 'bias'),
    ('batch_stats', 'mean', 'moving_mean', 'running_mean'),
    ('batch_stats', 'var', 'moving_variance', 'running_var'),
  ),
  'dense': (('params', 'kernel', 'kernel', 'weight'), ('params', 'bias', 'bias', 'bias')),
}
_KERAS_CLASSES = {'conv': 'conv2d', 'norm': 'batch_normalization', 'dense': 'dense'}


def _layers(num_classes: int, in_channels: int = 3) -> list[_Layer]:
  """Every layer with variables, in the order Keras's DenseNet121 creates them."""
  out = [
    _Layer('conv0', 'conv', 'conv1_conv', (7, 7, in_channels, STEM_FEATURES)),
    _Layer('norm0', 'norm', 'conv1_bn', (STEM_FEATURES,)),
  ]
  c = STEM_FEATURES
  for b, num_layers in enumerate(BLOCKS, 1):
    for i in range(1, num_layers + 1):
      p, k = f'denseblock{b}/denselayer{i}', f'conv{b + 1}_block{i}'
      out += [
        _Layer(f'{p}/norm1', 'norm', f'{k}_0_bn', (c,)),
        _Layer(f'{p}/conv1', 'conv', f'{k}_1_conv', (1, 1, c, BOTTLENECK)),
        _Layer(f'{p}/norm2', 'norm', f'{k}_1_bn', (BOTTLENECK,)),
        _Layer(f'{p}/conv2', 'conv', f'{k}_2_conv', (3, 3, BOTTLENECK, GROWTH_RATE)),
      ]
      c += GROWTH_RATE
    if b < len(BLOCKS):
      out += [
        _Layer(f'transition{b}/norm', 'norm', f'pool{b + 1}_bn', (c,)),
        _Layer(f'transition{b}/conv', 'conv', f'pool{b + 1}_conv', (1, 1, c, c // 2)),
      ]
      c //= 2
  return [
    *out,
    _Layer('norm5', 'norm', 'bn', (c,)),
    _Layer('classifier', 'dense', 'predictions', (c, num_classes)),
  ]


def _expected_shapes(num_classes: int, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
  """{'params/…' or 'batch_stats/…': shape} of DenseNet121(num_classes) on such inputs."""
  shapes = {}
  for layer in _layers(num_classes, in_channels):
    for collection, name, _, _ in _VARIABLES[layer.kind]:
      bias = layer.kind == 'dense' and name == 'bias'
      shapes[f'{collection}/{layer.path}/{name}'] = (num_classes,) if bias else layer.shape
  return shapes


def _require_file(path: str) -> None:
  if not os.path.isfile(path):
    raise NotFoundError(f'{path} does not exist; give {WEIGHT_FORMATS}.')


def _is_hdf5(path: str) -> bool:
  """HDF5's signature at offset 0 (Keras writes no user block); needs no h5py."""
  with open(path, 'rb') as f:
    return f.read(8) == b'\x89HDF\r\n\x1a\n'


# Keras --------------------------------------------------------------------------------------

_KERAS_FIX = 'give keras.applications.DenseNet121 weights with its top, as saved by save_weights'


def _h5py() -> Any:
  try:
    import h5py
  except ImportError as e:
    raise WeightsError('reading Keras .h5 weights needs h5py: pip install h5py') from e
  return h5py


def _decode(names: Any) -> list[str]:
  return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _keras_layer_name(name: str) -> str:
  """Keras 3's name for a layer of the legacy download ('conv1/conv' → 'conv1_conv')."""
  return 'predictions' if name == 'fc1000' else name.replace('/', '_')


def _keras3_groups(f: Any) -> dict[str, list[str]] | None:
  """For Keras 3's `.weights.h5` layout, {class: its `layers/<class>[_k]` groups, by k}; else
  None. Keras numbers each class's layers in the model's order, which for DenseNet121 (a chain
  with skip connections) is `_layers()`'s; `other` lists groups of any other class."""
  if 'layer_names' in f.attrs or 'model_weights' in f or 'layers' not in f:
    return None
  out: dict[str, list[tuple[int, str]]] = {c: [] for c in (*_KERAS_CLASSES.values(), 'other')}
  for group in f['layers']:
    cls, _, k = group.rpartition('_')
    cls, k = (cls, int(k)) if cls in out and k.isdigit() else (group, 0)
    out[cls if cls in out else 'other'].append((k, group))
  return {c: [g for _, g in sorted(groups)] for c, groups in out.items()}


def _read_keras(f: Any) -> dict[str, dict[str, np.ndarray]]:
  """{Keras layer name: {variable name: array}} from either `.h5` layout; the legacy one names
  its layers (attribute `layer_names`, each group's `weight_names`), Keras 3's numbers them."""
  out: dict[str, dict[str, np.ndarray]] = {}
  keras3 = _keras3_groups(f)
  if keras3 is not None:
    layers = f['layers']
    for kind, cls in _KERAS_CLASSES.items():
      names = [la.keras for la in _layers(0) if la.kind == kind]
      variables = [v[2] for v in _VARIABLES[kind]]
      for i, group in enumerate(keras3[cls]):
        name = names[i] if i < len(names) else f'layers/{group}'
        out[name] = {
          (variables[int(j)] if int(j) < len(variables) else f'vars/{j}'): np.asarray(v)
          for j, v in layers[group].get('vars', {}).items()
        }
    return out | {
      f'layers/{g}': {f'vars/{j}': np.asarray(v) for j, v in layers[g]['vars'].items()}
      for g in keras3['other']
      if 'vars' in layers[g]
    }
  root = f.get('model_weights', f)
  for name in _decode(root.attrs.get('layer_names', [])):
    group = root[name]
    weights = _decode(group.attrs.get('weight_names', []))
    if weights:
      out[_keras_layer_name(name)] = {
        w.rpartition('/')[2].partition(':')[0]: np.asarray(group[w]) for w in weights
      }
  return out


def load_keras(path: str) -> dict[str, Any]:
  """Keras DenseNet121 weights (`.h5` or `.weights.h5`) → {'params', 'batch_stats'} (numpy).

  Keras's conv kernels are HWIO and its dense kernel [in, out], as Flax's: only names change.
  """
  _require_file(path)
  if not _is_hdf5(path):
    raise WeightsError(f'{path} is not an HDF5 file; {_KERAS_FIX}.')
  h5py = _h5py()
  try:
    with h5py.File(path, 'r') as f:
      found = _read_keras(f)
  except OSError as e:
    raise WeightsError(f'{path} cannot be read as HDF5 ({e}); {_KERAS_FIX}.') from e
  top = found.get('predictions', {}).get('kernel')
  num_classes = top.shape[-1] if top is not None and top.ndim == 2 else 1000
  arrays = {}
  for layer in _layers(num_classes):
    values = found.pop(layer.keras, {})
    for collection, name, keras, _ in _VARIABLES[layer.kind]:
      if keras in values:
        arrays[f'{collection}/{layer.path}/{name}'] = values.pop(keras).astype(np.float32)
    found[layer.keras] = values  # What is left is not in the model.
  arrays |= {
    f'{layer} (Keras)/{v}': value for layer, values in found.items() for v, value in values.items()
  }
  weights.check_names_and_shapes(arrays, _expected_shapes(num_classes), path)
  return scopes.unflatten(arrays)


def recognise_keras(path: str) -> bool:
  """Whether `path` is a Keras DenseNet121 `.h5` (by its layer names or, in Keras 3's layout,
  its count of convs and batch norms and the stem's kernel), reading no weights."""
  if not (os.path.isfile(path) and _is_hdf5(path)):
    return False
  with _h5py().File(path, 'r') as f:
    keras3 = _keras3_groups(f)
    if keras3 is not None:
      stem = f['layers'].get('conv2d/vars/0')
      return (
        len(keras3['conv2d']) == 120
        and len(keras3['batch_normalization']) == 121
        and stem is not None
        and stem.shape[:2] + stem.shape[3:] == (7, 7, STEM_FEATURES)
      )
    names = {
      _keras_layer_name(n) for n in _decode(f.get('model_weights', f).attrs.get('layer_names', []))
    }
  return {'conv4_block24_2_conv', 'conv5_block16_2_conv'} <= names and not (
    {'conv4_block25_0_bn', 'conv5_block17_0_bn'} & names
  )


# torchvision -------------------------------------------------------------------------------

_TORCH_FIX = 'give the state dict of torchvision.models.densenet121, saved with torch.save'
# torchvision's `_load_state_dict` rewrites keys of its first release this way.
_OLD_TORCH_KEY = re.compile(
  r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$'
)
# Buffers that are not weights: BN's update counter, torchxrayvision's calibration thresholds.
_TORCH_SKIPPED = re.compile(r'(.*\.num_batches_tracked|op_threshs)$')


def _torch_key(layer: _Layer, variable: str) -> str:
  prefix = 'classifier' if layer.kind == 'dense' else 'features.' + layer.path.replace('/', '.')
  return f'{prefix}.{variable}'


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise WeightsError(f'reading {path} (a PyTorch file) needs PyTorch: pip install torch') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    pickled = re.search(r'GLOBAL (\S+)', str(e))
    if pickled:
      raise WeightsError(
        f'{path} pickles Python objects ({pickled.group(1)}), not just tensors, as '
        "torchxrayvision's released weights do: load it where that class imports and save its "
        'state_dict(), e.g. torch.save(xrv.models.DenseNet(weights="densenet121-res224-all")'
        '.state_dict(), "xrv_densenet121.pth").'
      ) from e
    raise WeightsError(f'{path} is not a PyTorch state dict file; {_TORCH_FIX}.') from e
  except (RuntimeError, OSError, EOFError, ValueError) as e:
    raise WeightsError(f'{path} is not a PyTorch file ({e}); {_TORCH_FIX}.') from e
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise WeightsError(f'{path} holds no state dict (names → tensors); {_TORCH_FIX}.')
  out = {}
  for key, value in state.items():
    key = _OLD_TORCH_KEY.sub(r'\1\2', key.removeprefix('module.'))
    if not _TORCH_SKIPPED.fullmatch(key):
      out[key] = value.to(torch.float32).numpy(force=True)
  return out


def load_torch(path: str, *, fold_xrv_normalisation: bool = True) -> dict[str, Any]:
  """A torchvision densenet121 state dict → {'params', 'batch_stats'} (numpy).

  OIHW kernels become HWIO, the classifier's [out, in] weight [in, out]. A 1-channel conv0
  (torchxrayvision's) becomes a 3-channel one: with `fold_xrv_normalisation`, for inputs
  preprocessed as ImageNet's; otherwise for torchxrayvision's scaling on all three channels
  (see the module docstring for both, and where the first is inexact).
  """
  _require_file(path)
  found = _read_torch(path)
  top = found.get('classifier.weight')
  num_classes = top.shape[0] if top is not None and top.ndim == 2 else 1000
  stem = found.get('features.conv0.weight')
  in_channels = 1 if stem is not None and stem.ndim == 4 and stem.shape[1] == 1 else 3
  arrays = {}
  for layer in _layers(num_classes, in_channels):
    for collection, name, _, torch_name in _VARIABLES[layer.kind]:
      value = found.pop(_torch_key(layer, torch_name), None)
      if value is not None:
        if layer.kind == 'conv' and value.ndim == 4:
          value = value.transpose(2, 3, 1, 0)
        elif layer.kind == 'dense' and value.ndim == 2:
          value = value.T
        arrays[f'{collection}/{layer.path}/{name}'] = value
  arrays |= {f'{key} (torch)': value for key, value in found.items()}  # Not in the model.
  weights.check_names_and_shapes(arrays, _expected_shapes(num_classes, in_channels), path)
  if in_channels == 1:
    _spread_grey_stem(arrays, fold_xrv_normalisation)
  return scopes.unflatten(arrays)


def _spread_grey_stem(arrays: dict[str, np.ndarray], fold: bool) -> None:
  """Turns a 1-channel conv0 into a 3-channel one in place (see the module docstring)."""
  kernel = arrays['params/conv0/kernel']  # [7, 7, 1, 64]
  if not fold:
    arrays['params/conv0/kernel'] = np.repeat(kernel / 3, 3, axis=2)
    return
  std, mean = np.asarray(IMAGENET_STD, np.float64), np.asarray(IMAGENET_MEAN, np.float64)
  k64 = kernel.astype(np.float64)
  arrays['params/conv0/kernel'] = (k64 * (2048 * std / 3)[:, None]).astype(np.float32)
  offset = (2048 * mean.mean() - 1024) * k64.sum(axis=(0, 1, 2))
  arrays['batch_stats/norm0/mean'] = (arrays['batch_stats/norm0/mean'] - offset).astype(np.float32)


def _torch_pickle(path: str) -> bytes:
  """The pickled part of a torch.save file, where its keys are (not its tensor data)."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      name = next((n for n in z.namelist() if n.endswith('data.pkl')), None)
      return z.read(name) if name else b''
  with open(path, 'rb') as f:  # The legacy format pickles the dict before the storages.
    return f.read(1 << 20)


def recognise_torch(path: str) -> bool:
  """Whether `path` is a DenseNet-121 state dict: denseblock3 has 24 layers, denseblock4 16
  (DenseNet-161/169/201 have more), judged from its keys alone."""
  if not os.path.isfile(path):
    return False
  try:
    keys = _torch_pickle(path)
  except (OSError, zipfile.BadZipFile):
    return False
  return all(
    (f'features.denseblock{b}.denselayer{n}.'.encode() in keys) == present
    for b, n, present in ((3, 24, True), (3, 25, False), (4, 16, True), (4, 17, False))
  )


def load_weights(path: str) -> dict[str, Any]:
  """Keras `.h5` or torchvision `.pth` DenseNet-121 weights → {'params', 'batch_stats'}."""
  _require_file(path)
  return load_keras(path) if _is_hdf5(path) else load_torch(path)


def recognise(path: str) -> bool:
  return recognise_keras(path) or recognise_torch(path)


# Cell i of a layer is centred on input pixel offset + stride * i. A k×k, stride-s op with
# padding p puts output j's window at s*j - p … s*j - p + k - 1, centred on s*j - p + (k - 1)/2
# of its input: conv0 (7, 2, 3) and pool0 (3, 2, 1) keep offset 0 (centres 2j, then 4j); the
# blocks' 1×1 and padded 3×3 convs keep centres; each 2×2/2 average pool centres j on 2j + 0.5 of
# its input, adding half its input stride: transition1 → (0 + 4/2, 8), transition2 → (2 + 8/2,
# 16), transition3 → (6 + 16/2, 32); norm5 is pointwise.
_CELL_CENTRES = {
  'denseblock2': (2, 8),
  'denseblock3': (6, 16),
  'denseblock4': (14, 32),
  'norm5': (14, 32),
}

BACKBONE = Backbone(
  name='densenet121',
  create=create,
  head_scopes='classifier',
  aux_logits=None,
  logits_bias='classifier/bias',
  weight_decay=r'(.*/)?conv\d?/kernel$,classifier/kernel$',
  min_size=MIN_SIZE,
  default_size=224,
  preprocessing='imagenet',
  gradcam_layers=tuple(_CELL_CENTRES),
  cell_centres=_CELL_CENTRES,
  feature_taps={'classifier': 'pool'},
  blocks=(
    'conv0',
    'norm0',
    'denseblock1',
    'transition1',
    'denseblock2',
    'transition2',
    'denseblock3',
    'transition3',
    'denseblock4',
    'norm5',
  ),
  head_inputs={'classifier': 'norm5'},
  load_weights=load_weights,
  weight_formats=WEIGHT_FORMATS,
  recognise=recognise,
)
