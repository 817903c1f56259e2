"""A TFDS builder over a folder whose subfolders are the classes (TF-Slim's flowers layout).

    source_dir/stage_0/a.png, source_dir/stage_1/b.dcm, ...  (nested folders count for their class)

Images are the files `images.is_candidate` takes: by extension (.jpg .jpeg .png .bmp .tif .tiff
.dcm .dicom) or, for DICOM, by content, so that extensionless PACS exports count too.

Labels are the sorted subfolder names, numbered from 0 as slim numbers them; `labels.txt` in the
built directory holds them in slim's `0:name` format (one per line), so slim's `read_label_file`
reads it. Splits are stratified per class and deterministic for `dataset.split_seed`: the test
share is held out first, then either the validation share or, with `dataset.num_folds = k > 1`,
fold `dataset.fold` of k (the validation folds of a k-fold sweep partition every non-test image).

Each distinct folder state and split setting gets its own build, named by a fingerprint of the
files' paths, sizes and modification times plus the settings: a second run on an unchanged folder
reuses its build, while an added, removed or edited file, or a changed setting, leads to a new
build. Builds hold the data dir's build lock, so runs sharing it build each dataset once.

TFDS (4.9.10) writes into DATA_DIR/class_folder/CONFIG/incomplete.XXXXXX_1.0.0/ and renames it to
1.0.0/ only once complete, so a killed build is never taken for a finished one; but a killed build
leaves that temporary directory behind, a failed one (TFDS deletes the temporary directory) an
empty CONFIG/, and every build an empty downloads/extracted/. Under the lock, `build` removes
them all, before building and after, whether the build succeeded or not.

Records store each image as `images.load_stored` reads it at the stored size S (passed in;
`dataset_for` derives it from the config): decoded, squashed to S × S and antialiased once, at
build time, so that training decodes small images, not 2,000–3,000 px X-rays. A build is grey
(C = 1) when every readable image is grey, else RGB (C = 3; grey images repeated), decided in the
read pass that checks every file; `stored_shape(builder)` gives (S, S, C), also kept in the
metadata with the encoding. Stored size, channel rule, resize filter, encoding and the grey
window (dataset.grey_window, how DICOM and 16-bit images become 8-bit) are in the fingerprint.
With S = None (full resolution) records are PNG at the files' own shapes, resized on every read.

Encoding, measured with benchmarks/encoding.py (200 grey 1024² X-ray-like images stored at 342,
2 CPUs, PIL decoding; ArrayRecord already zstd-compresses every record, so "raw" is not):

  encoding      bytes/image  read+decode per record
  raw bytes          95,027     0.20 ms  (chosen)
  raw int64          91,423     0.77 ms  (TFDS's default: a varint per pixel)
  raw + zlib         79,954     0.62 ms
  PNG                53,740     1.44 ms
  JPEG q95           26,214     0.60 ms  (lossy)
  full-res PNG      739,574     9.15 ms  (the old layout, at 1024²)

Raw bytes (`Tensor(encoding=BYTES)`) read 3× faster than zlib and 7× faster than PNG for 1.8×
PNG's disk; the size is small next to the full-resolution files it replaces, and storage stays
lossless. Decoded records are read-only numpy views of the record's bytes.

Per-record labels and file names are also stored in the build's metadata, so that class counts,
class-balanced sampling and prediction reports need not decode any image.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from pneumo_jax import locks
from pneumo_jax.data.images import (
  DEFAULT_WINDOW,
  RESIZE_FILTER,
  DatasetError,
  GreyWindow,
  is_candidate,
  load_stored,
)

__all__ = [
  'ENCODING',
  'ENCODINGS',
  'DatasetError',
  'build',
  'check_settings',
  'label_names',
  'split_filenames',
  'split_labels',
  'stored_shape',
]

# Bump when the stored records change for the same input, so that old builds are not reused.
_FORMAT_VERSION = 3  # 3: 16-bit PNGs windowed by their used bits (dataset.grey_window).
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


@dataclasses.dataclass(frozen=True)
class _Scan:
  """The image files of a source folder, as found before building."""

  root: str
  classes: tuple[str, ...]
  files: tuple[tuple[str, ...], ...]  # Per class: paths relative to root, sorted.
  stats: tuple[tuple[str, int, int], ...]  # (relative path, size, mtime_ns): the fingerprint.


@dataclasses.dataclass(eq=False)
class _FolderConfig(tfds.core.BuilderConfig):
  """One build: the scanned folder, split settings and record format; `name` embeds their
  fingerprint.

  The builder takes its input from here (not from a constructor argument) because TFDS
  re-creates builders from their config when a data source is pickled into a grain worker.
  """

  scan: _Scan | None = dataclasses.field(default=None, repr=False)
  validation_fraction: float = 0.2
  test_fraction: float = 0.0
  split_seed: int = 0
  num_folds: int = 0
  fold: int = 0
  skip_corrupt: bool = False
  stored_size: int | None = None  # None: full resolution.
  encoding: str = ENCODING  # Of stored-size records; full resolution is always PNG.
  channels: int = 3
  grey_window: GreyWindow = DEFAULT_WINDOW
  # From the read pass before a build (None when reusing one): readable files per class, and
  # the unreadable ones skipped.
  readable: tuple[tuple[str, ...], ...] | None = dataclasses.field(default=None, repr=False)
  skipped: tuple[str, ...] = ()


class ClassFolder(tfds.core.GeneratorBasedBuilder):
  """Class-subfolder tree → stored images (see the module doc), labels and relative file names."""

  VERSION = tfds.core.Version('1.0.0')

  # TFDS prints "Downloading and preparing dataset Unknown size …" for any build; here nothing
  # is downloaded, so say what happens instead.
  def _log_download_bytes(self) -> None:
    scan = self.builder_config.scan
    logging.info(
      'Building the dataset: %d images from %s into %s',
      sum(map(len, scan.files)),
      scan.root,
      self.data_dir,
    )

  def _log_download_done(self) -> None:
    pass  # build() logs the result with the split sizes.

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    scan = config.scan
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'Images from the class subfolders of {scan.root}.',
      features=tfds.features.FeaturesDict(
        {
          'image': _image_feature(config.stored_size, config.channels, config.encoding),
          'label': tfds.features.ClassLabel(names=list(scan.classes)),
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
    scan = config.scan
    if config.readable is None:
      raise RuntimeError('build() reads the folder before building; call it, not the builder')
    splits = _assign_splits(scan, config.readable, config)
    self.info.metadata.update(
      {
        'source_dir': scan.root,
        'skipped_corrupt': list(config.skipped),
        'channels': config.channels,
        'stored_size': config.stored_size,
        'encoding': config.encoding,
        'splits': {
          name: {'labels': [label for _, label in recs], 'filenames': [p for p, _ in recs]}
          for name, recs in splits.items()
        },
      }
    )
    lines = ''.join(f'{i}:{name}\n' for i, name in enumerate(scan.classes))
    (epath.Path(self.data_dir) / 'labels.txt').write_text(lines)
    return {name: self._generate_examples(recs) for name, recs in splits.items()}

  def _generate_examples(self, records: Sequence[tuple[str, int]]) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    root = config.scan.root
    with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:  # Pillow frees the GIL.
      images = pool.map(lambda rec: _record_image(os.path.join(root, rec[0]), config), records)
      for (path, label), image in zip(records, images, strict=True):
        yield path, {'image': image, 'label': label, 'filename': path}


def build(
  dataset_cfg: ml_collections.ConfigDict,
  data_dir: str,
  stored_size: int | None,
  *,
  encoding: str = ENCODING,
) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder for `dataset_cfg.source_dir`, building it unless up to date.

  Records hold each image as `images.load_stored(file, stored_size)` gives it (None: full
  resolution), with the dataset's channel count (`stored_shape`) and grey window
  (`GreyWindow.from_config(dataset_cfg)`). `encoding` (one of
  ENCODINGS) is for benchmarks; the default is the measured choice.

  Read with `builder.as_data_source(split)` (no TensorFlow needed). Settings and the folder are
  checked before anything is written; the build itself runs under `locks.build_lock(data_dir)`.

  Raises:
    DatasetError: bad settings or bad input; the message names the field or path and the fix.
    ConfigError: a bad grey window (`check_settings`).
  """
  check_settings(dataset_cfg)
  window = GreyWindow.from_config(dataset_cfg)
  if stored_size is not None and stored_size < 1:
    raise DatasetError(f'stored size {stored_size} must be at least 1, or None (full resolution)')
  if encoding not in ENCODINGS:
    raise ValueError(f'encoding={encoding!r}: use one of {list(ENCODINGS)}')
  scan = _scan(dataset_cfg.source_dir, data_dir)
  settings = {
    'validation_fraction': float(dataset_cfg.validation_fraction),
    'test_fraction': float(dataset_cfg.test_fraction),
    'split_seed': int(dataset_cfg.split_seed),
    'num_folds': int(dataset_cfg.num_folds),
    'fold': int(dataset_cfg.fold),
    'skip_corrupt': bool(dataset_cfg.skip_corrupt),
  }
  num_shards = int(dataset_cfg.num_shards)
  stored = {
    'stored_size': None if stored_size is None else int(stored_size),
    'encoding': encoding if stored_size is not None else 'png',
  }
  record_format = [stored, _CHANNEL_RULE, RESIZE_FILTER.name, window]
  fingerprint = hashlib.sha256(
    json.dumps(
      [_FORMAT_VERSION, scan.root, scan.classes, scan.stats, settings, num_shards, record_format]
    ).encode()
  ).hexdigest()[:16]
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(scan.root).lower()).strip('_') or 'folder'
  name = f'{slug[:40]}_{fingerprint}'
  _assign_splits(scan, scan.files, _FolderConfig(name=name, scan=scan, **settings))  # Fail early.
  with locks.build_lock(data_dir):
    _remove_leftovers(data_dir)
    try:
      # TFDS renames a build to its version directory only once complete (see the module doc).
      done = os.path.join(data_dir, ClassFolder.name, name, str(ClassFolder.VERSION))
      if os.path.isdir(done):  # Reuse: its channel count is recorded; read no image.
        with open(os.path.join(done, 'metadata.json')) as f:
          prepared = {'channels': json.load(f)['channels']}
      else:
        readable, skipped, channels = _drop_corrupt(scan, settings['skip_corrupt'], window)
        prepared = {'channels': channels, 'readable': readable, 'skipped': tuple(skipped)}
      config = _FolderConfig(
        name=name, scan=scan, **settings, **stored, grey_window=window, **prepared
      )
      builder = ClassFolder(config=config, data_dir=data_dir)
      builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(num_shards=num_shards),
      )
    finally:
      _remove_leftovers(data_dir)
  skipped = builder.info.metadata['skipped_corrupt']
  if skipped:
    logging.warning('Skipped %d unreadable image(s) in %s: %s', len(skipped), scan.root, skipped)
  logging.info(
    'Dataset %s: %s',
    builder.data_dir,
    ', '.join(f'{k} {v.num_examples}' for k, v in builder.info.splits.items()),
  )
  return builder


