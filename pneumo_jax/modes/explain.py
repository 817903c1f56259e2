"""--mode explain: one annotated Grad-CAM / guided Grad-CAM panel per image file."""

import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from pneumo_jax import models, sharding
from pneumo_jax.data import augment, images
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import explain, reports
from pneumo_jax.modes import common

NAME = 'explain'
HELP = 'Grad-CAM and guided Grad-CAM panels of image files'
FLAGS = ('inputs', 'checkpoint', 'layer', 'target_class')
NEEDS_WORKDIR = True

EXPLAIN_DIR = 'explain'


def _output_names(files: Sequence[str]) -> dict[str, str]:
  """A distinct file-name stem per input (inputs from different folders may share a name)."""
  out, seen = {}, set()
  for path in files:
    stem = base = os.path.splitext(os.path.basename(path))[0]
    n = 1
    while stem in seen:
      stem, n = f'{base}_{n}', n + 1
    seen.add(stem)
    out[path] = stem
  return out


def _true_label(path: str, names: Sequence[str]) -> int | None:
  """The class of a file inside a class folder (its nearest ancestor named like a class)."""
  for part in reversed(os.path.normpath(os.path.abspath(path)).split(os.sep)[:-1]):
    if part in names:
      return list(names).index(part)
  return None


def _finer_layers(backbone: models.Backbone, layer: str, size: int) -> list[str]:
  """Up to two layers before `layer` with at least 3×3 cells at this size, of distinct strides."""
  known = backbone.gradcam_layers
  out, strides = [], set()
  for name in reversed(known[: known.index(layer)] if layer in known else known):
    stride = backbone.cell_centres[name][1]
    if size / stride >= 3 and stride not in strides and len(out) < 2:
      out.append(name)
      strides.add(stride)
  return out


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  inputs: Sequence[str],
  *,
  checkpoint: str = 'latest',
  layer: str | None = None,
  target_class: int | None = None,
) -> str:
  """Writes one annotated panel per input (see explain.panel_figure) under
  WORKDIR/explain/step<step>_<layer>[_class<k>]/; returns that folder.

  Args:
    inputs: image files, folders (searched recursively), glob patterns or CSVs with a path
      column (images.expand_inputs).
    layer: the submodule Grad-CAM weighs (None: the backbone's default); it needs more than 2×2
      cells at input.image_size, else a warning names finer layers.
    target_class: class id to explain in every image; None → each image's predicted class.

  An input inside a folder named like a class (the training layout) shows that class as the
  true one. A file that cannot be read or breaks dataset.min_image_side / max_aspect_ratio is
  listed and skipped. The output folder is checked to be writable before anything is computed.
  """
  files = images.expand_inputs(inputs)
  model, variables, step, names = common.restore(config, workdir, checkpoint)
  if target_class is not None and not 0 <= target_class < len(names):
    raise ConfigError(
      f'--target_class={target_class} is not a class id; use 0..{len(names) - 1} for {names}'
    )
  size = config.input.image_size
  backbone = models.backbone_of(config)
  layer = layer or backbone.default_gradcam_layer
  lead = jax.process_index() == 0  # Every process computes; process 0 writes and reports.
  target = '' if target_class is None else f'_class{target_class}'
  out_dir = os.path.join(workdir, EXPLAIN_DIR, f'step{step}_{layer.replace("/", "-")}{target}')
  if lead:
    reports.check_writable(out_dir, 'the explanations folder', create=False)
  warning = explain.grid_warning(
    layer,
    explain.layer_grid(model, variables, size, layer),
    size,
    _finer_layers(backbone, layer, size),
  )
  if warning and lead:
    print(f'Warning: {warning}')
  mesh = sharding.make_mesh()
  variables = sharding.replicate(variables, mesh)
  stems = _output_names(files)
  errors: dict[str, str] = {}
  readable: list[str] = []
  for batch in common.padded_batches(
    common.examples(files, config, errors, readable), common.global_batch(config)
  ):
    # Every process reads every file and feeds its own rows; process 0 writes the panels.
    mine = {k: sharding.own_rows(batch[k]) for k in ('image', 'box', 'flip', 'colour')}
    arrays = sharding.shard_batch(mine, mesh)
    pixels = augment.from_batch(arrays, size)
    target = None
    if target_class is not None:
      target = sharding.shard_batch(np.full(len(mine['flip']), target_class, np.int32), mesh)
    result = multihost_utils.process_allgather(  # The whole batch, on every process.
      explain.explain(
        model,
        variables,
        pixels,
        target,
        layer=layer,
        cells=backbone.cell_centres.get(layer),
      ),
      tiled=True,
    )
    shown = multihost_utils.process_allgather(pixels, tiled=True)
    for row in np.flatnonzero(batch['mask']) if lead else ():
      path = readable[batch['index'][row]]
      one = {k: v[row] for k, v in result.items()}
      panel = explain.panel_figure(
        shown[row], one, names, layer=layer, step=step, true_label=_true_label(path, names)
      )
      explain.write_panel(os.path.join(out_dir, f'{stems[path]}.png'), panel)
      predicted = int(one['probs'].argmax())
      print(
        f'{reports.printable(path)}: predicted {names[predicted]} ({one["probs"][predicted]:.1%}), '
        f'explained {names[int(one["target"])]}'
      )
  if lead or not readable:  # Nothing readable fails every process.
    common.report_errors(errors, len(files))
  if lead:
    print(
      f'Explanations at {layer} (checkpoint step {step}) for {len(readable)} image(s) in '
      f'{reports.printable(out_dir)}'
    )
  return out_dir
