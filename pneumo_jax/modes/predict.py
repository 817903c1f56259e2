"""--mode predict: class (or finding) probabilities of image files, as a CSV with its provenance."""

import hashlib
import itertools
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from pneumo_jax import heads
from pneumo_jax.data import dicom, images
from pneumo_jax.evaluation import calibration, inference, operating_points, reports
from pneumo_jax.modes import common

NAME = 'predict'
HELP = 'class probabilities of image files, as a CSV'
FLAGS = ('inputs', 'checkpoint', 'tta')
NEEDS_WORKDIR = True

PREDICTIONS_DIR = 'predictions'


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  inputs: Sequence[str],
  *,
  checkpoint: str = 'latest',
  tta: bool = False,
) -> str:
  """Classifies image files; writes WORKDIR/predictions/step<step>[_tta].csv and returns its path.

  Args:
    inputs: image files, folders (searched recursively), glob patterns or CSVs with a path
      column (images.expand_inputs); each must exist or match (else NotFoundError, before
      anything is written).
    tta: average the probabilities (each finding's, for findings) with those of the
      left-right mirrored image.

  One CSV row per input (see reports.write_predictions), with a DICOM file's patient and UIDs
  (dicom.identifiers) when any input is DICOM; a file that cannot be read or breaks
  dataset.min_image_side / max_aspect_ratio is listed and gets its error in its row, unless no
  input at all can be read (an error, nothing written). WORKDIR/predictions/ is checked to be
  writable before anything is computed.
  When WORKDIR/calibration.json keeps a temperature for the checkpoint's step (`--mode eval`
  fits it on the validation split), the probabilities are temperature-scaled, and each cut's
  decision at its config.operating_point threshold (Youden's J by default, chosen on the same
  split) is written beside them as a `decision_<cut>` column of 1 (positive) or 0, e.g.
  `decision_ge_stage_1`: "stage ≥ stage_1".
  A multi-label run (findings, `heads.get(model.head).multilabel`) writes a probability column
  per finding, named by it (independent sigmoids: they need not sum to one), a prediction
  listing the findings at probability metrics.PRESENT_AT, and, when calibrated (a temperature
  per finding), a `decision_<finding>` column per finding at its own threshold.
  The CSV's provenance (inputs, checkpoint, view, whether calibrated) sits in the `.json` beside
  it, with the temperature and thresholds applied; predictions made with other inputs or settings
  get a new name (`..._2.csv`) instead of replacing it.
  Every process reads every file and runs its share of each batch; process 0 writes (the
  others return '').
  """
  point = operating_points.decision_point(config)
  multilabel = heads.get(config.model.head).multilabel
  files = images.expand_inputs(inputs)
  model, variables, step, names = common.restore(config, workdir, checkpoint)
  if jax.process_index() == 0:
    reports.check_writable(
      os.path.join(workdir, PREDICTIONS_DIR), 'the predictions folder', create=False
    )
  errors: dict[str, str] = {}
  readable: list[str] = []
  batches = common.padded_batches(
    common.examples(files, config, errors, readable, flips=tta), common.global_batch(config)
  )
  first = next(batches, None)
  if first is None:  # Nothing readable: this raises, before anything is written.
    common.report_errors(errors, len(files))
  out = inference.predict(
    model,
    variables,
    itertools.chain([first], batches),
    image_size=config.input.image_size,
    whole_batches=True,  # Every process reads every file.
  )
  probs = np.zeros((len(readable), len(names)))
  np.add.at(probs, out['index'], out['probs'])
  probs /= np.bincount(out['index'], minlength=len(readable))[:, None]
  if jax.process_index() > 0:
    return ''  # Process 0 writes the report.
  entry = calibration.load(workdir, step)
  decisions, applied = {}, None
  if entry is not None:
    probs, decisions, applied = _calibrated(probs, names, entry, point, multilabel)
    applied['file'] = os.path.join(workdir, calibration.CALIBRATION_FILE)
  provenance = {
    'step': step,
    'tta': tta,
    'calibrated': entry is not None,
    **common.view(config),
    'num_inputs': len(files),
    'inputs_sha256': hashlib.sha256(
      json.dumps([os.path.abspath(f) for f in files]).encode()
    ).hexdigest(),
  }
  stem = reports.claim_stem(
    os.path.join(workdir, PREDICTIONS_DIR, f'step{step}{"_tta" if tta else ""}'), provenance
  )
  ids = {f: found for f in readable if (found := dicom.identifiers(f))}
  path = reports.write_predictions(
    f'{stem}.csv',
    files,
    probs,
    names,
    errors,
    identifiers=ids,
    decisions=decisions,
    multilabel=multilabel,
  )
  reports.write_json(
    f'{stem}.json',
    {'provenance': provenance, 'calibration': applied, 'csv': os.path.basename(path)},
  )
  print(
    f'Predicted {len(readable)} image(s) with checkpoint step {step}'
    f'{" (flip TTA)" if tta else ""}: {reports.printable(path)}'
  )
  if entry is not None:
    print(
      f'Probabilities scaled by {calibration.describe(entry)}; decisions at '
      f'{operating_points.POINTS[point]}: {", ".join(decisions) or "none"}'
    )
  common.report_errors(errors, len(files))
  return path


def _calibrated(
  probs: np.ndarray, names: Sequence[str], entry: dict, point: str, multilabel: bool
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
  """The probabilities scaled by the step's kept temperature(s), each cut's (finding's) decision
  at its `point` threshold (`decision_<cut>` columns), and what was applied (for the
  provenance)."""
  probs = calibration.scaled(probs, entry['temperature'])
  scores = operating_points.questions(probs, names, multilabel)
  thresholds = {
    cut: points.get(point)
    for cut, points in entry.get('operating_points', {}).items()
    if cut in scores and points.get(point) is not None
  }
  decisions = {f'decision_{cut}': scores[cut] >= t for cut, t in thresholds.items()}
  applied = {
    'temperature': entry['temperature'],
    'fitted_on': entry['fitted_on'],
    'n': entry['n'],
    'operating_point': point,
    'thresholds': thresholds,
  }
  return probs, decisions, applied
