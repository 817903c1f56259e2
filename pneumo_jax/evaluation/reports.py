"""Evaluation reports and prediction tables on disk.

One evaluation writes, under WORKDIR/eval/, files that share the stem `<split>_<step>` so that
evaluations of several splits and checkpoints sit side by side without overwriting each other:
  <split>_<step>.json                   metrics (see metrics.compute), label names, step, provenance
  <split>_<step>_confusion_matrix.png   counts, rows = true class (not for findings)
  <split>_<step>_roc.png                one-vs-rest ROC curve per class (per finding)
  <split>_<step>_predictions.csv        per image: path, true and predicted label, probabilities
                                        (findings: a probability and a label_<finding> column each)
  <split>_<step>_reliability.png        reliability diagram, before and after temperature scaling
  <split>_<step>.html                   the whole report in one self-contained page (html_report)
An external source's evaluation has the stem `<source>_<split>_<step>` (`<source>_all_<step>`
when scored whole, `--split all`).
Every file is written atomically (a temporary file renamed into place), so a killed run leaves
either the old file or the new one. A report records its provenance (what produced it: split,
checkpoint, dataset, preprocessing) in its JSON; `claim_stem` gives a report made with other
settings a new stem (`<stem>_2`, …) instead of replacing the earlier one, while re-running the
same thing refreshes it in place.
Figures are drawn on bare matplotlib Figures (Agg canvas), never through pyplot's global state,
so writing reports needs no display and leaves an interactive session alone.
"""

import csv
import errno
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from pneumo_jax import atomic
from pneumo_jax.errors import DatasetError, NotWritableError
from pneumo_jax.evaluation.metrics import PRESENT_AT


def eval_stem(workdir: str, split: str, step: int, source: str = '') -> str:
  """Path prefix shared by one evaluation's files (before `claim_stem`); `source` names an
  external source's (`<source>_<split>_<step>`)."""
  return os.path.join(workdir, 'eval', f'{source}_{split}_{step}' if source else f'{split}_{step}')


def check_writable(folder: str, what: str, *, create: bool = True) -> None:
  """Fails, naming `folder` and `what` it is for, when a file cannot be created there (read-only,
  full, not a folder): called before a mode computes, so nothing is spent on results that could
  not be kept. Creates `folder` when missing; with `create` False it leaves nothing behind: a
  missing folder is checked at its nearest existing ancestor, where it would be created."""
  probed = folder
  while not create and not os.path.lexists(probed) and os.path.dirname(probed) != probed:
    probed = os.path.dirname(probed)
  try:
    if create:
      os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(probed):
      raise NotADirectoryError(errno.ENOTDIR, f'{probed!r} is not a folder')
    fd, probe = tempfile.mkstemp(dir=probed, prefix='.write_check.')
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise NotWritableError(
      f'{what} {folder!r} cannot be written ({e.strerror or e}); make it writable, free some '
      'space, or point the run at another folder'
    ) from e


# How CSVs are encoded: UTF-8, except that a file name which is not UTF-8 (Python gives its bytes
# as lone surrogates, os.fsdecode) is written as its own bytes, so the CSV names the exact file
# (read it back with the same encoding and errors to get the name os.listdir gives).
CSV_ENCODING = {'encoding': 'utf-8', 'errors': 'surrogateescape'}


def printable(path: str) -> str:
  """`path` for a message or log line: as it is, except that each byte of a non-UTF-8 name is
  written as \\xNN (its surrogates cannot be printed to a UTF-8 stream; CSVs keep the bytes)."""
  return os.fsencode(path).decode('utf-8', 'backslashreplace')


def write_json(path: str, record: dict[str, Any]) -> None:
  with atomic.atomic_file(path) as tmp, open(tmp, 'w') as f:
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
  with atomic.atomic_file(path) as tmp:
    fig.savefig(tmp, dpi=120)


