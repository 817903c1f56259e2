"""Feature cache: when only the heads train, the frozen backbone runs once per image and view.

The seed's recipe trains a new head on a frozen InceptionV3 for 6,000 steps of 16 images: the
backbone runs 96,000 times over ~2,000 images, computing the same features again and again. When
a phase trains nothing below the heads' inputs (`Backbone.feature_taps`: the pools before the
logits), no batch norm below them uses batch statistics, and the training augmentation reduces
to a finite set of views (no random crop, no colour distortion; a flip gives two), those inputs
are a function of (image, view) alone. So they are computed once per training image and view,
and once per validation image in the evaluation view, and the phase trains and evaluates the
heads from them (`models.taps.substitute`). The batches are the uncached path's (same records,
same flips, same dropout), so the heads learn the same numbers up to float rounding.

The cache lives on disk, memory-mapped, under WORKDIR/features/<key>/: sets larger than memory
still work (the OS pages them in), and a resumed run reuses it. The key hashes everything the
features depend on (the dataset build, image and stored size, views, the tapped heads, dtype and
every frozen variable's value), so a changed dataset, checkpoint or size never reuses a stale
cache; building a new one removes the run's old ones.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.sharding import Mesh

from pneumo_jax import scopes, sharding
from pneumo_jax.data import folder_builder, pipeline, preprocess
from pneumo_jax.evaluation import inference
from pneumo_jax.models import Backbone, taps

CACHE_DIR = 'features'
_VERSION = 1  # Bump when what is stored changes for the same key.


def why_not(
  cfg: ml_collections.ConfigDict, backbone: Backbone, trainable: Iterable[str]
) -> str | None:
  """None when a phase (its config `cfg`, its trainable parameter paths) can train from the
  cache; else why not, for one log line. Decided from the config alone, before any state."""
  if not cfg.feature_cache:
    return 'feature_cache is off'
  if cfg.input.random_crop:
    return 'input.random_crop draws a new crop every step'
  if cfg.input.color_distortion:
    return 'input.color_distortion draws new colours every step'
  if cfg.batch_norm == 'all':
    return "batch_norm='all' normalises frozen layers with batch statistics"
  if jax.process_count() > 1:
    return 'it is built by one process (multi-process runs train uncached)'
  below = [p for p in trainable if p.split('/')[0] not in backbone.feature_taps]
  if below:
    return f'{below[0]} trains, below the heads ({", ".join(backbone.feature_taps)})'
  return None


def heads(trainable: Iterable[str]) -> tuple[str, ...]:
  """The heads a cached phase trains (and whose inputs the cache holds)."""
  return tuple(sorted({p.split('/')[0] for p in trainable}))


@dataclasses.dataclass(frozen=True)
class Cache:
  """Memory-mapped features: train[head] [N, views, ...], validation[head] [M, ...]."""

  directory: str
  train: dict[str, np.ndarray]
  validation: dict[str, np.ndarray]

  def train_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A pipeline batch read without images (records' 'index', their 'flip') → the features of
    those records in those views, with the labels."""
    views = next(iter(self.train.values())).shape[1]
    view = batch['flip'].astype(np.int64) if views > 1 else np.zeros_like(batch['index'])
    index = batch['index'].astype(np.int64)
    return {
      'features': {h: np.ascontiguousarray(f[index, view]) for h, f in self.train.items()},
      'label': batch['label'],
    }

  def validation_batches(self, labels: np.ndarray, batch: int) -> Iterator[dict[str, Any]]:
    """The validation split's features in record order, in full batches (the last one padded
    and masked), as pipeline.eval_batches yields images."""
    n = len(labels)
    for start in range(0, n, batch):
      index = np.arange(start, start + batch)
      mask = index < n
      index = np.where(mask, index, start)
      yield {
        'features': {h: np.ascontiguousarray(f[index]) for h, f in self.validation.items()},
        'label': labels[index],
        'index': np.where(mask, index, -1).astype(np.int32),
        'mask': mask,
      }


