"""main.py's eval, predict and explain modes: restore a checkpoint, run it, write under WORKDIR.

All three run jitted on every device (batches padded to a multiple of the device count), on the
EMA weights when the run kept them. Class names come from the run's dataset (the class
subfolders), so a checkpoint and a dataset with different numbers of classes are refused.
"""

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from pneumo_jax import checkpoints, sharding
from pneumo_jax.data import dataset_for, folder_builder, images, pipeline, preprocess
from pneumo_jax.errors import ConfigError, DatasetError
from pneumo_jax.evaluation import explain, inference, metrics, reports
from pneumo_jax.models import build_model

PREDICTIONS_DIR = 'predictions'
EXPLAIN_DIR = 'explain'


def _model_for(config: ml_collections.ConfigDict, workdir: str, variables: dict[str, Any],
               step: int, label_names: Sequence[str]) -> Any:
  """The inference model for restored `variables`; refuses a checkpoint with other classes.

  The aux head is not built (inference ignores it).
  """
  have = np.shape(variables['params']['Logits']['Conv2d_1c_1x1']['biases'])[-1]
  if have != len(label_names):
    raise ConfigError(
        f'checkpoint {step} in {workdir} predicts {have} classes, but the dataset '
        f'({config.dataset.source_dir or "config.dataset"}) has {len(label_names)}: '
        f'{list(label_names)}; point --config.dataset.source_dir at the folder the run was '
        'trained on, or --workdir at a run trained on this one')
  return build_model(config, have, create_aux_logits=False)


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
  _predictions.csv} (see reports) and prints the metrics table. Returns the metrics.

  The checkpoint is found before the dataset is built, so a workdir without a run is refused
  before anything is written.
  """
  variables, step = checkpoints.load_for_inference(workdir, checkpoint)
  builder = dataset_for(config, workdir)
  names = folder_builder.label_names(builder)
  folder_builder.split_labels(builder, split)  # A missing split fails here, naming the fix.
  model = _model_for(config, workdir, variables, step, names)
  input_cfg = ml_collections.ConfigDict(config.input.to_dict())
  input_cfg.eval_batch_size = _global_batch(config)
  batches = pipeline.eval_batches(builder, split, input_cfg, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  out = inference.predict(model, variables, batches)
  result = metrics.compute(out['label'], out['probs'], names)
  if jax.process_index() == 0:
    files = list(np.asarray(folder_builder.split_filenames(builder, split))[out['index']])
    provenance = {'split': split, 'step': step, 'dataset': str(builder.data_dir),
                  **_view(config)}
    path = reports.write_eval(
        workdir, split, step, result, names, out['label'], out['probs'], provenance,
        write_extra=lambda stem: reports.write_predictions(
            f'{stem}_predictions.csv', files, out['probs'], names, {},
            true_labels=[names[i] for i in out['label']]))
    print(f'{split} split, checkpoint step {step} ({len(files)} images); report in {path}')
    print(metrics.format_table(result, names))
  return result


def _view(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The preprocessing settings that decide what the model sees (part of a report's provenance)."""
  return {'image_size': config.input.image_size,
          'central_crop_fraction': preprocess.eval_central_fraction(config.input)}


def _examples(files: Sequence[str], config: ml_collections.ConfigDict, errors: dict[str, str],
              readable: list[str], flips: bool = False) -> Iterator[tuple[np.ndarray, int]]:
  """(eval-preprocessed image, index in `readable`) for each file that can be read.

  As the examples are consumed, unreadable files go to `errors` (path → message) and the others
  to `readable`. With `flips`, each image is followed by its left-right mirror image. The view is
  the evaluation pipeline's (preprocess.eval_central_fraction), so a file is framed as in eval.
  """
  fraction = preprocess.eval_central_fraction(config.input)
  for path in files:
    try:
      image = preprocess.eval(images.load_image(path), config.input.image_size,
                              central_fraction=fraction)
    except DatasetError as e:
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


def _report_errors(errors: dict[str, str], total: int) -> None:
  """Lists unreadable inputs; fails (nothing written yet) when none of the inputs was readable."""
  if not errors:
    return
  listing = '\n'.join(f'  {message}' for message in errors.values())
  if len(errors) == total:
    raise DatasetError(f'none of the {total} input(s) could be read:\n{listing}')
  print(f'{len(errors)} of {total} input(s) unreadable, skipped:\n{listing}')


