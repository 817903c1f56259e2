# python main.py --config configs/demo.py --workdir runs/demo
"""Offline demo: a generated 4-stage "opacity profusion" folder, trained on a laptop CPU.

No ImageNet weights ship with the repository, so the demo trains every layer from random
initialisation (and says so loudly) at a small input size; the pipeline is the real one: folder →
TFDS build → grain → InceptionV3 → checkpoints → validation metrics. Change dataset.source_dir and
init_checkpoint (see README) for a real fine-tune.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset.synthetic = True
  c.dataset.validation_fraction = 0.25
  c.input.image_size = 96
  c.input.batch_size = 32
  c.input.eval_batch_size = 64
  c.input.color_distortion = False  # Grey images: colour jitter only adds noise.
  c.input.random_crop = False  # Opacity count is the signal; a crop could cut opacities away.
  c.model.batch_norm_decay = 0.9  # From scratch, moving statistics must catch up in few steps.
  c.init_checkpoint = ''
  c.exclude_scopes = ''
  c.trainable_scopes = '.*'  # From scratch, everything trains.
  c.optimizer.name = 'adam'
  c.optimizer.epsilon = 1e-8
  c.optimizer.weight_decay = 0.0
  c.schedule.name = 'warmup_cosine'
  c.schedule.learning_rate = 2e-3
  c.schedule.warmup_steps = 20
  c.schedule.end_learning_rate = 0.0
  c.num_steps = 200
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 100
  c.best_metric = 'accuracy'
  return c
