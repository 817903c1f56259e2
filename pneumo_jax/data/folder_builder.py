"""A TFDS builder over an image collection (class folders, split folders or a label file, as
`sources` finds them): array_record shards of each image decoded once, stored at the size
training uses, with the class names and per-record identifiers in the build's metadata. A
multilabel label file (dataset.task='multilabel') gives each record a label per finding (1, 0 or
-1 for ignored) instead of a class.

One read pass checks every file (unreadable and suspicious ones fail the build, or are skipped
with dataset.skip_corrupt), decides the channel count (1 when every image is grey) and hashes
the pixels, so that identical images share a split; `splits.assign` then splits by patient when
ids are known, else by image. Each source state and setting gets its own build, named by a
fingerprint of the files (paths, sizes, modification times, a label file's bytes) and the
settings, so an unchanged source is reused and any change builds anew; builds hold the data dir's
build lock, under which what killed builds left is removed. docs/datasets.md says why records
are raw bytes, how TFDS's temporary folders are handled and how non-UTF-8 file names are kept.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from pneumo_jax import locks, progress
from pneumo_jax.data import dicom, sources, splits
from pneumo_jax.data.images import (
  DEFAULT_WINDOW,
  RESIZE_FILTER,
  DatasetError,
  GreyWindow,
  SuspectRule,
  load_stored,
)

__all__ = [
  'COLUMNS',
  'ENCODING',
  'ENCODINGS',
  'WHOLE',
  'DatasetError',
  'build',
  'check_settings',
  'label_counts',
  'label_names',
  'split_column',
  'split_filenames',
  'split_labels',
  'stored_shape',
  'task',
]

# Bump when the stored records change for the same input, so that old builds are not reused.
_FORMAT_VERSION = 4  # 4: file names as bytes, identifiers and split facts in the metadata.
# How a build chooses its channel count (see the module doc); part of the fingerprint.
_CHANNEL_RULE = 'one-if-all-grey'
# Encodings of a stored-size record: uint8 tensors as TFDS stores them ('int64': one varint per
# value, TFDS's default; 'bytes': raw; 'zlib': raw, zlib-compressed), or image files.
ENCODINGS = ('int64', 'bytes', 'zlib', 'png', 'jpeg')
ENCODING = 'bytes'  # Chosen by benchmarks/encoding.py: see the module doc.
_TENSOR_ENCODINGS = {
  'int64': tfds.features.Encoding.NONE,
  'bytes': tfds.features.Encoding.BYTES,
  'zlib': tfds.features.Encoding.ZLIB,
}
_PNG_HEADER = b'\x89PNG\r\n\x1a\n'
_PNG8_COLOUR_TYPE = {1: 0, 3: 2}  # Channels → IHDR colour type (grey, truecolour) at 8 bits.
_WORKERS = os.cpu_count() or 1
# Per-record identifiers a build keeps beside labels and file names ('' when unknown).
_IDENTIFIERS = ('patient_id', 'study_uid', 'sop_uid')
COLUMNS = ('labels', 'filenames', 'patient_ids', 'study_uids', 'sop_uids')
_SHOWN = 10  # Patients or files named in one log line.
# The one split of a whole-source build. TFDS reserves 'all' (every split of a build, which
# `as_data_source('all')` reads), so the records' split is named 'whole' there.
WHOLE = 'all'
_TFDS_WHOLE = 'whole'


@dataclasses.dataclass(frozen=True)
class _Record:
  """One example as a build writes it: its file, class and identifiers."""

  path: str  # As sources.Example.path.
  label: int | tuple[int, ...]  # As sources.Example.label.
  patient_id: str = ''  # '' when unknown.
  study_uid: str = ''  # DICOM only.
  sop_uid: str = ''  # DICOM only.


@dataclasses.dataclass(eq=False)
class _FolderConfig(tfds.core.BuilderConfig):
  """One build: the scanned source, split settings and record format; `name` embeds their
  fingerprint.

  The builder takes its input from here (not from a constructor argument) because TFDS
  re-creates builders from their config when a data source is pickled into a grain worker.
  """

  scan: sources.Source | None = dataclasses.field(default=None, repr=False)
  stored_size: int | None = None  # None: full resolution.
  encoding: str = ENCODING  # Of stored-size records; full resolution is always PNG.
  channels: int = 3
  grey_window: GreyWindow = DEFAULT_WINDOW
  # From the read pass and split before a build (None when reusing one): each split's records
  # in record order, and the build's metadata beyond them.
  records: dict[str, list[_Record]] | None = dataclasses.field(default=None, repr=False)
  facts: dict | None = dataclasses.field(default=None, repr=False)


class ClassFolder(tfds.core.GeneratorBasedBuilder):
  """Class-subfolder tree → stored images (see the module doc), labels and relative file names."""

  VERSION = tfds.core.Version('1.0.0')

  # TFDS prints "Downloading and preparing dataset Unknown size …" for any build; here nothing
  # is downloaded, so say what happens instead.
  def _log_download_bytes(self) -> None:
    config = self.builder_config
    logging.info(
      'Building the dataset: %d images from %s into %s',
      sum(map(len, config.records.values())),
      config.scan.what,
      self.data_dir,
    )

  def _log_download_done(self) -> None:
    pass  # build() logs the result with the split sizes.

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    scan = config.scan
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'Images from the {scan.kind} of {scan.what}.',
      features=tfds.features.FeaturesDict(
        {
          'image': _image_feature(config.stored_size, config.channels, config.encoding),
          'label': _label_feature(scan),
          # The path's bytes (os.fsencode), so that a name that is not UTF-8 is kept exactly.
          'filename': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
      # Records keep the order written, so the metadata's labels index them.
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is local.
    config = self.builder_config
    if config.records is None:
      raise RuntimeError('build() reads the source before building; call it, not the builder')
    self.info.metadata.update(
      {
        **config.facts,
        'splits': {
          name: {
            'labels': [r.label for r in recs],
            'filenames': [r.path for r in recs],
            **{f'{field}s': [getattr(r, field) for r in recs] for field in _IDENTIFIERS},
          }
          for name, recs in config.records.items()
        },
      }
    )
    lines = ''.join(f'{i}:{name}\n' for i, name in enumerate(config.scan.classes))
    (epath.Path(self.data_dir) / 'labels.txt').write_text(lines)
    return {
      _TFDS_WHOLE if name == WHOLE else name: self._generate_examples(recs, name)
      for name, recs in config.records.items()
    }

  def _generate_examples(
    self, records: Sequence[_Record], split: str
  ) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    root = config.scan.root
    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:  # Pillow frees the GIL.
      images = pool.map(lambda rec: _record_image(os.path.join(root, rec.path), config), records)
      images = progress.track(images, f'Writing the {split} split', len(records), 'img')
      for i, (rec, image) in enumerate(zip(records, images, strict=True)):
        name = os.fsencode(rec.path)
        yield i, {'image': image, 'label': _label_value(rec.label), 'filename': name}


def build(
  dataset_cfg: ml_collections.ConfigDict,
  data_dir: str,
  stored_size: int | None,
  *,
  encoding: str = ENCODING,
  whole: bool = False,
) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder for the dataset config's source (`sources.scan`: class
  folders, split folders or a label file), building it unless up to date.

  Records hold each image as `images.load_stored(file, stored_size)` gives it (None: full
  resolution), with the dataset's channel count (`stored_shape`) and grey window
  (`GreyWindow.from_config(dataset_cfg)`). `encoding` (one of ENCODINGS) is for benchmarks; the
  default is the measured choice. With `whole`, every readable image goes into one split, 'all'
  (an external test set scored whole), whatever the source's splits say.

  Read with `builder.as_data_source(split)` (no TensorFlow needed). Settings and the source are
  checked before anything is written; the build itself runs under `locks.build_lock(data_dir)`.

  Raises:
    DatasetError: bad settings or bad input; the message names the field or path and the fix.
    ConfigError: a bad grey window, suspect-image rule, class list or patient pattern.
  """
  check_settings(dataset_cfg)
  window = GreyWindow.from_config(dataset_cfg)
  suspect = SuspectRule.from_config(dataset_cfg)
  if stored_size is not None and stored_size < 1:
    raise DatasetError(f'stored size {stored_size} must be at least 1, or None (full resolution)')
  if encoding not in ENCODINGS:
    raise ValueError(f'encoding={encoding!r}: use one of {list(ENCODINGS)}')
  scan = sources.scan(dataset_cfg, data_dir)
  settings = _split_settings(dataset_cfg, scan, whole)
  num_shards = int(dataset_cfg.num_shards)
  stored = {
    'stored_size': None if stored_size is None else int(stored_size),
    'encoding': encoding if stored_size is not None else 'png',
  }
  record_format = [stored, _CHANNEL_RULE, RESIZE_FILTER.name, window, dataclasses.astuple(suspect)]
  found = [scan.kind, scan.root, scan.classes, scan.content, scan.stats, scan.broken]
  if scan.task != 'single':  # Single-label builds keep the names they had before tasks.
    found += [scan.task, scan.label_policy]
  examples = [dataclasses.astuple(e) for e in scan.examples]
  fingerprint = hashlib.sha256(
    json.dumps([_FORMAT_VERSION, found, examples, settings, num_shards, record_format]).encode()
  ).hexdigest()[:16]
  stem = os.path.splitext(os.path.basename(scan.what))[0]
  slug = re.sub(r'[^a-z0-9]+', '_', stem.lower()).strip('_') or 'folder'
  name = f'{slug[:40]}_{fingerprint}'
  # TFDS renames a build to its version directory only once complete (docs/datasets.md).
  done = os.path.join(data_dir, ClassFolder.name, name, str(ClassFolder.VERSION))
  # Fail early, before taking the lock and reading every image (the read pass may only add
  # groups); a finished build of this fingerprint was split already (a by-patient split of a
  # large collection takes seconds).
  if not whole and not os.path.isdir(done):
    patients = [e.patient for e in scan.examples]
    _split(scan, range(len(scan.examples)), patients, [''] * len(patients), settings)
  with locks.build_lock(data_dir):
    _remove_leftovers(data_dir)
    try:
      if os.path.isdir(done):  # Reuse: its channel count is recorded; read no image.
        with open(os.path.join(done, 'metadata.json')) as f:
          prepared = {'channels': json.load(f)['channels']}
      else:
        prepared = _prepare(scan, settings, window, suspect)
        prepared['facts'].update(stored)
      config = _FolderConfig(name=name, scan=scan, **stored, grey_window=window, **prepared)
      builder = ClassFolder(config=config, data_dir=data_dir)
      builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(num_shards=num_shards),
      )
    finally:
      _remove_leftovers(data_dir)
  _log_build(builder, scan)
  return builder


