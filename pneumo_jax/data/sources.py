"""Where a build's examples come from: the dataset config → candidate files with their class,
patient and predefined split, from class folders, split folders (`train/ val/ test/`, any case,
each holding the same class folders) or a label file (`path,label[,patient_id][,split]`, read
as UTF-8 with other bytes kept by 'surrogateescape', as file names on such disks are).

With dataset.task='multilabel' the label file has a column per finding instead of `label`
(`path[,patient_id][,split],finding,…`, as ChestX-ray14's and CheXpert's files), each cell 1
(present), 0 (absent), -1 (uncertain) or blank (not mentioned), also written 1.0/0.0/-1.0 as
CheXpert does; dataset.uncertain and dataset.blank turn -1 and blank into 1, 0 or -1 (ignored:
masked out of the loss and the metrics), CheXpert's U-Ones, U-Zeros and U-Ignore.

Classes come in `dataset.class_names` order when set (it must name exactly the classes found),
else sorted. A file's patient is the CSV's `patient_id`, else the first group (or whole match) of
`dataset.patient_pattern` in its relative path (it must match every file), else DICOM's
PatientID (read later, by the build's read pass). Odd entries do not stop the scan: a folder that
cannot be listed is returned in `broken`, and link loops, dangling links and unreadable files
stay candidates for the read pass to list with their cause.
"""

import csv
import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import logging

from pneumo_jax.data.images import PILLOW_EXTENSIONS, is_candidate
from pneumo_jax.errors import ConfigError, DatasetError

__all__ = [
  'POLICIES',
  'TASKS',
  'Example',
  'Source',
  'check_settings',
  'class_names_of',
  'finding_columns_of',
  'label_policy_of',
  'patient_regex',
  'scan',
  'task_of',
]

# Folder names (and CSV `split` values), lower-cased, → the split they stand for.
SPLIT_ALIASES = {
  'train': 'train',
  'val': 'validation',
  'valid': 'validation',
  'validation': 'validation',
  'test': 'test',
}
CSV_COLUMNS = ('path', 'label', 'patient_id', 'split')
TASKS = ('single', 'multilabel')  # dataset.task.
# dataset.uncertain and dataset.blank → the value a -1 or blank cell of a finding becomes.
POLICIES = {'ignore': -1, 'zeros': 0, 'ones': 1}
_NOT_FINDINGS = ('path', 'patient_id', 'split')  # A multilabel file's other columns.
_FINDING_VALUES = {1.0: 1, 0.0: 0, -1.0: -1}  # A finding cell's number (1, 1.0, …) → its value.
_SHOWN = 5  # Offending CSV lines or files quoted in one message.


@dataclasses.dataclass(frozen=True)
class Example:
  """One candidate file."""

  path: str  # Relative to Source.root (a label file's absolute paths stay absolute).
  # Single-label: an index into Source.classes. Multilabel: per finding (Source.classes' order)
  # 1 present, 0 absent or -1 ignored, after dataset.uncertain and dataset.blank.
  label: int | tuple[int, ...]
  patient: str = ''  # '' when unknown (here; DICOM's PatientID is read later).
  split: str = ''  # 'train', 'validation' or 'test' when the source fixes it, else ''.


@dataclasses.dataclass(frozen=True)
class Source:
  """What a build reads, as found before building."""

  root: str  # The source folder, or the label file's folder.
  kind: str  # 'class folders', 'split folders' or 'label file'.
  classes: tuple[str, ...]  # Class names in label order; multilabel: the findings, in order.
  examples: tuple[Example, ...]
  # (path, size, mtime_ns) of every candidate (lstat when it cannot be followed): part of the
  # build's fingerprint, with `content`.
  stats: tuple[tuple[str, int, int], ...]
  # (path, message naming it and why): folders that could not be listed.
  broken: tuple[tuple[str, str], ...] = ()
  content: str = ''  # sha256 of the label file's bytes; '' for folders.
  label_file: str = ''  # The label file's path; '' for folders.
  task: str = 'single'  # dataset.task.
  # Multilabel: (('uncertain', policy), ('blank', policy)), as `label_policy_of`; else ().
  label_policy: tuple[tuple[str, str], ...] = ()

  @property
  def what(self) -> str:
    """The source as a user names it."""
    return self.label_file or self.root


