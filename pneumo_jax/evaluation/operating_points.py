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

Findings (a multi-label run) ask one question each, "is this finding present?", scored by its own
probability over the films whose label for it is used: the cut is the finding's name, and its
thresholds are chosen and measured exactly as a cut's.
"""

from collections.abc import Iterator, Sequence
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
  """Per cut (per finding), the threshold of each of POINTS, from (validation) labels [N] and
  probabilities [N, K] (findings: [N, F] both); None for every point of a cut whose positives or
  negatives are missing."""
  out = {}
  for cut, used, truth, score in _truths(labels, probs, label_names):
    truth, score = truth[used], score[used]
    if truth.all() or not truth.any():
      out[cut] = dict.fromkeys(POINTS)
      continue
    fpr, tpr, thresholds = skm.roc_curve(truth, score, drop_intermediate=False)
    # Index 0 is roc_curve's threshold above every score (nothing positive): never a choice.
    j = 1 + int(np.argmax((tpr - fpr)[1:]))
    out[cut] = {
      'youden': float(thresholds[j]),
      'sensitivity_90': float(thresholds[int(np.argmax(tpr >= 0.90))]),
      'sensitivity_95': float(thresholds[int(np.argmax(tpr >= 0.95))]),
    }
  return out


def questions(
  probs: np.ndarray, label_names: Sequence[str], multilabel: bool
) -> dict[str, np.ndarray]:
  """Cut id → its score per image [N]: 'ge_<class>' → the summed probability of that class and
  the later ones; for findings (`multilabel`), each finding's name → its probability."""
  probs = np.asarray(probs, np.float64)
  if multilabel:
    return {name: probs[:, f] for f, name in enumerate(label_names)}
  return {cut: cut_scores(probs, first) for cut, first in cuts(label_names).items()}


def _truths(
  labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
  """(cut, used [N] bool, truth [N] bool, score [N]) per question; a single-label run uses every
  image, findings ([N, F] labels) those whose label is not ignored (-1)."""
  labels = np.asarray(labels)
  multilabel = labels.ndim == 2
  for f, (cut, score) in enumerate(questions(probs, label_names, multilabel).items()):
    if multilabel:
      yield cut, labels[:, f] >= 0, labels[:, f] == 1, score
    else:
      yield cut, np.ones(len(labels), bool), labels >= cuts(label_names)[cut], score


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
  'low', 'high', 'used', 'dropped'}} for every cut (finding) and point with a threshold, the
  thresholds given (chosen on another split, or this one). A film is resampled with all its
  findings; a finding's rates count its used labels among the drawn films."""
  counts = np.concatenate(list(metrics.resample_counts(len(labels), resamples, seed)))
  rows = []
  for cut, used, truth, score in _truths(labels, probs, label_names):
    truth, score, weights = truth[used], score[used], counts[:, used].astype(float)
    for point, threshold in thresholds.get(cut, {}).items():
      if threshold is None:
        continue
      positive = score >= threshold
      estimate = _rates(np.ones((1, len(truth))), truth, positive)
      resampled = _rates(weights, truth, positive)
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
