# python main.py --config configs/sweeps/lr.py --workdir runs/lr \
#     --config.dataset.source_dir=/data/xray_by_stage --config.init_checkpoint=/weights/inception_v3
"""Learning-rate sweep of the default recipe: three rates, each with a fixed and a warmup-cosine
schedule (six trials), ranked in runs/lr/results.md.

The seed's fixed 0.01 was never compared with anything; this is the cheapest way to learn how far
it is from the best rate for your images. Add --sweep_parallel 2 to train two trials at once.
"""

import ml_collections

from configs import default
from pneumo_jax.modes import sweep


def get_config() -> ml_collections.ConfigDict:
  return default.get_config()


def get_sweep() -> list[dict]:
  return sweep.product(
    {'schedule.learning_rate': [0.03, 0.01, 0.003]},
    sweep.zip({'schedule.name': ['fixed', 'warmup_cosine'], 'schedule.warmup_steps': [0, 500]}),
  )