def scan(dataset_cfg: ml_collections.ConfigDict, data_dir: str) -> Source:
  """The examples of `dataset_cfg`'s source (see the module doc), checked.

  Raises:
    DatasetError: a missing or malformed source; the message names the path, line or class
      (a finding's bad cell: the file, line and column).
    ConfigError: both or neither of dataset.source_dir and dataset.labels_csv set, or a bad
      dataset.class_names, dataset.patient_pattern or multilabel setting (`check_settings`).
  """
  wanted, pattern = check_settings(dataset_cfg)
  source_dir, labels_csv = dataset_cfg.source_dir, dataset_cfg.labels_csv
  skip = bool(dataset_cfg.skip_corrupt)
  if task_of(dataset_cfg) == 'multilabel':
    labelling = _Findings(finding_columns_of(dataset_cfg), label_policy_of(dataset_cfg))
    return _label_file(labels_csv, labelling, pattern, skip)
  if labels_csv:
    return _label_file(labels_csv, _Classes(wanted), pattern, skip)
  return _folders(source_dir, data_dir, wanted, pattern)


def check_settings(
  dataset_cfg: ml_collections.ConfigDict,
) -> tuple[tuple[str, ...], re.Pattern | None]:
  """Checks the source fields without reading anything; returns the class names
  (`class_names_of`) and the patient pattern (`patient_regex`).

  Raises:
    ConfigError: both dataset.source_dir and dataset.labels_csv set, a bad class list or
      patient pattern, or a bad dataset.task, label_columns, uncertain or blank; multilabel
      without a label file, or with dataset.class_names.
  """
  source_dir, labels_csv = dataset_cfg.source_dir, dataset_cfg.labels_csv
  if source_dir and labels_csv:
    raise ConfigError(
      f'dataset.source_dir={source_dir!r} and dataset.labels_csv={labels_csv!r} are both set: '
      'use one (a label file lists its images itself); unset the other'
    )
  columns = finding_columns_of(dataset_cfg)
  if task_of(dataset_cfg) == 'multilabel':
    if not labels_csv:
      raise ConfigError(
        "dataset.task='multilabel' needs dataset.labels_csv: a CSV with columns path "
        '(optional patient_id, split) and one column per finding (1, 0, -1 or blank); folders '
        'give one class per image'
      )
    if dataset_cfg.class_names:
      raise ConfigError(
        f'dataset.class_names={dataset_cfg.class_names!r} names single-label classes; with '
        "dataset.task='multilabel' choose and order the findings with dataset.label_columns"
      )
    label_policy_of(dataset_cfg)
  elif columns:
    raise ConfigError(
      f'dataset.label_columns={dataset_cfg.label_columns!r} is for findings: set '
      '--config.dataset.task=multilabel, or unset it (a single-label file has a label column)'
    )
  return class_names_of(dataset_cfg), patient_regex(dataset_cfg)


def task_of(dataset_cfg: ml_collections.ConfigDict) -> str:
  """dataset.task, checked: 'single' (a class per image) or 'multilabel' (findings).

  Raises:
    ConfigError: another value.
  """
  task = dataset_cfg.task
  if task not in TASKS:
    raise ConfigError(
      f"dataset.task={task!r}: use 'single' (one class per image) or 'multilabel' (a column "
      'of 1/0/-1/blank per finding in dataset.labels_csv)'
    )
  return task


def finding_columns_of(dataset_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """dataset.label_columns as a tuple, a list or a comma string; () when unset (every column
  of the label file but path, patient_id and split).

  Raises:
    ConfigError: a name that is empty, repeats, or is path, patient_id or split.
  """
  given = dataset_cfg.label_columns
  if not given:
    return ()
  names = _distinct_names(given)
  if names is None or set(names) & set(_NOT_FINDINGS):
    raise ConfigError(
      f'dataset.label_columns={given!r}: give distinct, non-empty finding columns of the label '
      "file in the order wanted, as a list or a comma string such as 'Effusion,Nodule' (not "
      f'{", ".join(_NOT_FINDINGS)}), or leave it empty for every other column'
    )
  return names


def _distinct_names(given: str | Sequence[Any]) -> tuple[str, ...] | None:
  """A list or comma string of names, stripped; None when one is empty or repeats."""
  names = tuple(str(n).strip() for n in (given.split(',') if isinstance(given, str) else given))
  return None if '' in names or len(set(names)) < len(names) else names


def label_policy_of(dataset_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, str], ...]:
  """(('uncertain', dataset.uncertain), ('blank', dataset.blank)), checked.

  Raises:
    ConfigError: a policy that is not one of POLICIES.
  """
  policy = (('uncertain', dataset_cfg.uncertain), ('blank', dataset_cfg.blank))
  for field, value in policy:
    if value not in POLICIES:
      raise ConfigError(
        f'dataset.{field}={value!r}: use ignore (masked out of the loss and metrics), zeros '
        '(absent) or ones (present)'
      )
  return policy


