"""pneumo_jax's InceptionV3: slim's names, shapes and counts; the training switches.

Numerical equality with TF-Slim is tested in test_slim_parity.py. Here shapes come from
`jax.eval_shape` (nothing compiled), and forward passes run at 75×75, the smallest input.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from pneumo_jax import models, scopes
from pneumo_jax.models.inception_v3 import InceptionV3
from tests import reference


def _images(size: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)


def _abstract_variables(model: InceptionV3, size: int) -> dict:
  return jax.eval_shape(model.init, jax.random.key(0), _images(size))


def _shapes(model: InceptionV3, size: int) -> dict[str, tuple[int, ...]]:
  return {k: v.shape for k, v in scopes.flatten(_abstract_variables(model, size)).items()}


def _endpoint_shapes(model: InceptionV3, size: int) -> dict[str, tuple[int, ...]]:
  def endpoints(variables, images):
    return model.apply(variables, images)[1]

  points = jax.eval_shape(endpoints, _abstract_variables(model, size), _images(size))
  return {k: v.shape for k, v in points.items()}


def _random_variables(model: InceptionV3, size: int, seed: int = 0) -> dict:
  """Non-trivial random values (see reference.py), without compiling `model.init`."""
  rng = np.random.default_rng(seed)
  flat = {
    k: jnp.asarray(reference.nontrivial_value(k.rsplit('/', 1)[-1], shape, rng))
    for k, shape in _shapes(model, size).items()
  }
  return scopes.unflatten(flat)


@pytest.fixture(scope='module')
def shapes_299():
  return _shapes(InceptionV3(), 299)


@pytest.fixture(scope='module')
def small():
  """(variables, images, inference-mode endpoints) at 75×75."""
  variables = _random_variables(InceptionV3(), 75)
  images = reference.random_images(2, 75, seed=0)
  return variables, images, jax.jit(InceptionV3().apply)(variables, images)[1]


def test_parameter_count_is_slims(shapes_299):
  params = {k: s for k, s in shapes_299.items() if k.startswith('params/')}
  assert sum(int(np.prod(s)) for s in params.values()) == 27_145_970
  assert len(params) == 196 and len(shapes_299) == 388  # slim's 388 checkpoint variables.


@pytest.mark.parametrize(
  'path, shape',
  [
    ('params/Conv2d_1a_3x3/weights', (3, 3, 3, 32)),
    ('params/Conv2d_1a_3x3/BatchNorm/beta', (32,)),
    ('batch_stats/Conv2d_1a_3x3/BatchNorm/moving_mean', (32,)),
    ('batch_stats/Conv2d_4a_3x3/BatchNorm/moving_variance', (192,)),
    ('params/Mixed_5c/Branch_1/Conv_1_0c_5x5/weights', (5, 5, 48, 64)),
    ('params/Mixed_5b/Branch_3/Conv2d_0b_1x1/weights', (1, 1, 192, 32)),
    ('params/Mixed_6a/Branch_1/Conv2d_1a_1x1/weights', (3, 3, 96, 96)),
    ('params/Mixed_6b/Branch_2/Conv2d_0e_1x7/weights', (1, 7, 128, 192)),
    ('params/Mixed_7b/Branch_1/Conv2d_0b_3x1/weights', (3, 1, 384, 384)),
    ('params/Mixed_7c/Branch_1/Conv2d_0c_3x1/weights', (3, 1, 384, 384)),
    ('params/Mixed_7c/Branch_2/Conv2d_0c_1x3/weights', (1, 3, 384, 384)),
    ('params/AuxLogits/Conv2d_2a_5x5/weights', (5, 5, 128, 768)),
    ('params/AuxLogits/Conv2d_2b_1x1/biases', (1001,)),
    ('params/Logits/Conv2d_1c_1x1/weights', (1, 1, 2048, 1001)),
  ],
)
def test_slim_scope_names(shapes_299, path, shape):
  assert shapes_299[path] == shape


def test_small_inputs_shrink_the_aux_kernel_as_slim_does():
  names = _shapes(InceptionV3(), 75)
  assert names['params/AuxLogits/Conv2d_2a_1x1/weights'] == (1, 1, 128, 768)
  assert not any('Conv2d_2a_5x5' in k or 'gamma' in k for k in names)


FEATURES = {
  'Conv2d_1a_3x3': 32,
  'Conv2d_2a_3x3': 32,
  'Conv2d_2b_3x3': 64,
  'MaxPool_3a_3x3': 64,
  'Conv2d_3b_1x1': 80,
  'Conv2d_4a_3x3': 192,
  'MaxPool_5a_3x3': 192,
  'Mixed_5b': 256,
  'Mixed_5c': 288,
  'Mixed_5d': 288,
  'Mixed_6a': 768,
  'Mixed_6b': 768,
  'Mixed_6c': 768,
  'Mixed_6d': 768,
  'Mixed_6e': 768,
  'Mixed_7a': 1280,
  'Mixed_7b': 2048,
  'Mixed_7c': 2048,
}
SIDES = {
  299: (149, 147, 147, 73, 73, 71, 35, 35, 35, 35, 17, 17, 17, 17, 17, 8, 8, 8),
  75: (37, 35, 35, 17, 17, 15, 7, 7, 7, 7, 3, 3, 3, 3, 3, 1, 1, 1),
}


@pytest.mark.parametrize('size', [299, 75])
def test_endpoint_shapes(size):
  got = _endpoint_shapes(InceptionV3(), size)
  expected = {n: (2, s, s, c) for (n, c), s in zip(FEATURES.items(), SIDES[size], strict=True)}
  expected |= {
    'AuxLogits': (2, 1001),
    'PreLogits': (2, 1, 1, 2048),
    'Logits': (2, 1001),
    'Predictions': (2, 1001),
  }
  assert got == expected


def test_without_aux_logits():
  model = InceptionV3(num_classes=4, create_aux_logits=False)
  assert not any('AuxLogits' in k for k in _shapes(model, 75))
  points = _endpoint_shapes(model, 75)
  assert 'AuxLogits' not in points and points['Logits'] == (2, 4)


def test_depth_multiplier_and_min_depth():
  half = _shapes(InceptionV3(depth_multiplier=0.5), 75)
  assert half['params/Conv2d_1a_3x3/weights'] == (3, 3, 3, 16)
  assert half['params/Logits/Conv2d_1c_1x1/weights'] == (1, 1, 1024, 1001)
  tiny = _shapes(InceptionV3(depth_multiplier=0.1, min_depth=16), 75)
  assert tiny['params/Conv2d_1a_3x3/weights'] == (3, 3, 3, 16)  # max(int(3.2), 16)
  assert tiny['params/Mixed_5b/Branch_0/Conv2d_0a_1x1/weights'] == (1, 1, 19, 16)  # 19 = 0.1·192
  with pytest.raises(ValueError, match='depth_multiplier'):
    _shapes(InceptionV3(depth_multiplier=0.0), 75)


def test_bad_input_sizes_are_clear_errors():
  with pytest.raises(ValueError, match='>= 75'):
    _shapes(InceptionV3(), 74)
  with pytest.raises(ValueError, match='larger than TF-Slim InceptionV3 supports'):
    _shapes(InceptionV3(), 400)


def test_every_batch_norm_uses_the_activation():
  calls = []

  def counting_relu(x):
    calls.append(x.shape)
    return nn.relu(x)

  _shapes(InceptionV3(activation=counting_relu), 75)
  assert len(calls) == 96  # every conv + batch norm (192 moving statistics / 2)


def test_endpoints_are_submodules_for_interception():
  seen = set()

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and len(context.module.path) == 1:
      seen.add(context.module.path[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _shapes(InceptionV3(), 75)
  assert set(FEATURES) | {'AuxLogits', 'Logits'} == seen


def test_batch_norm_train_rule(small):
  variables, images, _ = small
  model = InceptionV3(batch_norm_train=('Logits', 'Mixed_7.*'))
  _, state = jax.jit(
    lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
    )
  )(variables, images)
  old = scopes.flatten(variables['batch_stats'])
  new = scopes.flatten(state['batch_stats'])
  assert old.keys() == new.keys()
  np.testing.assert_array_equal(
    new['Conv2d_1a_3x3/BatchNorm/moving_mean'], old['Conv2d_1a_3x3/BatchNorm/moving_mean']
  )
  assert not np.array_equal(
    new['Mixed_7c/Branch_0/Conv2d_0a_1x1/BatchNorm/moving_mean'],
    old['Mixed_7c/Branch_0/Conv2d_0a_1x1/BatchNorm/moving_mean'],
  )
  for path in old:
    changed = not np.array_equal(new[path], old[path])
    assert changed == path.startswith('Mixed_7'), path  # AuxLogits, Mixed_6e, ... frozen.


def test_frozen_batch_norm_runs_in_inference_mode(small):
  variables, images, eval_points = small
  frozen = InceptionV3(batch_norm_train=())
  (_, train_points), state = jax.jit(
    lambda v, x: frozen.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)}
    )
  )(variables, images)
  np.testing.assert_allclose(train_points['Mixed_7c'], eval_points['Mixed_7c'], rtol=1e-6)
  for path, value in scopes.flatten(state['batch_stats']).items():
    np.testing.assert_array_equal(value, scopes.flatten(variables['batch_stats'])[path])

  # Dropout (keep 0.8 on PreLogits) is on in training only, and follows `train` alone.
  pre = np.asarray(eval_points['PreLogits'])
  dropped = np.asarray(train_points['PreLogits'])
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], pre[kept] / 0.8, rtol=1e-6)
  assert 0.1 < 1 - kept[pre != 0].mean() < 0.3
  _, again = jax.jit(InceptionV3().apply)(variables, images)
  np.testing.assert_array_equal(again['PreLogits'], pre)


def test_bfloat16_compute_keeps_float32_params(small):
  variables, images, eval_points = small
  model = InceptionV3(dtype=jnp.bfloat16)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(_abstract_variables(model, 75)))
  logits, points = jax.jit(model.apply)(variables, images)
  assert points['Mixed_7c'].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  # The same function to bfloat16's ~3 significant digits (measured: 6e-3).
  assert reference.relative_error(logits, eval_points['Logits']) < 3e-2


def test_the_record_builds_for_inference_and_describes_its_settings():
  """Inference builds InceptionV3 without its aux head; the model card's phrases are its own."""
  config = default.get_config()
  assert models.build_model(config, 4).create_aux_logits
  assert not models.build_inference_model(config, 4).create_aux_logits
  assert models.backbone_of(config).describe(config) == (
    'depth multiplier 1',
    'min depth 16',
    'aux head on (loss weight 0.4)',
  )
  config.model.name = 'densenet121'
  assert models.build_inference_model(config, 4).num_classes == 4
  assert models.backbone_of(config).describe(config) == ()
