# python main.py --config configs/sweeps/tiny.py --workdir runs/tiny
"""The demo in miniature, as a two-trial sweep over the seed: 75 px, two steps per trial.

It runs the whole sweep machinery (a shared dataset built once, one process per trial, the
ranked results table, skip-on-rerun) in a minute or two on a CPU; tests/test_sweep.py runs it.
Two steps teach the model nothing, so the numbers mean nothing. The trials differ only in the
seed, so the second one reuses the first one's compiled steps from JAX's compilation cache.
"""

import ml_collections

from configs import demo
from pneumo_jax.modes import sweep


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  c.dataset.synthetic_images_per_class = 6
  c.dataset.synthetic_image_size = 80
  c.input.image_size = 75  # InceptionV3's smallest input.
  c.input.batch_size = 4
  c.input.eval_batch_size = 8
  c.schedule.warmup_steps = 1
  c.num_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 0
  return c


def get_sweep() -> list[dict]:
  return sweep.product({'seed': [0, 1]})