def class_names_of(dataset_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """dataset.class_names as a tuple (() when unset); a comma string or a list.

  Raises:
    ConfigError: a name that is empty or repeats, or fewer than two names.
  """
  given = dataset_cfg.class_names
  if not given:
    return ()
  names = _distinct_names(given)
  if names is None or len(names) < 2:
    raise ConfigError(
      f'dataset.class_names={given!r}: give two or more distinct, non-empty class names in '
      "label order, as a list or a comma string such as 'none,mild,moderate,severe'"
    )
  return names


def patient_regex(dataset_cfg: ml_collections.ConfigDict) -> re.Pattern | None:
  """dataset.patient_pattern compiled (None when unset).

  Raises:
    ConfigError: it does not compile.
  """
  pattern = dataset_cfg.patient_pattern
  if not pattern:
    return None
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(
      f'dataset.patient_pattern={pattern!r} is not a regular expression ({e}); e.g. '
      r"'(person\d+)_' takes person12 from person12_bacteria_1.jpeg"
    ) from e


def _patient(path: str, pattern: re.Pattern) -> str | None:
  """The patient id `pattern` finds in `path`: its first group that took part in the match, else
  the whole match; None when it does not match."""
  found = pattern.search(path)
  if not found:
    return None
  return next((g for g in found.groups() if g), found.group(0))


def _ordered(found: Sequence[str], wanted: tuple[str, ...], where: str) -> tuple[str, ...]:
  """The classes in label order: `wanted` (which must be exactly `found`), else sorted.

  A class name must be UTF-8 (it names the model's outputs in every report); file names need not.
  """
  _printable(found, where, 'class')
  if not wanted:
    return tuple(sorted(found))
  extra, absent = sorted(set(found) - set(wanted)), [c for c in wanted if c not in set(found)]
  if extra or absent:
    parts = ([f'{where} has {extra}, not in it'] if extra else []) + (
      [f'{absent} not found in {where}'] if absent else []
    )
    raise DatasetError(
      f'dataset.class_names={list(wanted)} differs from the classes of the source: '
      + '; '.join(parts)
      + '; make them the same set'
    )
  return wanted


def _printable(names: Sequence[str], where: str, what: str) -> None:
  """Raises DatasetError unless every name is printable UTF-8 (lone surrogates, control
  characters are not)."""
  odd = [c for c in names if not c.isprintable()]
  if odd:
    raise DatasetError(
      f'{what} name(s) {odd} in {where} are not printable UTF-8 text (\\udcXX: a byte that is '
      'not UTF-8); rename them'
    )


def _stat(path: str) -> tuple[int, int]:
  """(size, mtime_ns) of `path`, or of the link itself when it cannot be followed."""
  try:
    st = os.stat(path)
  except OSError:
    try:
      st = os.lstat(path)
    except OSError:
      return -1, -1
  return st.st_size, st.st_mtime_ns


def _visible_dirs(folder: str) -> tuple[list[str], list[str]]:
  """Sorted (visible sub-folder names, other entry names) of `folder`."""
  try:
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
  except OSError as e:
    raise DatasetError(
      f'cannot list folder {folder!r} ({e.strerror or e}); check its permissions'
    ) from e
  dirs = [e.name for e in entries if not e.name.startswith('.') and _is_dir(e)]
  return dirs, [e.name for e in entries if e.name not in set(dirs)]


def _is_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()
  except OSError:  # A link loop: not a folder; the walk lists it as a file.
    return False


def _folders(
  source_dir: str, data_dir: str, wanted: tuple[str, ...], pattern: re.Pattern | None
) -> Source:
  if not source_dir:
    raise DatasetError(
      'dataset.source_dir is empty: set --config.dataset.source_dir=/path/to/folder, a folder '
      'with one subfolder of images per class (or per split: train/, val/, test/), or '
      '--config.dataset.labels_csv=FILE'
    )
  root = os.path.realpath(source_dir)
  if not os.path.isdir(root):
    what = 'is not a folder' if os.path.exists(root) else 'does not exist'
    raise DatasetError(
      f'dataset.source_dir {source_dir!r} {what}; point it at a folder with one '
      'subfolder of images per class'
    )
  if os.path.realpath(data_dir).startswith(root + os.sep):
    raise DatasetError(
      f'data_dir {data_dir!r} lies inside dataset.source_dir {root!r}, where it '
      'would be read as a class; put it elsewhere'
    )
  top, loose = _visible_dirs(root)
  splits = {d: SPLIT_ALIASES[d.lower()] for d in top if d.lower() in SPLIT_ALIASES}
  if not splits:
    classes = _ordered(top, wanted, root)
    _need_two(classes, root, 'put each class in its own subfolder')
    walk = _walk(root, '', classes)
    kind = 'class folders'
  else:
    others = [d for d in top if d not in splits]
    if others:
      raise DatasetError(
        f'{root!r} mixes split folders {sorted(splits)} with other folders {others}: split '
        'folders (train, val, test) must each hold the class folders; move the others into them '
        '(or out), or rename the split folders if they are classes'
      )
    doubled = [s for s in set(splits.values()) if list(splits.values()).count(s) > 1]
    if doubled:
      names = [d for d in splits if splits[d] in doubled]
      raise DatasetError(f'{root!r} has folders {names} for the same split; merge them')
    if 'train' not in splits.values():
      raise DatasetError(f'{root!r} has split folders {sorted(splits)} but no train/; add it')
    per_split = {d: _visible_dirs(os.path.join(root, d)) for d in splits}
    union = sorted(set().union(*(set(dirs) for dirs, _ in per_split.values())))
    for d, (dirs, _) in per_split.items():
      absent = [c for c in union if c not in dirs]
      if absent:
        raise DatasetError(
          f'split folder {os.path.join(root, d)!r} lacks class folder(s) {absent} that another '
          'split has: every split folder must hold the same class folders'
        )
    classes = _ordered(union, wanted, root)
    _need_two(classes, root, 'put each class in its own subfolder')
    parts = [_walk(root, d, classes, split=splits[d]) for d in splits]
    walk = tuple(sum((part[k] for part in parts), ()) for k in range(5))
    kind = 'split folders'
  examples, stats, skipped, broken, empty = walk
  skipped = tuple(loose) + skipped  # Loose files belong to no class.
  if empty:
    raise DatasetError(
      f'class folder(s) {list(empty)} hold no images ({" ".join(PILLOW_EXTENSIONS)} or '
      'DICOM); add images or remove the folder(s)'
    )
  # Hidden files (.DS_Store, a generated folder's marker) are skipped without a word, as a file
  # browser hides them; other files that are not images are named.
  if shown := [p for p in skipped if not os.path.basename(p).startswith('.')]:
    logging.info('In %s: skipped %d non-image file(s), e.g. %s', root, len(shown), shown[:5])
  examples = _with_patients(examples, pattern, root)
  return Source(root, kind, classes, tuple(examples), tuple(stats), tuple(broken))


def _need_two(classes: Sequence[str], where: str, fix: str) -> None:
  if len(classes) < 2:
    raise DatasetError(
      f'{where!r} has {len(classes)} class(es) {list(classes)}; a classifier needs at least '
      f'two: {fix}'
    )


def _walk(root: str, base: str, classes: Sequence[str], split: str = ''):
  """(examples, stats, skipped, broken, empty class folders) under root/base/<class>/."""
  examples, stats, skipped, broken, empty = [], [], [], [], []
  if base:
    skipped += [os.path.join(base, n) for n in _visible_dirs(os.path.join(root, base))[1]]

  def unlisted(error: OSError) -> None:
    why = f'cannot list folder {error.filename!r} ({error.strerror or error})'
    broken.append((os.path.relpath(error.filename, root), why))

  for label, name in enumerate(classes):
    found, failed = 0, len(broken)
    for folder, dirs, names in os.walk(os.path.join(root, base, name), onerror=unlisted):
      dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
      for file in sorted(names):
        path = os.path.join(folder, file)
        rel = os.path.relpath(path, root)
        if not is_candidate(path):
          skipped.append(rel)
          continue
        found += 1
        examples.append(Example(rel, label, split=split))
        stats.append((rel, *_stat(path)))
    if not found and len(broken) == failed:  # An unlistable one is listed as broken.
      empty.append(os.path.join(root, base, name))
  return tuple(examples), tuple(stats), tuple(skipped), tuple(broken), tuple(empty)


def _with_patients(
  examples: Sequence[Example], pattern: re.Pattern | None, where: str
) -> list[Example]:
  """`examples` with the patient `pattern` finds where they have none yet."""
  if pattern is None:
    return list(examples)
  out, missed = [], []
  for e in examples:
    patient = e.patient or _patient(e.path, pattern)
    if patient is None:
      missed.append(e.path)
    out.append(dataclasses.replace(e, patient=patient or ''))
  if missed:
    raise DatasetError(
      f'dataset.patient_pattern={pattern.pattern!r} does not match {len(missed)} file(s) of '
      f'{where}, e.g. {missed[:_SHOWN]}; widen it (e.g. with | alternatives) so that it finds '
      'a patient in every path, or unset it'
    )
  return out


@dataclasses.dataclass(frozen=True)
class _Classes:
  """A single-label file's labels: a class name per row in its `label` column."""

  wanted: tuple[str, ...]  # dataset.class_names; () → the names found, sorted.
  task = 'single'
  label_policy = ()

  def reader(self, header: list[str], labels_csv: str) -> tuple[tuple[str, ...], Callable]:
    """((), row → (class name, None) or (None, why)); checks the header."""
    absent = [c for c in ('path', 'label') if c not in header]
    if absent:
      raise DatasetError(
        f'{labels_csv}: no column(s) {absent} in its header {header}; a label file needs '
        'columns path and label (optional patient_id, split)'
      )
    return (), self._read

  def _read(self, row: dict) -> tuple[str | None, str | None]:
    label = (row.get('label') or '').strip()
    if not label:
      return None, 'empty label'
    if self.wanted and label not in self.wanted:
      return None, f'label {label!r} is not one of dataset.class_names {list(self.wanted)}'
    return label, None

  def finish(
    self, names: tuple[str, ...], labels: list[str], labels_csv: str
  ) -> tuple[tuple[str, ...], list[int]]:
    """The classes (dataset.class_names' order, else sorted) and each row's class index."""
    del names  # (): the classes are the labels found.
    classes = _ordered(sorted(set(labels)), self.wanted, labels_csv)
    _need_two(classes, labels_csv, 'label rows with two or more classes')
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[label] for label in labels]


