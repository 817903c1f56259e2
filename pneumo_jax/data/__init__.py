"""The data stage: class folders, split folders or a label file → TFDS array_record build →
grain batches."""

import os

import jax
import ml_collections
import tensorflow_datasets as tfds

from pneumo_jax import distributed, locks
from pneumo_jax.data import folder_builder, preprocess, synthetic
from pneumo_jax.errors import DatasetError


def dataset_for(
  config: ml_collections.ConfigDict, workdir: str, whole: bool = False
) -> tfds.core.DatasetBuilder:
  """The prepared dataset of a run: builds (or reuses) it under dataset.data_dir or WORKDIR/data.

  With `whole`, every readable image of the source is in one split, 'all', whatever the
  source's own splits (an external test set, scored whole by `--mode eval --split all`).

  With dataset.synthetic on and no source_dir, the demo's generated folder is written first
  (under the data dir), so the demo needs nothing but this repository. Settings and folders are
  checked before anything is written. Generation and build hold the data dir's build lock, so
  runs sharing it generate and build once (the others wait, then reuse), and under it what
  killed runs left (temporary synthetic folders, incomplete TFDS builds) is removed first.
  With several processes, process 0 builds and the others then find its build, in a data dir
  they all must see.
  """
  data_dir = config.dataset.data_dir or os.path.join(workdir, 'data')
  distributed.check_shared(data_dir, 'dataset.data_dir' if config.dataset.data_dir else 'WORKDIR')
  builder = distributed.lead_first(
    'to build the dataset', lambda: _prepare(config, data_dir, whole)
  )
  if jax.process_count() > 1 and distributed.share_text(str(builder.data_dir)) != str(
    builder.data_dir
  ):
    raise DatasetError(
      f'process {jax.process_index()} found another dataset ({builder.data_dir}) than process 0: '
      'its dataset.source_dir holds other files; every host must see the same folder'
    )
  return builder


def _prepare(
  config: ml_collections.ConfigDict, data_dir: str, whole: bool
) -> tfds.core.DatasetBuilder:
  cfg = config.dataset
  size = None if cfg.full_resolution else stored_side(config)
  if not cfg.synthetic or cfg.labels_csv:  # Checks first, then builds under the lock.
    return folder_builder.build(cfg, data_dir, size, whole=whole)
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.source_dir = cfg.source_dir or os.path.join(data_dir, 'synthetic_stages')
  params = {
    'images_per_class': cfg.synthetic_images_per_class,
    'image_size': cfg.synthetic_image_size,
    'seed': cfg.split_seed,
  }
  folder_builder.check_settings(cfg)
  synthetic.check_stage_folder(cfg.source_dir, **params)
  with locks.build_lock(data_dir):
    synthetic.remove_incomplete(cfg.source_dir)
    synthetic.make_stage_folder(cfg.source_dir, **params)
    return folder_builder.build(cfg, data_dir, size, whole=whole)


def stored_side(config: ml_collections.ConfigDict) -> int:
  """The side of the square images a run's model pipeline works from: dataset.stored_size, else
  derived from input.image_size (preprocess.stored_size). A build stores images at this side
  unless dataset.full_resolution; prediction reads files at it too."""
  return config.dataset.stored_size or preprocess.stored_size(config.input.image_size)
