"""grain loaders over a built dataset: shuffled, augmented, per-process training batches and
padded, masked evaluation batches.

All randomness is a function of the seed and an element's position in the (repeated) stream:
grain reshuffles each epoch with seed + epoch, and `random_map` seeds each record's generator
from its seed and index, never from global state. So the same seed and settings give the same
batches, and an iterator restored from a checkpoint continues with exactly the next batch.
Batching is the last step, so that grain's worker processes hand batches back through shared
memory (with workers, each batch is assembled by one worker from its slice of the stream).
"""

import dataclasses
import math
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pneumo_jax.data import folder_builder, preprocess
from pneumo_jax.errors import ConfigError

_READ_THREADS = 4  # Per process: decoding and numpy resizing largely release the GIL.


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  """Reads record `index` of `source` and applies slim's train preprocessing."""

  source: Sequence[dict[str, Any]]  # builder.as_data_source(split)
  size: int
  random_crop: bool
  random_flip: bool
  color_distortion: bool

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    record = self.source[int(index)]
    image = preprocess.train(
      record['image'],
      rng,
      self.size,
      random_crop=self.random_crop,
      random_flip=self.random_flip,
      color_distortion=self.color_distortion,
    )
    return {'image': image, 'label': np.int32(record['label'])}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  """Reads record `index` (or, for -1, a padding example) with eval preprocessing (central crop
  `central_fraction`, see preprocess.eval_central_fraction)."""

  source: Sequence[dict[str, Any]]  # builder.as_data_source(split)
  size: int
  central_fraction: float

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    if index < 0:
      return {
        'image': np.zeros((self.size, self.size, 3), np.float32),
        'label': np.int32(0),
        'index': np.int32(-1),
        'mask': np.False_,
      }
    record = self.source[int(index)]
    image = preprocess.eval(record['image'], self.size, central_fraction=self.central_fraction)
    return {
      'image': image,
      'label': np.int32(record['label']),
      'index': np.int32(index),
      'mask': np.True_,
    }


def train_iterator(
  builder: tfds.core.DatasetBuilder,
  input_cfg: ml_collections.ConfigDict,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.DatasetIterator:
  """Endless shuffled training batches of this process's shard of the 'train' split.

  Yields {'image': float32 [B, H, W, 3] in [-1, 1], 'label': int32 [B]} with
  B = input.batch_size // process_count. Processes read disjoint records. With
  input.class_balanced, each batch cycles through the classes in turn (each class reshuffled
  per pass over it), so classes are seen equally often however unequal their counts.
  Save and restore the position with `grain.checkpoint.CheckpointSave/CheckpointRestore`.
  With input.num_workers > 1 each worker batches its own slice of the same image stream.
  (grain 0.2.18 sends a single worker's batches through a pipe instead of shared memory, and
  its close() may then wait 25 s: prefer 0 or at least 2 workers.)
  """
  batch = _local_batch(input_cfg.batch_size, process_count, 'input.batch_size')
  labels = folder_builder.split_labels(builder, 'train')
  num_classes = len(folder_builder.label_names(builder))
  # Independent random streams: [0] augmentation, [1:] the shuffle of each index stream.
  seeds = [
    int(s) for s in np.random.SeedSequence([seed, process_index]).generate_state(1 + num_classes)
  ]
  if input_cfg.class_balanced:
    shards = [np.flatnonzero(labels == c)[process_index::process_count] for c in range(num_classes)]
  else:
    shards = [np.arange(len(labels))[process_index::process_count]]
  if not all(len(shard) for shard in shards):
    raise folder_builder.DatasetError(
      f'process {process_index} of {process_count} gets no training records from '
      f'{builder.data_dir}: the train split (or, with input.class_balanced, one of its classes) '
      'has fewer records than there are processes'
    )
  streams = [
    grain.MapDataset.source(shard).shuffle(seed=s).repeat()  # New order each epoch.
    for shard, s in zip(shards, seeds[1:], strict=False)
  ]
  indices = grain.MapDataset.mix(streams) if input_cfg.class_balanced else streams[0]
  example = _TrainExample(
    builder.as_data_source('train'),
    input_cfg.image_size,
    input_cfg.random_crop,
    input_cfg.random_flip,
    input_cfg.color_distortion,
  )
  ds = (
    indices.random_map(example, seed=seeds[0])
    .to_iter_dataset(_read_options(batch))
    .batch(batch, drop_remainder=True)
  )
  if input_cfg.num_workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=input_cfg.num_workers),
      worker_init_fn=_ignore_interrupt,
    )
  return iter(ds)


def eval_batches(
  builder: tfds.core.DatasetBuilder,
  split: str,
  input_cfg: ml_collections.ConfigDict,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's share of `split`, eval-preprocessed, in full padded batches.

  Yields {'image', 'label', 'index' (record index in the split, -1 for padding), 'mask' (False
  for padding)}, B = input.eval_batch_size // process_count. Every process yields the same
  number of batches, so collective ops across processes stay in step.
  """
  batch = _local_batch(input_cfg.eval_batch_size, process_count, 'input.eval_batch_size')
  source = builder.as_data_source(split)
  mine = np.arange(process_index, len(source), process_count)
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch)
  padded = np.full(num_batches * batch, -1, np.int64)
  padded[: len(mine)] = mine
  example = _EvalExample(source, input_cfg.image_size, preprocess.eval_central_fraction(input_cfg))
  ds = grain.MapDataset.source(padded).map(example).to_iter_dataset(_read_options(batch))
  return iter(ds.batch(batch))


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
