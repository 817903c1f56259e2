"""Feature cache: the frozen part of a network runs once per image and view, not every step.

When no batch norm below a phase's trainable layers uses batch statistics and the training
augmentation reduces to a finite set of views (no random crop or colour distortion; a flip gives
two), the outputs of its frozen layers depend on (image, view) alone. They are computed once per
training image and view, and once per validation image in the evaluation view, and the phase
trains and evaluates from them (`models.taps.substitute`) on the uncached path's batches, so the
trained layers learn the same numbers up to float rounding. `plan` decides where the network is
cut, `disk_shortfall` whether that fits on disk, `load_or_build` makes the cache.

It lives on disk, memory-mapped, under WORKDIR/features/<key>/, so sets larger than memory work
and a resumed run reuses it. The key hashes everything the features depend on (dataset, sizes,
views, the cut, dtype, every frozen variable's value); a new build removes the run's old caches.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import re
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
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pneumo_jax import atomic, distributed, progress, scopes, sharding
from pneumo_jax.data import folder_builder, pipeline, preprocess
from pneumo_jax.evaluation import inference
from pneumo_jax.models import Backbone, taps

CACHE_DIR = 'features'
_VERSION = 1  # Bump when what is stored changes for the same key.
_SPARE = 2**30  # Disk a cache must leave free (checkpoints, reports).
# The build's batch a CPU device: InceptionV3 at 299 px, 2 cores, forward passes: 8.1 img/s at
# batch 8, 7.5 at 16, 6.9 at 32 (the default eval_batch_size).
_CPU_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Cut:
  """Where a phase's frozen part ends: the layers whose outputs the cache holds (name → path
  regex, as `Backbone.feature_taps`) and the top-level scopes whose variables compute them."""

  taps: dict[str, str]
  frozen: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether a phase trains from a feature cache: from the one at `cut`, or (`cut` None) through
  the whole network, for `reason` (one log line)."""

  cut: Cut | None
  reason: str = ''

  @property
  def cached(self) -> bool:
    return self.cut is not None


def plan(cfg: ml_collections.ConfigDict, backbone: Backbone, trainable: Iterable[str]) -> Decision:
  """Where a phase (its config `cfg`, its trainable parameter paths) can train from a cache, or
  why it cannot. Decided from the config alone, before any state (disk space aside).

  Only heads train: the heads' inputs (`feature_taps`). Blocks train too, the lowest being
  blocks[k]: blocks[k − 1]'s output, plus the input of any trainable head that reads a frozen
  block (InceptionV3's aux head on Mixed_6e when only Mixed_7* train).
  """
  if not cfg.feature_cache:
    return Decision(None, 'feature_cache is off')
  if cfg.input.random_crop:
    return Decision(None, 'input.random_crop draws a new crop every step')
  if cfg.input.color_distortion:
    return Decision(None, 'input.color_distortion draws new colours every step')
  if cfg.batch_norm == 'all':
    return Decision(None, "batch_norm='all' normalises frozen layers with batch statistics")
  trained = {p.split('/')[0] for p in trainable}
  blocks = backbone.blocks
  if unknown := sorted(trained - set(blocks) - set(backbone.feature_taps)):
    return Decision(
      None, f"{unknown[0]} trains and is neither a head nor one of the backbone's blocks"
    )
  k = min((blocks.index(s) for s in trained if s in blocks), default=len(blocks))
  if k == 0:
    return Decision(None, f'{blocks[0]} trains: no frozen layer is left to cache')
  cut = {
    h: backbone.feature_taps[h]
    for h in sorted(trained & set(backbone.feature_taps))
    if blocks.index(backbone.head_inputs[h]) < k
  }
  if k < len(blocks):
    cut[blocks[k - 1]] = re.escape(blocks[k - 1])
  return Decision(Cut(cut, blocks[:k]))


