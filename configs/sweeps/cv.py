# python main.py --config configs/sweeps/cv.py --workdir runs/cv \
#     --config.dataset.source_dir=/data/xray_by_stage --config.init_checkpoint=/weights/inception_v3
"""5-fold cross-validation of the default recipe: five trials, one per validation fold.

With ~2,000 images a single 20% validation split gives a kappa that moves by a few points from
one split seed to the next; the mean ± standard deviation over folds in runs/cv/results.md says
how much of a difference between recipes is real.
"""

import ml_collections

from configs import default
from pneumo_jax.modes import sweep


def get_config() -> ml_collections.ConfigDict:
  return default.get_config()


def get_sweep() -> list[dict]:
  return sweep.folds(5)
