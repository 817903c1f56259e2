"""Classification metrics for an ordinal grading task or for findings, computed by scikit-learn.

Stages are ordinal, so quadratic weighted kappa (a miss by two stages costs four times a miss by
one) is the headline; accuracy alone hides which stages are confused. Findings (several per film,
`dataset.task='multilabel'`) are binary tasks each: ROC AUC and average precision per finding, over
the films whose label is used (an ignored label, -1, counts nowhere), then their macro and micro
AUC. Metrics that are undefined on a split (a class absent from the labels, a single class
everywhere) are None rather than a crash or a NaN, so a small validation split still gets a report.
"""

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
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


# The metric that picks the best checkpoint unless `best_metric` is set, by `dataset.task`.
DEFAULT_BEST_METRIC = {'single': 'kappa', 'multilabel': 'auc_macro'}


def _default_best_metric(task: str) -> str:
  return DEFAULT_BEST_METRIC.get(task, 'kappa')  # An unknown task: validate names it.


def default_best_metric(task: ml_collections.FieldReference) -> ml_collections.FieldReference:
  """A config field that reads as the default best metric of whichever task the field `task`
  (config.dataset.task) holds when it is read, until a value is set: quadratic kappa for graded
  single-label runs, macro AUC for findings (where kappa is undefined)."""
  # The lazy op ml_collections' own `ref + 1` and `ref.to_str()` are built with.
  return task._apply_op(_default_best_metric)


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


def _checked(
  labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
  """(int64 labels, float64 probs renormalised) after checking shapes, ids and row sums, so that a
  caller's mistake is named here rather than deep inside scikit-learn."""
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
      'probs rows must sum to 1 (class probabilities); a row sums to '
      f'{sums.flat[np.abs(sums - 1).argmax()]}'
    )
  return labels, probs / sums  # float32 rounding would trip scikit-learn's float64 check.


