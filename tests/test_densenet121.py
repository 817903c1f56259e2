"""pneumo_jax.models.densenet121 computes what Keras's and torchvision's DenseNet-121 compute.

References: keras.applications.DenseNet121 and torchvision.models.densenet121 (also with
torchxrayvision's 1-channel conv0), their weights re-drawn as tests/reference.py does (He
kernels, non-trivial BN statistics), saved in each format and read back by our loaders. Compared:
logits and every block's output, at 224 px and 61 px (odd, so every floor in the size arithmetic
is exercised), after checking that the references' outputs depend on their input. Variables are
never initialised by a compiled init: shapes come from `jax.eval_shape`.

torchvision's outputs are also stored in tests/fixtures/ (a sample of every end point at 61 px,
and the state dict's keys; tests/fixtures/make_densenet_fixtures.py writes them), with weights
drawn from a seed: without torch (`.[test]` leaves it out) the loader and the model are checked
against those, and with torch, against torchvision itself and the stored outputs against it.
"""

import contextlib
import functools
import importlib.util
import json
import os
import sys

# torchvision imports triton (through torch._dynamo), which crashes the process with a
# segmentation fault when TensorFlow is already loaded (torch 2.14.1, TF 2.21); the other order
# works (torch alone, as the loader uses it, is safe either way). pytest imports test modules in
# name order before running any, and this one sorts before those that import TensorFlow
# (test_keras_parity, test_optim), so it imports torchvision first; if TensorFlow still came
# first (those files named before this one), the torchvision tests skip instead of crashing.
with contextlib.suppress(ImportError):
  if 'tensorflow' not in sys.modules:
    import torchvision  # noqa: F401

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')  # As test_keras_parity: builds in ~1 s.

import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from configs import default
from pneumo_jax import scopes
from pneumo_jax.errors import ConfigError, NotFoundError, WeightsError
from pneumo_jax.evaluation import explain
from pneumo_jax.models import densenet121 as dn
from pneumo_jax.models.densenet121 import keras_weights, net, torch_weights
from tests import reference

# Keras's TensorFlow backend converts tensors with np.array(x), which NumPy 2 flags.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy")

SIZES = (224, 61)
CLASSES = 5
TOLERANCE = 1e-4
MODEL = dn.DenseNet121(num_classes=CLASSES)
FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'densenet121_torchvision.npz')
SAMPLED = 96  # Elements of each end point, per image, that the fixture keeps.
TORCH_REASON = (
  'torchvision is not installed (.[test] leaves it out; the stored outputs are checked instead, '
  'and .ci/run installs it): pip install torch==2.14.1 torchvision==0.29.1 (x86_64; '
  'torchvision from PyPI does not import beside torch 2.13.0)'
)

# Keras layer (and torchvision module) outputs that are our end_points.
KERAS_ENDPOINTS = {
  'pool1': 'conv0',
  'conv2_block6_concat': 'denseblock1',
  'pool2_pool': 'transition1',
  'conv3_block12_concat': 'denseblock2',
  'pool3_pool': 'transition2',
  'conv4_block24_concat': 'denseblock3',
  'pool4_pool': 'transition3',
  'conv5_block16_concat': 'denseblock4',
  'relu': 'norm5',
  'avg_pool': 'PreLogits',
}
COMPARED = ('Logits', *KERAS_ENDPOINTS.values())


def _grey(size: int) -> np.ndarray:
  """[noise, smooth pattern] grey levels q in [0, 1], float32 [2, size, size]. Two noise images
  would give nearly the same globally pooled features."""
  y, x = np.meshgrid(*2 * [np.linspace(-1.0, 1.0, size)], indexing='ij')
  smooth = 0.5 + 0.4 * np.sin(3 * x) * np.cos(2 * y)
  noise = np.random.default_rng(size).uniform(0, 1, (size, size))
  return np.stack([noise, smooth]).astype(np.float32)


def _imagenet(q: np.ndarray) -> np.ndarray:
  """Pixels in [0, 1], [B, H, W, 1 or 3] → ImageNet-normalised [B, H, W, 3]: the input."""
  return ((q - np.asarray(dn.IMAGENET_MEAN)) / np.asarray(dn.IMAGENET_STD)).astype(np.float32)


def _colour(size: int) -> np.ndarray:
  """Two ImageNet-normalised colour images: noise and a smooth pattern."""
  y, x = np.meshgrid(*2 * [np.linspace(0.0, 1.0, size)], indexing='ij')
  smooth = np.stack([x, y, (x + y) / 2], axis=-1)
  return _imagenet(np.stack([np.random.default_rng(size).uniform(0, 1, (size, size, 3)), smooth]))