def stored_shape(builder: tfds.core.DatasetBuilder) -> tuple[int | None, int | None, int]:
  """(S, S, C) of the build's images; (None, None, C) for a full-resolution build."""
  metadata = builder.info.metadata
  size = metadata['stored_size']
  return size, size, int(metadata['channels'])


def label_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Class names in label order (sorted subfolder names)."""
  return list(builder.info.features['label'].names)


def split_labels(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """Int labels of every record of `split`, in record order, without decoding any image."""
  return np.asarray(_split_metadata(builder, split)['labels'], dtype=np.int32)


def split_filenames(builder: tfds.core.DatasetBuilder, split: str) -> list[str]:
  """Paths (relative to the source folder) of every record of `split`, in record order."""
  return list(_split_metadata(builder, split)['filenames'])


def _split_metadata(builder: tfds.core.DatasetBuilder, split: str) -> dict:
  splits = builder.info.metadata['splits']
  if split not in splits:
    raise DatasetError(
      f'no split {split!r} in {builder.data_dir}; it has {sorted(splits)} '
      '(a test split exists only with dataset.test_fraction > 0: rebuild with e.g. '
      '--config.dataset.test_fraction=0.1, which also moves images out of train and validation)'
    )
  return splits[split]


def check_settings(cfg: ml_collections.ConfigDict) -> None:
  """Rejects split settings that cannot describe a split (DatasetError) and a bad grey window
  (ConfigError), naming the config field.

  Public so that callers can check before writing anything (e.g. before generating images).
  """
  GreyWindow.from_config(cfg)
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


def _scan(source_dir: str, data_dir: str) -> _Scan:
  """Lists the classes and their image files; skips hidden and non-image files, saying so."""
  if not source_dir:
    raise DatasetError(
      'dataset.source_dir is empty: set --config.dataset.source_dir=/path/to/'
      'folder, a folder with one subfolder of images per class'
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
  entries = sorted(os.scandir(root), key=lambda e: e.name)
  classes = tuple(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))
  if len(classes) < 2:
    raise DatasetError(
      f'{root!r} has {len(classes)} class subfolder(s) {list(classes)}; a '
      'classifier needs at least two: put each class in its own subfolder'
    )
  skipped = [e.name for e in entries if not e.is_dir()]  # Loose files belong to no class.
  files, stats, empty = [], [], []
  for name in classes:
    found = []
    for folder, dirs, names in os.walk(os.path.join(root, name)):
      dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
      for file in sorted(names):
        rel = os.path.relpath(os.path.join(folder, file), root)
        if not is_candidate(os.path.join(folder, file)):
          skipped.append(rel)
          continue
        st = os.stat(os.path.join(root, rel))
        found.append(rel)
        stats.append((rel, st.st_size, st.st_mtime_ns))
    if not found:
      empty.append(os.path.join(root, name))
    files.append(tuple(found))
  if empty:
    raise DatasetError(
      f'class folder(s) {empty} hold no images (.jpg .jpeg .png .bmp .tif .tiff or DICOM); add '
      'images or remove the folder(s)'
    )
  if skipped:
    hidden = sum(os.path.basename(p).startswith('.') for p in skipped)
    logging.info(
      'In %s: skipped %d hidden and %d other non-image file(s), e.g. %s',
      root,
      hidden,
      len(skipped) - hidden,
      skipped[:5],
    )
  return _Scan(root=root, classes=classes, files=tuple(files), stats=tuple(stats))


def _inspect(path: str, window: GreyWindow) -> tuple[str | None, bool]:
  """(None, whether it is grey) when `path` reads as an image, else (the reader's message, which
  names the path and why, False)."""
  try:
    return None, load_stored(path, None, window=window).shape[-1] == 1
  except DatasetError as e:
    return str(e), False


def _drop_corrupt(
  scan: _Scan, skip: bool, window: GreyWindow
) -> tuple[tuple[tuple[str, ...], ...], list[str], int]:
  """Reads every image once; fails listing all unreadable ones (broken files, and DICOM files
  that hold no single image: multi-frame, reports...), or drops them when `skip`.

  Returns the readable files per class, the skipped ones, and the channel count: 1 when every
  readable image is grey, else 3.
  """
  paths = [p for per_class in scan.files for p in per_class]
  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    found = list(pool.map(lambda p: _inspect(os.path.join(scan.root, p), window), paths))
  bad = {p: r for p, (r, _) in zip(paths, found, strict=True) if r}
  channels = 1 if all(grey for r, grey in found if not r) else 3
  if bad and not skip:
    listing = '\n'.join(f'  {r}' for r in bad.values())
    raise DatasetError(
      f'{len(bad)} unreadable image(s) in {scan.root}:\n{listing}\nreplace or '
      'delete them, or set --config.dataset.skip_corrupt=True to skip them'
    )
  files = tuple(tuple(p for p in per_class if p not in bad) for per_class in scan.files)
  empty = [os.path.join(scan.root, c) for c, f in zip(scan.classes, files, strict=True) if not f]
  if empty:
    raise DatasetError(f'class folder(s) {empty} hold no readable images; add some')
  return files, sorted(bad), channels


def _assign_splits(
  scan: _Scan, files: Sequence[Sequence[str]], config: _FolderConfig
) -> dict[str, list[tuple[str, int]]]:
  """Stratified split: per class, a seeded permutation cut into test / validation (or fold) / train.

  Records are listed per split in a seeded mixed order (not grouped by class).

  Each class draws from its own generator seeded by the split seed and its name, so adding a
  class leaves the others' splits unchanged.
  """
  names = ['train', 'validation'] + (['test'] if config.test_fraction > 0 else [])
  splits = {name: [] for name in names}
  short = []
  for label, (cls, paths) in enumerate(zip(scan.classes, files, strict=True)):
    n = len(paths)
    rng = np.random.default_rng([config.split_seed, zlib.crc32(cls.encode())])
    order = rng.permutation(n)
    n_test = _round(config.test_fraction * n)
    test, rest = order[:n_test], order[n_test:]
    parts = {'test': test}
    if config.num_folds > 1:
      k = config.num_folds
      in_fold = np.arange(len(rest)) % k == config.fold
      parts.update(validation=rest[in_fold], train=rest[~in_fold])
      # Judge the worst fold, so that a sweep fails at once rather than at its last fold.
      counts = {'train': len(rest) - math.ceil(len(rest) / k), 'validation': len(rest) // k}
    else:
      n_val = _round(config.validation_fraction * n)
      parts.update(validation=rest[:n_val], train=rest[n_val:])
      counts = {'train': len(rest) - n_val, 'validation': n_val}
    if config.test_fraction > 0:
      counts['test'] = n_test
    if not all(counts.values()):
      worst = ' (smallest fold)' if config.num_folds > 1 else ''
      short.append(
        f'  class {cls!r} ({n} images): '
        + ', '.join(f'{split} {c}' for split, c in counts.items())
        + worst
      )
    for name in names:
      splits[name].extend((paths[i], label) for i in parts[name])
  if short:
    how = (
      f'dataset.num_folds={config.num_folds}'
      if config.num_folds > 1
      else f'dataset.validation_fraction={config.validation_fraction}'
    )
    raise DatasetError(
      f'in {scan.root}, {how} and dataset.test_fraction={config.test_fraction} leave some '
      'split without an example of a class:\n'
      + '\n'.join(short)
      + '\nadd images to those classes or change the fractions / number of folds'
    )
  # Mix the classes in record order too, so that any run of records (an eval batch, say) is not
  # all one class, which would skew anything computed per batch, such as batch-norm statistics.
  order = np.random.default_rng(config.split_seed)
  return {name: [recs[i] for i in order.permutation(len(recs))] for name, recs in splits.items()}


def _round(x: float) -> int:
  """Rounds half up (Python's round() goes to even, which surprises for 2.5 → 2)."""
  return int(np.floor(x + 0.5))


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