def _roc_curves(
  labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str], metrics: dict[str, Any]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Name → (truth, score) of each ROC curve: one-vs-rest per class, or per finding over its
  used labels; none for a class or finding whose AUC is undefined on the split."""
  if labels.ndim == 2:
    return {
      name: (labels[labels[:, f] >= 0, f] == 1, probs[labels[:, f] >= 0, f])
      for f, name in enumerate(label_names)
      if metrics['per_finding'][name]['auc'] is not None
    }
  return {
    name: (labels == c, probs[:, c])
    for c, name in enumerate(label_names)
    if metrics['per_class'][name]['auc'] is not None
  }


def _plot_roc(path: str, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
  fig = Figure(figsize=(6, 5), layout='constrained')
  ax = fig.add_subplot()
  for name, (truth, score) in curves.items():
    skm.RocCurveDisplay.from_predictions(truth, score, name=name, ax=ax)
  ax.plot([0, 1], [0, 1], ls=':', c='grey', lw=1)
  ax.set(title=title, xlabel='false positive rate', ylabel='true positive rate')
  _save_figure(fig, path)


def plot_reliability(
  path: str, curves: Mapping[str, tuple[Mapping[str, Any], float]], bins: int, title: str
) -> str:
  """Writes a reliability diagram: per curve (legend name → (calibration.reliability's record,
  ECE)), each confidence bin's accuracy against its mean confidence (bins with images only), over
  the diagonal a calibrated model follows."""
  fig = Figure(figsize=(5.5, 5), layout='constrained')
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], ls=':', c='grey', lw=1, label='calibrated')
  for (name, (r, ece)), marker in zip(curves.items(), 'os^', strict=False):
    kept = [i for i, c in enumerate(r['count']) if c]
    ax.plot(
      [r['confidence'][i] for i in kept],
      [r['accuracy'][i] for i in kept],
      marker=marker,
      label=f'{name} (ECE {ece:.3f})',
    )
  ax.set(
    title=title,
    xlabel=f'top-label confidence ({bins} equal-width bins)',
    ylabel='accuracy in the bin',
    xlim=(0, 1),
    ylim=(0, 1.02),
  )
  ax.legend(loc='upper left')
  _save_figure(fig, path)
  return path


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
  source: str = '',
) -> str:
  """Writes one evaluation's report under WORKDIR/eval/; returns its JSON's path.

  The stem is `claim_stem(eval_stem(..., source), provenance)`. The figures and
  `write_extra(stem)`'s files come first and `<stem>.json` (metrics and provenance) last, since
  its presence claims the stem. Findings (labels [N, F]) have no confusion matrix.
  """
  provenance = provenance or {}
  stem = claim_stem(eval_stem(workdir, split, step, source), provenance)
  title = f'{split}, step {step}'
  if 'confusion_matrix' in metrics:
    _plot_confusion_matrix(
      f'{stem}_confusion_matrix.png', metrics['confusion_matrix'], label_names, title
    )
  curves = _roc_curves(np.asarray(labels), np.asarray(probs), label_names, metrics)
  _plot_roc(f'{stem}_roc.png', curves, title)
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
FINDINGS_SEPARATOR = '|'  # Between the findings of a prediction cell, as ChestX-ray14's labels.


def write_predictions(
  path: str,
  files: Sequence[str],
  probs: np.ndarray,
  label_names: Sequence[str],
  errors: dict[str, str],
  true_labels: Sequence[str] | np.ndarray | None = None,
  identifiers: Mapping[str, Mapping[str, str]] | None = None,
  decisions: Mapping[str, Sequence[bool]] | None = None,
  *,
  multilabel: bool = False,
) -> str:
  """Writes one CSV row per input file, in order: path, [identifiers,] [true label,] predicted
  label, one probability column per class (named after it), [decisions,] error. Encoded as
  CSV_ENCODING. Findings (`multilabel`): the true labels are a `label_<finding>` column each
  (1 present, 0 absent, -1 ignored), and the prediction lists the findings whose probability
  is at least metrics.PRESENT_AT, joined by FINDINGS_SEPARATOR (empty: none).

  Args:
    path: the CSV to write.
    files: every input, including the unreadable ones.
    probs: [len(files) - len(errors), C], rows for the readable files in `files` order.
    label_names: the C class names (column headers).
    errors: unreadable file → message; its row has empty prediction and probabilities.
    true_labels: per readable file, its true class name (evaluation), or for findings its [F]
      labels ([n, F]); None → no label column.
    identifiers: file → {column: value} (a DICOM file's patient and UIDs); the columns are
      those any file has, in first-seen order, empty for a file without them.
    decisions: column → per readable file, a yes/no decision (written 1 or 0): an operating
      point's call.
  """
  if true_labels is None:
    truth_column = []
  elif multilabel:
    truth_column = [f'{LABEL_COLUMN}_{name}' for name in label_names]
  else:
    truth_column = [LABEL_COLUMN]
  identifiers, decisions = identifiers or {}, decisions or {}
  id_columns = list(dict.fromkeys(k for ids in identifiers.values() for k in ids))
  header = [
    PATH_COLUMN,
    *id_columns,
    *truth_column,
    PREDICTION_COLUMN,
    *label_names,
    *decisions,
    ERROR_COLUMN,
  ]
  if len(set(header)) != len(header):
    raise DatasetError(
      f'class names {list(label_names)} repeat or collide with the CSV columns '
      f'{", ".join([PATH_COLUMN, *id_columns, *truth_column, PREDICTION_COLUMN, ERROR_COLUMN])}'
      "; rename the class folders (or the label file's finding columns)"
    )
  probs = np.asarray(probs)
  if len(files) - len(errors) != len(probs):
    raise ValueError(
      f'{len(files)} files with {len(errors)} errors need '
      f'{len(files) - len(errors)} rows of probabilities; got {len(probs)}'
    )
  rows, truths = iter(probs), iter(() if true_labels is None else true_labels)
  calls = iter(zip(*decisions.values(), strict=True)) if decisions else None
  with atomic.atomic_file(path) as tmp, open(tmp, 'w', newline='', **CSV_ENCODING) as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for file in files:
      if file in errors:
        truth = [''] * len(truth_column)
        cells = ['', *[''] * (len(label_names) + len(decisions)), errors[file]]
      else:
        p = next(rows)
        if not truth_column:
          truth = []
        elif multilabel:
          truth = [str(int(t)) for t in next(truths)]
        else:
          truth = [next(truths)]
        called = [str(int(c)) for c in next(calls)] if calls else []
        cells = [_prediction(p, label_names, multilabel), *(f'{x:.6f}' for x in p), *called, '']
      ids = [identifiers.get(file, {}).get(k, '') for k in id_columns]
      writer.writerow([file, *ids, *truth, *cells])
  return path


def _prediction(probs: np.ndarray, label_names: Sequence[str], multilabel: bool) -> str:
  """A row's prediction cell: the most probable class, or the findings at least PRESENT_AT."""
  if multilabel:
    present = (n for n, p in zip(label_names, probs, strict=True) if p >= PRESENT_AT)
    return FINDINGS_SEPARATOR.join(present)
  return label_names[int(probs.argmax())]
