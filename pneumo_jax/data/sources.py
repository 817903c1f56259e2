"""Where a build's examples come from: the dataset config → candidate files with their class,
patient and predefined split, from class folders, split folders (`train/ val/ test/`, any case,
each holding the same class folders) or a label file (`path,label[,patient_id][,split]`, read
as UTF-8 with other bytes kept by 'surrogateescape', as file names on such disks are).

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
from collections.abc import Sequence

import ml_collections
from absl import logging

from pneumo_jax.data.images import PILLOW_EXTENSIONS, is_candidate
from pneumo_jax.errors import ConfigError, DatasetError

__all__ = ['Example', 'Source', 'check_settings', 'class_names_of', 'patient_regex', 'scan']

# Folder names (and CSV `split` values), lower-cased, → the split they stand for.
SPLIT_ALIASES = {
  'train': 'train',
  'val': 'validation',
  'valid': 'validation',
  'validation': 'validation',
  'test': 'test',
}
CSV_COLUMNS = ('path', 'label', 'patient_id', 'split')
_SHOWN = 5  # Offending CSV lines or files quoted in one message.


@dataclasses.dataclass(frozen=True)
class Example:
  """One candidate file."""

  path: str  # Relative to Source.root (a label file's absolute paths stay absolute).
  label: int  # Index into Source.classes.
  patient: str = ''  # '' when unknown (here; DICOM's PatientID is read later).
  split: str = ''  # 'train', 'validation' or 'test' when the source fixes it, else ''.


@dataclasses.dataclass(frozen=True)
class Source:
  """What a build reads, as found before building."""

  root: str  # The source folder, or the label file's folder.
  kind: str  # 'class folders', 'split folders' or 'label file'.
  classes: tuple[str, ...]
  examples: tuple[Example, ...]
  # (path, size, mtime_ns) of every candidate (lstat when it cannot be followed): part of the
  # build's fingerprint, with `content`.
  stats: tuple[tuple[str, int, int], ...]
  # (path, message naming it and why): folders that could not be listed.
  broken: tuple[tuple[str, str], ...] = ()
  content: str = ''  # sha256 of the label file's bytes; '' for folders.
  label_file: str = ''  # The label file's path; '' for folders.

  @property
  def what(self) -> str:
    """The source as a user names it."""
    return self.label_file or self.root


def scan(dataset_cfg: ml_collections.ConfigDict, data_dir: str) -> Source:
  """The examples of `dataset_cfg`'s source (see the module doc), checked.

  Raises:
    DatasetError: a missing or malformed source; the message names the path, line or class.
    ConfigError: both or neither of dataset.source_dir and dataset.labels_csv set, or a bad
      dataset.class_names or dataset.patient_pattern.
  """
  wanted, pattern = check_settings(dataset_cfg)
  source_dir, labels_csv = dataset_cfg.source_dir, dataset_cfg.labels_csv
  if labels_csv:
    return _label_file(labels_csv, wanted, pattern, bool(dataset_cfg.skip_corrupt))
  return _folders(source_dir, data_dir, wanted, pattern)


def check_settings(
  dataset_cfg: ml_collections.ConfigDict,
) -> tuple[tuple[str, ...], re.Pattern | None]:
  """Checks the source fields without reading anything; returns the class names
  (`class_names_of`) and the patient pattern (`patient_regex`).

  Raises:
    ConfigError: both dataset.source_dir and dataset.labels_csv set, or a bad class list or
      patient pattern.
  """
  source_dir, labels_csv = dataset_cfg.source_dir, dataset_cfg.labels_csv
  if source_dir and labels_csv:
    raise ConfigError(
      f'dataset.source_dir={source_dir!r} and dataset.labels_csv={labels_csv!r} are both set: '
      'use one (a label file lists its images itself); unset the other'
    )
  return class_names_of(dataset_cfg), patient_regex(dataset_cfg)


def class_names_of(dataset_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """dataset.class_names as a tuple (() when unset); a comma string or a list.

  Raises:
    ConfigError: a name that is empty or repeats, or fewer than two names.
  """
  given = dataset_cfg.class_names
  if not given:
    return ()
  names = given.split(',') if isinstance(given, str) else list(given)
  names = [str(n).strip() for n in names]
  if len(names) < 2 or '' in names or len(set(names)) < len(names):
    raise ConfigError(
      f'dataset.class_names={given!r}: give two or more distinct, non-empty class names in '
      "label order, as a list or a comma string such as 'none,mild,moderate,severe'"
    )
  return tuple(names)


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
  odd = [c for c in found if not c.isprintable()]  # Lone surrogates, control characters.
  if odd:
    raise DatasetError(
      f'class name(s) {odd} in {where} are not printable UTF-8 text (\\udcXX: a byte that is '
      'not UTF-8); rename them'
    )
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


def _label_file(
  labels_csv: str, wanted: tuple[str, ...], pattern: re.Pattern | None, skip: bool
) -> Source:
  path = os.path.realpath(labels_csv)
  if not os.path.isfile(path):
    what = 'is not a file' if os.path.exists(path) else 'does not exist'
    raise DatasetError(
      f'dataset.labels_csv {labels_csv!r} {what}; point it at a CSV with columns path,label '
      '(optional patient_id, split)'
    )
  with open(path, 'rb') as f:
    content = f.read()
  root, name = os.path.dirname(path), os.path.basename(path)
  text = content.decode('utf-8', 'surrogateescape').removeprefix('\ufeff')
  reader = csv.DictReader(text.splitlines(keepends=True))
  header = [h.strip() for h in reader.fieldnames or []]
  reader.fieldnames = header
  absent = [c for c in ('path', 'label') if c not in header]
  if absent:
    raise DatasetError(
      f'{labels_csv}: no column(s) {absent} in its header {header}; a label file needs columns '
      'path and label (optional patient_id, split)'
    )
  rows, bad, seen = [], [], {}
  for row in reader:
    line = reader.line_num
    cell = {c: (row.get(c) or '').strip() for c in CSV_COLUMNS}
    file, label, split = cell['path'], cell['label'], cell['split']
    full = os.path.normpath(os.path.join(root, file))
    why = None
    if not file:
      why = 'empty path'
    elif not label:
      why = 'empty label'
    elif wanted and label not in wanted:
      why = f'label {label!r} is not one of dataset.class_names {list(wanted)}'
    elif split and split.lower() not in SPLIT_ALIASES:
      why = f'split {split!r} is not train, validation or test (or empty: drawn by the fractions)'
    elif full in seen:
      why = f'path {file!r} repeats line {seen[full]}'
    elif not os.path.lexists(full):
      why = f'no such file {full!r}'
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
  classes = _ordered(sorted({label for _, label, _, _ in rows}), wanted, labels_csv)
  _need_two(classes, labels_csv, 'label rows with two or more classes')
  index = {c: i for i, c in enumerate(classes)}
  examples = [Example(rel, index[label], patient, split) for rel, label, patient, split in rows]
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
  )
