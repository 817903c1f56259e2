"""Evaluation reports and prediction tables on disk.

One evaluation writes, under WORKDIR/eval/, files that share the stem `<split>_<step>` so that
evaluations of several splits and checkpoints sit side by side without overwriting each other:
  <split>_<step>.json                   metrics (see metrics.compute), label names, step
  <split>_<step>_confusion_matrix.png   counts, rows = true class
  <split>_<step>_roc.png                one-vs-rest ROC curve per class
  <split>_<step>_predictions.csv        per image: path, true and predicted label, probabilities
Figures are drawn on bare matplotlib Figures (Agg canvas), never through pyplot's global state,
so writing reports needs no display and leaves an interactive session alone.
"""

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm


def eval_stem(workdir: str, split: str, step: int) -> str:
  """Path prefix shared by one evaluation's files."""
  return os.path.join(workdir, 'eval', f'{split}_{step}')


def _plot_confusion_matrix(path: str, confusion: Sequence[Sequence[int]],
                           label_names: Sequence[str], title: str) -> None:
  n = len(label_names)
  fig = Figure(figsize=(2 + 0.8 * n, 1.5 + 0.8 * n), layout='constrained')
  ax = fig.add_subplot()
  skm.ConfusionMatrixDisplay(np.asarray(confusion), display_labels=list(label_names)).plot(
      ax=ax, cmap='Blues', xticks_rotation=45 if n > 4 else 'horizontal', colorbar=False)
  ax.set_title(title)
  fig.savefig(path, dpi=120)


def _plot_roc(path: str, labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str],
              per_class: dict[str, Any], title: str) -> None:
  fig = Figure(figsize=(6, 5), layout='constrained')
  ax = fig.add_subplot()
  for c, name in enumerate(label_names):
    if per_class[name]['auc'] is None:  # Class absent from (or alone in) this split: no curve.
      continue
    skm.RocCurveDisplay.from_predictions(labels == c, probs[:, c], name=name, ax=ax)
  ax.plot([0, 1], [0, 1], ls=':', c='grey', lw=1)
  ax.set(title=title, xlabel='false positive rate', ylabel='true positive rate')
  fig.savefig(path, dpi=120)


def write_eval(workdir: str, split: str, step: int, metrics: dict[str, Any],
               label_names: Sequence[str], labels: np.ndarray, probs: np.ndarray) -> str:
  """Writes the metrics JSON and its two figures; returns the JSON's path."""
  stem = eval_stem(workdir, split, step)
  os.makedirs(os.path.dirname(stem), exist_ok=True)
  record = {'split': split, 'step': int(step), 'label_names': list(label_names), **metrics}
  with open(f'{stem}.json', 'w') as f:
    json.dump(record, f, indent=2)
  title = f'{split}, step {step}'
  _plot_confusion_matrix(f'{stem}_confusion_matrix.png', metrics['confusion_matrix'],
                         label_names, title)
  _plot_roc(f'{stem}_roc.png', np.asarray(labels), np.asarray(probs), label_names,
            metrics['per_class'], title)
  return f'{stem}.json'


PATH_COLUMN, LABEL_COLUMN, PREDICTION_COLUMN, ERROR_COLUMN = 'path', 'label', 'prediction', 'error'


def write_predictions(path: str, files: Sequence[str], probs: np.ndarray,
                      label_names: Sequence[str], errors: dict[str, str],
                      true_labels: Sequence[str] | None = None) -> str:
  """Writes one CSV row per input file, in order: path, [true label,] predicted label, one
  probability column per class (named after it), error.

  Args:
    path: the CSV to write.
    files: every input, including the unreadable ones.
    probs: [len(files) - len(errors), C], rows for the readable files in `files` order.
    label_names: the C class names (column headers).
    errors: unreadable file → message; its row has empty prediction and probabilities.
    true_labels: per readable file, its true class name (evaluation); None → no label column.
  """
  truth_column = [LABEL_COLUMN] if true_labels is not None else []
  header = [PATH_COLUMN, *truth_column, PREDICTION_COLUMN, *label_names, ERROR_COLUMN]
  if len(set(header)) != len(header):
    raise ValueError(f'class names {list(label_names)} repeat or collide with the CSV columns '
                     f'{PATH_COLUMN}, {LABEL_COLUMN}, {PREDICTION_COLUMN}, {ERROR_COLUMN}; '
                     'rename the class folders')
  probs = np.asarray(probs)
  if len(files) - len(errors) != len(probs):
    raise ValueError(f'{len(files)} files with {len(errors)} errors need '
                     f'{len(files) - len(errors)} rows of probabilities; got {len(probs)}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  rows, truths = iter(probs), iter(true_labels or ())
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for file in files:
      if file in errors:
        truth, cells = '', ['', *[''] * len(label_names), errors[file]]
      else:
        p = next(rows)
        truth = next(truths, '')
        cells = [label_names[int(p.argmax())], *(f'{x:.6f}' for x in p), '']
      writer.writerow([file, *([truth] if truth_column else []), *cells])
  return path