def _log_build(builder: tfds.core.DatasetBuilder, scan: sources.Source) -> None:
  """Logs what a build holds and how it was split (from its metadata, so a reuse says it too)."""
  meta = builder.info.metadata
  skipped = meta['skipped_corrupt']
  if skipped:
    logging.warning('Skipped %d unreadable image(s) in %s: %s', len(skipped), scan.what, skipped)
  sizes = {k: len(v['labels']) for k, v in meta['splits'].items()}
  logging.info('Dataset %s: %s', builder.data_dir, ', '.join(f'{k} {v}' for k, v in sizes.items()))
  if task(builder) == 'multilabel':
    counts = label_counts(builder)
    logging.info(
      'images per finding (positive/negative/ignored): %s',
      '; '.join(
        f'{name}: ' + ', '.join(f'{k} {"/".join(map(str, c[f]))}' for k, c in counts.items())
        for f, name in enumerate(label_names(builder))
      ),
    )
  if WHOLE in sizes:
    return
  if scan.kind == 'split folders':
    drawn = {
      'train': ' (drawn from the train folder by dataset.validation_fraction)',
      'folds': ' (a fold of the train and val folders: dataset.num_folds, dataset.fold)',
    }.get(meta['validation_from'], '')
    logging.info(
      'splits from folders: %s',
      ', '.join(f'{k} {v}' + (drawn if k == 'validation' else '') for k, v in sizes.items()),
    )
  if meta.get('split_by') == 'patient':
    logging.info(
      'split by patient: %s patients',
      ', '.join(f'{k} {n}' for k, n in meta['patients'].items()),
    )
  else:
    logging.warning(
      'split by image: films of one patient may be in both splits (give patient ids: '
      'dataset.patient_pattern, or a label file with a patient_id column)'
    )
  if meta.get('duplicate_groups'):
    logging.info(
      '%d set(s) of identical images (%d images), each kept in one split (unless the '
      "source's own splits part it)",
      meta['duplicate_groups'],
      meta['duplicate_images'],
    )
  crossing = meta.get('crossing_patients')
  if crossing:
    logging.warning(
      '%d patient(s) have films in two of the splits %s gives, kept as given: %s',
      len(crossing),
      scan.what,
      crossing[:_SHOWN] + (['…'] if len(crossing) > _SHOWN else []),
    )


