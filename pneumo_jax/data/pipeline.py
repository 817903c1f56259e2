"""grain loaders over a built dataset: shuffled training batches (each process its slice of every
global batch) and padded, masked evaluation batches, both as stored uint8 images plus the view
to take of each.

The host only reads records (already at their stored size) and draws each example's view
(preprocess.draw: crop box, flip, colour factors); `augment.apply` crops, resizes, flips and
distorts on the accelerator, inside the jitted step. So the host's work per image is a copy, and
what the device receives is uint8 (a quarter of float32's bytes, a twelfth for grey records).

All randomness is a function of the seed and an element's position in the (repeated) stream:
grain reshuffles each epoch with seed + epoch, and `random_map` seeds each record's generator
from its seed and index, never from global state. So the same seed and settings give the same
batches, and an iterator restored from a checkpoint continues with exactly the next batch.
Batching is the last step, so that grain's worker processes hand batches back through shared
memory (with workers, each batch is assembled by one worker from its slice of the stream).
"""

import dataclasses
import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pneumo_jax.data import folder_builder, images, preprocess
from pneumo_jax.errors import ConfigError

_READ_THREADS = 4  # Per process: record reads and decoding largely release the GIL.
_PREFETCH = 2  # Batches ready ahead of the step, on the host and (with `put`) on the devices.
_MAX_AUTO_WORKERS = 16


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  """Reads record `index` of `source` (fitted to side × side) and draws its training view.

  Returns the stored uint8 image with the view's parameters (augment.apply applies them on the
  device), or, with `read_images` off (training from a feature cache), the record's index instead
  of its image: the draws, hence the views, are the same either way.
  """

  source: Sequence[dict[str, Any]]  # builder.as_data_source(split)
  labels: np.ndarray  # Of every record: no record is read without its image.
  side: int
  random_crop: bool
  random_flip: bool
  color_distortion: bool
  read_images: bool = True

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    view = preprocess.draw(
      self.side,
      self.side,
      rng,
      random_crop=self.random_crop,
      random_flip=self.random_flip,
      color_distortion=self.color_distortion,
    )
    data = (
      {'image': images.fit(self.source[int(index)]['image'], self.side)}
      if self.read_images
      else {'index': np.int32(index)}
    )
    return {**data, **view, 'label': self.labels[int(index)]}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  """Reads record `index` (or, for -1, a padding example) with the evaluation view (central crop
  `central_fraction`, see preprocess.eval_central_fraction)."""

  source: Sequence[dict[str, Any]]  # builder.as_data_source(split)
  side: int
  channels: int
  central_fraction: float
  label_shape: tuple[int, ...] = ()  # Of padding's label: (F,) for a multilabel build.

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    view = preprocess.central_view(self.side, self.side, self.central_fraction)
    if index < 0:
      image = np.zeros((self.side, self.side, self.channels), np.uint8)
      label, mask = np.zeros(self.label_shape, np.int32), False
    else:
      record = self.source[int(index)]
      image, label = images.fit(record['image'], self.side), np.int32(record['label'])
      mask = True
    return {
      'image': image,
      **view,
      'label': label,
      'index': np.int32(index),
      'mask': np.bool_(mask),
    }


def side(builder: tfds.core.DatasetBuilder, input_cfg: ml_collections.ConfigDict) -> int:
  """The side of the square uint8 images batches carry: the build's stored size, or for a
  full-resolution build the default for input.image_size (records are fitted when read)."""
  stored, _, _ = folder_builder.stored_shape(builder)
  return stored or preprocess.stored_size(input_cfg.image_size)


