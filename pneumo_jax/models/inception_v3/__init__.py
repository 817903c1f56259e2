"""InceptionV3 with TF-Slim's scope names (`net`), its weight readers (`slim_weights` for slim's
`.ckpt`, `keras_weights` for Keras's `.h5`) and its `BACKBONE` record."""

import os
import zipfile
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from pneumo_jax.models import weights
from pneumo_jax.models.backbone import Backbone
from pneumo_jax.models.inception_v3.net import BLOCKS, MIN_SIZE, InceptionV3

__all__ = ['BACKBONE', 'InceptionV3']

# Where the cells of InceptionV3's endpoints sit in the input: cell i's receptive field is centred
# on input pixel offset + stride * i. Only the stem's VALID layers and the stride-2 reductions
# (Mixed_6a, Mixed_7a) move centres (each VALID k×k op adds stride_in * (k - 1) / 2 to the
# offset); the SAME layers in between keep them. Plain resizing would stretch the cells over the
# whole image instead, misplacing the outer ones (by 19 px for Mixed_7c at 299 px input).
_CELL_CENTRES: dict[str, tuple[float, float]] = {
  'Conv2d_1a_3x3': (1, 2),
  'Conv2d_2a_3x3': (3, 2),
  'Conv2d_2b_3x3': (3, 2),
  'MaxPool_3a_3x3': (5, 4),
  'Conv2d_3b_1x1': (5, 4),
  'Conv2d_4a_3x3': (9, 4),
  'MaxPool_5a_3x3': (13, 8),
  'Mixed_5b': (13, 8),
  'Mixed_5c': (13, 8),
  'Mixed_5d': (13, 8),
  'Mixed_6a': (21, 16),
  'Mixed_6b': (21, 16),
  'Mixed_6c': (21, 16),
  'Mixed_6d': (21, 16),
  'Mixed_6e': (21, 16),
  'Mixed_7a': (37, 32),
  'Mixed_7b': (37, 32),
  'Mixed_7c': (37, 32),
}
# A 1×7 kernel (Mixed_6b…6e's factorised convs) occurs in InceptionV3 and not in DenseNet.
_KERAS_SIGNATURE = (1, 7, 128, 128)


def _create(
  model_cfg: ml_collections.ConfigDict, num_classes: int, **overrides: Any
) -> InceptionV3:
  kwargs = dict(
    num_classes=num_classes,
    head=model_cfg.head,
    create_aux_logits=model_cfg.create_aux_logits,
    dropout_keep_prob=model_cfg.dropout_keep_prob,
    depth_multiplier=model_cfg.depth_multiplier,
    min_depth=model_cfg.min_depth,
    dtype=jnp.dtype(model_cfg.dtype),
    batch_norm_decay=model_cfg.batch_norm_decay,
  )
  return InceptionV3(**(kwargs | overrides))


def _load_weights(path: str) -> dict[str, np.ndarray]:
  from pneumo_jax.models.inception_v3 import keras_weights, slim_weights  # TF/Keras inside.

  return (
    keras_weights.read(path) if weights.hdf5_shapes(path) is not None else slim_weights.read(path)
  )


def _recognise(path: str) -> bool:
  """A Keras .h5 with InceptionV3's kernels, or a TensorFlow checkpoint (only InceptionV3 reads
  those; its reader then checks the variables)."""
  shapes = weights.hdf5_shapes(path)
  if shapes is not None:
    return _KERAS_SIGNATURE in shapes
  if os.path.exists(path + '.index'):  # A V2 checkpoint prefix.
    return True
  return os.path.isfile(path) and not zipfile.is_zipfile(path)  # V1 (PyTorch's files are zips).


def _describe(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  model = config.model
  return (
    f'depth multiplier {model.depth_multiplier:g}',
    f'min depth {model.min_depth}',
    f'aux head {"on" if model.create_aux_logits else "off"} '
    f'(loss weight {config.aux_loss_weight:g})',
  )


BACKBONE = Backbone(
  name='inception_v3',
  create=_create,
  head_scopes='Logits,AuxLogits',
  aux_logits='AuxLogits',
  logits_bias='Logits/Conv2d_1c_1x1/biases',
  weight_decay='.*weights$',  # slim's: every conv kernel (`weights`), biases and BN excluded.
  min_size=MIN_SIZE,
  default_size=299,
  preprocessing='inception',
  gradcam_layers=tuple(_CELL_CENTRES),
  cell_centres=_CELL_CENTRES,
  # The heads' average pools (named after their kernel, which shrinks for small inputs).
  feature_taps={'Logits': r'Logits/AvgPool_1a_\w+', 'AuxLogits': r'AuxLogits/AvgPool_1a_\w+'},
  blocks=BLOCKS,
  head_inputs={'Logits': 'Mixed_7c', 'AuxLogits': 'Mixed_6e'},
  load_weights=_load_weights,
  weight_formats='a TF-Slim InceptionV3 .ckpt or a Keras InceptionV3 .h5',
  recognise=_recognise,
  inference_overrides={'create_aux_logits': False},
  describe=_describe,
)