def disk_shortfall(
  workdir: str,
  builder: tfds.core.DatasetBuilder,
  cfg: ml_collections.ConfigDict,
  cut: Cut,
  model: nn.Module,
  variables: dict[str, Any],
) -> str | None:
  """Why `cut`'s cache would not fit on WORKDIR's disk beside `_SPARE` bytes for checkpoints
  and reports (one log line); None when it fits. A top block's outputs are large, the heads'
  pooled inputs small (README's feature cache paragraph gives sizes)."""
  size = cfg.input.image_size
  shapes = jax.eval_shape(
    lambda v: taps.capture(
      model, v, jnp.zeros((1, size, size, 3)), cut.taps, tuple(cut.taps), train=False
    ),
    variables,
  )
  per_view = sum(4 * math.prod(s.shape[1:]) for s in shapes.values())  # float32
  views = 1 + bool(cfg.input.random_flip)
  rows = views * len(folder_builder.split_labels(builder, 'train'))
  rows += len(folder_builder.split_labels(builder, 'validation'))
  root = os.path.join(workdir, CACHE_DIR)
  # A new build first removes the run's old caches, so their space counts as free.
  old = sum(f.stat().st_size for f in pathlib.Path(root).rglob('*') if f.is_file())
  free = shutil.disk_usage(workdir).free + old
  if rows * per_view + _SPARE <= free:
    return None
  return (
    f'its {rows * per_view / 2**30:.1f} GiB (and {_SPARE / 2**30:.0f} GiB to spare) would not '
    f'fit in the {free / 2**30:.1f} GiB free under {workdir}'
  )


@dataclasses.dataclass(frozen=True)
class Cache:
  """Memory-mapped features of `taps`: train[tap] [N, views, ...], validation[tap] [M, ...]."""

  directory: str
  taps: dict[str, str]
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
    """This process's block of each global batch of `batch` validation records (padding
    masked), as pipeline.eval_batches yields images."""
    local = batch // jax.process_count()
    rows = pipeline.eval_rows(len(labels), local, jax.process_index(), jax.process_count())
    for index in rows.reshape(-1, local):
      mask = index >= 0
      read = np.where(mask, index, 0)
      yield {
        'features': {h: np.ascontiguousarray(f[read]) for h, f in self.validation.items()},
        'label': labels[read],
        'index': index.astype(np.int32),
        'mask': mask,
      }


def load_or_build(
  workdir: str,
  builder: tfds.core.DatasetBuilder,
  cfg: ml_collections.ConfigDict,
  backbone: Backbone,
  model: nn.Module,
  variables: dict[str, Any],
  cut: Cut,
  mesh: Mesh,
  interrupted: Callable[[], None] = lambda: None,
) -> Cache:
  """The phase's cache: reused when WORKDIR holds one for the same key, else computed with
  `model` (the phase's) and `variables` ({'params', 'batch_stats'} on the mesh).

  In a multi-process run, process 0's key and finding decide for all; every process computes
  its block of each batch and process 0 writes the gathered rows (one writer on the shared
  storage). `interrupted` is called between batches of a build, on every process (it may be a
  collective), and may raise to abandon it (Ctrl-C): the next build removes the unfinished folder.
  """
  tapped = tuple(cut.taps)
  # Evaluation runs the inference model, which has no auxiliary head.
  evaluated = tuple(h for h in tapped if h != backbone.aux_logits)
  flips = bool(cfg.input.random_flip)
  key = distributed.share_text(_key(builder, cfg, backbone, cut, flips, variables))
  path = os.path.join(workdir, CACHE_DIR, key)
  found = distributed.share_flag(os.path.exists(os.path.join(path, 'done.json')))
  if not found:
    _build(path, builder, cfg, model, variables, cut, evaluated, mesh, interrupted)
  cache = Cache(
    path,
    cut.taps,
    {h: np.load(os.path.join(path, f'train_{h}.npy'), mmap_mode='r') for h in tapped},
    {h: np.load(os.path.join(path, f'validation_{h}.npy'), mmap_mode='r') for h in evaluated},
  )
  _log_cache(cache, 'Reusing' if found else 'Built')
  return cache


