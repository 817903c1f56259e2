"""Classification metrics for an ordinal grading task, computed by scikit-learn.

Stages are ordinal, so quadratic weighted kappa (a miss by two stages costs four times a miss by
one) is the headline; accuracy alone hides which stages are confused. Metrics that are undefined
on a split (a class absent from the labels, a single class everywhere) are None rather than a
crash or a NaN, so a small validation split still gets a report.
"""

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import exceptions
from sklearn import metrics as skm

from pneumo_jax.errors import ConfigError

# The top-level scalars `compute` always returns, and whether a larger value is better. The
# training loop logs these and ranks checkpoints by `config.best_metric`, one of these keys.
HIGHER_IS_BETTER: dict[str, bool] = {
  'accuracy': True,
  'balanced_accuracy': True,
  'kappa': True,
  'auc_macro': True,
  'loss': False,
}


def better(name: str, candidate: float | None, incumbent: float | None) -> bool:
  """Whether `candidate` beats `incumbent` on metric `name`; an undefined (None) never wins."""
  if name not in HIGHER_IS_BETTER:
    raise ConfigError(f'unknown metric {name!r}; choose one of {sorted(HIGHER_IS_BETTER)}')
  if candidate is None:
    return False
  if incumbent is None:
    return True
  return candidate > incumbent if HIGHER_IS_BETTER[name] else candidate < incumbent


def _defined(x: float) -> float | None:
  return None if math.isnan(x) else float(x)


def _one_vs_rest_auc(is_class: np.ndarray, score: np.ndarray) -> float | None:
  """ROC AUC of one class against the rest; None unless both groups are present."""
  if is_class.all() or not is_class.any():
    return None
  return float(skm.roc_auc_score(is_class, score))


def compute(labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
  """Metrics of predicted class probabilities against integer labels.

  Args:
    labels: [N] true class ids in [0, C).
    probs: [N, C] predicted probabilities (rows sum to 1).
    label_names: the C class names, in class-id order.

  Returns:
    A JSON-serialisable dict: the scalars of HIGHER_IS_BETTER (None where undefined),
    'top_5_accuracy' only when C > 5, 'per_class' {name: {precision, recall, f1, support,
    auc}}, and 'confusion_matrix' (list of lists, rows = true class, columns = predicted).
  """
  labels = np.asarray(labels).astype(np.int64)
  probs = np.asarray(probs, np.float64)
  num_classes = len(label_names)
  if probs.ndim != 2 or probs.shape[1] != num_classes or labels.shape != probs.shape[:1]:
    raise ValueError(
      f'expected labels [N] and probs [N, {num_classes}] for {num_classes} label names; got '
      f'labels {labels.shape} and probs {probs.shape}'
    )
  if not len(labels):
    raise ValueError('cannot compute metrics on zero examples')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}')
  sums = probs.sum(axis=-1, keepdims=True)
  if np.abs(sums - 1).max() > 1e-3:
    raise ValueError(
      'probs rows must sum to 1 (softmax outputs); a row sums to '
      f'{sums.flat[np.abs(sums - 1).argmax()]}'
    )
  probs = probs / sums  # float32 rounding would trip scikit-learn's float64 check.
  classes = np.arange(num_classes)
  preds = probs.argmax(axis=-1)

  with warnings.catch_warnings():
    # Undefined values are reported as None below; sklearn's warnings about them are noise here.
    warnings.simplefilter('ignore', exceptions.UndefinedMetricWarning)
    warnings.filterwarnings('ignore', 'y_pred contains classes not in y_true')
    warnings.filterwarnings('ignore', 'A single label was found')
    precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels, preds, labels=classes, zero_division=0
    )
    kappa = skm.cohen_kappa_score(
      labels, preds, labels=classes, weights='quadratic', replace_undefined_by=np.nan
    )
    out: dict[str, Any] = {
      'accuracy': float(skm.accuracy_score(labels, preds)),
      'balanced_accuracy': float(skm.balanced_accuracy_score(labels, preds)),
      'kappa': _defined(kappa),
      'auc_macro': None,
      'loss': float(skm.log_loss(labels, probs, labels=classes)),
    }
  if num_classes > 5:
    out['top_5_accuracy'] = float(skm.top_k_accuracy_score(labels, probs, k=5, labels=classes))

  aucs = [_one_vs_rest_auc(labels == c, probs[:, c]) for c in classes]
  defined = [a for a in aucs if a is not None]
  out['auc_macro'] = float(np.mean(defined)) if defined else None
  out['per_class'] = {
    name: {
      'precision': float(precision[c]),
      'recall': float(recall[c]),
      'f1': float(f1[c]),
      'support': int(support[c]),
      'auc': aucs[c],
    }
    for c, name in enumerate(label_names)
  }
  out['confusion_matrix'] = skm.confusion_matrix(labels, preds, labels=classes).tolist()
  return out


def _fmt(x: float | None) -> str:
  return '   n/a' if x is None else f'{x:6.3f}'


def format_table(metrics: dict[str, Any], label_names: Sequence[str]) -> str:
  """Plain-text summary for the console: scalars, per-class table, confusion matrix."""
  lines = [
    f'{k:>18}: {_fmt(metrics[k])}' for k in (*HIGHER_IS_BETTER, 'top_5_accuracy') if k in metrics
  ]
  width = max(12, *(len(n) for n in label_names))
  lines += ['', f'{"class":>{width}}  precision  recall      f1     auc  support']
  for name in label_names:
    m = metrics['per_class'][name]
    lines.append(
      f'{name:>{width}}     {_fmt(m["precision"])}  {_fmt(m["recall"])}  '
      f'{_fmt(m["f1"])}  {_fmt(m["auc"])}  {m["support"]:7d}'
    )
  lines += [
    '',
    'confusion matrix (rows = true, columns = predicted):',
    ' ' * width + ''.join(f' {n[:7]:>7}' for n in label_names),
  ]
  lines += [
    f'{name:>{width}}' + ''.join(f' {v:7d}' for v in row)
    for name, row in zip(label_names, metrics['confusion_matrix'], strict=True)
  ]
  return '\n'.join(lines)
