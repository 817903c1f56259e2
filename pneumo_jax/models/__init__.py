"""The backbones, by `config.model.name`, and the one model constructor.

Each backbone is a module here that provides a `BACKBONE` (see `backbone.Backbone`): everything
the rest of pneumo_jax asks about it. Adding one is a module and a line in `BACKBONES`.
"""

from typing import Any

import flax.linen as nn
import ml_collections

from pneumo_jax import scopes
from pneumo_jax.errors import ConfigError, WeightsError
from pneumo_jax.models import densenet121, inception_v3
from pneumo_jax.models.backbone import Backbone

__all__ = [
  'BACKBONES',
  'Backbone',
  'backbone_for_file',
  'backbone_of',
  'build_inference_model',
  'build_model',
  'get_backbone',
  'num_classes_of',
]

BACKBONES: dict[str, Backbone] = {b.name: b for b in (inception_v3.BACKBONE, densenet121.BACKBONE)}


def get_backbone(name: str) -> Backbone:
  """The backbone `config.model.name` selects."""
  if name not in BACKBONES:
    raise ConfigError(
      f'config.model.name={name!r} is not a backbone; use one of {sorted(BACKBONES)}'
    )
  return BACKBONES[name]


def backbone_of(config: ml_collections.ConfigDict) -> Backbone:
  return get_backbone(config.model.name)


def build_model(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> nn.Module:
  """The backbone of `config.model` for `num_classes`; `overrides` set other fields (e.g.
  batch_norm_train). `model.apply(variables, images, train=...)` returns (logits, end_points)."""
  return backbone_of(config).build(config.model, num_classes, **overrides)


def build_inference_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The model for evaluation, prediction and explanation: no auxiliary head (inference ignores
  it, so its weights need not be there)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.create_aux_logits = False
  return build_model(config, num_classes)


def num_classes_of(config: ml_collections.ConfigDict, params: Any) -> int:
  """How many classes a checkpoint's parameters predict (the final classifier's bias length)."""
  return int(scopes.flatten(params)[backbone_of(config).logits_bias].shape[-1])


def backbone_for_file(path: str) -> Backbone:
  """The backbone whose weight loader reads the raw weights file at `path`."""
  for backbone in BACKBONES.values():
    if backbone.recognise(path):
      return backbone
  formats = '; '.join(f'{b.name}: {b.weight_formats}' for b in BACKBONES.values())
  raise WeightsError(f'{path} holds the weights of no known backbone ({formats})')
