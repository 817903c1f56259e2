"""TF-Slim's own InceptionV3 → converters.slim_to_orbax → pneumo_jax: same function, same names.

One reference graph per input size: 299 (slim's size, saved as a V1 file like the released
checkpoint) and 107 (small-input kernel reductions: 2×2 head pool, 1×1 aux conv; saved as V2).
"""

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from converters import slim_to_orbax
from pneumo_jax import scopes
from pneumo_jax.models import weights
from pneumo_jax.models.inception_v3 import InceptionV3, slim_weights
from tests import reference

pytest.importorskip('tf_slim')
pytestmark = pytest.mark.filterwarnings('ignore:`layer.apply` is deprecated:UserWarning')

TOLERANCE = 1e-4
COMPARED = ('Conv2d_1a_3x3', 'Conv2d_4a_3x3', 'Mixed_5d', 'Mixed_6e', 'Mixed_7c', 'PreLogits')
COMPARED += ('AuxLogits', 'Logits', 'Predictions')


@dataclasses.dataclass
class Case:
  size: int
  slim: reference.SlimReference
  checkpoint: str
  images: np.ndarray
  expected: dict[str, np.ndarray]  # slim's endpoints for `images`.
  other: dict[str, np.ndarray]  # slim's endpoints for different images.
  variables: dict
  actual: dict[str, np.ndarray]  # pneumo_jax's endpoints for `images`.


def _endpoints(model: InceptionV3, variables: dict, images: np.ndarray) -> dict[str, np.ndarray]:
  return jax.device_get(jax.jit(lambda v, x: model.apply(v, x)[1])(variables, images))


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  """Builds each size's reference once, on first use, for the whole module."""
  built = {}

  def get(size: int) -> Case:
    if size not in built:
      slim = reference.build_slim_reference(size)
      images = reference.random_images(2, size, seed=1)
      path = str(tmp_path_factory.mktemp(f'slim{size}') / 'model.ckpt')
      checkpoint = slim.save(path, 'V1' if size == 299 else 'V2')  # V1: like the released file.
      variables = slim_weights.read(checkpoint)
      built[size] = Case(
        size=size,
        slim=slim,
        checkpoint=checkpoint,
        images=images,
        expected=slim.outputs(images),
        other=slim.outputs(reference.random_images(2, size, seed=2)),
        variables=variables,
        actual=_endpoints(InceptionV3(), variables, images),
      )
    return built[size]

  yield get
  for c in built.values():
    c.slim.session.close()


@pytest.fixture(params=[299, 107])
def case(cases, request):
  return cases(request.param)


@pytest.fixture
def small(cases):
  return cases(107)


def test_reference_depends_on_its_input(case):
  # Otherwise a port that ignored its input would pass the comparisons below.
  for name in ('Mixed_7c', 'AuxLogits', 'Logits'):
    assert reference.relative_error(case.other[name], case.expected[name]) > 3e-3, name


@pytest.mark.parametrize('name', COMPARED)
def test_endpoint_matches_slim(case, name):
  assert case.actual[name].shape == case.expected[name].shape
  assert reference.relative_error(case.actual[name], case.expected[name]) <= TOLERANCE


def test_names_follow_the_input_size(case):
  params = case.variables['params']
  aux_conv = 'Conv2d_2a_5x5' if case.size == 299 else 'Conv2d_2a_1x1'
  assert aux_conv in params['AuxLogits']
  assert len(scopes.flatten(case.variables)) == 388


def test_v1_and_v2_files_convert_identically(small, tmp_path):
  v1 = slim_weights.read(small.slim.save(str(tmp_path / 'v1.ckpt'), 'V1'))
  flat_v1, flat_v2 = scopes.flatten(v1), scopes.flatten(small.variables)
  assert flat_v1.keys() == flat_v2.keys()
  for k, v in flat_v2.items():
    np.testing.assert_array_equal(flat_v1[k], v, err_msg=k)


def test_drop_background_keeps_the_imagenet_classes(small):
  variables = slim_weights.read(small.checkpoint, drop_background=True)
  out = _endpoints(InceptionV3(num_classes=1000), variables, small.images)
  for name in ('Logits', 'AuxLogits'):
    assert out[name].shape == (2, 1000)
    expected = small.expected[name][:, 1:]
    assert reference.relative_error(out[name], expected) <= TOLERANCE, name


