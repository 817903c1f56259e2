"""Optimizers and schedules against TensorFlow's own (the reference slim used), masks, decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from configs import default
from pneumo_jax.training import optim

TF1 = tf.compat.v1.train


def _cfg(name, **kw):
  c = default.get_config().optimizer
  c.name = name
  c.weight_decay = 0.0
  for k, v in kw.items():
    c[k] = v
  return c


def _tf_optimizer(name, lr, c):
  return {
    'rmsprop': lambda: TF1.RMSPropOptimizer(
      lr, decay=c.rmsprop_decay, momentum=c.rmsprop_momentum, epsilon=c.epsilon
    ),
    'momentum': lambda: TF1.MomentumOptimizer(lr, c.momentum),
    'sgd': lambda: TF1.GradientDescentOptimizer(lr),
    'adam': lambda: TF1.AdamOptimizer(lr, c.adam_beta1, c.adam_beta2, c.epsilon),
    'adagrad': lambda: TF1.AdagradOptimizer(lr, c.adagrad_initial_accumulator_value),
    'adadelta': lambda: TF1.AdadeltaOptimizer(lr, c.adadelta_rho, c.epsilon),
    'ftrl': lambda: TF1.FtrlOptimizer(
      lr, c.ftrl_learning_rate_power, c.ftrl_initial_accumulator_value, c.ftrl_l1, c.ftrl_l2
    ),
  }[name]()


def _grad(w):
  """Gradient of a fixed non-quadratic loss, so every step's gradient differs."""
  return np.cos(3.0 * w) + 0.5 * w


# Slim's defaults (opt_epsilon 1.0) everywhere, except adam: TF scales its epsilon by
# sqrt(1 - beta2^t), optax does not, so the two agree only where epsilon is negligible.
@pytest.mark.parametrize(
  'name,kw',
  [
    ('rmsprop', {}),
    ('momentum', {}),
    ('sgd', {}),
    ('adagrad', {}),
    ('adadelta', {}),
    ('ftrl', {}),
    ('ftrl', {'ftrl_l1': 0.01, 'ftrl_l2': 0.1}),
    ('adam', {'epsilon': 1e-8}),
  ],
)
def test_matches_tensorflow_optimizer(name, kw):
  c = _cfg(name, **kw)
  lr = 0.1
  w0 = np.array([0.5, -1.0, 2.0], np.float32)
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    var = tf.compat.v1.Variable(w0)
    g = tf.compat.v1.placeholder(tf.float32, [3])
    train = _tf_optimizer(name, lr, c).apply_gradients([(g, var)])
    sess.run(tf.compat.v1.global_variables_initializer())
    tf_ws = []
    for _ in range(5):
      sess.run(train, {g: _grad(sess.run(var))})
      tf_ws.append(sess.run(var))

  params = {'w': jnp.asarray(w0)}
  tx = optim.make_optimizer(c, optax.constant_schedule(lr), {'w': True}, '')
  state = tx.init(params)
  for expected in tf_ws:
    updates, state = tx.update({'w': jnp.asarray(_grad(np.asarray(params['w'])))}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params['w'], expected, rtol=2e-5, atol=1e-5)


def test_rmsprop_differs_from_plain_optax_defaults():
  """The TF semantics matter: optax.rmsprop with slim's numbers but optax's init goes elsewhere."""
  c = _cfg('rmsprop')
  params = {'w': jnp.ones(3)}
  ours = optim.make_optimizer(c, optax.constant_schedule(0.01), {'w': True}, '')
  plain = optax.rmsprop(0.01, decay=0.9, eps=1.0, momentum=0.9)
  g = {'w': jnp.full(3, 0.3)}
  u1, _ = ours.update(g, ours.init(params), params)
  u2, _ = plain.update(g, plain.init(params), params)
  assert not np.allclose(u1['w'], u2['w'])


def _tf_lr(fn):
  """TF1's decay functions; eagerly they return a callable giving the value."""
  return [float(fn(tf.constant(s, tf.int64))()) for s in range(0, 1000, 37)]


def test_schedules_match_tensorflow():
  s = default.get_config().schedule
  s.learning_rate, s.decay_steps, s.decay_rate = 0.01, 100, 0.94
  steps = range(0, 1000, 37)
  for staircase in (True, False):
    s.name, s.staircase = 'exponential', staircase
    ours = optim.make_schedule(s, 1000)
    ref = _tf_lr(
      lambda t, st=staircase: tf.compat.v1.train.exponential_decay(0.01, t, 100, 0.94, staircase=st)
    )
    np.testing.assert_allclose([ours(i) for i in steps], ref, rtol=1e-5)
  s.name, s.power, s.end_learning_rate = 'polynomial', 2.0, 1e-4
  ours = optim.make_schedule(s, 800)
  ref = _tf_lr(lambda t: tf.compat.v1.train.polynomial_decay(0.01, t, 800, 1e-4, power=2.0))
  np.testing.assert_allclose([ours(i) for i in steps], ref, rtol=1e-5)
  s.name = 'fixed'
  assert {float(optim.make_schedule(s, 10)(i)) for i in steps} == {0.01}


def test_warmup_cosine_by_formula():
  s = default.get_config().schedule
  s.name, s.learning_rate, s.warmup_steps, s.end_learning_rate = 'warmup_cosine', 0.1, 10, 0.0
  f = optim.make_schedule(s, 110)
  assert float(f(0)) == 0.0
  np.testing.assert_allclose(float(f(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(f(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(f(60)), 0.05, rtol=1e-5)  # half-way down the cosine
  np.testing.assert_allclose(float(f(110)), 0.0, atol=1e-7)


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match=r'config\.optimizer\.name'):
    optim.make_optimizer(_cfg('lamb'), optax.constant_schedule(0.1), {'w': True}, '')
  s = default.get_config().schedule
  s.name = 'cyclic'
  with pytest.raises(ValueError, match=r'config\.schedule\.name'):
    optim.make_schedule(s, 10)


def test_mask_and_weight_decay_scope():
  """Frozen leaves get zero updates; decay (slim's L2) reaches trainable conv kernels only."""
  c = _cfg('sgd', weight_decay=0.5)
  params = {
    'Logits': {'w': {'weights': jnp.ones((1, 1, 2, 2)), 'biases': jnp.ones(2)}},
    'Conv': {'weights': jnp.ones((3, 3, 1, 2))},
  }
  trainable = {'Logits': {'w': {'weights': True, 'biases': True}}, 'Conv': {'weights': False}}
  tx = optim.make_optimizer(c, optax.constant_schedule(1.0), trainable, '.*weights$')
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['Logits']['w']['weights'], -0.5)  # -lr · wd · w
  np.testing.assert_allclose(updates['Logits']['w']['biases'], 0.0)
  np.testing.assert_allclose(updates['Conv']['weights'], 0.0)


def test_gradient_clipping():
  c = _cfg('sgd', grad_clip_norm=1.0)
  params = {'w': jnp.zeros(4)}
  tx = optim.make_optimizer(c, optax.constant_schedule(1.0), {'w': True}, '')
  updates, _ = tx.update({'w': jnp.full(4, 10.0)}, tx.init(params), params)
  np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-6)