@dataclasses.dataclass(frozen=True)
class _Findings:
  """A multilabel file's labels: a column per finding (see the module doc)."""

  columns: tuple[str, ...]  # dataset.label_columns; () → every column but path, patient_id, split.
  label_policy: tuple[tuple[str, str], ...]  # label_policy_of.
  task = 'multilabel'

  def reader(self, header: list[str], labels_csv: str) -> tuple[tuple[str, ...], Callable]:
    """(the findings in order, row → (values, None) or (None, why)); checks the header."""
    fix = (
      'a multilabel label file needs a path column and one column per finding (optional '
      'patient_id, split)'
    )
    if 'path' not in header:
      raise DatasetError(f"{labels_csv}: no column 'path' in its header {header}; {fix}")
    findings = self.columns or tuple(h for h in header if h not in _NOT_FINDINGS)
    if '' in findings:
      raise DatasetError(
        f'{labels_csv}: column {header.index("") + 1} of its header {header} has no name (an '
        'index that pandas wrote?); name it or drop it, or list the findings in '
        'dataset.label_columns'
      )
    absent = [c for c in findings if c not in header]
    if absent:
      raise DatasetError(
        f'{labels_csv}: dataset.label_columns names {absent}, not in its header {header}; '
        'list columns it has'
      )
    if not findings:
      raise DatasetError(f'{labels_csv}: its header {header} has no finding column; {fix}')
    doubled = sorted({c for c in findings if header.count(c) > 1})
    if doubled:
      raise DatasetError(f'{labels_csv}: column(s) {doubled} repeat in its header; rename them')
    _printable(findings, labels_csv, 'finding')
    policy = dict(self.label_policy)
    uncertain, blank = POLICIES[policy['uncertain']], POLICIES[policy['blank']]

    def read(row: dict) -> tuple[tuple[int, ...] | None, str | None]:
      values, bad = [], []
      for column in findings:
        cell = row.get(column)
        if cell is None:  # csv's value for the cells a short row lacks.
          bad.append(f'column {column!r} is missing (the row is shorter than the header)')
          continue
        cell = cell.strip()
        if not cell:
          values.append(blank)
          continue
        try:
          value = _FINDING_VALUES.get(float(cell))
        except ValueError:
          value = None
        if value is None:
          bad.append(f'column {column!r} holds {cell!r}')
        else:
          values.append(uncertain if value == -1 else value)
      if bad:
        return None, ', '.join(bad) + ' (a finding is 1, 0, -1 for uncertain, or blank)'
      return tuple(values), None

    return findings, read

  def finish(
    self, names: tuple[str, ...], labels: list[tuple[int, ...]], labels_csv: str
  ) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    del labels_csv  # Splits check each finding's counts.
    return names, labels


