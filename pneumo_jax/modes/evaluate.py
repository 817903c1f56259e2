"""--mode eval: metrics and reports of a checkpoint on a split of the run's dataset."""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from pneumo_jax import checkpoints
from pneumo_jax.data import dataset_for, folder_builder, pipeline
from pneumo_jax.evaluation import inference, metrics, model_card, reports
from pneumo_jax.modes import common


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  split: str = 'validation',
  checkpoint: str = 'latest',
) -> dict[str, Any]:
  """Evaluates a checkpoint on a split; writes WORKDIR/eval/<split>_<step>{.json,_*.png,
  _predictions.csv,_model_card.md} (see reports) and prints the metrics table. Returns the
  metrics (metrics.compute's, with metrics.bootstrap_ci's under model_card.INTERVALS).

  The model card is also written to WORKDIR/model_card.md, where the latest evaluation's card
  replaces the previous one: one fixed place for "the card of this run", while each report keeps
  its own beside it. The checkpoint is found before the dataset is built, so a workdir without a
  run is refused before anything is written.
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
  result = {
    **metrics.compute(out['label'], out['probs'], names),
    model_card.INTERVALS: metrics.bootstrap_ci(out['label'], out['probs'], names),
  }
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
    with open(path) as f:  # The card is rendered from the report as written, as export can.
      card = model_card.render(
        config,
        model_card.data_of(builder),
        json.load(f),
        checkpoint=checkpoint,
        report_path=path,
      )
    model_card.write(f'{path.removesuffix(".json")}_model_card.md', card)
    model_card.write(os.path.join(workdir, model_card.CARD_FILE), card)
    print(f'{split} split, checkpoint step {step} ({len(files)} images); report in {path}')
    print(metrics.format_table(result, names))
    print(f'model card: {os.path.join(workdir, model_card.CARD_FILE)}')
  return result
