"""--mode predict: class probabilities of image files, as a CSV with its provenance."""

import hashlib
import itertools
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from pneumo_jax.data import images
from pneumo_jax.evaluation import inference, reports
from pneumo_jax.modes import common

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
    inputs: image files, folders (searched recursively) or glob patterns; each must exist or
      match (else NotFoundError, before anything is written).
    tta: average the probabilities with those of the left-right mirrored image.

  One CSV row per input (see reports.write_predictions); a file that cannot be read is listed
  and gets its error in its row, unless no input at all can be read (an error, nothing written).
  The CSV's provenance (inputs, checkpoint, view) sits in the `.json` beside it; predictions made
  with other inputs or settings get a new name (`..._2.csv`) instead of replacing it.
  Every process reads every file and runs its share of each batch; process 0 writes (the
  others return '').
  """
  files = images.expand_inputs(inputs)
  model, variables, step, names = common.restore(config, workdir, checkpoint)
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
  provenance = {
    'step': step,
    'tta': tta,
    **common.view(config),
    'num_inputs': len(files),
    'inputs_sha256': hashlib.sha256(
      json.dumps([os.path.abspath(f) for f in files]).encode()
    ).hexdigest(),
  }
  stem = reports.claim_stem(
    os.path.join(workdir, PREDICTIONS_DIR, f'step{step}{"_tta" if tta else ""}'), provenance
  )
  path = reports.write_predictions(f'{stem}.csv', files, probs, names, errors)
  reports.write_json(f'{stem}.json', {'provenance': provenance, 'csv': os.path.basename(path)})
  print(
    f'Predicted {len(readable)} image(s) with checkpoint step {step}'
    f'{" (flip TTA)" if tta else ""}: {path}'
  )
  common.report_errors(errors, len(files))
  return path