def _row_problem(file: str, full: str, split: str, seen: dict[str, int]) -> str | None:
  """Why a label file's row (its label read) cannot be used, or None."""
  if split and split.lower() not in SPLIT_ALIASES:
    return f'split {split!r} is not train, validation or test (or empty: drawn by the fractions)'
  if full in seen:
    return f'path {file!r} repeats line {seen[full]}'
  if not os.path.lexists(full):
    return f'no such file {full!r}'
  return None


def _label_file(
  labels_csv: str, labelling: _Classes | _Findings, pattern: re.Pattern | None, skip: bool
) -> Source:
  path = os.path.realpath(labels_csv)
  if not os.path.isfile(path):
    what = 'is not a file' if os.path.exists(path) else 'does not exist'
    columns = 'path,label' if labelling.task == 'single' else 'path and one per finding'
    raise DatasetError(
      f'dataset.labels_csv {labels_csv!r} {what}; point it at a CSV with columns {columns} '
      '(optional patient_id, split)'
    )
  with open(path, 'rb') as f:
    content = f.read()
  root, name = os.path.dirname(path), os.path.basename(path)
  text = content.decode('utf-8', 'surrogateescape').removeprefix('\ufeff')
  reader = csv.DictReader(text.splitlines(keepends=True))
  header = [h.strip() for h in reader.fieldnames or []]
  reader.fieldnames = header
  names, read_label = labelling.reader(header, labels_csv)
  rows, bad, seen = [], [], {}
  for row in reader:
    line = reader.line_num
    cell = {c: (row.get(c) or '').strip() for c in CSV_COLUMNS}
    file, split = cell['path'], cell['split']
    full = os.path.normpath(os.path.join(root, file))
    label, why = read_label(row) if file else (None, 'empty path')
    why = why or _row_problem(file, full, split, seen)
    if why:
      bad.append(f'{name}:{line}: {why}')
      continue
    seen[full] = line
    rel = file if os.path.isabs(file) else os.path.relpath(full, root)
    rows.append((rel, label, cell['patient_id'], SPLIT_ALIASES.get(split.lower(), '')))
  if bad and not skip:
    more = f' … and {len(bad) - _SHOWN} more' if len(bad) > _SHOWN else ''
    raise DatasetError(
      f'{len(bad)} bad row(s) in {labels_csv}: ' + '; '.join(bad[:_SHOWN]) + more + '; fix '
      'them, or set --config.dataset.skip_corrupt=True to skip them'
    )
  if bad:
    logging.warning('Skipped %d bad row(s) of %s: %s', len(bad), labels_csv, bad)
  classes, labels = labelling.finish(names, [label for _, label, _, _ in rows], labels_csv)
  examples = [
    Example(rel, label, patient, split)
    for (rel, _, patient, split), label in zip(rows, labels, strict=True)
  ]
  examples = _with_patients(examples, pattern, labels_csv)
  stats = tuple((rel, *_stat(os.path.join(root, rel))) for rel, _, _, _ in rows)
  return Source(
    root,
    'label file',
    classes,
    tuple(examples),
    stats,
    content=hashlib.sha256(content).hexdigest(),
    label_file=path,
    task=labelling.task,
    label_policy=labelling.label_policy,
  )
