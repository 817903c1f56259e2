"""The classifier heads: softmax cross-entropy and the ordinal (CORN) head's probabilities, loss
and gradients, and one ordinal InceptionV3 trained a step and run through inference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from pneumo_jax import heads, models, scopes, validate
from pneumo_jax.data import augment, preprocess
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import explain, inference
from pneumo_jax.training import optim
from pneumo_jax.training.step import TrainState, make_train_step


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_softmax_cross_entropy_with_class_weights_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
  labels = jnp.array([0, 2])
  w = jnp.array([1.0, 1.0, 3.0])[labels]
  p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True)
  by_hand = (-np.log(p[0, 0]) * 1.0 + -np.log(p[1, 2]) * 3.0) / 2
  loss = heads.Softmax.loss
  np.testing.assert_allclose(float(loss(logits, labels, 3, 0.0, w)), by_hand, rtol=1e-6)
  smooth = np.array([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], [0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3]])
  by_hand = -(smooth * np.log(p)).sum(1) @ np.array([1.0, 3.0]) / 2
  np.testing.assert_allclose(float(loss(logits, labels, 3, 0.1, w)), by_hand, rtol=1e-6)


@pytest.mark.parametrize('classes', [2, 3, 4, 7])
def test_ordinal_probabilities_are_monotone_and_sum_to_one(classes):
  logits = np.random.default_rng(classes).normal(0, 4, (500, classes - 1)).astype(np.float32)
  logits[:5] = [30.0] * (classes - 1)  # Saturated rows: every conditional ≈ 1, or ≈ 0.
  logits[5:10] = [-30.0] * (classes - 1)
  probs = np.asarray(heads.Ordinal.probs(jnp.asarray(logits)), np.float64)
  assert probs.shape == (500, classes) and (probs >= 0).all()
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  at_least = np.cumsum(probs[:, ::-1], axis=1)[:, ::-1]  # P(y ≥ k), k = 0 … K − 1.
  assert (np.diff(at_least, axis=1) <= 1e-7).all()
  # P(y > k) is the product of the conditionals P(y > j | y > j − 1), j ≤ k.
  np.testing.assert_allclose(
    at_least[:, 1:], np.cumprod(_sigmoid(logits.astype(np.float64)), axis=1), atol=1e-6
  )
  np.testing.assert_allclose(
    np.exp(heads.Ordinal.scores(jnp.asarray(logits))), probs, rtol=1e-5, atol=1e-7
  )


def test_ordinal_loss_by_hand():
  """K = 4: the y = 1 example trains tasks 0 (target 1) and 1 (target 0), not 2; y = 3 trains
  all three with target 1: five terms, weighted per example, over five."""
  logits = np.array([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], np.float32)
  labels = np.array([1, 3])
  w = np.array([2.0, 0.5], np.float32)
  pos = lambda x: -np.log(_sigmoid(x))
  neg = lambda x: -np.log(1 - _sigmoid(x))
  by_hand = (2.0 * (pos(0.5) + neg(-1.0)) + 0.5 * (pos(1.5) + pos(0.2) + pos(-0.3))) / 5
  got = heads.Ordinal.loss(jnp.asarray(logits), jnp.asarray(labels), 4, 0.0, jnp.asarray(w))
  np.testing.assert_allclose(float(got), by_hand, rtol=1e-6)
  # Smoothing ε: each binary target t becomes t (1 − ε) + ε / 2.
  e = 0.2
  mix = lambda x, t: (t * (1 - e) + e / 2) * pos(x) + (1 - t * (1 - e) - e / 2) * neg(x)
  by_hand = (
    2.0 * (mix(0.5, 1) + mix(-1.0, 0)) + 0.5 * (mix(1.5, 1) + mix(0.2, 1) + mix(-0.3, 1))
  ) / 5
  got = heads.Ordinal.loss(jnp.asarray(logits), jnp.asarray(labels), 4, e, jnp.asarray(w))
  np.testing.assert_allclose(float(got), by_hand, rtol=1e-6)


def test_ordinal_loss_ignores_task_k_for_grades_below_k():
  labels = jnp.array([0, 1, 2, 3, 1])
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  grads = np.asarray(jax.grad(heads.Ordinal.loss)(logits, labels, 4, 0.1, jnp.ones(5, jnp.float32)))
  used = np.asarray(labels)[:, None] >= np.arange(3)
  assert (grads[~used] == 0).all()
  assert (grads[used] != 0).all()


def test_head_names_are_checked():
  c = default.get_config()
  c.model.head = 'corn'
  with pytest.raises(ConfigError, match=r"model.head='corn'.*'ordinal', 'sigmoid', 'softmax'"):
    validate.check(c)


@pytest.mark.long
def test_ordinal_inception_trains_a_step_predicts_and_explains_k_classes():
  """A 3-class ordinal run: its classifiers (and aux head) have 2 outputs, the checkpoint's
  class count reads 3, a step with the aux loss and class weights trains the head, inference
  returns 3 probabilities per image, and Grad-CAM explains the most probable of the 3."""
  c = default.get_config()
  c.model.head = 'ordinal'
  c.model.depth_multiplier = 0.25
  size, batch, classes = 75, 4, 3
  model = models.build_model(c, classes, batch_norm_train=())
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  flat = scopes.flatten(variables['params'])
  assert flat['Logits/Conv2d_1c_1x1/biases'].shape == (classes - 1,)
  assert flat['AuxLogits/Conv2d_2b_1x1/biases'].shape == (classes - 1,)
  assert models.num_classes_of(c, variables['params']) == classes

  mask = scopes.mask(variables['params'], 'Logits,AuxLogits')
  tx = optim.make_optimizer(c.optimizer, optax.constant_schedule(0.01), mask, '')
  step = make_train_step(
    model,
    tx,
    mask,
    aux_loss_weight=0.4,
    label_smoothing=0.1,
    class_weights=np.array([1.0, 2.0, 3.0]),
    ema_decay=0.0,
    aux_logits='AuxLogits',
    image_size=size,
  )
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
  )
  r = np.random.default_rng(0)
  view = preprocess.central_view(size, size, 1.0)
  data = {
    'image': r.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
    **{k: np.stack([v] * batch) for k, v in view.items()},
    'label': np.array([0, 1, 2, 2], np.int32),
  }
  new, metrics = jax.jit(step)(state, data, jax.random.key(1))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['aux_loss']) > 0
  before, after = scopes.flatten(state.params), scopes.flatten(new.params)
  assert not np.array_equal(
    before['Logits/Conv2d_1c_1x1/weights'], after['Logits/Conv2d_1c_1x1/weights']
  )

  inference_model = models.build_inference_model(c, classes)
  out = inference.predict(
    inference_model,
    {'params': new.params, 'batch_stats': new.batch_stats},
    [{**data, 'mask': np.ones(batch, bool)}],
    image_size=size,
  )
  assert out['probs'].shape == (batch, classes)
  np.testing.assert_allclose(out['probs'].sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(out['label'], data['label'])

  why = explain.explain(
    inference_model,
    {'params': new.params, 'batch_stats': new.batch_stats},
    augment.from_batch(data, size),
    layer='Mixed_6e',
  )
  np.testing.assert_allclose(why['probs'], out['probs'], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(why['target'], out['probs'].argmax(-1))
  assert np.isfinite(why['grad_cam']).all() and np.abs(why['guided_backprop']).max() > 0
