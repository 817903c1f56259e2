"""The backbones, by `config.model.name`, and the one model constructor.

Each backbone is a module here that provides a `BACKBONE` (see `backbone.Backbone`): everything
the rest of pneumo_jax asks about it. Adding one is a module and a line in `BACKBONES`.
"""

from typing import Any

import flax.linen as nn
import ml_collections

from pneumo_jax import heads, scopes
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
  'head_scopes_of',
  'num_classes_of',
]

BACKBONES: dict[str, Backbone] = {b.name: b for b in (inception_v3.BACKBONE, densenet121.BACKBONE)}


def backbone_of(config: ml_collections.ConfigDict) -> Backbone:
  """The backbone `config.model.name` selects."""
  name = config.model.name
  if name not in BACKBONES:
    raise ConfigError(
      f'config.model.name={name!r} is not a backbone; use one of {sorted(BACKBONES)}'
    )
  return BACKBONES[name]


def build_model(config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> nn.Module:
  """The backbone of `config.model` for `num_classes`; `overrides` set other fields (e.g.
  batch_norm_train). `model.apply(variables, images, train=...)` returns (logits, end_points)."""
  return backbone_of(config).build(config.model, num_classes, **overrides)


def build_inference_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The model for evaluation, prediction and explanation, as the backbone builds it for
  inference (without an auxiliary head, whose weights need not be there)."""
  return build_model(config, num_classes, inference=True)


def _head_scopes(name: str) -> str | None:
  backbone = BACKBONES.get(name)
  return backbone.head_scopes if backbone else None  # An unknown name: validate names it.


def head_scopes_of(name: ml_collections.FieldReference) -> ml_collections.FieldReference:
  """A config field that reads as the `head_scopes` of whichever backbone the field `name`
  (config.model.name) holds when it is read, until a value is set: the default
  `exclude_scopes` and `trainable_scopes`, so overriding `model.name` alone moves them too."""
  # The lazy op ml_collections' own `ref + 1` and `ref.to_str()` are built with.
  return name._apply_op(_head_scopes)


def num_classes_of(config: ml_collections.ConfigDict, params: Any) -> int:
  """How many classes a checkpoint's parameters predict: from the final classifier's bias
  length, by `config.model.head` (an ordinal head has one output fewer than classes)."""
  outputs = int(scopes.flatten(params)[backbone_of(config).logits_bias].shape[-1])
  return heads.get(config.model.head).classes(outputs)


def backbone_for_file(path: str) -> Backbone:
  """The backbone whose weight loader reads the raw weights file at `path`."""
  for backbone in BACKBONES.values():
    if backbone.recognise(path):
      return backbone
  formats = '; '.join(f'{b.name}: {b.weight_formats}' for b in BACKBONES.values())
  raise WeightsError(f'{path} holds the weights of no known backbone ({formats})')