def _intercepting(model: nn.Module, variables, images, layers):
  """(logits, end_points, {layer: output of the submodule at that path}), the way Grad-CAM
  reaches a layer (pneumo_jax.evaluation.explain)."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = '/'.join(context.module.path)
    if context.method_name == '__call__' and path in layers:
      captured[path] = out
    return out

  with nn.intercept_methods(interceptor):
    logits, end_points = model.apply(variables, images, train=False)
  return logits, end_points, captured


_apply = jax.jit(lambda v, x: _intercepting(MODEL, v, x, dn.BACKBONE.gradcam_layers))


def _ours(variables, images) -> dict[str, np.ndarray]:
  _, end_points, _ = _apply(variables, images)
  return {k: np.asarray(end_points[k]) for k in COMPARED}


def _errors(ours, theirs) -> dict[str, float]:
  return {k: reference.relative_error(ours[k], theirs[k]) for k in COMPARED}


# ---------------------------------------------------------------------------- Keras


@pytest.fixture(scope='module')
def keras_model():
  """keras.applications.DenseNet121 (CLASSES, logits out, any input size), weights re-drawn."""
  import keras

  model = keras.applications.DenseNet121(
    weights=None,
    classes=CLASSES,
    classifier_activation=None,
    input_tensor=keras.Input((None, None, 3)),
  )
  rng = np.random.default_rng(0)
  for variable in model.weights:
    variable.assign(reference.nontrivial_value(variable.name, variable.shape, rng))
  return model


def _save_legacy(model, path: str, rename=lambda name: name) -> None:
  """The legacy layout with Keras 2-era names (`conv1/conv`, `fc1000`): h5py nests groups at
  each '/', as in the real densenet121_weights_tf_dim_ordering_tf_kernels.h5."""
  import keras

  with h5py.File(path, 'w') as f:
    names = [rename(layer.name) for layer in model.layers]
    f.attrs['layer_names'] = np.array([n.encode() for n in names])
    for layer, name in zip(model.layers, names, strict=True):
      group = f.create_group(name)
      weight_names = [f'{name}/{v.name}:0' for v in layer.weights]
      group.attrs['weight_names'] = np.array([w.encode() for w in weight_names], dtype='S')
      for weight_name, variable in zip(weight_names, layer.weights, strict=True):
        group.create_dataset(weight_name, data=keras.ops.convert_to_numpy(variable))


@pytest.fixture(scope='module')
def keras_files(keras_model, tmp_path_factory):
  folder = tmp_path_factory.mktemp('keras')
  files = {
    'keras3': str(folder / 'reference.weights.h5'),
    'legacy': str(folder / 'densenet121_weights_tf_dim_ordering_tf_kernels.h5'),
    'keras2_names': str(folder / 'keras2_names.h5'),
  }
  keras_model.save_weights(files['keras3'])
  reference.save_keras_legacy_h5(keras_model, files['legacy'])
  old = {'conv1_conv': 'conv1/conv', 'conv1_bn': 'conv1/bn', 'predictions': 'fc1000'}
  _save_legacy(keras_model, files['keras2_names'], lambda n: old.get(n, n))
  return files


@pytest.fixture(scope='module')
def keras_outputs(keras_model, keras_files):
  """{size: (Keras's endpoints, ours)} on the same two images."""
  import keras

  outputs = {name: keras_model.get_layer(name).output for name in KERAS_ENDPOINTS}
  fn = keras.Model(keras_model.inputs[0], {**outputs, 'logits': keras_model.output})
  variables = keras_weights.read(keras_files['keras3'])
  result = {}
  for size in SIZES:
    images = _colour(size)
    out = {k: keras.ops.convert_to_numpy(v) for k, v in fn(images, training=False).items()}
    theirs = {KERAS_ENDPOINTS.get(k, 'Logits'): v for k, v in out.items()}
    result[size] = theirs, _ours(variables, images)
  return result


def test_keras_layouts_load_the_same_variables(keras_files, keras_model):
  loaded = {k: scopes.flatten(keras_weights.read(p)) for k, p in keras_files.items()}
  assert loaded['keras3'].keys() == net.expected_shapes(CLASSES).keys()
  for name in ('legacy', 'keras2_names'):
    assert loaded[name].keys() == loaded['keras3'].keys()
    for key, value in loaded['keras3'].items():
      np.testing.assert_array_equal(loaded[name][key], value, err_msg=f'{name}: {key}')
  # Keras 3's file numbers layers per class; the pairing must follow the model's names.
  expected = keras_model.get_layer('conv4_block7_1_bn').moving_variance.numpy()
  np.testing.assert_array_equal(
    loaded['keras3']['batch_stats/denseblock3/denselayer7/norm2/var'], expected
  )
  with h5py.File(keras_files['keras2_names']) as f:
    assert f['conv1/conv/conv1/conv/kernel:0'].shape == (7, 7, 3, 64)  # The download's nesting.


@pytest.mark.parametrize('size', SIZES)
def test_keras_reference_depends_on_its_input(keras_outputs, size):
  theirs, _ = keras_outputs[size]
  for name in ('Logits', 'denseblock2', 'norm5'):
    a, b = theirs[name]
    assert reference.relative_error(a, b) > 1000 * TOLERANCE, name


@pytest.mark.parametrize('size', SIZES)
def test_matches_keras(keras_outputs, size):
  theirs, ours = keras_outputs[size]
  errors = _errors(ours, theirs)
  assert max(errors.values()) <= TOLERANCE, errors


def test_pipeline_pixels_are_normalised_as_the_imagenet_weights_expect(keras_files, keras_outputs):
  """The pipeline feeds [-1, 1]; the model a config builds converts them to ImageNet's mean/std
  first, so it computes what Keras computes on its own preprocessing of the same pixels."""
  cfg = default.get_config().model
  assert dn.create(cfg, CLASSES).input_normalisation == 'imagenet'
  model = MODEL.clone(input_normalisation='imagenet')
  q = _colour(61) * np.asarray(dn.IMAGENET_STD, np.float32) + np.asarray(
    dn.IMAGENET_MEAN, np.float32
  )
  logits, _ = model.apply(keras_weights.read(keras_files['keras3']), 2.0 * q - 1.0)
  assert reference.relative_error(np.asarray(logits), keras_outputs[61][0]['Logits']) < TOLERANCE


def test_keras_parity_catches_swapped_or_flipped_kernels(keras_files, keras_outputs):
  """The parity above would fail for a mis-paired layer or a kernel read as WHIO."""
  theirs, _ = keras_outputs[61]
  good = scopes.flatten(keras_weights.read(keras_files['keras3']))
  a, b = (f'params/denseblock3/denselayer{i}/conv2/kernel' for i in (5, 6))
  swapped = good | {a: good[b], b: good[a]}
  flipped = good | {a: good[a].transpose(1, 0, 2, 3)}
  for bad in (swapped, flipped):
    ours = _ours(scopes.unflatten(bad), _colour(61))
    assert reference.relative_error(ours['Logits'], theirs['Logits']) > 100 * TOLERANCE


def test_keras_loader_lists_every_offender(keras_files, tmp_path):
  path = str(tmp_path / 'broken.weights.h5')
  with h5py.File(keras_files['keras3']) as src, h5py.File(path, 'w') as dst:
    src.copy('layers', dst)
    src.copy('vars', dst)
    del dst['layers/batch_normalization_3/vars/2']  # conv2_block2_0_bn's moving mean.
    del dst['layers/conv2d_6/vars/0']  # conv2_block3_2_conv's kernel.
    dst['layers/conv2d_6/vars/0'] = np.zeros((3, 3, 128, 33), np.float32)
    dst.create_dataset('layers/normalization/vars/0', data=np.zeros(3))
  with pytest.raises(WeightsError) as e:
    keras_weights.read(path)
  message = str(e.value)
  assert 'batch_stats/denseblock1/denselayer2/norm1/mean' in message
  assert 'params/denseblock1/denselayer3/conv2/kernel: (3, 3, 128, 33)' in message
  assert 'layers/normalization' in message


def test_keras_recognise(keras_files, tmp_path):
  import keras

  for path in keras_files.values():
    assert keras_weights.recognise(path) and dn.recognise(path), path
  tiny = keras.Sequential(
    [
      keras.Input((8, 8, 3)),
      keras.layers.Conv2D(4, 3),
      keras.layers.BatchNormalization(),
      keras.layers.Flatten(),
      keras.layers.Dense(2),
    ]
  )
  tiny.save_weights(tmp_path / 'tiny.weights.h5')
  reference.save_keras_legacy_h5(tiny, str(tmp_path / 'tiny.h5'))
  (tmp_path / 'text.h5').write_text('not hdf5')
  for name in ('tiny.weights.h5', 'tiny.h5', 'text.h5', 'absent.h5'):
    assert not dn.recognise(str(tmp_path / name)), name
  with pytest.raises(WeightsError, match='missing'):
    dn.load_weights(str(tmp_path / 'tiny.weights.h5'))
  with pytest.raises(NotFoundError, match=r'absent\.h5'):
    dn.load_weights(str(tmp_path / 'absent.h5'))


# ---------------------------------------------------------------------------- torchvision


def _torchvision():
  """(torch, torchvision), or a skip saying why they cannot be used here."""
  if importlib.util.find_spec('torchvision') is None:
    pytest.skip(TORCH_REASON)
  if 'tensorflow' in sys.modules and 'torchvision' not in sys.modules:
    pytest.skip(
      'TensorFlow was imported before torchvision, which would then crash the process; '
      'run this file alone or before the TensorFlow tests'
    )
  return (
    pytest.importorskip('torch', reason=TORCH_REASON),
    pytest.importorskip('torchvision', reason=TORCH_REASON),
  )


def _torch_state(keys_shapes, in_channels: int, seed: int) -> dict[str, np.ndarray]:
  """A torchvision densenet121 state dict (keys and shapes as listed, in that order) with values
  re-drawn from `seed`; in_channels=1: torchxrayvision's conv0, its kernel divided by 1024 so
  that their inputs in [-1024, 1024] give conv0 outputs of the usual size, as weights trained on
  that range would."""
  rng = np.random.default_rng(seed)
  kinds = {'running_mean': 'moving_mean', 'running_var': 'moving_variance'}
  state = {}
  for key, shape in keys_shapes:
    leaf = key.rpartition('.')[2]
    if key == 'features.conv0.weight':
      shape = (64, in_channels, 7, 7)
    if leaf == 'num_batches_tracked':
      value = np.zeros(shape, np.int64)
    elif leaf == 'weight' and len(shape) > 1:  # Draw in HWIO / [in, out] for fan-in, then back.
      value = reference.nontrivial_value('kernel', shape[::-1], rng).T
      if key == 'features.conv0.weight' and in_channels == 1:
        value = value / 1024
    else:
      kind = kinds.get(leaf) or ('bias' if leaf == 'bias' else 'gamma')
      value = reference.nontrivial_value(kind, shape, rng)
    state[key] = np.ascontiguousarray(value)
  return state


def _torch_reference(in_channels: int = 3, seed: int = 1):
  """torchvision densenet121 (CLASSES, eval mode), weights as `_torch_state` draws them."""
  torch, torchvision = _torchvision()
  model = torchvision.models.densenet121(weights=None, num_classes=CLASSES)
  if in_channels == 1:
    model.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
  keys_shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
  state = _torch_state(keys_shapes, in_channels, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  return model.eval()


def _torch_endpoints(model, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
  """Our end_points' counterparts, NHWC, from a torchvision DenseNet."""
  import torch

  out = {}
  with torch.no_grad():
    x = torch.from_numpy(images_nchw)
    for name, module in model.features.named_children():
      x = module(x)
      if name == 'pool0':
        out['conv0'] = x
      elif name.startswith(('denseblock', 'transition')):
        out[name] = x
    out['norm5'] = x = torch.relu(x)
    out['PreLogits'] = x = x.mean(dim=(2, 3))
    out['Logits'] = model.classifier(x)
  return {k: v.numpy().transpose(0, 2, 3, 1) if v.ndim == 4 else v.numpy() for k, v in out.items()}


def _nchw(images: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


@pytest.fixture(scope='module')
def torch_model():
  return _torch_reference()


@pytest.fixture(scope='module')
def torch_file(torch_model, tmp_path_factory):
  import torch

  path = str(tmp_path_factory.mktemp('torch') / 'densenet121.pth')
  torch.save(torch_model.state_dict(), path)
  return path


@pytest.fixture(scope='module')
def torch_outputs(torch_model, torch_file):
  variables = torch_weights.read(torch_file)
  return {
    size: (_torch_endpoints(torch_model, _nchw(_colour(size))), _ours(variables, _colour(size)))
    for size in SIZES
  }


@pytest.mark.parametrize('size', SIZES)
def test_torchvision_reference_depends_on_its_input(torch_outputs, size):
  theirs, _ = torch_outputs[size]
  for name in ('Logits', 'denseblock2', 'norm5'):
    a, b = theirs[name]
    assert reference.relative_error(a, b) > 1000 * TOLERANCE, name


@pytest.mark.parametrize('size', SIZES)
def test_matches_torchvision(torch_outputs, size):
  theirs, ours = torch_outputs[size]
  errors = _errors(ours, theirs)
  assert max(errors.values()) <= TOLERANCE, errors


def test_torch_key_styles_and_formats(torch_model, torch_file, tmp_path):
  """torchvision's first key style (`norm.1`), a DataParallel `module.` prefix and torch's
  legacy (non-zip) format load the same; recognise tells DenseNet-121 from its siblings."""
  import torch

  old_style = {
    'module.' + k.replace('norm1', 'norm.1').replace('conv2', 'conv.2'): v
    for k, v in torch_model.state_dict().items()
  }
  legacy = str(tmp_path / 'old.pth')
  torch.save(old_style, legacy, _use_new_zipfile_serialization=False)
  expected = scopes.flatten(torch_weights.read(torch_file))
  for key, value in scopes.flatten(torch_weights.read(legacy)).items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  assert torch_weights.recognise(torch_file) and torch_weights.recognise(legacy)
  assert dn.recognise(torch_file)
  densenet169_keys = {
    f'features.denseblock{b}.denselayer{i}.norm1.weight': torch.zeros(1)
    for b in (3, 4)
    for i in range(1, 33)
  }
  torch.save(densenet169_keys, tmp_path / 'densenet169.pth')
  assert not dn.recognise(str(tmp_path / 'densenet169.pth'))


def test_torch_loader_lists_every_offender(torch_model, tmp_path):
  import torch

  state = dict(torch_model.state_dict())
  del state['features.denseblock2.denselayer3.norm2.running_var']
  state['features.transition2.conv.weight'] = torch.zeros(256, 512, 3, 3)
  state['features.extra.weight'] = torch.zeros(2)
  torch.save(state, tmp_path / 'broken.pth')
  with pytest.raises(WeightsError) as e:
    torch_weights.read(str(tmp_path / 'broken.pth'))
  message = str(e.value)
  assert 'batch_stats/denseblock2/denselayer3/norm2/var' in message
  assert 'params/transition2/conv/kernel: (3, 3, 512, 256)' in message
  assert 'features.extra.weight' in message
  torch.save(torch_model, tmp_path / 'pickled_model.pt')  # As torchxrayvision ships its weights.
  with pytest.raises(WeightsError, match=r'DenseNet\).*state_dict\(\)'):
    dn.load_weights(str(tmp_path / 'pickled_model.pt'))
  (tmp_path / 'text.pth').write_text('not a state dict')
  with pytest.raises(WeightsError, match='not a PyTorch state dict file'):
    dn.load_weights(str(tmp_path / 'text.pth'))
  assert not dn.recognise(str(tmp_path / 'text.pth'))


# ------------------------------------------------- torchvision's outputs stored in tests/fixtures


def fixture_cases():
  """The stored cases: name → (in_channels, seed, fold_xrv_normalisation, our input (NHWC),
  torchvision's input (NCHW), the end points kept)."""
  u = 1024 * (2 * _grey(61) - 1)
  q = _grey(224)
  return {
    'torchvision': (3, 1, True, _colour(61), _nchw(_colour(61)), COMPARED),
    'xrv_spread': (1, 2, False, np.repeat(u[..., None], 3, axis=-1), u[:, None], COMPARED),
    'xrv_folded': (1, 2, True, _imagenet(q[..., None]), (1024 * (2 * q - 1))[:, None], ('Logits',)),
  }


@pytest.fixture(scope='module')
def stored():
  with np.load(FIXTURE) as f:
    return dict(f)


def _stored_state(stored, in_channels: int, seed: int) -> dict[str, np.ndarray]:
  return _torch_state(json.loads(str(stored['state_keys'])), in_channels, seed)


def _stored_errors(stored, case: str, outputs) -> dict[str, float]:
  """Relative errors of `outputs` (full end points) at the elements the fixture kept."""
  return {
    k: reference.relative_error(
      np.reshape(outputs[k], (2, -1))[:, stored[f'{case}/{k}/index']], stored[f'{case}/{k}']
    )
    for k in COMPARED
    if f'{case}/{k}' in stored
  }


@pytest.mark.parametrize('case', ('torchvision', 'xrv_spread'))
def test_stored_reference_depends_on_its_input(stored, case):
  for name in ('Logits', 'denseblock2', 'norm5'):
    a, b = stored[f'{case}/{name}']
    assert reference.relative_error(a, b) > 1000 * TOLERANCE, name


@pytest.mark.parametrize('case', tuple(fixture_cases()))
def test_matches_stored_torchvision_outputs(stored, case):
  """The loader and the model without torch: xrv_folded is exact but for conv0's 3-pixel border
  (test_xrv_folded_into_imagenet_input), whose error reaches the logits."""
  in_channels, seed, fold, ours, _, _ = fixture_cases()[case]
  state = _stored_state(stored, in_channels, seed)
  variables = torch_weights.from_state(state, FIXTURE, fold_xrv_normalisation=fold)
  errors = _stored_errors(stored, case, _ours(variables, ours))
  assert errors and max(errors.values()) <= (2e-3 if case == 'xrv_folded' else TOLERANCE), errors


def test_stored_outputs_are_torchvisions():
  """The fixture still holds what torchvision computes (skipped without torch)."""
  stored = dict(np.load(FIXTURE))
  models = {}
  for case, (in_channels, seed, _, _, theirs, _) in fixture_cases().items():
    model = models.get((in_channels, seed)) or _torch_reference(in_channels, seed)
    models[in_channels, seed] = model
    errors = _stored_errors(stored, case, _torch_endpoints(model, np.ascontiguousarray(theirs)))
    assert errors and max(errors.values()) <= TOLERANCE, (case, errors)


def test_state_dict_key_styles_offenders_and_recognise(stored):
  """As the torch tests below, on the stored keys: torchvision's first key style (`norm.1`) and a
  DataParallel `module.` prefix load the same; every offender is listed; recognise tells
  DenseNet-121's keys (tests/fixtures/densenet121_keys.pth) from DenseNet-169's."""
  state = _stored_state(stored, 3, 1)
  expected = scopes.flatten(torch_weights.from_state(state, 'new.pth'))
  old_style = {
    'module.' + k.replace('norm1', 'norm.1').replace('conv2', 'conv.2'): v for k, v in state.items()
  }
  for key, value in scopes.flatten(torch_weights.from_state(old_style, 'old.pth')).items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  broken = dict(state)
  del broken['features.denseblock2.denselayer3.norm2.running_var']
  broken['features.transition2.conv.weight'] = np.zeros((256, 512, 3, 3), np.float32)
  broken['features.extra.weight'] = np.zeros(2, np.float32)
  with pytest.raises(WeightsError) as e:
    torch_weights.from_state(broken, 'broken.pth')
  message = str(e.value)
  assert 'broken.pth' in message
  assert 'batch_stats/denseblock2/denselayer3/norm2/var' in message
  assert 'params/transition2/conv/kernel: (3, 3, 512, 256)' in message
  assert 'features.extra.weight' in message
  folder = os.path.dirname(FIXTURE)
  assert torch_weights.recognise(os.path.join(folder, 'densenet121_keys.pth'))
  assert not dn.recognise(os.path.join(folder, 'densenet169_keys.pth'))


# ---------------------------------------------------------------------------- torchxrayvision


@pytest.fixture(scope='module')
def xrv(tmp_path_factory):
  """A torchxrayvision-style (1-channel conv0) torchvision DenseNet and its state dict file."""
  model = _torch_reference(in_channels=1, seed=2)  # Skips without torch.
  import torch

  path = str(tmp_path_factory.mktemp('xrv') / 'xrv_densenet121.pth')
  torch.save(model.state_dict(), path)
  return model, path


def test_xrv_spread_over_three_channels_is_exact(xrv):
  """Fed torchxrayvision's own scaling u = 1024 (2q - 1) on all three channels."""
  model, path = xrv
  variables = torch_weights.read(path, fold_xrv_normalisation=False)
  for size in SIZES:
    u = 1024 * (2 * _grey(size) - 1)
    theirs = _torch_endpoints(model, u[:, None])
    assert reference.relative_error(*theirs['Logits']) > 1000 * TOLERANCE
    ours = _ours(variables, np.repeat(u[..., None], 3, axis=-1))
    errors = _errors(ours, theirs)
    assert max(errors.values()) <= TOLERANCE, errors


def test_xrv_folded_into_imagenet_input(xrv):
  """Fed ImageNet-normalised grey images: exact wherever conv0's window misses the padding.

  At 224 px conv0 has 112 outputs, of which 0, 1 (window from -3, -1) and 111 (to 225) reach
  the zero padding; pool0 cells 0, 1 and 55 see those. The border's error spreads inwards
  through the later layers (their receptive fields cover the image) but stays small.
  """
  model, path = xrv
  variables = torch_weights.read(path)
  q = _grey(224)
  theirs = _torch_endpoints(model, (1024 * (2 * q - 1))[:, None])
  ours = _ours(variables, _imagenet(q[..., None]))
  interior = np.s_[:, 2:55, 2:55]
  assert reference.relative_error(ours['conv0'][interior], theirs['conv0'][interior]) <= TOLERANCE
  assert reference.relative_error(ours['conv0'], theirs['conv0']) > 100 * TOLERANCE  # The border.
  assert reference.relative_error(ours['Logits'], theirs['Logits']) <= 2e-3  # Measured 3.6e-4.


def test_minimum_size_is_torchvisions():
  """29 px is the smallest input torchvision's densenet121 runs on; ours refuses less."""
  torch, torchvision = _torchvision()
  model = torchvision.models.densenet121(weights=None, num_classes=CLASSES).eval()
  with torch.no_grad():
    assert model(torch.zeros(1, 3, dn.MIN_SIZE, dn.MIN_SIZE)).shape == (1, CLASSES)
    with pytest.raises(RuntimeError):
      model(torch.zeros(1, 3, dn.MIN_SIZE - 1, dn.MIN_SIZE - 1))


# ---------------------------------------------------------------------------- the module


def test_min_size_error():
  assert dn.BACKBONE.min_size == dn.MIN_SIZE == 29
  images = jax.ShapeDtypeStruct((1, 29, 29, 3), jnp.float32)
  jax.eval_shape(MODEL.init, jax.random.key(0), images)
  for shape in ((1, 28, 29, 3), (1, 29, 28, 3), (29, 29, 3)):
    with pytest.raises(ConfigError, match=r'input\.image_size'):
      jax.eval_shape(MODEL.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_variables_and_end_points():
  model = MODEL.clone(dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  flat = {k: tuple(v.shape) for k, v in scopes.flatten(variables).items()}
  assert flat == net.expected_shapes(CLASSES)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  assert flat['params/denseblock4/denselayer16/conv2/kernel'] == (3, 3, 128, 32)
  assert flat['params/transition3/conv/kernel'] == (1, 1, 1024, 512)
  assert flat['batch_stats/norm5/var'] == (1024,)
  logits, end_points = jax.eval_shape(model.apply, variables, images)
  assert logits.dtype == jnp.float32
  shapes = {k: v.shape for k, v in end_points.items()}
  assert shapes == {
    'conv0': (2, 56, 56, 64),
    'denseblock1': (2, 56, 56, 256),
    'transition1': (2, 28, 28, 128),
    'denseblock2': (2, 28, 28, 512),
    'transition2': (2, 14, 14, 256),
    'denseblock3': (2, 14, 14, 1024),
    'transition3': (2, 7, 7, 512),
    'denseblock4': (2, 7, 7, 1024),
    'norm5': (2, 7, 7, 1024),
    'PreLogits': (2, 1024),
    'Logits': (2, CLASSES),
    'Predictions': (2, CLASSES),
  }


def test_scopes():
  shapes = net.expected_shapes(CLASSES)
  params = [k.removeprefix('params/') for k in shapes if k.startswith('params/')]
  decayed = {p for p in params if scopes.matches(dn.BACKBONE.weight_decay, p)}
  convs = {p for p in params if p.endswith('/kernel') and len(shapes[f'params/{p}']) == 4}
  assert len(convs) == 120
  assert decayed == convs | {'classifier/kernel'}
  assert {p for p in params if scopes.matches(dn.BACKBONE.head_scopes, p)} == {
    'classifier/kernel',
    'classifier/bias',
  }
  assert shapes[f'params/{dn.BACKBONE.logits_bias}'] == (CLASSES,)
  top = 'denseblock4,norm5,classifier'
  assert sum(scopes.matches(top, p) for p in params) == 16 * 6 + 2 + 2


def test_create_reads_the_model_config():
  cfg = default.get_config().model
  cfg.dropout_keep_prob = 1.0
  cfg.batch_norm_decay = 0.9
  cfg.dtype = 'bfloat16'
  model = dn.BACKBONE.build(
    cfg, 3, create_aux_logits=True, batch_norm_train=(), activation=explain.guided_relu
  )
  assert (model.num_classes, model.dropout_rate, model.batch_norm_decay) == (3, 0.0, 0.9)
  assert model.dtype == jnp.bfloat16 and model.batch_norm_train == ()
  assert model.activation is explain.guided_relu
  cfg.dropout_keep_prob = 0.8
  assert dn.create(cfg, 3).dropout_rate == pytest.approx(0.2)
  cfg.dropout_keep_prob = 0.0
  with pytest.raises(ConfigError, match=r'model\.dropout_keep_prob'):
    dn.create(cfg, 3)


def test_config_file():
  from configs import densenet_two_phase

  c = densenet_two_phase.get_config()
  assert isinstance(c, ml_collections.ConfigDict)
  assert (c.model.name, c.input.image_size) == ('densenet121', 224)
  params = [k.removeprefix('params/') for k in net.expected_shapes(2) if k.startswith('params/')]
  head = {p for p in params if scopes.matches(c.phases.head.trainable_scopes, p)}
  top = {p for p in params if scopes.matches(c.phases.top.trainable_scopes, p)}
  assert head == {'classifier/kernel', 'classifier/bias'} and head < top < set(params)
  assert c.phases.top.schedule.learning_rate < c.schedule.learning_rate


@pytest.fixture(scope='module')
def random_variables():
  """{'params', 'batch_stats'} drawn as tests/reference.py draws them, shapes by eval_shape."""
  kinds = {'scale': 'gamma', 'mean': 'moving_mean', 'var': 'moving_variance'}
  images = jax.ShapeDtypeStruct((1, dn.MIN_SIZE, dn.MIN_SIZE, 3), jnp.float32)
  shapes = scopes.flatten(jax.eval_shape(MODEL.init, jax.random.key(0), images))
  rng = np.random.default_rng(0)
  return scopes.unflatten(
    {
      k: reference.nontrivial_value(kinds.get(leaf, leaf), v.shape, rng)
      for k, v in shapes.items()
      for leaf in [k.rpartition('/')[2]]
    }
  )


@functools.partial(jax.jit, static_argnums=0)
def _train_step_stats(model, variables, images):
  _, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
  return scopes.flatten(updates['batch_stats'])


def test_frozen_batch_norm_leaves_statistics_untouched(random_variables):
  images = _colour(32)
  before = scopes.flatten(random_variables['batch_stats'])
  after = _train_step_stats(MODEL.clone(batch_norm_train=()), random_variables, images)
  assert after.keys() == before.keys()
  for key, value in before.items():
    np.testing.assert_array_equal(after[key], value, err_msg=key)
  block4 = MODEL.clone(batch_norm_train=('denseblock4',))
  only4 = _train_step_stats(block4, random_variables, images)
  moved = {k for k in before if not np.array_equal(only4[k], before[k])}
  assert moved == {k for k in before if k.startswith('denseblock4/')}
  assert len(moved) == 16 * 2 * 2


def test_gradcam_layers_are_the_end_points(random_variables):
  """Grad-CAM intercepts the submodule named like the layer: it must output the end point
  (for norm5: after its ReLU)."""
  _, end_points, captured = _apply(random_variables, _colour(61))  # Compiled for the parity tests.
  assert set(captured) == set(dn.BACKBONE.gradcam_layers)
  for layer in dn.BACKBONE.gradcam_layers:
    np.testing.assert_array_equal(captured[layer], end_points[layer], err_msg=layer)
  assert dn.BACKBONE.default_gradcam_layer == 'norm5'


@pytest.mark.parametrize('size', (224, 61))
def test_cell_grids(random_variables, size):
  """Grad-CAM's grid per layer; at 224 px (a multiple of 32) the cells tile the image, so their
  number is the count of centres offset + stride * i inside it."""
  for layer, (offset, stride) in dn.BACKBONE.cell_centres.items():
    rows, cols = explain.layer_grid(MODEL, random_variables, size, layer)
    assert rows == cols and offset + stride * (rows - 1) <= size - 1, layer
    if size % 32 == 0:
      assert rows == (size - 1 - offset) // stride + 1, layer


def test_cell_centres_are_receptive_field_centres(random_variables):
  """Measured: with every dense layer's conv2 zeroed, a block passes its input through (its new
  channels are constant), so a cell's receptive field is the stem's and the transitions' alone
  (15 px for denseblock2 up to 39 px for norm5): the centre of the input pixels its gradient
  reaches must be the tabled offset + stride * i. Identity activations keep every path open."""
  size = 96
  flat = scopes.flatten(random_variables)
  zeroed = scopes.unflatten(
    {k: np.zeros_like(v) if k.endswith('conv2/kernel') else v for k, v in flat.items()}
  )
  model = MODEL.clone(activation=lambda x: x)
  layers = dn.BACKBONE.gradcam_layers

  def cells(image):
    _, end_points = model.apply(zeroed, image[None])
    return jnp.stack(
      [end_points[la][0, n // 2, n // 2].sum() for la in layers for n in [end_points[la].shape[1]]]
    )

  grads = jax.jit(jax.jacrev(cells))(jnp.asarray(_colour(size)[0]))
  widths = {'denseblock2': 15, 'denseblock3': 23, 'denseblock4': 39, 'norm5': 39}
  for layer, grad in zip(layers, np.abs(np.asarray(grads)), strict=True):
    offset, stride = dn.BACKBONE.cell_centres[layer]
    n = explain.layer_grid(MODEL, random_variables, size, layer)[0]
    for axis in (1, 0):  # Rows, then columns, with a non-zero gradient.
      reached = np.nonzero(grad.sum(axis=(axis, 2)))[0]
      assert reached[-1] - reached[0] + 1 == widths[layer], layer  # Not clipped by the border.
      assert (reached[0] + reached[-1]) / 2 == offset + stride * (n // 2), layer


def test_keras_to_orbax_recognises_a_densenet_file(keras_files, tmp_path):
  """`python -m converters.keras_to_orbax FILE OUT` picks the backbone the file holds, and OUT
  restores with plain orbax as {'params', 'batch_stats'}."""
  import orbax.checkpoint as ocp

  from converters import keras_to_orbax
  from pneumo_jax import models

  assert models.backbone_for_file(keras_files['legacy']) is dn.BACKBONE
  out = str(tmp_path / 'densenet_orbax')
  keras_to_orbax.main([keras_files['legacy'], out])
  restored = scopes.flatten(ocp.StandardCheckpointer().restore(out))
  expected = scopes.flatten(keras_weights.read(keras_files['legacy']))
  assert restored.keys() == expected.keys()
  for k, v in expected.items():
    np.testing.assert_array_equal(restored[k], v)