def test_training_mode_matches_slim(small):
  # Batch statistics in the forward pass, and moving averages updated as TF's fused batch norm
  # does (decay 0.9997, unbiased batch variance). Normalising by statistics of few values
  # amplifies float32 rounding with depth: against a float64 run, slim and pneumo_jax both drift
  # ~1e-3 by Mixed_7c. Normalising by the unbiased variance instead moves Mixed_7c and AuxLogits
  # by ~0.3; updating with the biased one moves the moving-variance steps by ~0.5 (measured).
  names = ('Mixed_5d', 'Mixed_6e', 'Mixed_7c', 'AuxLogits')
  expected, updated = small.slim.train_outputs(small.images, names)
  (_, points), state = InceptionV3().apply(
    small.variables,
    small.images,
    train=True,
    mutable=['batch_stats'],
    rngs={'dropout': jax.random.key(0)},
  )
  for name in names:
    assert reference.relative_error(points[name], expected[name]) <= 5e-3, name
  for path, new in scopes.flatten(state['batch_stats']).items():
    old = small.slim.values['InceptionV3/' + path]
    step, expected_step = np.asarray(new) - old, updated['InceptionV3/' + path] - old
    # The step is ~3e-4 of values ~1, so float32 leaves it ~3 significant digits.
    assert reference.relative_error(step, expected_step) < 1e-2, path


def _forged(tmp_path, arrays, name='forged.ckpt'):
  return reference.write_tf_checkpoint(arrays, str(tmp_path / name), 'V2')


def test_every_mismatch_is_listed_and_training_state_is_skipped(tmp_path):
  f32 = np.float32
  ckpt = _forged(
    tmp_path,
    {
      'InceptionV3/Conv2d_1a_3x3/weights': np.zeros((3, 3, 3, 16), f32),  # mis-shaped
      'InceptionV3/Conv2d_1a_3x3/weights/RMSProp': np.zeros((3, 3, 3, 16), f32),  # slot
      'InceptionV3/Conv2d_2a_3x3/BatchNorm/beta': np.zeros(32, f32),
      'InceptionV3/Conv2d_2a_3x3/BatchNorm/beta/ExponentialMovingAverage': np.zeros(32, f32),
      'InceptionV3/Mixed_5b/Branch_9/Conv2d_0a_1x1/weights': np.zeros((1, 1, 4, 4), f32),
      'InceptionV3/Logits/Conv2d_1c_1x1/weights': np.zeros((1, 1, 2048, 5), f32),
      'global_step': np.int64(7),
    },
  )
  with pytest.raises(ValueError) as error:
    slim_weights.read(ckpt)
  message = str(error.value)
  assert 'params/Mixed_5b/Branch_9/Conv2d_0a_1x1/weights' in message  # unknown
  assert 'params/Conv2d_1a_3x3/weights: (3, 3, 3, 16) in the file' in message  # mis-shaped
  assert 'params/Mixed_7c/Branch_3/Conv2d_0b_1x1/weights' in message  # missing
  assert 'batch_stats/Conv2d_2a_3x3/BatchNorm/moving_mean' in message  # missing
  assert 'params/Logits/Conv2d_1c_1x1/biases' in message  # missing, 5-class model inferred
  for skipped in ('RMSProp', 'ExponentialMovingAverage', 'global_step', 'AuxLogits'):
    assert skipped not in message
  with pytest.raises(ValueError, match='1001-class'):
    slim_weights.read(ckpt, drop_background=True)


def test_aux_head_is_optional(small, monkeypatch):
  tensors = {
    k: v
    for k, v in slim_weights._read(small.checkpoint).items()
    if not k.startswith('InceptionV3/AuxLogits/')
  }
  monkeypatch.setattr(slim_weights, '_read', lambda path: tensors)
  variables = slim_weights.read(small.checkpoint)
  assert 'AuxLogits' not in variables['params']
  expected = weights.model_shapes(InceptionV3(create_aux_logits=False), 299)
  weights.check_names_and_shapes(scopes.flatten(variables), expected, 'converted')


def test_other_files_are_refused_clearly(tmp_path):
  not_inception = _forged(tmp_path, {'resnet/conv1/weights': np.zeros((7, 7, 3, 64), np.float32)})
  with pytest.raises(ValueError, match='not a TF-Slim InceptionV3 checkpoint'):
    slim_weights.read(not_inception)
  junk = tmp_path / 'junk.ckpt'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='cannot read a TF checkpoint'):
    slim_weights.read(str(junk))


def test_cli_writes_a_restorable_checkpoint_and_keeps_existing_ones(small, tmp_path):
  out = str(tmp_path / 'orbax')
  slim_to_orbax.main([small.checkpoint, out, '--drop_background'])
  restored = ocp.StandardCheckpointer().restore(out)
  assert set(restored) == {'params', 'batch_stats'}
  expected = scopes.flatten(slim_weights.read(small.checkpoint, drop_background=True))
  got = scopes.flatten(restored)
  assert got.keys() == expected.keys()
  for k, v in expected.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)

  before = sorted(os.listdir(out))
  with pytest.raises(FileExistsError, match='overwrite'):
    slim_to_orbax.main([small.checkpoint, out])
  assert sorted(os.listdir(out)) == before
  slim_to_orbax.main([small.checkpoint, out, '--overwrite'])
  restored = ocp.StandardCheckpointer().restore(out)
  assert restored['params']['Logits']['Conv2d_1c_1x1']['biases'].shape == (1001,)
  assert [p for p in os.listdir(tmp_path) if p != 'orbax'] == []  # no staging dirs left