def stored_shape(builder: tfds.core.DatasetBuilder) -> tuple[int | None, int | None, int]:
  """(S, S, C) of the build's images; (None, None, C) for a full-resolution build."""
  metadata = builder.info.metadata
  size = metadata['stored_size']
  return size, size, int(metadata['channels'])


def task(builder: tfds.core.DatasetBuilder) -> str:
  """The build's dataset.task: 'single' (a class per record) or 'multilabel' (findings)."""
  return builder.info.metadata.get('task', 'single')  # Builds made before tasks: single.


def label_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Class names in label order (sorted subfolder names, or dataset.class_names' order); for a
  multilabel build the findings, in the label file's column order (or dataset.label_columns')."""
  if task(builder) == 'multilabel':
    return list(builder.info.metadata['findings'])
  return list(builder.info.features['label'].names)


def split_labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """Labels of every record of `split`, in record order, without decoding any image: int32 [N]
  class indices, or for a multilabel build int32 [N, F], per finding 1 (present), 0 (absent)
  or -1 (ignored: uncertain or blank under dataset.uncertain / dataset.blank = 'ignore')."""
  labels = np.asarray(_split_metadata(builder, split)['labels'], dtype=np.int32)
  if task(builder) == 'multilabel':
    return labels.reshape(len(labels), len(label_names(builder)))  # Also [0, F] when empty.
  return labels


def label_counts(builder: tfds.core.DatasetBuilder) -> dict[str, np.ndarray]:
  """Per split: int64 [K] images per class, or for a multilabel build [F, 3] images per finding
  that are positive, negative and ignored (in that order)."""
  counts = {}
  for split in builder.info.metadata['splits']:
    labels = split_labels(builder, split)
    if task(builder) == 'multilabel':
      counts[split] = np.stack([np.sum(labels == v, axis=0) for v in (1, 0, -1)], axis=1)
    else:
      counts[split] = np.bincount(labels, minlength=len(label_names(builder)))
  return counts


def split_filenames(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
  """Paths (relative to the source folder or label file; absolute where a label file gave them
  so) of every record of `split`, in record order. A name that is not UTF-8 comes as Python
  decodes file names (lone surrogates; `os.fsencode` gives its bytes back)."""
  return split_column(builder, split, 'filenames')


def split_column(builder: tfds.core.DatasetBuilder, split: str, name: str) -> list:
  """Per-record `name` (one of COLUMNS: labels, filenames, patient_ids, study_uids, sop_uids) of
  `split`, in record order, read from the metadata. Identifiers are '' where unknown (and for
  every record of a build made before they were kept)."""
  if name not in COLUMNS:
    raise ValueError(f'column {name!r}: use one of {list(COLUMNS)}')
  meta = _split_metadata(builder, split)
  return list(meta.get(name) or [''] * len(meta['labels']))


def _split_metadata(builder: tfds.core.DatasetBuilder, split: str) -> dict:
  parts = builder.info.metadata['splits']
  if split not in parts:
    raise DatasetError(
      f'no split {split!r} in {builder.data_dir}; it has {sorted(parts)} '
      '(a test split exists only with dataset.test_fraction > 0: rebuild with e.g. '
      '--config.dataset.test_fraction=0.1, which also moves images out of train and validation; '
      'a set training never saw is scored whole with --split all)'
    )
  return parts[split]


def check_settings(cfg: ml_collections.ConfigDict) -> None:
  """Rejects split settings that cannot describe a split (DatasetError) and a bad grey window
  (ConfigError), naming the config field.

  Public so that callers can check before writing anything (e.g. before generating images).
  Also checks the source fields (`sources.check_settings`) and the suspect-image rule
  (ConfigError).
  """
  GreyWindow.from_config(cfg)
  SuspectRule.from_config(cfg)
  sources.check_settings(cfg)
  val, test, folds = cfg.validation_fraction, cfg.test_fraction, cfg.num_folds
  if not 0.0 <= test < 1.0:
    raise DatasetError(f'dataset.test_fraction={test} must be in [0, 1); 0 means no test split')
  if folds < 0 or folds == 1:
    raise DatasetError(f'dataset.num_folds={folds} must be 0 (no folds) or at least 2')
  if folds > 1 and not 0 <= cfg.fold < folds:
    raise DatasetError(f'dataset.fold={cfg.fold} is out of range: use 0 … {folds - 1}')
  if folds == 0 and not (0.0 < val < 1.0 and val + test < 1.0):
    raise DatasetError(
      f'dataset.validation_fraction={val} must be in (0, 1) and leave room for training with '
      f'dataset.test_fraction={test} (their sum must be < 1)'
    )
  if cfg.num_shards < 1:
    raise DatasetError(f'dataset.num_shards={cfg.num_shards} must be at least 1')


def _remove_leftovers(data_dir: str) -> None:
  """Deletes the incomplete builds and empty directories that TFDS leaves (see the module doc).

  Only safe under the data dir's build lock: a live build's temporary directory looks the same.
  """
  root = os.path.join(data_dir, ClassFolder.name)
  configs = [e.path for e in os.scandir(root) if e.is_dir()] if os.path.isdir(root) else []
  removed = []
  for config in configs:
    for entry in os.scandir(config):
      if entry.name.startswith('incomplete.') and entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
        removed.append(entry.path)
  if removed:
    logging.info('Removed %d incomplete build(s) that killed runs left: %s', len(removed), removed)
  downloads = os.path.join(data_dir, 'downloads')
  for empty in [*configs, root, os.path.join(downloads, 'extracted'), downloads]:
    with contextlib.suppress(OSError):  # Not there, or not empty: keep it.
      os.rmdir(empty)


def _split_settings(cfg: ml_collections.ConfigDict, scan: sources.Source, whole: bool) -> dict:
  """The settings that decide a build's splits (part of its fingerprint), checked against the
  splits the source fixes."""
  if whole:
    return {
      'whole': True,
      'split_seed': int(cfg.split_seed),
      'skip_corrupt': bool(cfg.skip_corrupt),
    }
  if cfg.test_fraction > 0 and any(e.split == 'test' for e in scan.examples):
    given = 'its test folder' if scan.kind == 'split folders' else "rows with split 'test'"
    raise DatasetError(
      f'dataset.test_fraction={cfg.test_fraction}: {scan.what} gives the test split itself '
      f'({given}); set --config.dataset.test_fraction=0'
    )
  return {
    'validation_fraction': float(cfg.validation_fraction),
    'test_fraction': float(cfg.test_fraction),
    'split_seed': int(cfg.split_seed),
    'num_folds': int(cfg.num_folds),
    'fold': int(cfg.fold),
    'skip_corrupt': bool(cfg.skip_corrupt),
  }


class _Read(NamedTuple):
  """What the read pass learns of one file."""

  error: str | None  # The reader's message (naming the path and why), or None when readable.
  grey: bool = False
  digest: str = ''  # Of the decoded pixels and their shape: copies under other names match.
  # dicom.identifiers: empty for a file that is not DICOM (read only for readable files).
  ids: Mapping[str, str] = types.MappingProxyType({})


def _inspect(path: str, window: GreyWindow, suspect: SuspectRule) -> _Read:
  try:
    image = load_stored(path, None, window=window, suspect=suspect)
  except DatasetError as e:
    return _Read(str(e))
  digest = hashlib.sha1(repr(image.shape).encode() + image.tobytes()).hexdigest()
  return _Read(None, image.shape[-1] == 1, digest, dicom.identifiers(path))


def _prepare(
  scan: sources.Source, settings: dict, window: GreyWindow, suspect: SuspectRule
) -> dict:
  """Reads every image once, then splits: the `_FolderConfig` fields of a new build.

  Fails listing every unreadable image (broken files, link loops, unreadable permissions,
  suspicious sizes, DICOM files that hold no single image) and folder that could not be listed,
  or skips them when settings['skip_corrupt']. The channel count is 1 when every readable image
  is grey, else 3.
  """
  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    read = pool.map(
      lambda e: _inspect(os.path.join(scan.root, e.path), window, suspect), scan.examples
    )
    found = list(progress.track(read, 'Reading images', len(scan.examples), 'img'))
  bad = dict(scan.broken)
  bad.update({e.path: r.error for e, r in zip(scan.examples, found, strict=True) if r.error})
  listing = '\n'.join(f'  {r}' for r in bad.values())
  if bad and not settings['skip_corrupt']:
    raise DatasetError(
      f'{len(bad)} unreadable image(s) in {scan.what}:\n{listing}\nreplace or '
      'delete them, or set --config.dataset.skip_corrupt=True to skip them'
    )
  if bad:
    logging.warning('dataset.skip_corrupt: leaving out %d image(s):\n%s', len(bad), listing)
  keep = [i for i, r in enumerate(found) if not r.error]
  if scan.task == 'single':  # Findings: the split checks each finding's images.
    have = {scan.examples[i].label for i in keep}
    empty = [c for label, c in enumerate(scan.classes) if label not in have]
    if empty:
      raise DatasetError(f'class(es) {empty} of {scan.what} hold no readable images; add some')
  ids = [r.ids for r in found]
  patients = [e.patient or ids[i].get('patient_id', '') for i, e in enumerate(scan.examples)]
  facts = {
    'source_dir': scan.root,
    'labels_csv': scan.label_file,
    'source_kind': scan.kind,
    'skipped_corrupt': sorted(bad),
    'channels': 1 if all(r.grey for r in found if not r.error) else 3,
    'task': scan.task,
  }
  if scan.task == 'multilabel':
    facts.update(findings=list(scan.classes), label_policy=dict(scan.label_policy))
  if settings.get('whole'):
    order = np.random.default_rng(settings['split_seed']).permutation(len(keep))
    parts = {WHOLE: [keep[i] for i in order]}
  else:
    parts, summary = _split(scan, keep, patients, [r.digest for r in found], settings)
    facts.update(summary)

  def record(i: int) -> _Record:
    e, uid = scan.examples[i], ids[i]
    return _Record(e.path, e.label, patients[i], uid.get('study_uid', ''), uid.get('sop_uid', ''))

  return {
    'channels': facts['channels'],
    'records': {name: [record(i) for i in part] for name, part in parts.items()},
    'facts': facts,
  }


def _freed(given: Sequence[str], settings: dict) -> set[str]:
  """The given splits whose examples the split settings deal afresh: with k folds the train and
  validation ones are pooled and folded, and without any given validation example it is drawn
  from the train ones. The others (test) stay as given."""
  if settings['num_folds'] > 1:
    return {'train', 'validation'}
  return set() if 'validation' in given else {'train'}


def _split(
  scan: sources.Source,
  keep: Sequence[int],
  patients: Sequence[str],
  hashes: Sequence[str],
  settings: dict,
) -> tuple[dict[str, list[int]], dict]:
  """Splits the examples `keep` (indices into scan.examples) with `splits.assign`, grouping each
  patient's films and identical images (equal `hashes`; '' unknown): each split's example
  indices in record order, and what the build records about it.

  Examples the source fixes keep their split, except those `_freed` releases; those are dealt
  apart from the ones still fixed (never into their split), and a patient or copy on both sides
  is kept as given and listed, as `splits.assign` lists a group fixed into two splits.
  """
  examples = [scan.examples[i] for i in keep]
  ids = [patients[i] for i in keep]
  groups, num_sets = splits.duplicate_groups(ids, [hashes[i] for i in keep])
  given = [e.split for e in examples]
  freed = _freed(given, settings)
  held = [j for j, s in enumerate(given) if s and s not in freed] if freed else []
  pool = sorted(set(range(len(examples))) - set(held))
  options = {k: settings[k] for k in ('validation_fraction', 'test_fraction', 'num_folds', 'fold')}
  labels = np.array([examples[j].label for j in pool], np.int64)
  if scan.task == 'multilabel':
    labels = labels.reshape(len(pool), len(scan.classes))  # Also [0, F] when nothing is free.
  result = splits.assign(
    labels,
    scan.classes,
    splits.Settings(**options, split_seed=settings['split_seed']),
    groups=[groups[j] for j in pool],
    fixed=None if freed else [given[j] for j in pool],
    source=scan.what,
  )
  order = {name: [pool[j] for j in idx] for name, idx in result.order.items()}
  crossing = list(result.crossing)
  if held:  # Only test stays held (test_fraction must then be 0: _split_settings).
    order['test'] = [
      held[j] for j in np.random.default_rng(settings['split_seed']).permutation(len(held))
    ]
    crossing = sorted({groups[j] for j in held} & {groups[j] for j in pool} - {''})
  copies = collections.Counter(hashes[i] for i in keep if hashes[i])
  facts = {
    'split_by': 'patient' if all(ids) else 'image',
    'patients': {name: len({ids[j] or f'#{j}' for j in part}) for name, part in order.items()},
    'duplicate_groups': num_sets,
    'duplicate_images': sum(n for n in copies.values() if n > 1),
    'crossing_patients': crossing,
    # Where validation came from when the source gives splits but not (or not only) it.
    'validation_from': ('folds' if len(freed) == 2 else 'train') if freed and any(given) else '',
  }
  return {name: [keep[j] for j in part] for name, part in order.items()}, facts


def _label_feature(scan: sources.Source) -> tfds.features.FeatureConnector:
  """The record's label: a class, or per finding 1, 0 or -1."""
  if scan.task == 'multilabel':
    return tfds.features.Tensor(shape=(len(scan.classes),), dtype=np.int8)
  return tfds.features.ClassLabel(names=list(scan.classes))


