"""Operating points: at which threshold, with what sensitivity and specificity?

A screening reader asks a yes/no question: for pneumoconiosis stages 0–3, "stage ≥ 1 or not";
for a two-class run, "the second class or not". Each question is a cut of the run's classes in
their order (sorted names, or `dataset.class_names`' order): cut k asks "class ≥ k", scored by
the summed probability of classes k… (for two classes, the one cut is the second class's
probability). Cuts are made for every k in 1…K−1, so the order of the classes must be a grade
order for the later cuts to mean anything (set `dataset.class_names` when sorting the names
does not give it).

For each cut, three thresholds are chosen on the validation split (`choose`): Youden's J (the
ROC point maximising sensitivity + specificity − 1) and the highest thresholds reaching 90% and
95% sensitivity. They are applied unchanged to any split (`evaluate`), which reports
sensitivity, specificity, PPV and NPV at each with percentile-bootstrap intervals (the resamples
of metrics.resample_counts: the same seeded draws as the model card's intervals). An image is
called positive when its score is at least the threshold (scikit-learn's roc_curve rule).
"""

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from sklearn import metrics as skm

from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import metrics

# The thresholds chosen per cut (config.operating_point names the one predict decides at).
POINTS = {
  'youden': "Youden's J",
  'sensitivity_90': '90% sensitivity',
  'sensitivity_95': '95% sensitivity',
}
MEASURES = ('sensitivity', 'specificity', 'ppv', 'npv')


def decision_point(config: ml_collections.ConfigDict) -> str:
  """config.operating_point, checked: one of POINTS."""
  point = config.operating_point
  if point not in POINTS:
    raise ConfigError(f'operating_point={point!r}: use one of {list(POINTS)}')
  return point


def cuts(label_names: Sequence[str]) -> dict[str, int]:
  """Cut id → its first positive class: 'ge_<name>' for each class but the first."""
  return {f'ge_{name}': k for k, name in enumerate(label_names) if k}


def cut_title(cut: str) -> str:
  """How a cut reads in a report: '≥ stage_1'."""
  return f'≥ {cut.removeprefix("ge_")}'


def cut_scores(probs: np.ndarray, first: int) -> np.ndarray:
  """The probability that an image is of class `first` or later: [N]."""
  return np.asarray(probs, np.float64)[:, first:].sum(axis=-1)


def choose(
  labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]
) -> dict[str, dict[str, float | None]]:
  """Per cut, the threshold of each of POINTS, from (validation) labels [N] and probabilities
  [N, K]; None for every point of a cut whose positives or negatives are missing."""
  labels = np.asarray(labels)
  out = {}
  for cut, first in cuts(label_names).items():
    truth = labels >= first
    if truth.all() or not truth.any():
      out[cut] = dict.fromkeys(POINTS)
      continue
    fpr, tpr, thresholds = skm.roc_curve(truth, cut_scores(probs, first), drop_intermediate=False)
    # Index 0 is roc_curve's threshold above every score (nothing positive): never a choice.
    j = 1 + int(np.argmax((tpr - fpr)[1:]))
    out[cut] = {
      'youden': float(thresholds[j]),
      'sensitivity_90': float(thresholds[int(np.argmax(tpr >= 0.90))]),
      'sensitivity_95': float(thresholds[int(np.argmax(tpr >= 0.95))]),
    }
  return out


def decide(probs: np.ndarray, first: int, threshold: float) -> np.ndarray:
  """[N] bool: the images called positive for the cut starting at class `first`."""
  return cut_scores(probs, first) >= threshold


def _rates(weights: np.ndarray, truth: np.ndarray, positive: np.ndarray) -> dict[str, np.ndarray]:
  """MEASURES for each row of example weights ([R, N] counts, or [1, N] ones); NaN where a
  denominator is zero."""
  tp = weights @ (truth & positive).astype(float)
  fn = weights @ (truth & ~positive).astype(float)
  tn = weights @ (~truth & ~positive).astype(float)
  fp = weights @ (~truth & positive).astype(float)
  with np.errstate(invalid='ignore', divide='ignore'):
    return {
      'sensitivity': tp / (tp + fn),
      'specificity': tn / (tn + fp),
      'ppv': tp / (tp + fp),
      'npv': tn / (tn + fn),
    }


def evaluate(
  labels: np.ndarray,
  probs: np.ndarray,
  label_names: Sequence[str],
  thresholds: dict[str, dict[str, float | None]],
  *,
  resamples: int = 1000,
  seed: int = 0,
  level: float = 0.95,
) -> list[dict[str, Any]]:
  """Rows {'cut', 'point', 'threshold', 'positives', 'negatives', and per MEASURES {'estimate',
  'low', 'high', 'used', 'dropped'}} for every cut and point with a threshold, the thresholds
  given (chosen on another split, or this one)."""
  labels = np.asarray(labels)
  counts = np.concatenate(list(metrics.resample_counts(len(labels), resamples, seed)))
  rows = []
  for cut, first in cuts(label_names).items():
    truth = labels >= first
    for point, threshold in thresholds.get(cut, {}).items():
      if threshold is None:
        continue
      positive = decide(probs, first, threshold)
      estimate = _rates(np.ones((1, len(labels))), truth, positive)
      resampled = _rates(counts.astype(float), truth, positive)
      row: dict[str, Any] = {
        'cut': cut,
        'point': point,
        'threshold': threshold,
        'positives': int(truth.sum()),
        'negatives': int((~truth).sum()),
      }
      for name in MEASURES:
        value = float(estimate[name][0])
        row[name] = {
          'estimate': None if np.isnan(value) else value,
          **metrics.percentile_interval(resampled[name], level),
        }
      rows.append(row)
  return rows