def train_iterator(
  builder: tfds.core.DatasetBuilder,
  input_cfg: ml_collections.ConfigDict,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  read_images: bool = True,
  put: Callable[[dict[str, np.ndarray]], Any] | None = None,
) -> grain.DatasetIterator:
  """Endless shuffled training batches of this process's shard of the 'train' split.

  Yields {'image': uint8 [B, S, S, C], 'box', 'flip', 'colour' (the views, see
  preprocess.draw), 'label': int32 [B], or [B, F] for a multilabel build (folder_builder.
  split_labels)} with B = input.batch_size // process_count; with
  `read_images` off, 'index' (record indices) instead of 'image'. `put` (e.g. placing a batch on
  the devices) runs in a background thread that keeps two batches ahead, so the accelerator
  never waits for the host's transfer. Iterators that differ only in `read_images` and `put`
  have interchangeable states (`get_state` / `set_state`). The processes' batches are slices of
  one global stream (`_Share`), the same for any process count. With
  input.class_balanced, each batch cycles through the classes in turn (each class reshuffled
  per pass over it), so classes are seen equally often however unequal their counts (not for a
  multilabel build: `check_class_balanced`).
  Save and restore the position with `grain.checkpoint.CheckpointSave/CheckpointRestore`.
  With input.num_workers > 1 each worker batches its own slice of the same image stream.
  (grain 0.2.18 sends a single worker's batches through a pipe instead of shared memory, and
  its close() may then wait 25 s: prefer 0 or at least 2 workers.)
  """
  batch = _local_batch(input_cfg.batch_size, process_count, 'input.batch_size')
  check_class_balanced(input_cfg, folder_builder.task(builder))
  labels = folder_builder.split_labels(builder, 'train')
  num_classes = len(folder_builder.label_names(builder))
  # Independent random streams: [0] augmentation, [1:] the shuffle of each index stream.
  seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(1 + num_classes)]
  if input_cfg.class_balanced:
    shards = [np.flatnonzero(labels == c) for c in range(num_classes)]
  else:
    shards = [np.arange(len(labels))]
  streams = [
    grain.MapDataset.source(shard).shuffle(seed=s).repeat()  # New order each epoch.
    for shard, s in zip(shards, seeds[1:], strict=False)
  ]
  indices = grain.MapDataset.mix(streams) if input_cfg.class_balanced else streams[0]
  example = _TrainExample(
    builder.as_data_source('train'),
    labels,
    side(builder, input_cfg),
    input_cfg.random_crop,
    input_cfg.random_flip,
    input_cfg.color_distortion,
    read_images,
  )
  stream = indices.random_map(example, seed=seeds[0])  # Views drawn by global position.
  ds = (
    grain.MapDataset.source(_Share(stream, batch, process_index, process_count))
    .to_iter_dataset(_read_options(batch))
    .batch(batch, drop_remainder=True)
  )
  workers = num_workers(input_cfg)  # Even without images: the state must stay transferable.
  if workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_ignore_interrupt
    )
  return iter(_prefetch(ds, put))


class _Share(Sequence):
  """Process `index`'s share of a global stream of examples: of each global batch (`count` ×
  `batch` consecutive elements), the `batch` from index × batch on. So the global batches, and
  each example's view, are the same for any number of processes (a run on two hosts trains on
  what one host would), and processes read disjoint records within an epoch."""

  def __init__(self, stream: grain.MapDataset, batch: int, index: int, count: int) -> None:
    self.stream, self.batch, self.index, self.count = stream, batch, index, count

  def __len__(self) -> int:
    return len(self.stream) // (self.batch * self.count) * self.batch

  def __getitem__(self, position: int) -> Any:
    step, row = divmod(position, self.batch)
    return self.stream[(step * self.count + self.index) * self.batch + row]


def eval_batches(
  builder: tfds.core.DatasetBuilder,
  split: str,
  input_cfg: ml_collections.ConfigDict,
  *,
  process_index: int = 0,
  process_count: int = 1,
  put: Callable[[dict[str, np.ndarray]], Any] | None = None,
) -> Iterator[dict[str, Any]]:
  """One pass over this process's share of `split` with the evaluation view, in full padded
  batches.

  Yields {'image' (uint8, stored), 'box', 'flip', 'colour' (the view), 'label' (int32 [B], or
  [B, F] for a multilabel build; 0 for padding), 'index' (record index in the split, -1 for
  padding), 'mask' (False for padding)}, B = input.eval_batch_size //
  process_count, each passed through `put` (as in train_iterator) when given: the process's
  block of each global batch (`eval_rows`).
  """
  batch = _local_batch(input_cfg.eval_batch_size, process_count, 'input.eval_batch_size')
  source = builder.as_data_source(split)
  rows = eval_rows(len(source), batch, process_index, process_count)
  example = _EvalExample(
    source,
    side(builder, input_cfg),
    folder_builder.stored_shape(builder)[2],
    preprocess.eval_central_fraction(input_cfg),
    folder_builder.split_labels(builder, split).shape[1:],
  )
  ds = grain.MapDataset.source(rows).map(example).to_iter_dataset(_read_options(batch))
  return iter(_prefetch(ds.batch(batch), put))


