"""--mode eval: metrics and reports of a checkpoint on a split of a labelled source: the run's own
dataset, or an external one (another source_dir or labels_csv), scored whole with `--split all`.

A multi-label run (`heads.get(model.head).multilabel`: findings) is scored per finding over its
used labels (metrics.compute_findings): the report is keyed by finding name, the ROC figure has a
curve per finding, the temperature and operating points are per finding, and the per-image CSV
has a probability and a `label_<finding>` column per finding.
"""

import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

import pneumo_jax
from pneumo_jax import checkpoints, heads, models, sharding
from pneumo_jax.data import augment, dataset_for, folder_builder, images, pipeline, preprocess
from pneumo_jax.errors import ConfigError, DatasetError
from pneumo_jax.evaluation import (
  calibration,
  explain,
  html_report,
  inference,
  metrics,
  model_card,
  operating_points,
  reports,
)
from pneumo_jax.modes import common

NAME = 'eval'
HELP = 'metrics and reports of a checkpoint on a split (all: a whole labelled source)'
FLAGS = ('split', 'checkpoint')
NEEDS_WORKDIR = True

ALL = folder_builder.WHOLE  # --split value: every image of the source (a whole build).
# folder_builder.COLUMNS that name an image outside this tool → the per-image CSV's columns.
_IDENTIFIERS = {'patient_ids': 'patient_id', 'study_uids': 'study_uid', 'sop_uids': 'sop_uid'}
CALIBRATION, OPERATING_POINTS = 'calibration', 'operating_points'  # The report's added keys.


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  split: str = 'validation',
  checkpoint: str = 'latest',
) -> dict[str, Any]:
  """Evaluates a checkpoint on a split; writes WORKDIR/eval/<split>_<step>{.json,.html,_*.png,
  _predictions.csv,_model_card.md} (see reports, html_report) and prints the metrics table.
  Returns the metrics (metrics.compute's of the model's probabilities, with
  metrics.bootstrap_ci's under model_card.INTERVALS, and, when the run has a validation split,
  CALIBRATION and OPERATING_POINTS).

  Calibration (see `_calibration`): the temperature and operating points of this checkpoint
  step are fitted on the run's validation split and kept in WORKDIR/calibration.json; an
  evaluation of the validation split refits them, any other split or source uses the kept ones
  (fitting them first from validation predictions when there are none). The calibration record
  compares ECE, Brier score and NLL before and after the temperature; the operating points are
  measured on the temperature-scaled probabilities, as predict writes them.

  The source is the run's own when it is the one WORKDIR/config.json records (or no config was
  recorded). Another source is external: its files are named `<source>_<split>_<step>…`, its
  classes must all be the run's (WORKDIR/labels.txt; a class it lacks is scored as absent),
  and a split-based evaluation says which of its images it scores (`--split all` scores every
  one). WORKDIR/model_card.md, one fixed place for "the card of this run", is replaced by the
  latest evaluation of the run's own source only; each report keeps its own card beside it.
  The checkpoint is found before the dataset is built, so a workdir without a run is refused
  before anything is written, and the output folders are checked to be writable before any
  build or inference.
  """
  variables, step = checkpoints.load_for_inference(workdir, checkpoint)
  own = _is_run_source(config, workdir)
  lead = jax.process_index() == 0
  if lead:
    reports.check_writable(
      os.path.join(workdir, 'eval'), 'the evaluation reports folder', create=False
    )
    kept = [calibration.CALIBRATION_FILE] + ([model_card.CARD_FILE] if own else [])
    reports.check_writable(workdir, f'WORKDIR (for {" and ".join(kept)})', create=False)
  builder = dataset_for(config, workdir, whole=split == ALL)
  folder_builder.split_labels(builder, split)  # A missing split fails here, naming the fix.
  source = _source_of(builder)
  _check_task(config, builder, source)
  names = checkpoints.load_label_names(workdir) or folder_builder.label_names(builder)
  to_run = _class_map(folder_builder.label_names(builder), names, source)
  absent = [n for i, n in enumerate(names) if i not in to_run]
  restored = common.for_classes(config, workdir, variables, step, names)
  if not own and split != ALL and lead:
    _say_which_images(builder, split, source)
  out = _predictions(config, builder, split, restored)
  labels = _run_labels(out['label'], to_run, len(names))
  result = {
    **metrics.compute(labels, out['probs'], names),
    model_card.INTERVALS: metrics.bootstrap_ci(labels, out['probs'], names),
  }
  entry = _calibration(config, workdir, split, step, own, restored, labels, out['probs'])
  if entry is not None:
    result[CALIBRATION] = calibration.report(labels, out['probs'], entry, names)
    result[OPERATING_POINTS] = {
      'chosen_on': entry['fitted_on'],
      'step': step,
      'predict_decides_at': operating_points.decision_point(config),
      'rows': operating_points.evaluate(
        labels,
        calibration.scaled(out['probs'], entry['temperature']),
        names,
        entry[OPERATING_POINTS],
      ),
    }
  worst = _confident_errors(config, restored, builder, split, labels, out)
  if lead:
    _write(
      config, workdir, builder, split, step, checkpoint, result, labels, out, own, absent, worst
    )
  return result