def _build(
  path: str,
  builder: tfds.core.DatasetBuilder,
  cfg: ml_collections.ConfigDict,
  model: nn.Module,
  variables: dict[str, Any],
  cut: Cut,
  evaluated: tuple[str, ...],
  mesh: Mesh,
  interrupted: Callable[[], None],
) -> None:
  """Computes the cache into a folder beside `path`, moved there once complete (process 0
  writes; every process computes its block of each batch)."""
  lead = jax.process_index() == 0
  tmp = f'{path}{atomic.INCOMPLETE}{os.getpid()}'  # Left behind by a stopped build.
  if lead:
    root = os.path.dirname(path)
    if os.path.isdir(root):
      shutil.rmtree(root)  # Stale caches of this run (another key) and killed builds.
    os.makedirs(tmp)
  t0 = time.time()
  size = cfg.input.image_size
  capture = jax.jit(
    lambda v, inputs, flip: taps.capture(
      model,
      v,
      taps.inputs({**inputs, 'flip': jnp.full_like(inputs['flip'], flip)}, size),
      cut.taps,
      tuple(cut.taps),
      train=False,
    ),
    static_argnums=2,
  )
  compute = functools.partial(
    _compute, tmp if lead else None, builder, capture, variables, mesh, interrupted
  )
  # Without random crops, training sees the whole image; evaluation its own view.
  views = (False, True)[: 1 + bool(cfg.input.random_flip)]
  first, passes = compute('train', _framing(cfg, 1.0), tuple(cut.taps), views)
  framed = _framing(cfg, preprocess.eval_central_fraction(cfg.input))
  passes += compute('validation', framed, evaluated, None)[1]
  if lead:
    with open(os.path.join(tmp, 'done.json'), 'w') as f:
      # The first batch's time holds the compile: benchmarks leave it out of the rate.
      json.dump(
        {
          'heads': tuple(cut.taps),
          'seconds': time.time() - t0,
          'passes': passes,
          'first_batch': first,
        },
        f,
      )
    os.replace(tmp, path)
  distributed.share_flag(True)  # The others open the cache once process 0 has put it in place.


def _framing(cfg: ml_collections.ConfigDict, fraction: float) -> ml_collections.ConfigDict:
  """`cfg.input` for reading a split with this central crop, in whole global batches (on CPUs
  at most `_CPU_BATCH` images a device: XLA:CPU's convolutions run faster on small batches)."""
  batch = cfg.input.eval_batch_size
  if jax.default_backend() == 'cpu':
    batch = min(batch, _CPU_BATCH * jax.device_count())
  batch = sharding.round_up(batch)
  return ml_collections.ConfigDict(
    {**cfg.input.to_dict(), 'central_crop_fraction': fraction, 'eval_batch_size': batch}
  )


def _log_cache(cache: Cache, what: str) -> None:
  shape = next(iter(cache.train.values())).shape
  path = cache.directory
  mb = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) / 2**20
  logging.info(
    '%s the feature cache of %s (%d training images × %d view(s), %d validation images, '
    '%.0f MB): %s',
    what,
    ', '.join(cache.train),
    shape[0],
    shape[1],
    len(next(iter(cache.validation.values()), ())),
    mb,
    path,
  )


def _compute(
  directory: str | None,
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
  """Writes <split>_<head>.npy into `directory` (None: computes its share for the process that
  writes): [N, len(views), ...] (train) or [N, ...] (views None: the evaluation view), each
  image read once for all its views. Returns the first batch's seconds and backbone passes, and
  all passes (padding included)."""
  n = len(folder_builder.split_labels(builder, split))
  out: dict[str, np.ndarray] = {}
  first: dict[str, float] = {}
  passes = 0
  t0 = time.time()
  batches = pipeline.eval_batches(
    builder,
    split,
    input_cfg,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    put=inference.put_inputs(mesh),
  )
  several = f' ({len(views)} views each)' if views and len(views) > 1 else ''
  what = f'Caching {split} features{several}'
  shown = progress.Progress(what, n, 'img', active=jax.process_index() == 0)
  for batch in batches:
    interrupted()
    keep = _all_processes_rows(batch['mask'])
    rows = _all_processes_rows(batch['index'])[keep]
    for v, flip in enumerate(views or (False,)):
      got = _all_processes_rows(capture(variables, _inputs(batch), flip))
      if directory is None:
        continue
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
    shown.update(len(rows))
  shown.close()
  for array in out.values():
    array.flush()
  return first, passes


def _all_processes_rows(x: Any) -> Any:
  """Every process's rows of a batch (a pytree of batch-split global arrays, or of this
  process's block as numpy), in the global batch's order, as numpy."""
  if jax.process_count() == 1:
    return jax.device_get(x)
  return multihost_utils.process_allgather(x, tiled=True)


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in batch.items() if k in inference.MODEL_INPUTS}


def _key(
  builder: tfds.core.DatasetBuilder,
  cfg: ml_collections.ConfigDict,
  backbone: Backbone,
  cut: Cut,
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
    sorted(cut.taps.items()),
    cfg.model.to_dict(),
  ]
  digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
  for collection in ('params', 'batch_stats'):
    for path, value in sorted(scopes.flatten(variables[collection]).items()):
      if path.split('/')[0] in cut.frozen:  # Trainable layers' variables do not shape them.
        digest.update(path.encode())
        digest.update(np.asarray(jax.device_get(value)).tobytes())
  return digest.hexdigest()[:16]
