"""What the inference modes share: restoring a model, framing files, padded batches, errors.

Eval, predict, explain (and ImageNet top-k) restore through `restore`, read files through
`examples` (the evaluation view, so a file is framed as in eval) and batch them with
`padded_batches` (the last batch padded and masked, the batch a multiple of the device count).
"""

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from pneumo_jax import checkpoints, models, sharding
from pneumo_jax.data import dataset_for, folder_builder, images, preprocess, stored_side
from pneumo_jax.errors import ConfigError, DatasetError


class Restored(NamedTuple):
  """A checkpoint ready for inference: the model (no aux head), its variables (EMA when the run
  kept them), the checkpoint's step and the class names in output order."""

  model: Any
  variables: dict[str, Any]
  step: int
  names: list[str]


def restore(config: ml_collections.ConfigDict, workdir: str, checkpoint: str) -> Restored:
  """Loads `checkpoint` ('latest', 'best' or a step) from WORKDIR before anything else (so a
  workdir with no run is refused having written nothing), for the run's classes (its labels.txt,
  else the dataset's class folders)."""
  variables, step = checkpoints.load_for_inference(workdir, checkpoint)
  return for_classes(config, workdir, variables, step, label_names(config, workdir))


def for_classes(
  config: ml_collections.ConfigDict,
  workdir: str,
  variables: dict[str, Any],
  step: int,
  names: Sequence[str],
) -> Restored:
  """Restored variables with their inference model; refuses a checkpoint with other classes."""
  have = models.num_classes_of(config, variables['params'])
  if have != len(names):
    if differs := _model_settings_differ(config, workdir):
      raise ConfigError(
        f"checkpoint {step} in {workdir} was trained with {differs}: pass the run's model "
        'settings (WORKDIR/config.json records them), or use the config the run was trained with'
      )
    raise ConfigError(
      f'checkpoint {step} in {workdir} predicts {have} classes, but the dataset '
      f'({config.dataset.source_dir or "config.dataset"}) has {len(names)}: '
      f'{list(names)}; point --config.dataset.source_dir at the folder the run was '
      'trained on, or --workdir at a run trained on this one'
    )
  return Restored(models.build_inference_model(config, have), variables, step, list(names))


def _model_settings_differ(config: ml_collections.ConfigDict, workdir: str) -> str:
  """'model.head='ordinal' (not 'softmax')'-style text for the model fields that decide a
  checkpoint's outputs where WORKDIR/config.json records other values than `config`; '' when
  none differ or nothing was recorded."""
  recorded = (checkpoints.load_recorded_config(workdir) or {}).get('model', {})
  return ', '.join(
    f'model.{k}={recorded[k]!r} (not {config.model[k]!r})'
    for k in ('name', 'head')
    if k in recorded and k in config.model and recorded[k] != config.model[k]
  )


def label_names(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The run's class names (WORKDIR/labels.txt), else the dataset's: a trained run predicts
  without its training folder."""
  return checkpoints.load_label_names(workdir) or folder_builder.label_names(
    dataset_for(config, workdir)
  )


def global_batch(config: ml_collections.ConfigDict) -> int:
  """input.eval_batch_size rounded up to a multiple of the device count."""
  return sharding.round_up(config.input.eval_batch_size)


def view(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The preprocessing settings that decide what the model sees (part of a report's provenance)."""
  return {
    'image_size': config.input.image_size,
    'stored_size': stored_side(config),
    'central_crop_fraction': preprocess.eval_central_fraction(config.input),
  }


def example(path: str, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """A file as the model sees it in evaluation: stored as the builder stores it
  (images.load_stored at the run's stored size, grey window and suspect rule), with the
  evaluation view (preprocess.eval_central_fraction). Grey files are repeated to 3 channels (the
  device's augmentation does the same to grey records), so files of both kinds batch together.

  Raises:
    DatasetError: the file cannot be read, or breaks the suspect rule; names it.
  """
  side = stored_side(config)
  window = images.GreyWindow.from_config(config.dataset)
  suspect = images.SuspectRule.from_config(config.dataset)
  image = images.load_stored(path, side, window=window, suspect=suspect)
  return {
    'image': np.broadcast_to(image, (side, side, 3)),
    **preprocess.central_view(side, side, preprocess.eval_central_fraction(config.input)),
  }


def examples(
  files: Sequence[str],
  config: ml_collections.ConfigDict,
  errors: dict[str, str],
  readable: list[str],
  flips: bool = False,
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """(`example`, index in `readable`) for each file that can be read.

  As the examples are consumed, unreadable files go to `errors` (path → message) and the others
  to `readable`. With `flips`, each image is followed by its left-right mirror image.
  """
  for path in files:
    try:
      one = example(path, config)
    except DatasetError as e:
      errors[path] = str(e)
      continue
    readable.append(path)
    yield one, len(readable) - 1
    if flips:
      yield {**one, 'flip': np.True_}, len(readable) - 1


def padded_batches(
  examples: Iterator[tuple[dict[str, np.ndarray], int]], batch: int
) -> Iterator[dict[str, np.ndarray]]:
  """Full batches of the examples' fields plus 'index' and 'mask'; the last one padded with
  copies of its first example, masked."""
  while chunk := list(itertools.islice(examples, batch)):
    pad = batch - len(chunk)
    rows = [x for x, _ in chunk] + [chunk[0][0]] * pad
    yield {
      **{k: np.stack([r[k] for r in rows]) for k in rows[0]},
      'index': np.asarray([i for _, i in chunk] + [-1] * pad, np.int32),
      'mask': np.arange(batch) < len(chunk),
    }


def report_errors(errors: dict[str, str], total: int) -> None:
  """Lists unreadable inputs; fails (nothing written yet) when none of the inputs was readable."""
  if not errors:
    return
  listing = '\n'.join(f'  {message}' for message in errors.values())
  if len(errors) == total:
    raise DatasetError(f'none of the {total} input(s) could be read:\n{listing}')
  print(f'{len(errors)} of {total} input(s) unreadable, skipped:\n{listing}')