def _calibration(
  config: ml_collections.ConfigDict,
  workdir: str,
  split: str,
  step: int,
  own: bool,
  restored: common.Restored,
  labels: np.ndarray,
  probs: np.ndarray,
) -> dict[str, Any] | None:
  """The calibration entry of checkpoint `step` (calibration.fit's, with the operating points
  chosen on the temperature-scaled probabilities): fitted on these predictions when they are the
  run's validation split, else the one WORKDIR/calibration.json keeps, else fitted on the run's
  validation split, predicted now. Kept (process 0 writes) whenever fitted. None when the run
  has no validation split to fit on."""
  if not (own and split == 'validation'):
    entry = calibration.load(workdir, step)
    if entry is not None:
      return entry
    try:
      labels, probs = _validation_predictions(config, workdir, own, restored)
    except DatasetError as e:
      logging.warning('no calibration for step %d: %s', step, e)
      return None
  entry = calibration.fit(labels, probs, restored.names)
  entry[OPERATING_POINTS] = operating_points.choose(
    labels, calibration.scaled(probs, entry['temperature']), restored.names
  )
  if jax.process_index() == 0:
    calibration.save(workdir, step, entry)
  return entry


def _validation_predictions(
  config: ml_collections.ConfigDict, workdir: str, own: bool, restored: common.Restored
) -> tuple[np.ndarray, np.ndarray]:
  """(labels as the run's class ids, probabilities) of the run's own validation split: its
  source as WORKDIR/config.json records it when `config` reads another."""
  run_config = config if own else _recorded_config(config, workdir)
  builder = dataset_for(run_config, workdir)
  folder_builder.split_labels(builder, calibration.FITTED_ON)  # Missing: DatasetError.
  to_run = _class_map(folder_builder.label_names(builder), restored.names, _source_of(builder))
  out = _predictions(run_config, builder, calibration.FITTED_ON, restored)
  return _run_labels(out['label'], to_run, len(restored.names)), out['probs']


def _run_labels(labels: np.ndarray, to_run: np.ndarray, num_names: int) -> np.ndarray:
  """A source's labels in the run's terms (`_class_map`'s `to_run`): class ids [N] mapped, or
  findings [N, F_source] moved to the run's columns [N, num_names], a finding the source lacks
  ignored (-1)."""
  if labels.ndim == 1:
    return to_run[labels]
  out = np.full((len(labels), num_names), -1, labels.dtype)
  out[:, to_run] = labels
  return out


def _predictions(
  config: ml_collections.ConfigDict,
  builder: tfds.core.DatasetBuilder,
  split: str,
  restored: common.Restored,
) -> dict[str, np.ndarray]:
  """inference.predict over every record of `split` with the evaluation view."""
  input_cfg = ml_collections.ConfigDict(config.input.to_dict())
  input_cfg.eval_batch_size = common.global_batch(config)
  batches = pipeline.eval_batches(
    builder, split, input_cfg, process_index=jax.process_index(), process_count=jax.process_count()
  )
  return inference.predict(
    restored.model, restored.variables, batches, image_size=config.input.image_size
  )


