"""Calibration: can a 0.9 be believed? Temperature scaling, and how far probabilities are off.

Fine-tuned networks are over-confident. Temperature scaling (Guo et al. 2017) divides the logits
by one scalar T, fitted on the validation split by minimising the negative log-likelihood: it
leaves every argmax (so accuracy, kappa and the confusion matrix) unchanged and only softens or
sharpens the probabilities. The models return class probabilities (a softmax, or the ordinal
head's); their logarithms serve as logits (for a softmax they are its logits up to a constant per
row, which softmax ignores), so T is fitted and applied on log-probabilities.

Findings (a multi-label run: one sigmoid per finding) get a temperature per finding, the natural
extension: each finding is its own binary classifier with its own over-confidence, and a shared T
would trade one finding's calibration for another's. T_f divides the finding's logit
log(p / (1 − p)) and is fitted on the finding's used validation labels (its logit z as the
two-class logits [0, z], whose softmax is the sigmoid). A finding whose validation labels are all
one value (or all ignored) cannot be fitted: it keeps T = 1, and the log says so. Scores pool
every used (film, finding) entry as a two-class prediction (absent, present).

What is measured, before and after: the expected calibration error (ECE: 15 equal-width bins over
the top-label confidence, each bin's |accuracy − mean confidence| weighted by its share of the
images), the Brier score (multi-class: the mean over images of Σ_k (p_k − y_k)², twice the
binary Brier score for two classes) and the NLL (scikit-learn's log loss).

A fitted temperature is kept with the run, keyed by checkpoint step, in WORKDIR/calibration.json
(`save`, `load`), beside the operating points chosen on the same validation predictions.
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from scipy import optimize, special
from sklearn import metrics as skm

from pneumo_jax.evaluation import reports

ECE_BINS = 15
CALIBRATION_FILE = 'calibration.json'  # In WORKDIR: {step: entry}.
FITTED_ON = 'validation'  # The split temperatures and thresholds are chosen on.
# log T is searched in [log 1e-2, log 1e2]: wider than any network's miscalibration.
_LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


def logits_of(probs: np.ndarray) -> np.ndarray:
  """Logits (up to a constant per row) of softmax probabilities [N, K], in float64."""
  return np.log(np.clip(np.asarray(probs, np.float64), np.finfo(np.float64).tiny, None))


def finding_logits(probs: np.ndarray) -> np.ndarray:
  """The logits log(p / (1 − p)) of findings' sigmoid probabilities [N, F], in float64 (p of 0 or
  1 clipped to the nearest representable odds)."""
  p = np.clip(np.asarray(probs, np.float64), np.finfo(np.float64).tiny, None)
  return special.logit(np.clip(p, None, 1 - np.finfo(np.float64).epsneg))


def scaled(probs: np.ndarray, temperature: float | Sequence[float]) -> np.ndarray:
  """Probabilities with their logits divided by `temperature`: a softmax's [N, K] by one T, or
  findings' sigmoids [N, F] by a T per finding (a sequence of F, as `fit` gives findings)."""
  if isinstance(temperature, Sequence | np.ndarray):
    return special.expit(finding_logits(probs) / np.asarray(temperature, np.float64))
  return special.softmax(logits_of(probs) / temperature, axis=-1)


