"""Evaluation reports and prediction tables on disk.

One evaluation writes, under WORKDIR/eval/, files that share the stem `<split>_<step>` so that
evaluations of several splits and checkpoints sit side by side without overwriting each other:
  <split>_<step>.json                   metrics (see metrics.compute), label names, step, provenance
  <split>_<step>_confusion_matrix.png   counts, rows = true class
  <split>_<step>_roc.png                one-vs-rest ROC curve per class
  <split>_<step>_predictions.csv        per image: path, true and predicted label, probabilities
Every file is written atomically (a temporary file renamed into place), so a killed run leaves
either the old file or the new one. A report records its provenance (what produced it: split,
checkpoint, dataset, preprocessing) in its JSON; `claim_stem` gives a report made with other
settings a new stem (`<stem>_2`, …) instead of replacing the earlier one, while re-running the
same thing refreshes it in place.
Figures are drawn on bare matplotlib Figures (Agg canvas), never through pyplot's global state,
so writing reports needs no display and leaves an interactive session alone.
"""

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from pneumo_jax.errors import DatasetError, NotWritableError


def eval_stem(workdir: str, split: str, step: int) -> str:
  """Path prefix shared by one evaluation's files (before `claim_stem`)."""
  return os.path.join(workdir, 'eval', f'{split}_{step}')


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` (same extension) and renames it onto `path` once the
  block succeeds; on failure the temporary file is removed and `path` is left as it was."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    dir=folder, prefix=f'.{os.path.basename(path)}.', suffix=os.path.splitext(path)[1]
  )
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_writable(folder: str, what: str) -> None:
  """Fails, naming `folder` and `what` it is for, when a file cannot be created there (read-only,
  full, not a folder): called before a mode computes, so nothing is spent on results that could
  not be kept. Creates `folder` when missing."""
  try:
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix='.write_check.')
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise NotWritableError(
      f'{what} {folder!r} cannot be written ({e.strerror or e}); make it writable, free some '
      'space, or point the run at another folder'
    ) from e


def write_json(path: str, record: dict[str, Any]) -> None:
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    json.dump(record, f, indent=2)


def claim_stem(stem: str, provenance: dict[str, Any]) -> str:
  """`stem`, unless `<stem>.json` was made with other provenance: then the first of `<stem>_2`,
  `<stem>_3`, … that is free or was made with this provenance. Never replaces another's report."""
  provenance = json.loads(json.dumps(provenance))  # As it will read back (tuples → lists).
  candidate, n = stem, 1
  while os.path.exists(f'{candidate}.json'):
    try:
      with open(f'{candidate}.json') as f:
        if json.load(f).get('provenance') == provenance:
          break
    except (OSError, ValueError):
      pass  # Unreadable: not ours to replace.
    n += 1
    candidate = f'{stem}_{n}'
  return candidate


def _plot_confusion_matrix(
  path: str, confusion: Sequence[Sequence[int]], label_names: Sequence[str], title: str
) -> None:
  n = len(label_names)
  fig = Figure(figsize=(2 + 0.8 * n, 1.5 + 0.8 * n), layout='constrained')
  ax = fig.add_subplot()
  skm.ConfusionMatrixDisplay(np.asarray(confusion), display_labels=list(label_names)).plot(
    ax=ax, cmap='Blues', xticks_rotation=45 if n > 4 else 'horizontal', colorbar=False
  )
  ax.set_title(title)
  _save_figure(fig, path)


def _save_figure(fig: Figure, path: str) -> None:
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=120)


def _plot_roc(
  path: str,
  labels: np.ndarray,
  probs: np.ndarray,
  label_names: Sequence[str],
  per_class: dict[str, Any],
  title: str,
) -> None:
  fig = Figure(figsize=(6, 5), layout='constrained')
  ax = fig.add_subplot()
  for c, name in enumerate(label_names):
    if per_class[name]['auc'] is None:  # Class absent from (or alone in) this split: no curve.
      continue
    skm.RocCurveDisplay.from_predictions(labels == c, probs[:, c], name=name, ax=ax)
  ax.plot([0, 1], [0, 1], ls=':', c='grey', lw=1)
  ax.set(title=title, xlabel='false positive rate', ylabel='true positive rate')
  _save_figure(fig, path)


def write_eval(
  workdir: str,
  split: str,
  step: int,
  metrics: dict[str, Any],
  label_names: Sequence[str],
  labels: np.ndarray,
  probs: np.ndarray,
  provenance: dict[str, Any] | None = None,
  write_extra: Callable[[str], None] | None = None,
) -> str:
  """Writes one evaluation's report under WORKDIR/eval/; returns its JSON's path.

  The stem is `claim_stem(eval_stem(...), provenance)`. The figures and `write_extra(stem)`'s
  files come first and `<stem>.json` (metrics and provenance) last, since its presence claims
  the stem.
  """
  provenance = provenance or {}
  stem = claim_stem(eval_stem(workdir, split, step), provenance)
  title = f'{split}, step {step}'
  _plot_confusion_matrix(
    f'{stem}_confusion_matrix.png', metrics['confusion_matrix'], label_names, title
  )
  _plot_roc(
    f'{stem}_roc.png',
    np.asarray(labels),
    np.asarray(probs),
    label_names,
    metrics['per_class'],
    title,
  )
  if write_extra is not None:
    write_extra(stem)
  write_json(
    f'{stem}.json',
    {
      'split': split,
      'step': int(step),
      'label_names': list(label_names),
      'provenance': provenance,
      **metrics,
    },
  )
  return f'{stem}.json'


PATH_COLUMN, LABEL_COLUMN, PREDICTION_COLUMN, ERROR_COLUMN = 'path', 'label', 'prediction', 'error'


def write_predictions(
  path: str,
  files: Sequence[str],
  probs: np.ndarray,
  label_names: Sequence[str],
  errors: dict[str, str],
  true_labels: Sequence[str] | None = None,
) -> str:
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
    raise DatasetError(
      f'class names {list(label_names)} repeat or collide with the CSV columns '
      f'{PATH_COLUMN}, {LABEL_COLUMN}, {PREDICTION_COLUMN}, {ERROR_COLUMN}; '
      'rename the class folders'
    )
  probs = np.asarray(probs)
  if len(files) - len(errors) != len(probs):
    raise ValueError(
      f'{len(files)} files with {len(errors)} errors need '
      f'{len(files) - len(errors)} rows of probabilities; got {len(probs)}'
    )
  rows, truths = iter(probs), iter(true_labels or ())
  with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
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
