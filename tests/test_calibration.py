"""Temperature scaling, ECE and operating points against hand computations on fixed numbers."""

import json
import math

import numpy as np
import pytest
from scipy import special

from configs import default
from pneumo_jax import validate
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import calibration, metrics, operating_points


def test_temperature_matches_the_closed_form():
  """Every image has logits [0, 2] and 8 of 10 are class 1: the NLL is least where
  sigmoid(2 / T) = 0.8, i.e. T = 2 / ln 4."""
  logits = np.tile([0.0, 2.0], (10, 1))
  labels = np.array([1] * 8 + [0] * 2)
  assert calibration.fit_temperature(logits, labels) == pytest.approx(2 / math.log(4), rel=1e-6)
  # From probabilities: their logs are the logits up to a constant per row.
  probs = special.softmax(logits + np.arange(10)[:, None], axis=-1)
  entry = calibration.fit(labels, probs)
  assert entry == {
    'temperature': pytest.approx(2 / math.log(4), rel=1e-6),
    'fitted_on': 'validation',
    'n': 10,
  }
  np.testing.assert_allclose(calibration.scaled(probs, entry['temperature'])[:, 1], 0.8, rtol=1e-6)


def test_an_over_confident_model_gets_a_temperature_above_one():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 400)
  logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[labels]
  t = calibration.fit_temperature(3 * logits, labels)  # Logits three times too sharp.
  assert t == pytest.approx(3 * calibration.fit_temperature(logits, labels), rel=1e-5)
  assert t > 1.5


def test_ece_brier_and_nll_by_hand():
  probs = np.array(
    [
      [0.95, 0.05],  # bin 15 (0.9333, 1]: correct
      [0.05, 0.95],  # bin 15: wrong
      [0.40, 0.60],  # bin 9 (0.5333, 0.6]: correct
      [0.70, 0.30],  # bin 11 (0.6667, 0.7333]: correct
    ]
  )
  labels = np.array([0, 0, 1, 0])
  # Bin 15: accuracy 1/2, confidence 0.95; bin 9: 1 vs 0.6; bin 11: 1 vs 0.7.
  expected = 2 / 4 * abs(0.5 - 0.95) + 1 / 4 * abs(1 - 0.6) + 1 / 4 * abs(1 - 0.7)
  assert calibration.ece(labels, probs) == pytest.approx(expected)
  r = calibration.reliability(labels, probs)
  assert r['count'][14] == 2 and r['count'][8] == 1 and r['count'][10] == 1 and sum(r['count']) == 4
  assert r['accuracy'][0] is None
  brier = (2 * 0.05**2 + 2 * 0.95**2 + 2 * 0.4**2 + 2 * 0.3**2) / 4
  assert calibration.brier(labels, probs) == pytest.approx(brier)
  nll = -(math.log(0.95) + math.log(0.05) + math.log(0.6) + math.log(0.7)) / 4
  assert calibration.scores(labels, probs)['nll'] == pytest.approx(nll)


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin():
  probs = np.array([[1 / 3 * 2, 1 / 3], [1.0, 0.0]])  # 10/15 and 15/15.
  r = calibration.reliability(np.array([0, 0]), probs)
  assert r['count'][9] == 1 and r['count'][14] == 1


def test_entries_are_kept_per_step(tmp_path):
  assert calibration.load(str(tmp_path), 5) is None
  calibration.save(str(tmp_path), 10, {'temperature': 2.0, 'fitted_on': 'validation', 'n': 3})
  calibration.save(str(tmp_path), 5, {'temperature': 1.5, 'fitted_on': 'validation', 'n': 3})
  assert calibration.load(str(tmp_path), 10)['temperature'] == 2.0
  with open(tmp_path / calibration.CALIBRATION_FILE) as f:
    assert list(json.load(f)) == ['5', '10']
  assert sorted(p.name for p in tmp_path.iterdir()) == [calibration.CALIBRATION_FILE]