def _label_value(label: int | tuple[int, ...]) -> int | np.ndarray:
  """What a record stores for `label` (`_label_feature`)."""
  return label if isinstance(label, int) else np.asarray(label, np.int8)


def _image_feature(
  stored_size: int | None, channels: int, encoding: str
) -> tfds.features.FeatureConnector:
  """The record's image feature: full resolution is PNG of any shape, a stored size as chosen."""
  if stored_size is None:
    return tfds.features.Image(shape=(None, None, channels), encoding_format='png')
  shape = (stored_size, stored_size, channels)
  if encoding in _TENSOR_ENCODINGS:
    return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=_TENSOR_ENCODINGS[encoding])
  return tfds.features.Image(shape=shape, encoding_format=encoding)


def _record_image(path: str, config: _FolderConfig) -> np.ndarray | bytes:
  """What a record stores for `path`: the array, or image bytes encoded here with Pillow (TFDS
  would encode an array with TensorFlow)."""
  if config.stored_size is None:
    with open(path, 'rb') as f:
      data = f.read()
    # An 8-bit PNG with the dataset's channels already decodes to the stored array: keep it.
    if data[:8] == _PNG_HEADER and tuple(data[24:26]) == (8, _PNG8_COLOUR_TYPE[config.channels]):
      return data
    stored = load_stored(path, None, channels=config.channels, window=config.grey_window)
    return _encode(stored, 'PNG', compress_level=1)
  image = load_stored(path, config.stored_size, channels=config.channels, window=config.grey_window)
  if config.encoding in _TENSOR_ENCODINGS:
    return image
  if config.encoding == 'jpeg':
    return _encode(image, 'JPEG', quality=95)
  return _encode(image, 'PNG')


def _encode(image: np.ndarray, fmt: str, **options) -> bytes:
  """uint8 [H, W, 1 or 3] → image file bytes in Pillow's `fmt`."""
  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format=fmt, **options)
  return out.getvalue()
