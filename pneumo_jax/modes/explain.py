"""--mode explain: one annotated Grad-CAM / guided Grad-CAM panel per image file (per image and
finding explained, for a multi-label run)."""

import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from pneumo_jax import heads, models, sharding
from pneumo_jax.data import augment, images
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import explain, metrics, reports
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


def _target_id(target_class: int | str | None, names: Sequence[str]) -> int | None:
  """--target_class as a class (finding) id: a name, or an id (an int, or digits that are not a
  name); None stays None."""
  if target_class is None:
    return None
  if isinstance(target_class, str) and target_class in names:
    return list(names).index(target_class)
  if isinstance(target_class, str) and not target_class.isdigit():
    raise ConfigError(
      f'--target_class={target_class!r} is neither a class name nor an id; use one of '
      f'{list(names)} or 0..{len(names) - 1}'
    )
  if not 0 <= int(target_class) < len(names):
    raise ConfigError(
      f'--target_class={target_class} is not a class id; use 0..{len(names) - 1} for {names}'
    )
  return int(target_class)


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
  target_class: int | str | None = None,
) -> str:
  """Writes one annotated panel per input (see explain.panel_figure) under
  WORKDIR/explain/step<step>_<layer>[_class<k>]/; returns that folder.

  Args:
    inputs: image files, folders (searched recursively), glob patterns or CSVs with a path
      column (images.expand_inputs).
    layer: the submodule Grad-CAM weighs (None: the backbone's default); it needs more than 2×2
      cells at input.image_size, else a warning names finer layers.
    target_class: the class to explain in every image, by name or id; None → each image's
      predicted class.

  A multi-label run (findings: `heads.get(model.head).multilabel`) explains each finding on its
  own (Grad-CAM of its logit): `target_class` names one finding, else every finding predicted
  present (probability at least metrics.PRESENT_AT) gets a panel, `<file>_<finding>.png`, and an
  image with none present gets none (a line says so). An input inside a folder named like a
  class (the training layout) shows that class as the true one. A file that cannot be read or
  breaks dataset.min_image_side / max_aspect_ratio is listed and skipped. The output folder is
  checked to be writable before anything is computed.
  """
  files = images.expand_inputs(inputs)
  model, variables, step, names = common.restore(config, workdir, checkpoint)
  target_class = _target_id(target_class, names)
  multilabel = heads.get(config.model.head).multilabel
  # The targets explained in each batch: one class (None: each image's prediction), or every
  # finding, each kept where it is present.
  each_present = multilabel and target_class is None
  targets = range(len(names)) if each_present else [target_class]
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
    shown = multihost_utils.process_allgather(pixels, tiled=True)
    rows = np.flatnonzero(batch['mask'])
    probs = None  # Every finding's, once the batch's first pass has given them.
    for k in targets:
      if each_present and probs is not None and not (probs[rows, k] >= metrics.PRESENT_AT).any():
        continue  # No image of the batch has this finding: no backward pass for it.
      target = None
      if k is not None:
        target = sharding.shard_batch(np.full(len(mine['flip']), k, np.int32), mesh)
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
      probs = result['probs']
      for row in rows if lead else ():
        if each_present and probs[row, k] < metrics.PRESENT_AT:
          continue
        path = readable[batch['index'][row]]
        one = {key: v[row] for key, v in result.items()}
        _write_panel(out_dir, stems[path], path, shown[row], one, names, layer, step, multilabel)
    if each_present and lead:
      for row in rows[(probs[rows] < metrics.PRESENT_AT).all(axis=1)]:
        print(f'{reports.printable(readable[batch["index"][row]])}: no finding present')
  if lead or not readable:  # Nothing readable fails every process.
    common.report_errors(errors, len(files))
  if lead:
    print(
      f'Explanations at {layer} (checkpoint step {step}) for {len(readable)} image(s) in '
      f'{reports.printable(out_dir)}'
    )
  return out_dir


def _write_panel(
  out_dir: str,
  stem: str,
  path: str,
  view: np.ndarray,
  one: dict[str, np.ndarray],
  names: Sequence[str],
  layer: str,
  step: int,
  multilabel: bool,
) -> None:
  """Writes one image's panel (`<stem>.png`; findings: `<stem>_<finding>.png`) and says what it
  shows."""
  target = int(one['target'])
  probs = one['probs']
  if multilabel:
    panel = explain.panel_figure(view, one, names, layer=layer, step=step, multilabel=True)
    name = names[target].replace(os.sep, '-')
    explain.write_panel(os.path.join(out_dir, f'{stem}_{name}.png'), panel)
    print(f'{reports.printable(path)}: explained {names[target]} ({probs[target]:.1%})')
    return
  panel = explain.panel_figure(
    view, one, names, layer=layer, step=step, true_label=_true_label(path, names)
  )
  explain.write_panel(os.path.join(out_dir, f'{stem}.png'), panel)
  predicted = int(probs.argmax())
  print(
    f'{reports.printable(path)}: predicted {names[predicted]} ({probs[predicted]:.1%}), '
    f'explained {names[target]}'
  )
