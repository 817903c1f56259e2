"""main.py's eval, predict and explain modes: restore a checkpoint, run it, write under WORKDIR.

All three run jitted on every device (batches padded to a multiple of the device count), on the
EMA weights when the run kept them. Class names come from the run's dataset (the class
subfolders), so a checkpoint and a dataset with different numbers of classes are refused.
"""

import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from pneumo_jax import checkpoints, sharding
from pneumo_jax.data import dataset_for, folder_builder, images, pipeline, preprocess
from pneumo_jax.evaluation import explain, inference, metrics, reports
from pneumo_jax.models import build_model

PREDICTIONS_FILE = 'predictions.csv'
EXPLAIN_DIR = 'explain'


def _restore(config: ml_collections.ConfigDict, workdir: str, checkpoint: str,
             label_names: Sequence[str]) -> tuple[Any, dict[str, Any], int]:
  """(model, variables, step) for inference; the aux head is not built (inference ignores it)."""
  variables, step = checkpoints.load_for_inference(workdir, checkpoint)
  have = np.shape(variables['params']['Logits']['Conv2d_1c_1x1']['biases'])[-1]
  if have != len(label_names):
    raise ValueError(
        f'checkpoint {step} in {workdir} predicts {have} classes, but the dataset '
        f'({config.dataset.source_dir or "config.dataset"}) has {len(label_names)}: '
        f'{list(label_names)}; point --config.dataset.source_dir at the folder the run was '
        'trained on, or --workdir at a run trained on this one')
  return build_model(config, have, create_aux_logits=False), variables, step


