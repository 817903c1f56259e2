"""Model construction from the config."""

from typing import Any

import jax.numpy as jnp
import ml_collections

from pneumo_jax.models.inception_v3 import InceptionV3


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                **overrides: Any) -> InceptionV3:
  """InceptionV3 from `config.model`; `overrides` set other fields (e.g. batch_norm_train)."""
  m = config.model
  kwargs = dict(num_classes=num_classes, create_aux_logits=m.create_aux_logits,
                dropout_keep_prob=m.dropout_keep_prob, depth_multiplier=m.depth_multiplier,
                min_depth=m.min_depth, dtype=jnp.dtype(m.dtype),
                batch_norm_decay=m.batch_norm_decay)
  return InceptionV3(**(kwargs | overrides))
