"""TF-Slim InceptionV3 checkpoint → orbax checkpoint for pneumo_jax's InceptionV3.

  python -m converters.slim_to_orbax inception_v3.ckpt weights/inception_v3 [--drop_background]

The reading is `pneumo_jax.models.inception_v3.slim_weights` (see there for what is kept).
Needs TensorFlow (`pip install pneumo_jax[convert]`).
"""

import argparse
from collections.abc import Sequence

from absl import logging

from pneumo_jax.models import weights
from pneumo_jax.models.inception_v3 import slim_weights


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('ckpt', help='TF-Slim InceptionV3 checkpoint: V1 file or V2 prefix.')
  parser.add_argument('out_dir', help='orbax checkpoint directory to write.')
  parser.add_argument(
    '--drop_background', action='store_true', help='keep 1000 classes (drop class 0).'
  )
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty out_dir.')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  variables = slim_weights.read(args.ckpt, drop_background=args.drop_background)
  weights.save_variables(variables, args.out_dir, overwrite=args.overwrite)
  print(f'wrote {args.out_dir}')


if __name__ == '__main__':
  main()
