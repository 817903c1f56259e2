"""The data stage: a class-subfolder tree → TFDS array_record build → grain batches."""

import os

import ml_collections
import tensorflow_datasets as tfds

from pneumo_jax.data import folder_builder, synthetic


def dataset_for(config: ml_collections.ConfigDict, workdir: str) -> tfds.core.DatasetBuilder:
  """The prepared dataset of a run: builds (or reuses) it under dataset.data_dir or WORKDIR/data.

  With dataset.synthetic on and no source_dir, the demo's generated folder is written first
  (under the data dir), so the demo needs nothing but this repository.
  """
  cfg = config.dataset
  data_dir = cfg.data_dir or os.path.join(workdir, 'data')
  if cfg.synthetic:
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.source_dir = cfg.source_dir or os.path.join(data_dir, 'synthetic_stages')
    synthetic.make_stage_folder(cfg.source_dir, images_per_class=cfg.synthetic_images_per_class,
                                image_size=cfg.synthetic_image_size, seed=cfg.split_seed)
  elif not cfg.source_dir:
    raise ValueError('config.dataset.source_dir is empty: set it to the folder whose subfolders '
                     'are the classes (--config.dataset.source_dir=/path/to/images)')
  return folder_builder.build(cfg, data_dir)
