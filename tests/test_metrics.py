"""metrics.compute against scikit-learn called directly, and the ordinal/edge-case semantics."""

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumo_jax.evaluation import metrics

NAMES = ['stage0', 'stage1', 'stage2', 'stage3']


def _predictions(num_classes=4, n=80, seed=0, skill=2.0):
  """Labels and softmax probabilities that are better than chance but far from perfect."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  logits = rng.normal(size=(n, num_classes)) + skill * np.eye(num_classes)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return labels, probs


def test_matches_sklearn_computed_independently():
  labels, probs = _predictions()
  preds = probs.argmax(-1)
  m = metrics.compute(labels, probs, NAMES)
  assert m['accuracy'] == pytest.approx(skm.accuracy_score(labels, preds))
  assert m['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
  assert m['kappa'] == pytest.approx(skm.cohen_kappa_score(labels, preds, weights='quadratic'))
  assert m['auc_macro'] == pytest.approx(
    skm.roc_auc_score(labels, probs, multi_class='ovr', average='macro')
  )
  assert m['loss'] == pytest.approx(skm.log_loss(labels, probs))
  assert m['confusion_matrix'] == skm.confusion_matrix(labels, preds).tolist()
  report = skm.classification_report(labels, preds, target_names=NAMES, output_dict=True)
  for name in NAMES:
    for key, theirs in [
      ('precision', 'precision'),
      ('recall', 'recall'),
      ('f1', 'f1-score'),
      ('support', 'support'),
    ]:
      assert m['per_class'][name][key] == pytest.approx(report[name][theirs]), (name, key)
  assert 0.5 < m['accuracy'] < 1.0  # The fixture is neither chance nor perfect.


def test_keys():
  m = metrics.compute(*_predictions(), NAMES)
  assert set(metrics.HIGHER_IS_BETTER) <= set(m)
  assert 'top_5_accuracy' not in m  # Four classes: top-5 would always be 1.
  assert list(m['per_class']) == NAMES
  for stats in m['per_class'].values():
    assert set(stats) == {'precision', 'recall', 'f1', 'support', 'auc'}


def test_top_5_accuracy_only_above_five_classes():
  labels, probs = _predictions(num_classes=7, skill=0.5)
  m = metrics.compute(labels, probs, [f'c{i}' for i in range(7)])
  assert m['top_5_accuracy'] == pytest.approx(skm.top_k_accuracy_score(labels, probs, k=5))


def _quadratic_kappa_by_hand(labels, preds, k):
  observed = np.zeros((k, k))
  for t, p in zip(labels, preds, strict=True):
    observed[t, p] += 1
  expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
  i, j = np.indices((k, k))
  w = (i - j) ** 2 / (k - 1) ** 2
  return 1 - (w * observed).sum() / (w * expected).sum()


def test_kappa_is_quadratic_weighted_and_ordinal():
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  near = np.array([0, 1, 1, 2, 2, 3, 3, 3])  # Three misses, each by one stage.
  far = np.array([0, 3, 1, 3, 2, 0, 3, 3])  # Three misses too, by up to three stages.
  k_near = metrics.compute(labels, np.eye(4)[near], NAMES)['kappa']
  k_far = metrics.compute(labels, np.eye(4)[far], NAMES)['kappa']
  assert k_near == pytest.approx(_quadratic_kappa_by_hand(labels, near, 4))
  assert k_far == pytest.approx(_quadratic_kappa_by_hand(labels, far, 4))
  assert k_near == pytest.approx(0.85)  # 1 - (3/9) / (20/9), worked on paper.
  assert k_near > k_far  # Same accuracy, but a far miss costs more.


def test_absent_class_gives_none_auc_not_a_crash():
  labels, probs = _predictions()
  keep = labels != 2
  labels, probs = labels[keep], probs[keep]
  m = metrics.compute(labels, probs, NAMES)
  assert m['per_class']['stage2']['auc'] is None
  assert m['per_class']['stage2']['support'] == 0
  present = [skm.roc_auc_score(labels == c, probs[:, c]) for c in (0, 1, 3)]
  assert m['auc_macro'] == pytest.approx(np.mean(present))


def test_single_class_split_is_undefined_not_nan():
  probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]])
  m = metrics.compute(np.zeros(3, int), probs, ['a', 'b'])  # One class, always predicted.
  assert m['auc_macro'] is None
  assert m['kappa'] is None
  assert m['accuracy'] == 1.0


def test_loss_is_finite_for_confident_mistakes():
  m = metrics.compute(np.array([0, 1]), np.array([[0.0, 1.0], [0.0, 1.0]]), ['a', 'b'])
  assert np.isfinite(m['loss']) and m['loss'] > 5


def test_better_respects_direction_and_undefined_values():
  assert metrics.better('kappa', 0.5, 0.4)
  assert not metrics.better('kappa', 0.4, 0.5)
  assert metrics.better('loss', 0.3, 0.4)
  assert not metrics.better('loss', None, 0.4)
  assert metrics.better('auc_macro', 0.6, None)
  with pytest.raises(ValueError, match='unknown metric'):
    metrics.better('f2', 1.0, 0.0)


def test_bad_shapes_name_the_problem():
  with pytest.raises(ValueError, match=r'probs \[N, 4\]'):
    metrics.compute(np.zeros(3, int), np.ones((3, 3)) / 3, NAMES)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 4\)'):
    metrics.compute(np.array([0, 4]), np.ones((2, 4)) / 4, NAMES)
  with pytest.raises(ValueError, match='rows must sum to 1'):
    metrics.compute(np.array([0, 1]), np.ones((2, 4)), NAMES)


def test_format_table():
  labels, probs = _predictions()
  labels, probs = labels[labels != 3], probs[labels != 3]
  table = metrics.format_table(metrics.compute(labels, probs, NAMES), NAMES)
  for word in [*metrics.HIGHER_IS_BETTER, *NAMES, 'confusion matrix']:
    assert word in table
  assert 'n/a' in table  # stage3's AUC.


def test_labels_of_findings_take_the_findings_path():
  """[N, F] labels are findings (metrics.compute_findings); [N] labels keep the class metrics."""
  labels, probs = _predictions()
  single = metrics.compute(labels, probs, NAMES)
  assert 'per_finding' not in single and 'auc_micro' not in single
  findings = metrics.compute(np.eye(4, dtype=int)[labels], probs, NAMES)
  assert list(findings['per_finding']) == NAMES and findings['kappa'] is None
  for name in NAMES:  # One-vs-rest per class is each finding's binary task.
    assert findings['per_finding'][name]['auc'] == pytest.approx(single['per_class'][name]['auc'])
