"""Keras application weights (.h5) → orbax checkpoint for the matching pneumo_jax backbone.

  python -m converters.keras_to_orbax inception_v3_weights_tf_dim_ordering_tf_kernels.h5 OUT_DIR
  python -m converters.keras_to_orbax densenet121_weights_tf_dim_ordering_tf_kernels.h5 OUT_DIR

Recognises which backbone the file holds (`pneumo_jax.models.backbone_for_file`) and reads it with
that backbone's loader; OUT_DIR restores with `orbax.checkpoint.StandardCheckpointer().restore`
as {'params', 'batch_stats'}. Needs Keras 3 and h5py (`pip install pneumo_jax[convert]`).
"""

import argparse
from collections.abc import Sequence

from pneumo_jax import models
from pneumo_jax.models import weights


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('h5', help='Keras weights: legacy .h5 or Keras 3 .weights.h5')
  parser.add_argument('out_dir', help='orbax checkpoint directory to write.')
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty out_dir.')
  args = parser.parse_args(argv)
  backbone = models.backbone_for_file(args.h5)
  weights.save_variables(backbone.load_weights(args.h5), args.out_dir, overwrite=args.overwrite)
  print(
    f"wrote {args.out_dir}: {backbone.name} with the file's classifier (Keras order, no "
    f'background class); train with --config.model.name={backbone.name}'
  )


if __name__ == '__main__':
  main()