def compute(labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
  """Metrics of predicted class probabilities against integer labels, or of finding
  probabilities against findings' labels when `labels` is [N, F] (see `compute_findings`).

  Args:
    labels: [N] true class ids in [0, C).
    probs: [N, C] predicted probabilities (rows sum to 1).
    label_names: the C class names, in class-id order.

  Returns:
    A JSON-serialisable dict: the scalars of HIGHER_IS_BETTER (None where undefined),
    'top_5_accuracy' only when C > 5, 'per_class' {name: {precision, recall, f1, support,
    auc}}, and 'confusion_matrix' (list of lists, rows = true class, columns = predicted).
  """
  if np.ndim(labels) == 2:
    return compute_findings(labels, probs, label_names)
  labels, probs = _checked(labels, probs, label_names)
  num_classes = len(label_names)
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


# A finding is called present when its probability is at least this (the sigmoid's even odds)
# in the findings' accuracies; operating_points chooses a threshold per finding on validation.
PRESENT_AT = 0.5


def _checked_findings(
  labels: np.ndarray, probs: np.ndarray, finding_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
  """(int64 labels, float64 probs) of findings after checking shapes and values, so that a
  caller's mistake is named here rather than deep inside scikit-learn."""
  labels = np.asarray(labels).astype(np.int64)
  probs = np.asarray(probs, np.float64)
  num_findings = len(finding_names)
  if probs.ndim != 2 or probs.shape[1] != num_findings or labels.shape != probs.shape:
    raise ValueError(
      f'expected labels and probs [N, {num_findings}] for {num_findings} finding names; got '
      f'labels {labels.shape} and probs {probs.shape}'
    )
  if not len(labels):
    raise ValueError('cannot compute metrics on zero examples')
  unknown = sorted(set(np.unique(labels).tolist()) - {-1, 0, 1})
  if unknown:
    raise ValueError(
      f'finding labels must be 1 (present), 0 (absent) or -1 (ignored); got {unknown}'
    )
  if not (probs >= 0).all() or not (probs <= 1).all():
    raise ValueError('finding probabilities must lie in [0, 1] (one sigmoid per finding)')
  return labels, probs


def compute_findings(
  labels: np.ndarray, probs: np.ndarray, finding_names: Sequence[str]
) -> dict[str, Any]:
  """Metrics of independent finding probabilities against findings' labels.

  Each finding is a binary task over the films whose label is used (an ignored label, -1, counts
  in no metric): ROC AUC and average precision (scikit-learn's, the step-wise area under the
  precision-recall curve). A film is called positive for a finding at PRESENT_AT.

  Args:
    labels: [N, F] 1 (present), 0 (absent) or -1 (ignored).
    probs: [N, F] predicted probabilities, one per finding (rows need not sum to 1).
    finding_names: the F finding names, in column order.

  Returns:
    A JSON-serialisable dict: the scalars of HIGHER_IS_BETTER (None where undefined): 'accuracy'
    over every used (film, finding) entry, 'balanced_accuracy' the mean over findings of
    (sensitivity + specificity) / 2, 'kappa' None (no order between findings), 'auc_macro' the
    mean of the defined per-finding AUCs, 'loss' the mean binary cross-entropy over used entries;
    and 'auc_micro' (one ROC AUC over every used entry), 'per_finding' {name: {'auc',
    'average_precision', 'positives', 'negatives', 'ignored'}} and 'num_examples'.
  """
  labels, probs = _checked_findings(labels, probs, finding_names)
  used = labels >= 0
  per_finding: dict[str, dict[str, Any]] = {}
  balanced = []
  for f, name in enumerate(finding_names):
    truth, score = labels[used[:, f], f] == 1, probs[used[:, f], f]
    positives = int(truth.sum())
    auc = _one_vs_rest_auc(truth, score)
    per_finding[name] = {
      'auc': auc,
      # With no positive, precision is undefined at every threshold.
      'average_precision': float(skm.average_precision_score(truth, score)) if positives else None,
      'positives': positives,
      'negatives': len(truth) - positives,
      'ignored': int((~used[:, f]).sum()),
    }
    if auc is not None:
      balanced.append(skm.balanced_accuracy_score(truth, score >= PRESENT_AT))
  truth, score = labels[used] == 1, probs[used]
  aucs = [m['auc'] for m in per_finding.values() if m['auc'] is not None]
  return {
    'accuracy': float(np.mean(truth == (score >= PRESENT_AT))) if used.any() else None,
    'balanced_accuracy': float(np.mean(balanced)) if balanced else None,
    'kappa': None,
    'auc_macro': float(np.mean(aucs)) if aucs else None,
    'loss': float(skm.log_loss(truth, score, labels=[False, True])) if used.any() else None,
    'auc_micro': _one_vs_rest_auc(truth, score),
    'per_finding': per_finding,
    'num_examples': len(labels),
  }


# The metrics `bootstrap_ci` gives intervals for: the headline numbers of an ordinal grader.
BOOTSTRAPPED = ('accuracy', 'kappa', 'auc_macro')
_RESAMPLE_CHUNK = 100  # Resamples scored at once: bounds memory to a few [chunk, N] arrays.


def bootstrap_ci(
  labels: np.ndarray,
  probs: np.ndarray,
  label_names: Sequence[str],
  *,
  resamples: int = 1000,
  seed: int = 0,
  level: float = 0.95,
) -> dict[str, Any]:
  """Percentile-bootstrap confidence intervals of accuracy, quadratic weighted kappa and macro AUC.

  On a split of a few dozen X-rays a point estimate moves by tenths from one sample to the next;
  the interval says how far. Each resample draws N examples with replacement from
  numpy's default_rng(seed), so a fixed seed gives the same interval. The interval is the
  (1 - level) / 2 and (1 + level) / 2 quantiles of a metric over the resamples where it is
  defined; a resample where it is not (kappa when labels and predictions share one class; macro
  AUC when a class that the whole split scores is missing or alone) is dropped and counted, so that
  every kept value averages the same classes as the estimate.

  Returns:
    {'method': {'resamples', 'seed', 'level', 'n'}} and, per metric of BOOTSTRAPPED,
    {'estimate' (as `compute` gives it), 'low', 'high' (None when no resample defines it),
    'used', 'dropped'}. For findings ([N, F] labels), each of BOOTSTRAPPED_FINDINGS and
    'per_finding' {name: {each of FINDING_BOOTSTRAPPED}} instead.
  """
  if resamples < 1 or not 0 < level < 1:
    raise ValueError(f'need resamples >= 1 and 0 < level < 1; got {resamples} and {level}')
  findings = np.ndim(labels) == 2  # A film is resampled with all its findings.
  if findings:
    score, check, resampled = compute_findings, _checked_findings, _resample_finding_scores
    per, scalars = 'per_finding', BOOTSTRAPPED_FINDINGS
  else:
    score, check, resampled = compute, _checked, _resample_scores
    per, scalars = 'per_class', BOOTSTRAPPED
  estimate = score(labels, probs, label_names)
  labels, probs = check(labels, probs, label_names)
  # Macro AUC averages the classes (findings) whose AUC the whole split defines.
  defined = [i for i, name in enumerate(label_names) if estimate[per][name]['auc'] is not None]
  n = len(labels)
  chunks = [
    resampled(counts, labels, probs, defined) for counts in resample_counts(n, resamples, seed)
  ]

  def interval(key: str, value: float | None) -> dict[str, Any]:
    values = np.concatenate([chunk[key] for chunk in chunks])
    return {'estimate': value, **percentile_interval(values, level)}

  out: dict[str, Any] = {'method': {'resamples': resamples, 'seed': seed, 'level': level, 'n': n}}
  out.update({key: interval(key, estimate[key]) for key in scalars})
  if findings:  # A finding's figures use its used labels among the drawn films.
    out['per_finding'] = {
      name: {
        key: interval(f'{key}/{f}', estimate['per_finding'][name][key])
        for key in FINDING_BOOTSTRAPPED
      }
      for f, name in enumerate(label_names)
    }
  return out


# What `bootstrap_ci` gives intervals for on findings: these scalars, and per finding
# FINDING_BOOTSTRAPPED under 'per_finding'.
BOOTSTRAPPED_FINDINGS = ('accuracy', 'auc_macro', 'auc_micro')
FINDING_BOOTSTRAPPED = ('auc', 'average_precision')


def _resample_finding_scores(
  counts: np.ndarray, labels: np.ndarray, probs: np.ndarray, auc_findings: Sequence[int]
) -> dict[str, np.ndarray]:
  """The findings' bootstrapped values for resamples given as how often each film is drawn
  ([R, N]), NaN where undefined: BOOTSTRAPPED_FINDINGS, and '<key>/<finding index>' for
  FINDING_BOOTSTRAPPED. The same quantities as `compute_findings` (tests pin them to it)."""
  used = labels >= 0
  truth = labels == 1
  correct = used & (truth == (probs >= PRESENT_AT))
  films, findings = np.nonzero(used)  # Every used (film, finding) entry, for the micro AUC.
  out: dict[str, np.ndarray] = {}
  with np.errstate(invalid='ignore', divide='ignore'):
    out['accuracy'] = (counts @ correct.sum(1)) / (counts @ used.sum(1))
    for f in range(labels.shape[1]):
      rows = used[:, f]
      out[f'auc/{f}'] = _resample_auc(counts[:, rows], truth[rows, f], probs[rows, f])
      out[f'average_precision/{f}'] = _resample_average_precision(
        counts[:, rows], truth[rows, f], probs[rows, f]
      )
    aucs = [out[f'auc/{f}'] for f in auc_findings]
    out['auc_macro'] = np.mean(aucs, axis=0) if aucs else np.full(len(counts), np.nan)
    out['auc_micro'] = _resample_auc(
      counts[:, films], truth[films, findings], probs[films, findings]
    )
  return out


def _resample_average_precision(
  counts: np.ndarray, is_class: np.ndarray, score: np.ndarray
) -> np.ndarray:
  """Average precision per resample ([R]; NaN when no positive is drawn): the precision at each
  distinct score threshold, highest first, weighted by the recall it adds, which is the step-wise
  sum average_precision_score takes."""
  order = np.argsort(-score, kind='stable')
  score, is_class, counts = score[order], is_class[order], counts[:, order]
  last_of_tie = np.append(score[1:] != score[:-1], True)  # Each distinct score is a threshold.
  true_pos = np.cumsum(counts * is_class, axis=1)[:, last_of_tie]
  called = np.cumsum(counts, axis=1)[:, last_of_tie]
  added = np.diff(true_pos, axis=1, prepend=0)
  steps = np.where(added > 0, added * true_pos / np.maximum(called, 1), 0)
  return steps.sum(axis=1) / true_pos[:, -1]


def resample_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
  """Bootstrap resamples of n examples, as how often each is drawn: [chunk, n] count arrays
  (chunks of up to _RESAMPLE_CHUNK, `resamples` rows in all), drawn from numpy's
  default_rng(seed), so a fixed seed gives the same resamples."""
  rng = np.random.default_rng(seed)
  for start in range(0, resamples, _RESAMPLE_CHUNK):
    yield rng.multinomial(n, np.full(n, 1 / n), size=min(_RESAMPLE_CHUNK, resamples - start))


def percentile_interval(values: np.ndarray, level: float) -> dict[str, Any]:
  """{'low', 'high', 'used', 'dropped'}: the central `level` of a metric's resampled values,
  NaN values (resamples where it is undefined) dropped and counted; None bounds when none is
  defined."""
  kept = values[~np.isnan(values)]
  low, high = np.quantile(kept, [(1 - level) / 2, (1 + level) / 2]) if len(kept) else (None,) * 2
  return {
    'low': None if low is None else float(low),
    'high': None if high is None else float(high),
    'used': len(kept),
    'dropped': len(values) - len(kept),
  }


def _resample_scores(
  counts: np.ndarray, labels: np.ndarray, probs: np.ndarray, auc_classes: Sequence[int]
) -> dict[str, np.ndarray]:
  """BOOTSTRAPPED's values for resamples given as how often each example is drawn ([R, N]), NaN
  where undefined.

  The same quantities as `compute` (tests pin them to it on the resampled examples), but for all
  resamples at once: scikit-learn per resample takes ~8 ms, 8 s for 1,000 on every evaluation.
  """
  num_classes = probs.shape[1]
  drawn = counts.sum(axis=1).astype(np.float64)
  pairs = np.eye(num_classes * num_classes)[labels * num_classes + probs.argmax(axis=-1)]
  confusion = (counts @ pairs).reshape(-1, num_classes, num_classes)  # [R, true, predicted]
  expected = confusion.sum(2)[:, :, None] * confusion.sum(1)[:, None, :] / drawn[:, None, None]
  stages = np.arange(num_classes)
  cost = np.subtract.outer(stages, stages) ** 2  # Quadratic: a miss by two stages costs four.
  with np.errstate(invalid='ignore', divide='ignore'):
    kappa = 1 - (cost * confusion).sum((1, 2)) / (cost * expected).sum((1, 2))
    aucs = [_resample_auc(counts, labels == c, probs[:, c]) for c in auc_classes]
  return {
    'accuracy': np.trace(confusion, axis1=1, axis2=2) / drawn,
    'kappa': kappa,
    'auc_macro': np.mean(aucs, axis=0) if aucs else np.full(len(counts), np.nan),
  }


def _resample_auc(counts: np.ndarray, is_class: np.ndarray, score: np.ndarray) -> np.ndarray:
  """One-vs-rest ROC AUC per resample ([R]; NaN when a group is empty): the chance that a drawn
  positive outscores a drawn negative, ties counting half (Mann-Whitney), which is the area
  roc_auc_score integrates."""
  order = np.argsort(score)
  score, is_class, counts = score[order], is_class[order], counts[:, order]
  positives = counts * is_class
  negatives_below = np.pad(np.cumsum(counts * ~is_class, axis=1), ((0, 0), (1, 0)))
  below = negatives_below[:, np.searchsorted(score, score, 'left')]
  tied = negatives_below[:, np.searchsorted(score, score, 'right')] - below
  pairs = positives.sum(axis=1) * negatives_below[:, -1]
  return (positives * (below + tied / 2)).sum(axis=1) / pairs


def _fmt(x: float | None) -> str:
  return '   n/a' if x is None else f'{x:6.3f}'


def format_table(metrics: dict[str, Any], label_names: Sequence[str]) -> str:
  """Plain-text summary for the console: scalars, per-class table, confusion matrix (findings:
  scalars and per-finding table)."""
  if 'per_finding' in metrics:
    return _format_findings(metrics, label_names)
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


def _format_findings(metrics: dict[str, Any], finding_names: Sequence[str]) -> str:
  lines = [f'{k:>18}: {_fmt(metrics[k])}' for k in (*HIGHER_IS_BETTER, 'auc_micro') if k != 'kappa']
  width = max(12, *(len(n) for n in finding_names))
  lines += ['', f'{"finding":>{width}}     auc  avg prec  positives  negatives  ignored']
  for name in finding_names:
    m = metrics['per_finding'][name]
    lines.append(
      f'{name:>{width}}  {_fmt(m["auc"])}    {_fmt(m["average_precision"])}  '
      f'{m["positives"]:9d}  {m["negatives"]:9d}  {m["ignored"]:7d}'
    )
  return '\n'.join(lines)