def load_or_build(
  workdir: str,
  builder: tfds.core.DatasetBuilder,
  cfg: ml_collections.ConfigDict,
  backbone: Backbone,
  model: nn.Module,
  variables: dict[str, Any],
  trainable: Sequence[str],
  mesh: Mesh,
  interrupted: Callable[[], None] = lambda: None,
) -> Cache:
  """The phase's cache: reused when WORKDIR holds one for the same key, else computed with
  `model` (the phase's) and `variables` ({'params', 'batch_stats'} on the mesh).

  `interrupted` is called between batches of a build and may raise to abandon it (Ctrl-C): the
  unfinished folder is removed by the next build."""
  tapped = heads(trainable)
  # Evaluation runs the inference model, which has no auxiliary head.
  evaluated = tuple(h for h in tapped if h != backbone.aux_logits)
  flips = bool(cfg.input.random_flip)
  size = cfg.input.image_size
  key = _key(builder, cfg, backbone, tapped, flips, variables)
  root = os.path.join(workdir, CACHE_DIR)
  path = os.path.join(root, key)
  if not os.path.exists(os.path.join(path, 'done.json')):
    if os.path.isdir(root):
      shutil.rmtree(root)  # Stale caches of this run (another key) and killed builds.
    tmp = f'{path}.incomplete-{os.getpid()}'
    os.makedirs(tmp)
    t0 = time.time()
    capture = jax.jit(
      lambda v, inputs, flip: taps.capture(
        model,
        v,
        taps.inputs({**inputs, 'flip': jnp.full_like(inputs['flip'], flip)}, size),
        backbone.feature_taps,
        tapped,
        train=False,
      ),
      static_argnums=2,
    )

    def framing(fraction: float) -> ml_collections.ConfigDict:
      batch = sharding.round_up(cfg.input.eval_batch_size)
      return ml_collections.ConfigDict(
        {**cfg.input.to_dict(), 'central_crop_fraction': fraction, 'eval_batch_size': batch}
      )

    compute = functools.partial(_compute, tmp, builder, capture, variables, mesh, interrupted)
    # Without random crops, training sees the whole image; evaluation its own view.
    first, passes = compute('train', framing(1.0), tapped, (False, True)[: 1 + flips])
    framed = framing(preprocess.eval_central_fraction(cfg.input))
    passes += compute('validation', framed, evaluated, None)[1]
    with open(os.path.join(tmp, 'done.json'), 'w') as f:
      # The first batch's time holds the compile: benchmarks leave it out of the rate.
      json.dump(
        {'heads': tapped, 'seconds': time.time() - t0, 'passes': passes, 'first_batch': first}, f
      )
    os.replace(tmp, path)
    what = 'Built'
  else:
    what = 'Reusing'
  cache = Cache(
    path,
    {h: np.load(os.path.join(path, f'train_{h}.npy'), mmap_mode='r') for h in tapped},
    {h: np.load(os.path.join(path, f'validation_{h}.npy'), mmap_mode='r') for h in evaluated},
  )
  shape = next(iter(cache.train.values())).shape
  mb = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) / 2**20
  logging.info(
    '%s the feature cache of %s (%d training images × %d view(s), %d validation images, '
    '%.0f MB): %s',
    what,
    ', '.join(tapped),
    shape[0],
    shape[1],
    len(next(iter(cache.validation.values()), ())),
    mb,
    path,
  )
  return cache


def _compute(
  directory: str,
  builder: tfds.core.DatasetBuilder,
  capture: Any,
  variables: dict[str, Any],
  mesh: Mesh,
  interrupted: Callable[[], None],
  split: str,
  input_cfg: ml_collections.ConfigDict,
  names: Sequence[str],
  views: tuple[bool, ...] | None,
) -> tuple[dict[str, float], int]:
  """Writes <split>_<head>.npy: [N, len(views), ...] (train) or [N, ...] (views None: the
  evaluation view), each image read once for all its views. Returns the first batch's seconds
  and backbone passes, and all passes (padding included)."""
  n = len(folder_builder.split_labels(builder, split))
  out: dict[str, np.ndarray] = {}
  first: dict[str, float] = {}
  passes = 0
  t0 = time.time()
  batches = pipeline.eval_batches(builder, split, input_cfg, put=inference.put_inputs(mesh))
  for batch in batches:
    interrupted()
    keep = batch['mask']
    rows = batch['index'][keep]
    for v, flip in enumerate(views or (False,)):
      got = jax.device_get(capture(variables, _inputs(batch), flip))
      for name in names:
        if name not in out:
          shape = (n, len(views), *got[name].shape[1:]) if views else (n, *got[name].shape[1:])
          out[name] = np.lib.format.open_memmap(
            os.path.join(directory, f'{split}_{name}.npy'), 'w+', np.float32, shape
          )
        value = np.asarray(got[name], np.float32)[keep]
        if views:
          out[name][rows, v] = value
        else:
          out[name][rows] = value
    passes += len(keep) * len(views or (False,))
    first = first or {'seconds': time.time() - t0, 'passes': passes}
  for array in out.values():
    array.flush()
  return first, passes


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in batch.items() if k in inference.MODEL_INPUTS}


def _key(
  builder: tfds.core.DatasetBuilder,
  cfg: ml_collections.ConfigDict,
  backbone: Backbone,
  tapped: Sequence[str],
  flips: bool,
  variables: dict[str, Any],
) -> str:
  """A hash of everything the cached features depend on."""
  digest = hashlib.sha256()
  settings = [
    _VERSION,
    backbone.name,
    os.path.realpath(str(builder.data_dir)),
    cfg.input.image_size,
    pipeline.side(builder, cfg.input),
    preprocess.eval_central_fraction(cfg.input),
    flips,
    list(tapped),
    cfg.model.to_dict(),
  ]
  digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
  for collection in ('params', 'batch_stats'):
    for path, value in sorted(scopes.flatten(variables[collection]).items()):
      if path.split('/')[0] not in tapped:  # The heads' own variables do not shape the features.
        digest.update(path.encode())
        digest.update(np.asarray(jax.device_get(value)).tobytes())
  return digest.hexdigest()[:16]
