"""DenseNet-121 (torchvision's names, `net`), its weight readers (`keras_weights` for Keras's
`.h5`, `torch_weights` for torchvision state dicts) and its `BACKBONE` record.

The backbone chest X-ray work standardised on (CheXNet; torchxrayvision's X-ray weights).
docs/densenet121.md says how its batch norm and torchxrayvision's weights compare with the
originals.
"""

from typing import Any

import jax.numpy as jnp
import ml_collections

from pneumo_jax.errors import ConfigError
from pneumo_jax.models import weights
from pneumo_jax.models.backbone import Backbone
from pneumo_jax.models.densenet121 import keras_weights, torch_weights
from pneumo_jax.models.densenet121.net import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  MIN_SIZE,
  WEIGHT_FORMATS,
  DenseNet121,
)

__all__ = ['BACKBONE', 'IMAGENET_MEAN', 'IMAGENET_STD', 'MIN_SIZE', 'DenseNet121', 'create']


def create(model_cfg: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> DenseNet121:
  """DenseNet121 from `config.model`; `overrides` may set batch_norm_train and activation.

  `create_aux_logits` is accepted and ignored: DenseNet has no auxiliary head.
  """
  keep = model_cfg.dropout_keep_prob
  if not 0.0 < keep <= 1.0:
    raise ConfigError(f'model.dropout_keep_prob must be in (0, 1]; got {keep}.')
  overrides.pop('create_aux_logits', None)
  kwargs = dict(
    num_classes=num_classes,
    head=model_cfg.head,
    dtype=jnp.dtype(model_cfg.dtype),
    dropout_rate=1.0 - keep,
    batch_norm_decay=model_cfg.batch_norm_decay,
    input_normalisation='imagenet',
  )
  return DenseNet121(**(kwargs | overrides))


def load_weights(path: str) -> dict[str, Any]:
  """Keras `.h5` or torchvision `.pth` DenseNet-121 weights → {'params', 'batch_stats'}."""
  weights.require_file(path, WEIGHT_FORMATS)
  return keras_weights.read(path) if weights.is_hdf5(path) else torch_weights.read(path)


def recognise(path: str) -> bool:
  return keras_weights.recognise(path) or torch_weights.recognise(path)


# Cell i of a layer is centred on input pixel offset + stride * i. A k×k, stride-s op with
# padding p puts output j's window at s*j - p … s*j - p + k - 1, centred on s*j - p + (k - 1)/2
# of its input: conv0 (7, 2, 3) and pool0 (3, 2, 1) keep offset 0 (centres 2j, then 4j); the
# blocks' 1×1 and padded 3×3 convs keep centres; each 2×2/2 average pool centres j on 2j + 0.5 of
# its input, adding half its input stride: transition1 → (0 + 4/2, 8), transition2 → (2 + 8/2,
# 16), transition3 → (6 + 16/2, 32); norm5 is pointwise.
_CELL_CENTRES = {
  'denseblock2': (2, 8),
  'denseblock3': (6, 16),
  'denseblock4': (14, 32),
  'norm5': (14, 32),
}

BACKBONE = Backbone(
  name='densenet121',
  create=create,
  head_scopes='classifier',
  aux_logits=None,
  logits_bias='classifier/bias',
  weight_decay=r'(.*/)?conv\d?/kernel$,classifier/kernel$',
  min_size=MIN_SIZE,
  default_size=224,
  preprocessing='imagenet',
  gradcam_layers=tuple(_CELL_CENTRES),
  cell_centres=_CELL_CENTRES,
  feature_taps={'classifier': 'pool'},
  blocks=(
    'conv0',
    'norm0',
    'denseblock1',
    'transition1',
    'denseblock2',
    'transition2',
    'denseblock3',
    'transition3',
    'denseblock4',
    'norm5',
  ),
  head_inputs={'classifier': 'norm5'},
  load_weights=load_weights,
  weight_formats=WEIGHT_FORMATS,
  recognise=recognise,
)