def _label_names(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The run's class names (WORKDIR/labels.txt), else the dataset's: a trained run predicts
  without its training folder."""
  return (checkpoints.load_label_names(workdir)
          or folder_builder.label_names(dataset_for(config, workdir)))


def _global_batch(config: ml_collections.ConfigDict) -> int:
  """input.eval_batch_size rounded up to a multiple of the device count."""
  n = jax.device_count()
  return -(-config.input.eval_batch_size // n) * n


def run_eval(config: ml_collections.ConfigDict, workdir: str, *, split: str = 'validation',
             checkpoint: str = 'latest') -> dict[str, Any]:
  """Evaluates a checkpoint on a split; writes WORKDIR/eval/<split>_<step>{.json,_*.png,
  _predictions.csv} (see reports) and prints the metrics table. Returns the metrics."""
  builder = dataset_for(config, workdir)
  names = folder_builder.label_names(builder)
  model, variables, step = _restore(config, workdir, checkpoint, names)
  input_cfg = ml_collections.ConfigDict(config.input.to_dict())
  input_cfg.eval_batch_size = _global_batch(config)
  batches = pipeline.eval_batches(builder, split, input_cfg, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  out = inference.predict(model, variables, batches)
  result = metrics.compute(out['label'], out['probs'], names)
  if jax.process_index() == 0:
    path = reports.write_eval(workdir, split, step, result, names, out['label'], out['probs'])
    files = np.asarray(folder_builder.split_filenames(builder, split))[out['index']]
    reports.write_predictions(f'{reports.eval_stem(workdir, split, step)}_predictions.csv',
                              list(files), out['probs'], names, {},
                              true_labels=[names[i] for i in out['label']])
    print(f'{split} split, checkpoint step {step} ({len(files)} images); report in {path}')
    print(metrics.format_table(result, names))
  return result


def _examples(files: Sequence[str], config: ml_collections.ConfigDict, errors: dict[str, str],
              readable: list[str], flips: bool = False) -> Iterator[tuple[np.ndarray, int]]:
  """(eval-preprocessed image, index in `readable`) for each file that can be read.

  As the examples are consumed, unreadable files go to `errors` (path → message) and the others
  to `readable`. With `flips`, each image is followed by its left-right mirror image.
  """
  for path in files:
    try:
      image = preprocess.eval(images.load_image(path), config.input.image_size,
                              central_fraction=config.input.central_crop_fraction)
    except (ValueError, OSError) as e:
      errors[path] = str(e)
      continue
    readable.append(path)
    yield image, len(readable) - 1
    if flips:
      yield image[:, ::-1], len(readable) - 1


def _padded_batches(examples: Iterator[tuple[np.ndarray, int]],
                    batch: int) -> Iterator[dict[str, np.ndarray]]:
  """Full batches {'image', 'index', 'mask'}; the last one padded with masked zero images."""
  while chunk := list(itertools.islice(examples, batch)):
    pad = batch - len(chunk)
    yield {'image': np.stack([x for x, _ in chunk] + [np.zeros_like(chunk[0][0])] * pad),
           'index': np.asarray([i for _, i in chunk] + [-1] * pad, np.int32),
           'mask': np.arange(batch) < len(chunk)}


def _report_errors(errors: dict[str, str]) -> None:
  if errors:
    print(f'{len(errors)} unreadable input(s), skipped:')
    for path, message in errors.items():
      print(f'  {path}: {message}')


def run_predict(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], *,
                checkpoint: str = 'latest', tta: bool = False) -> str:
  """Classifies image files; writes WORKDIR/predictions.csv and returns its path.

  Args:
    inputs: image files, folders (searched recursively) or glob patterns.
    tta: average the probabilities with those of the left-right mirrored image.

  One CSV row per input (see reports.write_predictions); a file that cannot be read gets its
  error in the row instead of failing the run. Runs in one process, on all its devices.
  """
  files = images.expand_inputs(inputs)
  names = _label_names(config, workdir)
  model, variables, step = _restore(config, workdir, checkpoint, names)
  errors: dict[str, str] = {}
  readable: list[str] = []
  batches = _padded_batches(_examples(files, config, errors, readable, flips=tta),
                            _global_batch(config))
  first = next(batches, None)
  probs = np.zeros((0, len(names)))
  if first is not None:
    out = inference.predict(model, variables, itertools.chain([first], batches))
    probs = np.zeros((len(readable), len(names)))
    np.add.at(probs, out['index'], out['probs'])
    probs /= np.bincount(out['index'], minlength=len(readable))[:, None]
  path = reports.write_predictions(os.path.join(workdir, PREDICTIONS_FILE), files, probs, names,
                                   errors)
  print(f'Predicted {len(readable)} image(s) with checkpoint step {step}'
        f'{" (flip TTA)" if tta else ""}: {path}')
  _report_errors(errors)
  return path


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


def run_explain(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], *,
                checkpoint: str = 'latest', layer: str = explain.DEFAULT_LAYER,
                target_class: int | None = None) -> str:
  """Writes Grad-CAM, guided backprop and guided Grad-CAM PNGs (see explain.write) for each
  input under WORKDIR/explain/; returns that folder.

  Args:
    inputs: image files, folders (searched recursively) or glob patterns.
    layer: the submodule Grad-CAM weighs; it needs more than 1×1 cells at input.image_size
      (Mixed_7c does from about 107 px; use Mixed_6e or Mixed_5d below that).
    target_class: class id to explain in every image; None → each image's predicted class.
  """
  files = images.expand_inputs(inputs)
  names = _label_names(config, workdir)
  if target_class is not None and not 0 <= target_class < len(names):
    raise ValueError(f'--target_class={target_class} is not a class id; use 0..{len(names) - 1} '
                     f'for {names}')
  model, variables, step = _restore(config, workdir, checkpoint, names)
  mesh = sharding.make_mesh()
  variables = sharding.replicate(variables, mesh)
  out_dir = os.path.join(workdir, EXPLAIN_DIR)
  stems = _output_names(files)
  errors: dict[str, str] = {}
  readable: list[str] = []
  for batch in _padded_batches(_examples(files, config, errors, readable), _global_batch(config)):
    arrays = {'image': batch['image']}
    if target_class is not None:
      arrays['target'] = np.full(len(batch['image']), target_class, np.int32)
    arrays = sharding.shard_batch(arrays, mesh)
    result = jax.device_get(
        explain.explain(model, variables, arrays['image'], arrays.get('target'), layer=layer))
    for row in np.flatnonzero(batch['mask']):
      path = readable[batch['index'][row]]
      one = {k: v[row] for k, v in result.items()}
      explain.write(out_dir, stems[path], path, batch['image'][row], one, names)
      predicted = int(one['probs'].argmax())
      print(f'{path}: predicted {names[predicted]} ({one["probs"][predicted]:.1%}), '
            f'explained {names[int(one["target"])]}')
  print(f'Explanations at {layer} (checkpoint step {step}) for {len(readable)} image(s) in '
        f'{out_dir}')
  _report_errors(errors)
  return out_dir