def eval_rows(n: int, batch: int, process_index: int, process_count: int) -> np.ndarray:
  """The records (-1: padding) process `process_index` evaluates of a split of `n`: its block of
  `batch` rows in each global batch of `batch` × `process_count` consecutive records. Every
  process gets the same number of batches, so collectives across processes stay in step, and
  the blocks gathered in process order are the records in order."""
  size = batch * process_count
  padded = np.full(math.ceil(n / size) * size, -1, np.int64)
  padded[:n] = np.arange(n)
  return padded.reshape(-1, process_count, batch)[:, process_index].reshape(-1)


def check_class_balanced(input_cfg: ml_collections.ConfigDict, task: str) -> None:
  """Raises ConfigError for input.class_balanced with findings: a film belongs to several
  findings or none, so there are no classes to cycle through."""
  if input_cfg.class_balanced and task == 'multilabel':
    raise ConfigError(
      "input.class_balanced=True does not apply to dataset.task='multilabel' (a film has "
      "several findings or none); unset it, and weigh rare findings with class_weighting='balanced'"
    )


def num_workers(input_cfg: ml_collections.ConfigDict) -> int:
  """input.num_workers, with 'auto' resolved for this machine (see configs/default.py)."""
  if input_cfg.num_workers != 'auto':
    return int(input_cfg.num_workers)
  if jax.default_backend() == 'cpu':
    return 0  # The model needs the same cores; threads decode uint8 records fast enough.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(2, min((cores or 1) - 1, _MAX_AUTO_WORKERS))


def _prefetch(
  ds: grain.IterDataset, put: Callable[[dict[str, np.ndarray]], Any] | None
) -> grain.IterDataset:
  """Batches made in a background thread and (with `put`) transferred there, two ahead.

  grain's thread prefetch keeps the iterator's checkpointable state at the batch last handed
  out, so a checkpoint taken with batches in flight still resumes at the next unconsumed one.
  """
  ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=_PREFETCH)
  if put is None:
    return ds
  return grain.experimental.ThreadPrefetchIterDataset(ds.map(put), prefetch_buffer_size=_PREFETCH)


def _ignore_interrupt(worker_index: int, worker_count: int) -> None:
  """grain worker init: a terminal's Ctrl-C reaches every process of its group, but only the main
  process should react (it saves a checkpoint); workers would each die with a traceback."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _read_options(batch: int) -> grain.ReadOptions:
  """Threads decode ahead, holding about two batches (grain's default buffer is 500 images)."""
  return grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=2 * batch)


def _local_batch(global_batch: int, process_count: int, field: str) -> int:
  if global_batch < 1 or global_batch % process_count:
    raise ConfigError(
      f'{field}={global_batch} must be a positive multiple of the number of '
      f'processes ({process_count})'
    )
  return global_batch // process_count


def view_images(
  builder: tfds.core.DatasetBuilder,
  input_cfg: ml_collections.ConfigDict,
  index: np.ndarray,
  flip: np.ndarray,
) -> np.ndarray:
  """float32 [n, S, S, 3] in [-1, 1] (S = input.image_size): the train records `index`, flipped
  where `flip`, as a feature cache build feeds them to the network (its reads: whole images,
  central_crop_fraction 1.0, as training without random crops sees them), by the numpy reference
  (preprocess.apply). A phase trained from the cache reads no image; this draws its first batch."""
  example = _EvalExample(
    builder.as_data_source('train'),
    side(builder, input_cfg),
    folder_builder.stored_shape(builder)[2],
    central_fraction=1.0,
  )
  views = [{**example(int(i)), 'flip': np.bool_(f)} for i, f in zip(index, flip, strict=True)]
  return np.stack([preprocess.apply(v['image'], v, input_cfg.image_size) for v in views])
