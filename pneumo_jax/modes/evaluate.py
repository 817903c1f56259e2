"""--mode eval: metrics and reports of a checkpoint on a split of the run's dataset."""

from typing import Any

import jax
import ml_collections
import numpy as np

from pneumo_jax import checkpoints
from pneumo_jax.data import dataset_for, folder_builder, pipeline
from pneumo_jax.evaluation import inference, metrics, reports
from pneumo_jax.modes import common


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  split: str = 'validation',
  checkpoint: str = 'latest',
) -> dict[str, Any]:
  """Evaluates a checkpoint on a split; writes WORKDIR/eval/<split>_<step>{.json,_*.png,
  _predictions.csv} (see reports) and prints the metrics table. Returns the metrics.

  The checkpoint is found before the dataset is built, so a workdir without a run is refused
  before anything is written.
  """
  variables, step = checkpoints.load_for_inference(workdir, checkpoint)
  builder = dataset_for(config, workdir)
  folder_builder.split_labels(builder, split)  # A missing split fails here, naming the fix.
  restored = common.for_classes(
    config, workdir, variables, step, folder_builder.label_names(builder)
  )
  model, names = restored.model, restored.names
  input_cfg = ml_collections.ConfigDict(config.input.to_dict())
  input_cfg.eval_batch_size = common.global_batch(config)
  batches = pipeline.eval_batches(
    builder, split, input_cfg, process_index=jax.process_index(), process_count=jax.process_count()
  )
  out = inference.predict(model, variables, batches, image_size=config.input.image_size)
  result = metrics.compute(out['label'], out['probs'], names)
  if jax.process_index() == 0:
    files = list(np.asarray(folder_builder.split_filenames(builder, split))[out['index']])
    provenance = {
      'split': split,
      'step': step,
      'dataset': str(builder.data_dir),
      **common.view(config),
    }
    path = reports.write_eval(
      workdir,
      split,
      step,
      result,
      names,
      out['label'],
      out['probs'],
      provenance,
      write_extra=lambda stem: reports.write_predictions(
        f'{stem}_predictions.csv',
        files,
        out['probs'],
        names,
        {},
        true_labels=[names[i] for i in out['label']],
      ),
    )
    print(f'{split} split, checkpoint step {step} ({len(files)} images); report in {path}')
    print(metrics.format_table(result, names))
  return result
