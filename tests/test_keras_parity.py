"""converters/keras_to_orbax.py: Keras's InceptionV3, converted, computes what Keras computes.

The reference is keras.applications.InceptionV3 (TensorFlow backend) with re-drawn weights
(tests/reference.py), saved in the official download's legacy layout and as Keras 3's
`.weights.h5`. Compared: logits and every Mixed block's output, at 299 px and at 107 px (the
reference takes any size: see build_keras_reference), after checking that the reference's
outputs depend on its input at all. The two images differ in kind (noise, smooth pattern): two
noise images give nearly the same globally pooled features, so their logits differ by < 1%.
"""

import os

os.environ['KERAS_BACKEND'] = 'tensorflow'  # Before keras is first imported; either would do.

import h5py
import jax
import keras
import numpy as np
import orbax.checkpoint as ocp
import pytest

from converters import keras_to_orbax
from pneumo_jax import scopes
from pneumo_jax.models.inception_v3 import keras_weights
from tests import reference

# Keras's TensorFlow backend converts tensors with np.array(x), which NumPy 2 flags.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy")

SIZES = (299, 107)
TOLERANCE = 1e-4


def _images(size: int) -> np.ndarray:
  """[noise, smooth colour pattern], float32 [2, size, size, 3] in [-1, 1]."""
  y, x = np.meshgrid(*2 * [np.linspace(-1.0, 1.0, size)], indexing='ij')
  smooth = np.stack([np.sin(3 * x), np.cos(2 * y), x * y], axis=-1)
  return np.stack([reference.random_images(1, size, seed=size)[0], smooth]).astype(np.float32)


@pytest.fixture(scope='module')
def keras_model():
  return reference.build_keras_reference(seed=0)


@pytest.fixture(scope='module')
def h5_files(keras_model, tmp_path_factory):
  """The reference in both layouts: {'legacy': official-download layout, 'keras3': .weights.h5}."""
  folder = tmp_path_factory.mktemp('keras')
  files = {
    'legacy': str(folder / 'inception_v3_weights_tf_dim_ordering_tf_kernels.h5'),
    'keras3': str(folder / 'reference.weights.h5'),
  }
  reference.save_keras_legacy_h5(keras_model, files['legacy'])
  keras_model.save_weights(files['keras3'])
  return files


@pytest.fixture(scope='module')
def converted(h5_files, tmp_path_factory):
  """Each layout converted: the legacy one through the command line and back from orbax."""
  out = str(tmp_path_factory.mktemp('orbax') / 'keras_orbax')
  keras_to_orbax.main([h5_files['legacy'], out])
  return {
    'legacy': ocp.StandardCheckpointer().restore(out),
    'keras3': keras_weights.read(h5_files['keras3']),
  }


@pytest.fixture(scope='module')
def outputs(keras_model, converted):
  """{size: (keras endpoints, pneumo_jax endpoints)} on the same two random images."""
  keras_fn = reference.keras_endpoints(keras_model)
  apply = jax.jit(lambda v, x: keras_weights.target_model().apply(v, x, train=False))
  result = {}
  for size in SIZES:
    images = _images(size)
    ours_logits, ours = apply(converted['legacy'], images)
    theirs = {k: np.asarray(v) for k, v in keras_fn(images, training=False).items()}
    result[size] = theirs, {**jax.device_get(ours), 'Logits': np.asarray(ours_logits)}
  return result


def test_legacy_file_has_the_official_layout(h5_files):
  with h5py.File(h5_files['legacy'], 'r') as f:
    assert 'model_weights' not in f
    assert f['conv2d_1/conv2d_1/kernel:0'].shape == (3, 3, 3, 32)
    assert f['batch_normalization_94/batch_normalization_94/moving_variance:0'].shape == (192,)
    assert f['predictions/predictions/kernel:0'].shape == (2048, 1000)
    order = [n.decode() for n in f.attrs['layer_names']]
  convs = [n for n in order if n.startswith('conv2d_')]
  # The loader matches layers in this (topological) order, which is not creation order.
  assert len(convs) == 94 and convs != sorted(convs, key=lambda n: int(n.split('_')[1]))


def test_both_layouts_convert_to_the_same_variables(converted):
  legacy, keras3 = (scopes.flatten(converted[k]) for k in ('legacy', 'keras3'))
  assert sorted(legacy) == sorted(keras3)
  for name, value in legacy.items():
    np.testing.assert_array_equal(np.asarray(value), keras3[name], err_msg=name)
  assert 'AuxLogits' not in converted['legacy']['params']
  assert legacy['params/Logits/Conv2d_1c_1x1/weights'].shape == (1, 1, 2048, 1000)


@pytest.mark.parametrize('size', SIZES)
def test_reference_depends_on_its_input(outputs, size):
  theirs, _ = outputs[size]
  for name in ('logits', 'mixed10'):
    a, b = theirs[name]
    assert reference.relative_error(a, b) > 1000 * TOLERANCE, name


@pytest.mark.parametrize('size', SIZES)
def test_matches_keras(outputs, size):
  theirs, ours = outputs[size]
  pairs = {'logits': 'Logits', **reference.KERAS_TO_SLIM_ENDPOINTS}
  errors = {slim: reference.relative_error(ours[slim], theirs[k]) for k, slim in pairs.items()}
  assert max(errors.values()) <= TOLERANCE, errors


def test_rejects_other_files(tmp_path):
  tiny = keras.Sequential(
    [
      keras.Input((8, 8, 3)),
      keras.layers.Conv2D(4, 3),
      keras.layers.Flatten(),
      keras.layers.Dense(2),
    ]
  )
  tiny.save_weights(tmp_path / 'tiny.weights.h5')
  reference.save_keras_legacy_h5(tiny, str(tmp_path / 'tiny.h5'))
  for name in ('tiny.weights.h5', 'tiny.h5'):
    with pytest.raises(ValueError, match='not the weights of a Keras InceptionV3'):
      keras_weights.read(str(tmp_path / name))
  os.rename(tmp_path / 'tiny.weights.h5', tmp_path / 'renamed.h5')
  with pytest.raises(ValueError, match=r'must end in \.weights\.h5'):
    keras_weights.read(str(tmp_path / 'renamed.h5'))
  (tmp_path / 'text.h5').write_text('not hdf5')
  with pytest.raises(ValueError, match='not an HDF5 file'):
    keras_weights.read(str(tmp_path / 'text.h5'))