NAMES = ['stage_0', 'stage_1', 'stage_2']


def _known_roc():
  """Ten images: stage ≥ 1 scores (the probabilities of classes 1 and 2 summed) where the ROC's
  corners, and so each operating point, are known."""
  #          negatives (stage 0)           positives (stage 1 or 2)
  score = [0.05, 0.15, 0.25, 0.35, 0.65, 0.45, 0.55, 0.75, 0.85, 0.95]
  labels = np.array([0, 0, 0, 0, 0, 1, 2, 1, 2, 2])
  probs = np.array([[1 - s, s / 2, s / 2] for s in score])
  return labels, probs


def test_operating_points_on_a_known_roc():
  labels, probs = _known_roc()
  chosen = operating_points.choose(labels, probs, NAMES)
  ge1 = chosen['ge_stage_1']
  # ≥ 0.45: 5/5 positives, 1 false positive (0.65): J = 1 − 0.2 = 0.8, the best; ≥ 0.75 gives
  # 3/5 with no false positive (J = 0.6). 90% and 95% sensitivity need all 5 positives: 0.45.
  assert ge1 == pytest.approx({'youden': 0.45, 'sensitivity_90': 0.45, 'sensitivity_95': 0.45})
  # ≥ stage_2 scores each image by class 2's probability, s / 2: positives 0.275, 0.425, 0.475;
  # negatives up to 0.325 and 0.375. ≥ 0.275 finds all 3 with 2 of 7 false positives
  # (J = 1 − 2/7 = 0.714); ≥ 0.425 finds 2 with none (J = 2/3): Youden takes 0.275.
  assert chosen['ge_stage_2'] == pytest.approx(dict.fromkeys(operating_points.POINTS, 0.275))
  rows = operating_points.evaluate(labels, probs, NAMES, chosen, resamples=200)
  youden = next(r for r in rows if r['cut'] == 'ge_stage_1' and r['point'] == 'youden')
  assert youden['positives'] == 5 and youden['negatives'] == 5
  expected = {'sensitivity': 1.0, 'specificity': 0.8, 'ppv': 5 / 6, 'npv': 1.0}
  for name, value in expected.items():
    ci = youden[name]
    assert ci['estimate'] == pytest.approx(value), name
    assert ci['low'] <= value <= ci['high'], name
  assert youden['sensitivity']['low'] == 1.0  # Every resample's positives are all found.


def test_operating_point_intervals_use_the_cards_resamples():
  labels, probs = _known_roc()
  chosen = {'ge_stage_1': {'youden': 0.5}}
  row = operating_points.evaluate(labels, probs, NAMES, chosen, resamples=50, seed=3)[0]
  truth, called = labels >= 1, probs[:, 1:].sum(1) >= 0.5
  values = []
  for counts in np.concatenate(list(metrics.resample_counts(10, 50, 3))):
    tn = counts[~truth & ~called].sum()
    values.append(tn / counts[~truth].sum() if counts[~truth].sum() else np.nan)
  low, high = np.nanquantile(values, [0.025, 0.975])
  assert row['specificity']['low'] == pytest.approx(low)
  assert row['specificity']['high'] == pytest.approx(high)


def test_a_cut_without_positives_has_no_thresholds():
  labels, probs = _known_roc()
  chosen = operating_points.choose(np.where(labels == 2, 1, labels), probs, NAMES)
  assert chosen['ge_stage_2'] == dict.fromkeys(operating_points.POINTS)
  assert operating_points.cuts(['NORMAL', 'PNEUMONIA']) == {'ge_PNEUMONIA': 1}


def test_the_decision_point_is_checked_with_the_config():
  config = default.get_config()
  assert operating_points.decision_point(config) == 'youden'
  config.operating_point = 'yuoden'
  with pytest.raises(ConfigError, match=r"operating_point='yuoden': use one of \['youden'"):
    validate.check(config)
