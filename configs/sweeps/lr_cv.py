# python main.py --config configs/sweeps/lr_cv.py --workdir runs/lr_cv --sweep_parallel 2 \
#     --config.dataset.source_dir=/data/xray_by_stage --config.init_checkpoint=/weights/inception_v3
"""The learning-rate sweep, each setting cross-validated: lr.py's six trials × cv.py's five folds.

Thirty trials; each setting ranks by its mean over folds, so a lucky split cannot pick the rate.
"""

import ml_collections

from configs import default
from configs.sweeps import cv, lr
from pneumo_jax.modes import sweep


def get_config() -> ml_collections.ConfigDict:
  return default.get_config()


def get_sweep() -> list[dict]:
  return sweep.product(lr.get_sweep(), cv.get_sweep())