def run_predict(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], *,
                checkpoint: str = 'latest', tta: bool = False) -> str:
  """Classifies image files; writes WORKDIR/predictions/step<step>[_tta].csv and returns its path.

  Args:
    inputs: image files, folders (searched recursively) or glob patterns; each must exist or
      match (else NotFoundError, before anything is written).
    tta: average the probabilities with those of the left-right mirrored image.

  One CSV row per input (see reports.write_predictions); a file that cannot be read is listed
  and gets its error in its row, unless no input at all can be read (an error, nothing written).
  The CSV's provenance (inputs, checkpoint, view) sits in the `.json` beside it; predictions made
  with other inputs or settings get a new name (`..._2.csv`) instead of replacing it.
  Runs in one process, on all its devices.
  """
  files = images.expand_inputs(inputs)
  variables, step = checkpoints.load_for_inference(workdir, checkpoint)
  names = _label_names(config, workdir)
  model = _model_for(config, workdir, variables, step, names)
  errors: dict[str, str] = {}
  readable: list[str] = []
  batches = _padded_batches(_examples(files, config, errors, readable, flips=tta),
                            _global_batch(config))
  first = next(batches, None)
  if first is None:  # Nothing readable: this raises, before anything is written.
    _report_errors(errors, len(files))
  out = inference.predict(model, variables, itertools.chain([first], batches))
  probs = np.zeros((len(readable), len(names)))
  np.add.at(probs, out['index'], out['probs'])
  probs /= np.bincount(out['index'], minlength=len(readable))[:, None]
  provenance = {'step': step, 'tta': tta, **_view(config), 'num_inputs': len(files),
                'inputs_sha256': hashlib.sha256(json.dumps(
                    [os.path.abspath(f) for f in files]).encode()).hexdigest()}
  stem = reports.claim_stem(
      os.path.join(workdir, PREDICTIONS_DIR, f'step{step}{"_tta" if tta else ""}'), provenance)
  path = reports.write_predictions(f'{stem}.csv', files, probs, names, errors)
  reports.write_json(f'{stem}.json', {'provenance': provenance, 'csv': os.path.basename(path)})
  print(f'Predicted {len(readable)} image(s) with checkpoint step {step}'
        f'{" (flip TTA)" if tta else ""}: {path}')
  _report_errors(errors, len(files))
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


def _true_label(path: str, names: Sequence[str]) -> int | None:
  """The class of a file inside a class folder (its nearest ancestor named like a class)."""
  for part in reversed(os.path.normpath(os.path.abspath(path)).split(os.sep)[:-1]):
    if part in names:
      return list(names).index(part)
  return None


def run_explain(config: ml_collections.ConfigDict, workdir: str, inputs: Sequence[str], *,
                checkpoint: str = 'latest', layer: str = explain.DEFAULT_LAYER,
                target_class: int | None = None) -> str:
  """Writes one annotated panel per input (see explain.write_panel) under
  WORKDIR/explain/step<step>_<layer>[_class<k>]/; returns that folder.

  Args:
    inputs: image files, folders (searched recursively) or glob patterns.
    layer: the submodule Grad-CAM weighs; it needs more than 2×2 cells at input.image_size
      (Mixed_7c does from about 139 px; use Mixed_6e or Mixed_5d below that): a warning says so.
    target_class: class id to explain in every image; None → each image's predicted class.

  An input inside a folder named like a class (the training layout) shows that class as the
  true one.
  """
  files = images.expand_inputs(inputs)
  variables, step = checkpoints.load_for_inference(workdir, checkpoint)
  names = _label_names(config, workdir)
  if target_class is not None and not 0 <= target_class < len(names):
    raise ConfigError(f'--target_class={target_class} is not a class id; use '
                      f'0..{len(names) - 1} for {names}')
  model = _model_for(config, workdir, variables, step, names)
  size = config.input.image_size
  warning = explain.grid_warning(layer, explain.layer_grid(model, variables, size, layer), size)
  if warning:
    print(f'Warning: {warning}')
  mesh = sharding.make_mesh()
  variables = sharding.replicate(variables, mesh)
  target = '' if target_class is None else f'_class{target_class}'
  out_dir = os.path.join(workdir, EXPLAIN_DIR, f'step{step}_{layer.replace("/", "-")}{target}')
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
      explain.write_panel(os.path.join(out_dir, f'{stems[path]}.png'), batch['image'][row], one,
                          names, layer=layer, step=step, true_label=_true_label(path, names))
      predicted = int(one['probs'].argmax())
      print(f'{path}: predicted {names[predicted]} ({one["probs"][predicted]:.1%}), '
            f'explained {names[int(one["target"])]}')
  _report_errors(errors, len(files))
  print(f'Explanations at {layer} (checkpoint step {step}) for {len(readable)} image(s) in '
        f'{out_dir}')
  return out_dir
