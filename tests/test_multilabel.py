"""Multi-label findings (issue 22), the training side: the sigmoid head's loss, weights and
accuracy by hand, an ignored label's gradient (none, through the whole step), independent
probabilities, and a short run on visible findings that learns each of them."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from sklearn.utils.class_weight import compute_class_weight

from configs import default
from pneumo_jax import checkpoints, heads, scopes
from pneumo_jax.data import dataset_for, pipeline, preprocess, synthetic
from pneumo_jax.evaluation import inference, metrics
from pneumo_jax.models import build_inference_model
from pneumo_jax.models.inception_v3 import BACKBONE, InceptionV3
from pneumo_jax.training import feature_cache, loop, optim, phases
from pneumo_jax.training.step import TrainState, make_train_step
from tests import reference

SIZE = 75
# Present, absent, ignored: one film with every finding ignored, one with one of them ignored.
LABELS = np.array([[1, 0, -1], [0, 1, 0], [-1, -1, -1], [1, 1, 0]], np.int32)


def _bce(x, t):
  return -(t * np.log(1 / (1 + np.exp(-x))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x))))


def test_sigmoid_loss_by_hand():
  """Every used label's weighted binary cross-entropy over their number (8 of 12 here); an
  ignored one counts in neither; smoothing ε moves each target to 1 − ε/2 or ε/2."""
  logits = np.random.default_rng(0).normal(0, 2, LABELS.shape).astype(np.float32)
  w = np.random.default_rng(1).uniform(0.5, 2, LABELS.shape).astype(np.float32)
  used = LABELS >= 0
  for e in (0.0, 0.2):
    t = np.where(LABELS > 0, 1 - e / 2, e / 2)
    by_hand = (_bce(logits.astype(np.float64), t) * w)[used].sum() / used.sum()
    got = heads.Sigmoid.loss(jnp.asarray(logits), jnp.asarray(LABELS), 3, e, jnp.asarray(w))
    np.testing.assert_allclose(float(got), by_hand, rtol=1e-6)
  nothing = heads.Sigmoid.loss(jnp.asarray(logits), -jnp.ones_like(LABELS), 3, 0.0, jnp.asarray(w))
  assert float(nothing) == 0.0


def test_an_ignored_label_has_exactly_zero_gradient_and_an_absent_one_has_some():
  """'ignore' (-1) leaves the loss; a blank read as absent under 'zeros' (0) trains like any
  label."""
  logits = jnp.asarray(np.random.default_rng(0).normal(0, 2, LABELS.shape), jnp.float32)
  grad = jax.grad(heads.Sigmoid.loss)
  for e in (0.0, 0.1):
    g = np.asarray(grad(logits, jnp.asarray(LABELS), 3, e, jnp.ones(LABELS.shape)))
    assert (g[LABELS == -1] == 0).all()
    assert (g[LABELS >= 0] != 0).all()
  zeros = np.where(LABELS == -1, 0, LABELS)
  g = np.asarray(grad(logits, jnp.asarray(zeros), 3, 0.0, jnp.ones(LABELS.shape)))
  assert (g != 0).all()


def test_probabilities_are_independent():
  """One sigmoid per finding: rows need not sum to one, and one finding's logit moves only its
  own probability."""
  logits = np.random.default_rng(0).normal(0, 2, (50, 3)).astype(np.float32)
  probs = np.asarray(heads.Sigmoid.probs(jnp.asarray(logits)))
  np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-6)
  assert np.abs(probs.sum(-1) - 1).max() > 0.5
  moved = logits.copy()
  moved[:, 1] += 3.0
  after = np.asarray(heads.Sigmoid.probs(jnp.asarray(moved)))
  np.testing.assert_array_equal(after[:, [0, 2]], probs[:, [0, 2]])
  assert (after[:, 1] > probs[:, 1]).all()


def test_accuracy_counts_used_labels_at_probability_one_half():
  logits = jnp.array([[2.0, -1.0, 5.0], [1.0, 1.0, -3.0], [9.0, 9.0, 9.0], [-1.0, 2.0, 0.5]])
  # Right: 2 of 2, 2 of 3 (not the first), none used, 1 of 3 (the middle): 5 of 8.
  right = [[1, 1, 0], [0, 1, 1], [0, 0, 0], [0, 1, 0]]
  acc = float(heads.Sigmoid.accuracy(logits, jnp.asarray(LABELS)))
  assert acc == pytest.approx(np.sum(right) / np.sum(LABELS >= 0))


def test_balanced_weights_per_finding_are_scikit_learns():
  """Each finding a binary task of its own, over the films whose label is used; a film's weight
  for a finding is that of its label."""
  c = default.get_config()
  c.class_weighting = 'balanced'
  labels = np.random.default_rng(0).choice([1, 0, 0, 0, -1], (200, 4)).astype(np.int32)
  w = phases.class_weights(c, labels)
  assert w.shape == (4, 2)
  for f in range(4):
    used = labels[labels[:, f] >= 0, f]
    np.testing.assert_allclose(
      w[f], compute_class_weight('balanced', classes=np.array([0, 1]), y=used)
    )
  per_label = np.asarray(heads.Sigmoid.example_weights(jnp.asarray(LABELS), w[:3]))
  for (i, f), y in np.ndenumerate(LABELS):
    if y >= 0:
      assert per_label[i, f] == pytest.approx(w[f, y])
  ones = heads.Sigmoid.example_weights(jnp.asarray(LABELS), None)
  np.testing.assert_array_equal(ones, np.ones(LABELS.shape))
  c.class_weighting = ''
  assert phases.class_weights(c, labels) is None


def test_the_default_head_follows_the_task_until_set():
  c = ml_collections.ConfigDict({'dataset': {'task': 'single'}, 'model': {}})
  c.model.head = heads.default_for(c.dataset.get_ref('task'))
  assert c.model.head == 'softmax'
  c.dataset.task = 'multilabel'
  assert c.model.head == 'sigmoid'
  c.model.head = 'ordinal'
  assert (c.model.head, c.dataset.task) == ('ordinal', 'multilabel')
  assert [h.multilabel for h in (heads.Softmax, heads.Ordinal, heads.Sigmoid)] == [
    False,
    False,
    True,
  ]


def _batch(labels: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
  r = np.random.default_rng(seed)
  view = preprocess.central_view(SIZE, SIZE, 1.0)
  n = len(labels)
  return {
    'image': r.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
    **{k: np.stack([v] * n) for k, v in view.items()},
    'label': labels,
  }


def test_an_ignored_film_adds_nothing_to_the_step():
  """A head-only step with smoothing, class weights and the aux loss: the image of a film whose
  labels are all ignored cannot change the update (bit for bit), one read as absent does, and a
  batch with every label ignored has zero gradient."""
  model = InceptionV3(num_classes=3, head='sigmoid', depth_multiplier=0.25, batch_norm_train=())
  variables = reference.random_variables(model, SIZE)
  mask = scopes.mask(variables['params'], 'Logits,AuxLogits')
  tx = optim.make_optimizer(default.get_config().optimizer, optax.constant_schedule(0.1), mask, '')
  step = jax.jit(
    make_train_step(
      model,
      tx,
      mask,
      aux_loss_weight=0.4,
      label_smoothing=0.1,
      class_weights=np.array([[0.6, 3.0], [0.7, 2.0], [0.8, 1.5]]),
      ema_decay=0.0,
      aux_logits=BACKBONE.aux_logits,
      image_size=SIZE,
    )
  )
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
  )

  def trained(labels, other_image):
    batch = _batch(labels)
    if other_image:
      batch['image'][2] = 255 - batch['image'][2]
    new, metrics = step(state, batch, jax.random.key(0))
    return scopes.flatten(new.params), metrics

  a, metrics = trained(LABELS, False)
  b, _ = trained(LABELS, True)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['aux_loss']) > 0
  assert 0 <= float(metrics['accuracy']) <= 1
  kernel = 'Logits/Conv2d_1c_1x1/weights'
  assert not np.array_equal(a[kernel], scopes.flatten(variables['params'])[kernel])
  for k in (k for k in a if k.startswith(('Logits/', 'AuxLogits/'))):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  absent = np.where(LABELS == -1, 0, LABELS)
  a, _ = trained(absent, False)
  b, _ = trained(absent, True)
  assert not np.array_equal(a[kernel], b[kernel])
  _, metrics = trained(-np.ones_like(LABELS), False)
  assert float(metrics['grad_norm']) == 0.0 and float(metrics['total_loss']) == 0.0


@pytest.mark.long
def test_a_short_run_learns_every_finding_and_a_cached_head_phase_too(tmp_path):
  """From scratch on visible findings (uncertain cells ignored, blanks absent), balanced
  weights, smoothing and EMA: 150 steps of the whole net, then 30 of the heads from the feature
  cache. Every finding's validation AUC is high, and its probabilities are independent."""
  csv = synthetic.make_multilabel(str(tmp_path / 'set'), patients=100, films_per_patient=2)
  c = default.get_config()
  c.update_from_flattened_dict(
    {
      'dataset.task': 'multilabel',
      'dataset.labels_csv': csv,
      'dataset.data_dir': str(tmp_path / 'data'),
      'model.depth_multiplier': 0.25,
      'model.batch_norm_decay': 0.9,  # From scratch: the moving statistics must catch up.
      'input.image_size': SIZE,
      'input.batch_size': 16,
      'input.eval_batch_size': 32,
      'input.random_crop': False,  # Flips only: the head phase can train from cached features.
      'input.color_distortion': False,
      'optimizer.name': 'adam',
      'optimizer.epsilon': 1e-7,
      'schedule.learning_rate': 0.001,
      'class_weighting': 'balanced',
      'label_smoothing': 0.05,
      'ema_decay': 0.9,
      'log_every_steps': 50,
      'eval_every_steps': 0,
      'checkpoint_every_steps': 0,
      'feature_cache': True,
    }
  )
  c.phase_order = 'all,head'
  c.phases.all = dict(num_steps=150, trainable_scopes='.*')
  c.phases.head = dict(num_steps=30, trainable_scopes='Logits,AuxLogits')
  assert (c.model.head, c.best_metric) == ('sigmoid', 'auc_macro')
  workdir = str(tmp_path / 'work')
  summary = loop.train_and_evaluate(c, workdir)
  assert summary['step'] == 180 and summary['best']['auc_macro'] > 0.9
  assert os.listdir(os.path.join(workdir, feature_cache.CACHE_DIR))  # The head phase's.
  assert os.path.exists(os.path.join(workdir, 'train_images.png'))  # Titled by findings.

  names = checkpoints.load_label_names(workdir)
  assert names == ['effusion', 'nodule', 'fibrosis']
  variables, _ = checkpoints.load_for_inference(workdir)
  out = inference.predict(
    build_inference_model(c, len(names)),
    variables,
    pipeline.eval_batches(dataset_for(c, workdir), 'validation', c.input),
    image_size=SIZE,
  )
  assert out['probs'].shape == out['label'].shape == (len(out['label']), 3)
  assert (out['label'] == -1).any()
  assert np.abs(out['probs'].sum(-1) - 1).max() > 0.5
  found = metrics.compute(out['label'], out['probs'], names)
  # 14–16 positives a finding in validation: one AUC moves by several hundredths between
  # float-rounding neighbours of the same run, so each finding's bar is below the mean's.
  assert found['auc_macro'] > 0.9, found['per_finding']
  for name in names:
    assert found['per_finding'][name]['auc'] > 0.85, (name, found['per_finding'])