def _recorded_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`config` with the dataset settings WORKDIR/config.json records (the run's own source), each
  of the type the field has (JSON turned tuples into lists), so that the run's build is found
  again rather than rebuilt."""
  recorded = checkpoints.load_recorded_config(workdir)['dataset']
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in recorded.items():
    if key in out.dataset:
      was_tuple = isinstance(out.dataset[key], tuple) and isinstance(value, list)
      out.dataset[key] = tuple(value) if was_tuple else value
  return out


@functools.cache
def _gradcam_layer(model: Any, layers: tuple[str, ...], size: int) -> str:
  """The last of the backbone's Grad-CAM `layers` (its default), or when that is at most a 2×2
  grid at this input size (a uniform map) the latest earlier one with a finer grid. The grids are
  the shapes of the model's end points, traced once per model and size (jax.eval_shape: nothing
  is computed or compiled)."""
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0][1], image
  )
  for layer in reversed(layers):
    if layer in shapes and max(shapes[layer].shape[1:3]) > 2:
      return layer
  return layers[-1]


def _confident_errors(
  config: ml_collections.ConfigDict,
  restored: common.Restored,
  builder: tfds.core.DatasetBuilder,
  split: str,
  labels: np.ndarray,
  out: dict[str, np.ndarray],
) -> tuple[str, list[html_report.Error]]:
  """(Grad-CAM layer, the misclassified images the model was surest of (up to
  html_report.MAX_ERRORS), each with its Grad-CAM overlay for the predicted class; for findings
  the wrong (film, finding) calls at metrics.PRESENT_AT, with the finding's Grad-CAM). Every
  process computes its share; all return the same."""
  probs = out['probs']
  multilabel = labels.ndim == 2
  if multilabel:
    called = probs >= metrics.PRESENT_AT
    films, findings = np.nonzero((labels >= 0) & (called != (labels == 1)))
    confidence = np.where(called, probs, 1 - probs)[films, findings]
    worst = np.argsort(-confidence, kind='stable')[: html_report.MAX_ERRORS]
    rows, targets = films[worst], findings[worst]
  else:
    wrong = np.flatnonzero(probs.argmax(axis=-1) != labels)
    rows = wrong[np.argsort(-probs[wrong].max(axis=-1), kind='stable')][: html_report.MAX_ERRORS]
    targets = probs[rows].argmax(axis=-1)
  size = config.input.image_size
  backbone = models.backbone_of(config)
  if not len(rows):
    return backbone.default_gradcam_layer, []
  layer = _gradcam_layer(restored.model, backbone.gradcam_layers, size)
  source = builder.as_data_source(split)
  side = pipeline.side(builder, config.input)
  view = preprocess.central_view(side, side, preprocess.eval_central_fraction(config.input))

  def examples():
    for k, (row, target) in enumerate(zip(rows, targets, strict=True)):
      image = images.fit(source[int(out['index'][row])]['image'], side)
      yield {'image': np.broadcast_to(image, (side, side, 3)), **view, 'target': target}, k

  mesh = sharding.make_mesh()
  variables = sharding.replicate(restored.variables, mesh)
  shown, cams = [], []
  # At most the errors shown per batch: Grad-CAM and guided backprop cost a backward pass each.
  batch_size = min(common.global_batch(config), sharding.round_up(html_report.MAX_ERRORS))
  for batch in common.padded_batches(examples(), batch_size):
    mine = {k: sharding.own_rows(batch[k]) for k in ('image', 'box', 'flip', 'colour')}
    pixels = augment.from_batch(sharding.shard_batch(mine, mesh), size)
    # A single-label error shows the predicted class, which explain picks itself.
    target = sharding.shard_batch(sharding.own_rows(batch['target']), mesh) if multilabel else None
    result = explain.explain(
      restored.model,
      variables,
      pixels,
      target,
      layer=layer,
      cells=backbone.cell_centres.get(layer),
    )
    keep = batch['mask']
    cams.append(multihost_utils.process_allgather(result['grad_cam'], tiled=True)[keep])
    shown.append(multihost_utils.process_allgather(pixels, tiled=True)[keep])
  every = folder_builder.split_filenames(builder, split)
  names = restored.names

  def error(row: int, target: int, shown: np.ndarray, cam: np.ndarray) -> html_report.Error:
    if multilabel:
      p, name = float(probs[row, target]), names[target]
      present = p >= metrics.PRESENT_AT
      true = f'{name} {"present" if labels[row, target] == 1 else "absent"}'
      predicted, confidence = f'{name} {"present" if present else "absent"}', max(p, 1 - p)
    else:
      true, predicted = names[int(labels[row])], names[target]
      confidence = float(probs[row].max())
    return html_report.Error(
      file=every[int(out['index'][row])],
      true=true,
      predicted=predicted,
      confidence=confidence,
      png=html_report.overlay_png(shown, cam),
    )

  return layer, [
    error(row, int(target), view_, cam)
    for row, target, view_, cam in zip(
      rows, targets, np.concatenate(shown), np.concatenate(cams), strict=True
    )
  ]


def _write(
  config: ml_collections.ConfigDict,
  workdir: str,
  builder: tfds.core.DatasetBuilder,
  split: str,
  step: int,
  checkpoint: str,
  result: dict[str, Any],
  labels: np.ndarray,
  out: dict[str, np.ndarray],
  own: bool,
  absent: Sequence[str],
  worst: tuple[str, Sequence[html_report.Error]],
) -> None:
  """The report, its per-image CSV, reliability diagram, model card (WORKDIR/model_card.md too
  when `own`) and HTML page (with `worst`: `_confident_errors`' layer and images)."""
  names = _names(result)
  rows = out['index']
  every = folder_builder.split_filenames(builder, split)
  files = [every[i] for i in rows]
  ids = {}
  for column, header in _IDENTIFIERS.items():
    values = folder_builder.split_column(builder, split, column)
    if any(values):
      for file, i in zip(files, rows, strict=True):
        ids.setdefault(file, {})[header] = values[i]
  source = _source_of(builder)
  provenance = {
    'split': split,
    'step': step,
    'dataset': str(builder.data_dir),
    **common.view(config),
    'pneumo_jax_version': pneumo_jax.__version__,
  }
  if not own:  # An external source: its name in the report, and the run's classes it lacks.
    provenance.update(source=source, absent_classes=list(absent))
  path = reports.write_eval(
    workdir,
    split,
    step,
    result,
    names,
    labels,
    out['probs'],
    provenance,
    write_extra=lambda stem: _write_extra(stem, split, step, result, labels, out, files, ids),
    source='' if own else _slug(source),
  )
  stem = path.removesuffix('.json')
  with open(path) as f:  # The card and page are rendered from the report as written.
    record = json.load(f)
  data = model_card.data_of(builder)
  card = model_card.render(config, data, record, checkpoint=checkpoint, report_path=path)
  model_card.write(f'{stem}_model_card.md', card)
  if own:
    model_card.write(os.path.join(workdir, model_card.CARD_FILE), card)
  figures = {
    kind: f'{stem}_{kind}.png'
    for kind in ('confusion_matrix', 'roc', 'reliability')
    if os.path.exists(f'{stem}_{kind}.png')
  }
  of = '' if own else f' of {reports.printable(source)}'
  page = html_report.write(
    f'{stem}.html',
    html_report.render(
      record,
      recipe=model_card.recipe_rows(config, record, checkpoint),
      limits=model_card.limit_facts(config, data, record, checkpoint),
      figures=figures,
      errors=worst[1],
      gradcam_layer=worst[0],
      title=f'Evaluation of {config.model.name} at step {step}: {record["split"]} split{of}',
      json_path=path,
      version=pneumo_jax.__version__,
    ),
  )
  print(f'{split} split{of}, checkpoint step {step} ({len(files)} images); report in {path}')
  if absent:
    print(f'No image of class(es) {", ".join(absent)} in {reports.printable(source)}')
  _print_results(result, names)
  print(f'HTML report: {reports.printable(page)}')
  if own:
    print(f'model card: {os.path.join(workdir, model_card.CARD_FILE)}')
  else:
    print(f"model card: {stem}_model_card.md (the run's own is unchanged)")


def _print_results(result: dict[str, Any], names: Sequence[str]) -> None:
  """The metrics table, and the calibration before and after when there is one."""
  print(metrics.format_table(result, names))
  if CALIBRATION in result:
    c = result[CALIBRATION]
    print(
      f'calibration: {calibration.temperature_text(c["temperature"])} (fitted on '
      f'{c["fitted_on"]}); '
      + ', '.join(
        f'{k} {c["before"][k]:.4f} → {c["after"][k]:.4f}' for k in ('ece', 'brier', 'nll')
      )
    )


def _write_extra(
  stem: str,
  split: str,
  step: int,
  result: dict[str, Any],
  labels: np.ndarray,
  out: dict[str, np.ndarray],
  files: Sequence[str],
  ids: dict[str, dict[str, str]],
) -> None:
  """The per-image CSV and, when calibrated, the reliability diagram, under `stem`."""
  names = _names(result)
  multilabel = labels.ndim == 2
  reports.write_predictions(
    f'{stem}_predictions.csv',
    files,
    out['probs'],
    names,
    {},
    true_labels=labels if multilabel else [names[i] for i in labels],
    identifiers=ids,
    multilabel=multilabel,
  )
  if CALIBRATION in result:
    scaled = calibration.scaled(out['probs'], result[CALIBRATION]['temperature'])
    reports.plot_reliability(
      f'{stem}_reliability.png',
      {
        f'{name} T = {t:.2f}' if np.ndim(t) == 0 else f'{name}, a T per finding': (
          calibration.reliability(labels, p),
          calibration.ece(labels, p),
        )
        for name, t, p in (
          ('before', 1.0, out['probs']),
          ('after', result[CALIBRATION]['temperature'], scaled),
        )
      },
      calibration.ECE_BINS,
      f'{split}, step {step}',
    )


def _names(result: dict[str, Any]) -> list[str]:
  """The class (finding) names of a metrics.compute result, in order."""
  return list(result['per_finding'] if 'per_finding' in result else result['per_class'])


def _source_of(builder: tfds.core.DatasetBuilder) -> str:
  """The source a build read: its label file, else its folder."""
  metadata = builder.info.metadata
  return metadata.get('labels_csv') or metadata['source_dir']


def _slug(source: str) -> str:
  """A file-name stem naming a source (its base name, without a label file's extension)."""
  name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
  return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_') or 'source'


def _source_in(dataset: dict[str, Any], workdir: str) -> str:
  """The real path of the source a dataset config reads (as `dataset_for` resolves it)."""
  if dataset.get('labels_csv'):
    return os.path.realpath(dataset['labels_csv'])
  if dataset.get('source_dir'):
    return os.path.realpath(dataset['source_dir'])
  if dataset.get('synthetic'):
    return os.path.realpath(
      os.path.join(dataset.get('data_dir') or os.path.join(workdir, 'data'), 'synthetic_stages')
    )
  return ''


def _is_run_source(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether `config` reads the source WORKDIR/config.json records; True without a record."""
  recorded = (checkpoints.load_recorded_config(workdir) or {}).get('dataset')
  if not isinstance(recorded, dict):
    return True
  return _source_in(recorded, workdir) == _source_in(config.dataset.to_dict(), workdir)


def _check_task(
  config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, source: str
) -> None:
  """Refuses to score findings against classes, or classes against findings."""
  findings = heads.get(config.model.head).multilabel
  if findings != (folder_builder.task(builder) == 'multilabel'):
    raise ConfigError(
      f'model.head={config.model.head!r} predicts {"findings" if findings else "one class"} '
      f'per image, but {reports.printable(source)} was read with dataset.task='
      f"{folder_builder.task(builder)!r}; evaluate with the run's dataset.task and model.head "
      '(WORKDIR/config.json records them)'
    )


def _class_map(source_names: Sequence[str], names: Sequence[str], source: str) -> np.ndarray:
  """The run's class index of each of the source's classes (matched by name).

  Raises:
    DatasetError: a class of the source that the run does not know, named.
  """
  unknown = [n for n in source_names if n not in names]
  if unknown:
    raise DatasetError(
      f'{reports.printable(source)} has class(es) {unknown} that the run does not know (its '
      f'classes, WORKDIR/labels.txt: {list(names)}); rename or remove them, or evaluate a run '
      'trained on them'
    )
  return np.asarray([list(names).index(n) for n in source_names], np.int32)


def _say_which_images(builder: tfds.core.DatasetBuilder, split: str, source: str) -> None:
  """Logs and prints that a split-based evaluation of an external source scores part of it."""
  metadata = builder.info.metadata
  parts = metadata['splits']
  total = sum(len(p['labels']) for p in parts.values())
  how = (
    'as its split folders give them'
    if metadata.get('source_kind') == 'split folders'
    else 'drawn by dataset.split_seed'
  )
  line = (
    f'scoring the {split} split of {reports.printable(source)} ({len(parts[split]["labels"])} '
    f'of {total} images, {how}); --split {ALL} scores every image'
  )
  logging.info('%s', line)
  print(line)