def as_binary(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Findings' used (film, finding) entries as two-class predictions: labels [M] (1 present)
  and probabilities [M, 2] (absent, present); a single-label run's as they are."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    return labels, np.asarray(probs, np.float64)
  used = labels >= 0
  present = np.asarray(probs, np.float64)[used]
  return labels[used], np.stack([1 - present, present], axis=-1)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
  """The T > 0 minimising the mean NLL of softmax(logits / T) over [N, K] logits and [N] labels.

  A bounded scalar search over log T (scipy's `minimize_scalar`, deterministic): one scalar for
  the K-way softmax. A multi-label run would call it once per finding, on that finding's
  two-column [N, 2] logits [0, z].
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  rows = np.arange(len(labels))

  def nll(log_t: float) -> float:
    return -special.log_softmax(logits / math.exp(log_t), axis=-1)[rows, labels].mean()

  found = optimize.minimize_scalar(
    nll, bounds=_LOG_T_BOUNDS, method='bounded', options={'xatol': 1e-10}
  )
  return float(math.exp(found.x))


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
  """Per equal-width bin of top-label confidence ((i/bins, (i+1)/bins], the first closed at 0):
  'count', 'confidence' (mean) and 'accuracy' (None for an empty bin), and the 'edges'.
  Findings' labels [N, F] count each used entry (`as_binary`)."""
  labels, probs = as_binary(labels, probs)
  confidence = probs.max(axis=-1)
  correct = probs.argmax(axis=-1) == np.asarray(labels)
  which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
  count = np.bincount(which, minlength=bins)
  with np.errstate(invalid='ignore'):
    mean_conf = np.bincount(which, confidence, bins) / count
    accuracy = np.bincount(which, correct, bins) / count
  return {
    'edges': np.linspace(0, 1, bins + 1).tolist(),
    'count': count.tolist(),
    'confidence': [None if c == 0 else float(x) for c, x in zip(count, mean_conf, strict=True)],
    'accuracy': [None if c == 0 else float(x) for c, x in zip(count, accuracy, strict=True)],
  }


def ece(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
  """Expected calibration error over `bins` equal-width bins of top-label confidence."""
  r = reliability(labels, probs, bins)
  n = sum(r['count'])
  return float(
    sum(
      c / n * abs(a - m)
      for c, a, m in zip(r['count'], r['accuracy'], r['confidence'], strict=True)
      if c
    )
  )


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
  """Multi-class Brier score: mean over images of Σ_k (p_k − y_k)²."""
  probs = np.asarray(probs, np.float64)
  onehot = np.eye(probs.shape[1])[np.asarray(labels)]
  return float(((probs - onehot) ** 2).sum(axis=-1).mean())


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """{'ece', 'brier', 'nll'} of probabilities [N, K] against labels [N] (rows renormalised in
  float64: a float32 softmax sums to 1 only within rounding), or of findings' [N, F] over their
  used entries (`as_binary`)."""
  labels, probs = as_binary(labels, probs)
  probs = probs / probs.sum(axis=-1, keepdims=True)
  nll = skm.log_loss(labels, probs, labels=np.arange(probs.shape[1]))
  return {'ece': ece(labels, probs), 'brier': brier(labels, probs), 'nll': float(nll)}


def report(
  labels: np.ndarray, probs: np.ndarray, entry: dict[str, Any], names: Sequence[str] = ()
) -> dict[str, Any]:
  """The eval report's 'calibration' record: the temperature (and what it was fitted on) and
  `scores` before and after applying it to `probs`; for findings (labels [N, F], `names` theirs)
  also 'per_finding' {name: {'temperature', 'before', 'after'}} over each one's used labels
  (None scores where it has none)."""
  after = scaled(probs, entry['temperature'])
  out = {
    'temperature': entry['temperature'],
    'fitted_on': entry['fitted_on'],
    'fitted_n': entry['n'],
    'ece_bins': ECE_BINS,
    'before': scores(labels, probs),
    'after': scores(labels, after),
  }
  if np.ndim(labels) == 2:
    used = np.asarray(labels) >= 0
    out['per_finding'] = {
      name: {
        'temperature': entry['temperature'][f],
        **{
          key: scores(labels[:, f : f + 1], p[:, f : f + 1]) if used[:, f].any() else None
          for key, p in (('before', probs), ('after', after))
        },
      }
      for f, name in enumerate(names)
    }
  return out


def fit(labels: np.ndarray, probs: np.ndarray, names: Sequence[str] = ()) -> dict[str, Any]:
  """An entry of CALIBRATION_FILE from validation predictions: temperature (findings, labels
  [N, F] with their `names`: one per finding, see the module's docstring), split and size."""
  if np.ndim(labels) == 1:
    temperature = fit_temperature(logits_of(probs), labels)
  elif len(names) != np.shape(labels)[1]:
    raise ValueError(f'{np.shape(labels)[1]} findings need as many names; got {list(names)}')
  else:
    temperature = [
      _fit_finding(labels[:, f], finding_logits(probs)[:, f], name) for f, name in enumerate(names)
    ]
  return {'temperature': temperature, 'fitted_on': FITTED_ON, 'n': len(labels)}


def _fit_finding(labels: np.ndarray, logits: np.ndarray, name: str) -> float:
  """One finding's temperature over its used labels; 1 (logged) when they are all one value."""
  used = labels >= 0
  if len(np.unique(labels[used])) < 2:
    logging.warning(
      'finding %r: its %s labels are all one value (or ignored); its temperature stays 1',
      name,
      FITTED_ON,
    )
    return 1.0
  two_class = np.stack([np.zeros(used.sum()), logits[used]], axis=-1)  # softmax → sigmoid(z).
  return fit_temperature(two_class, labels[used])


def load(workdir: str, step: int) -> dict[str, Any] | None:
  """The entry kept for checkpoint `step`, or None (no file, no entry, or unreadable)."""
  try:
    with open(os.path.join(workdir, CALIBRATION_FILE)) as f:
      return json.load(f).get(str(step))
  except (OSError, ValueError, AttributeError):
    return None


def save(workdir: str, step: int, entry: dict[str, Any]) -> str:
  """Adds (or replaces) `step`'s entry in WORKDIR/calibration.json, atomically."""
  path = os.path.join(workdir, CALIBRATION_FILE)
  try:
    with open(path) as f:
      every = json.load(f)
  except (OSError, ValueError):
    every = {}
  if not isinstance(every, dict):
    every = {}
  every[str(step)] = entry
  reports.write_json(path, dict(sorted(every.items(), key=lambda kv: kv[0].zfill(20))))
  return path


def describe(entry: dict[str, Any]) -> str:
  """Which temperature applies and where it came from, for a printed line."""
  return (
    f'{temperature_text(entry["temperature"])} (fitted on the {entry["fitted_on"]} split, '
    f'{entry["n"]} images)'
  )


def temperature_text(temperature: float | Sequence[float]) -> str:
  """'temperature 1.234', or 'temperatures 1.234, 0.987, …' (one per finding)."""
  if isinstance(temperature, Sequence | np.ndarray):
    return 'temperatures ' + ', '.join(f'{t:.3f}' for t in temperature)
  return f'temperature {temperature:.3f}'
