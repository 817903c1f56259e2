"""metrics.bootstrap_ci on cases whose answer is known, and model cards rendered from configs.

The card written by a real evaluation is checked in test_modes (it reuses that module's run).
"""

import numpy as np
import pytest

from configs import default, two_phase
from pneumo_jax.evaluation import metrics, model_card

NAMES = ['stage0', 'stage1', 'stage2', 'stage3']


def _predictions(n, accuracy, num_classes=4, seed=0):
  """Labels and probabilities whose argmax is right with probability `accuracy`."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  wrong = (labels + rng.integers(1, num_classes, n)) % num_classes
  preds = np.where(rng.random(n) < accuracy, labels, wrong)
  probs = np.full((n, num_classes), 0.1 / (num_classes - 1))
  probs[np.arange(n), preds] = 0.9
  probs += rng.uniform(0, 0.01, probs.shape)  # No ties: AUC below 1 where predictions miss.
  return labels, probs / probs.sum(-1, keepdims=True)


def test_all_correct_predictions_give_a_point_interval():
  ci = metrics.bootstrap_ci(*_predictions(40, accuracy=1.0), NAMES)
  for key in metrics.BOOTSTRAPPED:
    assert (ci[key]['estimate'], ci[key]['low'], ci[key]['high']) == (1.0, 1.0, 1.0), key
  assert ci['accuracy']['used'] == 1000 and ci['accuracy']['dropped'] == 0


def test_accuracy_interval_matches_the_binomial_on_a_large_sample():
  """The bootstrap of a proportion p over n examples spans ~2 · 1.96 · sqrt(p(1-p)/n)."""
  n, p = 2000, 0.8
  ci = metrics.bootstrap_ci(*_predictions(n, p, num_classes=2), NAMES[:2])['accuracy']
  assert ci['low'] < p < ci['high']
  binomial = 2 * 1.96 * np.sqrt(p * (1 - p) / n)  # 0.035
  assert ci['high'] - ci['low'] == pytest.approx(binomial, rel=0.1)  # Monte Carlo error ~4%.


def test_a_fixed_seed_gives_the_same_intervals():
  labels, probs = _predictions(60, accuracy=0.6)
  first = metrics.bootstrap_ci(labels, probs, NAMES, resamples=200, seed=3)
  assert metrics.bootstrap_ci(labels, probs, NAMES, resamples=200, seed=3) == first
  other = metrics.bootstrap_ci(labels, probs, NAMES, resamples=200, seed=4)
  assert other['kappa']['low'] != first['kappa']['low']
  assert first['method'] == {'resamples': 200, 'seed': 3, 'level': 0.95, 'n': 60}


def test_resample_scores_are_compute_on_the_resampled_examples():
  """The vectorised scores equal `compute` on each resample, NaN where `compute` gives None (or,
  for macro AUC, averages fewer classes than the estimate: such a resample is dropped)."""
  labels, probs = _predictions(12, accuracy=0.5)
  probs[:4] = np.eye(4)[[0, 0, 1, 1]] * 0.5 + 0.125  # Tied scores: AUC counts ties half.
  counts = np.random.default_rng(0).multinomial(12, np.full(12, 1 / 12), size=40)
  scores = metrics._resample_scores(counts, labels, probs, auc_classes=range(4))
  for r, row in enumerate(counts):
    drawn = np.repeat(np.arange(12), row)
    want = metrics.compute(labels[drawn], probs[drawn], NAMES)
    if any(m['auc'] is None for m in want['per_class'].values()):
      want['auc_macro'] = None
    for key in metrics.BOOTSTRAPPED:
      got = scores[key][r]
      assert (want[key] is None and np.isnan(got)) or got == pytest.approx(want[key]), (r, key)


def test_undefined_resamples_are_dropped_and_counted():
  labels, probs = _predictions(8, accuracy=0.5)
  ci = metrics.bootstrap_ci(labels, probs, NAMES, resamples=300)
  assert 0 < ci['auc_macro']['dropped'] < 300  # 8 images: a class is often not drawn.
  assert ci['auc_macro']['used'] + ci['auc_macro']['dropped'] == 300
  single = metrics.bootstrap_ci(np.zeros(5, int), np.tile([0.9, 0.1], (5, 1)), ['a', 'b'])
  assert single['kappa'] == {
    'estimate': None,
    'low': None,
    'high': None,
    'used': 0,
    'dropped': 1000,
  }


def _card(config, split='test', checkpoint='best', counts=None, n=200):
  counts = counts or {'train': [300, 120, 60, 20], 'validation': [75, 30, 15, 5]}
  labels, probs = _predictions(n, accuracy=0.7)
  data = model_card.Data(
    source_dir='/data/xrays',
    build_dir='/data/build/1.0.0',
    label_names=NAMES,
    counts=counts,
    channels=1,
    skipped=2,
  )
  report = {
    'split': split,
    'step': 4000,
    'label_names': NAMES,
    'provenance': {'image_size': 299, 'stored_size': 342, 'central_crop_fraction': 1.0},
    **metrics.compute(labels, probs, NAMES),
    model_card.INTERVALS: metrics.bootstrap_ci(labels, probs, NAMES, resamples=100),
  }
  return model_card.render(config, data, report, checkpoint=checkpoint)


def test_card_of_a_two_phase_run_on_a_test_split():
  config = two_phase.get_config()
  config.dataset.test_fraction = 0.1
  config.init_checkpoint = '/weights/inception_v3'
  counts = {'train': [270, 108, 54, 18], 'validation': [67, 27, 14, 5], 'test': [38, 15, 7, 2]}
  card = _card(config, counts=counts)
  for text in (
    '# Model card: inception_v3 grader of stage0, stage1, stage2, stage3 (step 4000)',
    '| stage0 | 270 | 67 | 38 | 375 |',
    '| **total** | 450 | 113 | 62 | 625 |',
    'test 10% held out first, validation 20% of the rest',
    '`/weights/inception_v3`, re-initialising `Logits,AuxLogits`',
    '| head | 1–1000 | `Logits,AuxLogits` | frozen | momentum, weight decay 4e-05, clip 5 | '
    'fixed | 0.01 |',
    '| top | 1001–4000 | `Mixed_6e,Mixed_7,Logits,AuxLogits` | frozen | '
    'momentum, weight decay 4e-05, clip 5 | 100 warm-up steps, cosine to 0 | 0.001 |',
    'EMA of the weights (decay 0.999)',
    '## Metrics: test split, 200 images',
    'The test split was held out before training',
    'Class imbalance: stage0 has 15.0× the images of stage3 (class weighting balanced)',
    'Input: grey (one channel, repeated to three for the network) images squashed to 342 px',
    'Not a medical device',
  ):
    assert text in card, text
  assert 'Optimistic' not in card


def test_card_says_a_validation_estimate_is_optimistic():
  config = default.get_config()
  config.dataset.num_folds, config.dataset.fold = 5, 2
  config.early_stopping_patience = 4
  card = _card(config, split='validation')
  for text in (
    'validation = fold 2 of 5 of the rest',
    '| main | 1–6000 | `Logits,AuxLogits` | trainable | rmsprop, weight decay 4e-05 | fixed |',
    'random init',
    'Optimistic: training evaluates the validation split every 500 steps to keep the best '
    'checkpoint by kappa and stops after 4 evaluations without a new best, and this checkpoint '
    'is the one it chose.',
    'fold 2 of 5: the mean over all folds is steadier',
  ):
    assert text in card, text


def test_card_of_an_external_set_scored_whole():
  """An external source (its provenance names it): no split of it, no claim of a single source."""
  config = two_phase.get_config()
  counts = {'all': [40, 20, 0, 5]}
  _, probs = _predictions(65, accuracy=0.7)
  labels = np.repeat([0, 1, 3], [40, 20, 5])
  data = model_card.Data('/data/site_b', '/data/build/2', NAMES, counts, 1, 0)
  report = {
    'split': 'all',
    'step': 4000,
    'label_names': NAMES,
    'provenance': {
      'image_size': 299,
      'stored_size': 342,
      'central_crop_fraction': 1.0,
      'source': '/data/site_b',
      'absent_classes': ['stage2'],
    },
    **metrics.compute(labels, probs, NAMES),
    model_card.INTERVALS: metrics.bootstrap_ci(labels, probs, NAMES, resamples=50),
  }
  card = model_card.render(config, data, report, checkpoint='best')
  for text in (
    '`/data/site_b` (external: not the source the run was trained on)',
    '| stage0 | 40 | 40 |',
    'Split: none: every readable image of the source was scored (`--split all`).',
    'Training never read this source, nor chose its checkpoint on it',
    'External source: these images come from `/data/site_b`',
    'No all image of stage2: untested on them.',
  ):
    assert text in card, text
  for text in ('Single source', 'Optimistic', 'stratified per class'):
    assert text not in card, text
