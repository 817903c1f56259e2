"""The batch norm both backbones share (pneumo_jax.models.layers), on small arrays: its variable
names, the frozen-scope rule, its moving averages and its normalisation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pneumo_jax import scopes
from pneumo_jax.models import layers

SLIM = functools.partial(
  layers.BatchNorm, epsilon=1e-3, use_scale=False, names=layers.SLIM_NAMES, batch_norm_decay=0.9
)
FLAX = functools.partial(
  layers.BatchNorm,
  epsilon=1e-5,
  use_scale=True,
  names=layers.FLAX_NAMES,
  batch_norm_decay=0.8,
  activation=nn.relu,
)


class _Two(nn.Module):
  """Two batch norms in a row, at paths `a` and `b`."""

  norm: layers.NormFactory

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.norm(name='b')(self.norm(name='a')(x, train), train)


def _x(seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (2, 3, 3, 4)) * 2.0 + 0.5


@pytest.mark.parametrize(
  'norm, params, stats',
  [
    (SLIM, {'beta'}, {'moving_mean', 'moving_variance'}),
    (FLAX, {'scale', 'bias'}, {'mean', 'var'}),
  ],
)
def test_variable_names_are_the_backbones(norm, params, stats):
  variables = _Two(norm).init(jax.random.key(0), _x(), False)
  assert set(variables['params']['a']) == params
  assert set(variables['batch_stats']['b']) == stats


@pytest.mark.parametrize('norm', [SLIM, FLAX])
def test_only_the_scopes_given_learn(norm):
  """`a` (matched by its bias's path) uses and updates batch statistics; `b` stays frozen."""
  model = _Two(functools.partial(norm, batch_norm_train=('a',)))
  variables = model.init(jax.random.key(0), _x(), False)
  x = _x(1)
  _, updated = model.apply(variables, x, True, mutable=['batch_stats'])
  names, decay = model.norm.keywords['names'], model.norm.keywords['batch_norm_decay']
  n = x.shape[0] * x.shape[1] * x.shape[2]
  mean, var = np.mean(x, axis=(0, 1, 2)), np.var(x, axis=(0, 1, 2))
  a = updated['batch_stats']['a']
  np.testing.assert_allclose(a[names.mean], (1 - decay) * mean, rtol=1e-5)
  np.testing.assert_allclose(a[names.var], decay + (1 - decay) * var * n / (n - 1), rtol=1e-5)
  frozen = scopes.flatten(updated['batch_stats']['b'])
  assert all(
    np.array_equal(v, scopes.flatten(variables['batch_stats']['b'])[k]) for k, v in frozen.items()
  )
  # `a` normalises with the batch's (biased) statistics, `b` with its moving ones (mean 0,
  # variance 1 at init): only its epsilon remains.
  eps, act = model.norm.keywords['epsilon'], model.norm.keywords.get('activation') or (lambda v: v)
  y_a = act((x - mean) / np.sqrt(var + eps))
  y = model.apply(variables, x, True, mutable=['batch_stats'])[0]
  np.testing.assert_allclose(y, act(y_a / np.sqrt(1 + eps)), rtol=1e-5, atol=1e-6)


def test_scale_bias_epsilon_and_activation_in_inference_mode():
  model = layers.BatchNorm(**FLAX.keywords)
  stats = {'mean': jnp.asarray([0.5, -1.0]), 'var': jnp.asarray([4.0, 0.25])}
  params = {'scale': jnp.asarray([2.0, -1.0]), 'bias': jnp.asarray([0.1, 0.2])}
  x = jnp.asarray([[[[1.5, -2.0], [0.5, 0.0]]]])
  y = model.apply({'params': params, 'batch_stats': stats}, x, False)
  expected = (x - stats['mean']) * params['scale'] / np.sqrt(stats['var'] + 1e-5) + params['bias']
  np.testing.assert_allclose(y, np.maximum(expected, 0), rtol=1e-6)
  train_without_rule = model.apply(
    {'params': params, 'batch_stats': stats}, x, True, mutable=['batch_stats']
  )[1]
  assert not np.allclose(train_without_rule['batch_stats']['mean'], stats['mean'])


def test_compute_dtype_keeps_float32_statistics():
  model = _Two(functools.partial(SLIM, dtype=jnp.bfloat16))
  variables = model.init(jax.random.key(0), _x(), False)
  y, updated = model.apply(variables, _x(1).astype(jnp.bfloat16), True, mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updated))
