"""The train step: a pure function of (state, batch, rng), jitted data-parallel by the loop.

Gradients are taken only with respect to the trainable parameters, so a head-only step never runs
the backbone's backward pass; frozen parameters are carried over untouched (not even `+ 0`), and the
model's `batch_norm_train` rule keeps frozen batch-norm layers in inference mode. The EMA skips the
leaves the run never trains, so theirs stay bitwise equal to the parameters: checkpoints then keep
them once, in WORKDIR/base (see checkpoints).
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pneumo_jax import heads, scopes
from pneumo_jax.models import taps


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any = None  # None unless config.ema_decay > 0.


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  trainable: Any,
  *,
  aux_loss_weight: float,
  label_smoothing: float,
  class_weights: np.ndarray | None,
  ema_decay: float,
  ema_mask: Any = None,
  aux_logits: str | None = None,
  image_size: int,
  feature_taps: Mapping[str, str] | None = None,
) -> Callable:
  """Builds step(state, batch, rng) → (state, metrics).

  A batch is the pipeline's (uint8 images and their views, augmented here on the device) or,
  when it carries 'features', a feature cache's (taps.substitute: the frozen layers below the
  cached outputs never run).

  Args:
    model: a backbone's module whose `batch_norm_train` says which BN layers learn and whose
      `head` (pneumo_jax.heads) gives the loss.
    tx: from `optim.make_optimizer` with the same `trainable` mask.
    trainable: tree of bools shaped like the params.
    class_weights: the loss's class weights (Keras's `class_weight`; `phases.class_weights`):
      [K] per class, or [F, 2] per finding and label (negative, positive) for a multi-label
      head; None for 1.
    ema_mask: tree of bools, the leaves the EMA averages (default `trainable`); the rest are
      carried over as they are. The loop passes the leaves any phase trains, so a leaf trained
      earlier keeps converging to its (now fixed) value.
    aux_logits: the end_points key of the backbone's auxiliary classifier (its loss is weighted
      by `aux_loss_weight`); None or absent from the outputs → no aux loss.
    image_size: the side of the model's input images.
    feature_taps: a feature cache's taps (`Cache.taps`), for batches that carry its 'features'.
  """
  is_trainable = scopes.flatten(trainable)
  ema_follows = is_trainable if ema_mask is None else scopes.flatten(ema_mask)
  num_classes = model.num_classes
  head = heads.get(model.head)

  def step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    flat = scopes.flatten(state.params)
    train_part = {k: v for k, v in flat.items() if is_trainable[k]}
    labels = batch['label']
    weights = head.example_weights(labels, class_weights)

    def loss_fn(train_part):
      params = scopes.unflatten({**flat, **train_part})
      with taps.substitute(batch.get('features'), feature_taps):
        (logits, end_points), new_vars = model.apply(
          {'params': params, 'batch_stats': state.batch_stats},
          taps.inputs(batch, image_size),
          train=True,
          rngs={'dropout': rng},
          mutable=['batch_stats'],
        )
      loss = head.loss(logits, labels, num_classes, label_smoothing, weights)
      aux_loss = jnp.zeros([], jnp.float32)
      if aux_logits in end_points:
        aux_loss = head.loss(end_points[aux_logits], labels, num_classes, label_smoothing, weights)
      accuracy = head.accuracy(logits, labels)
      total = loss + aux_loss_weight * aux_loss
      return total, (
        new_vars['batch_stats'],
        {'loss': loss, 'aux_loss': aux_loss, 'total_loss': total, 'accuracy': accuracy},
      )

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(train_part)
    full_grads = scopes.unflatten(
      {k: grads[k] if k in grads else jnp.zeros_like(v) for k, v in flat.items()}
    )
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    stepped = scopes.flatten(optax.apply_updates(state.params, updates))
    new = {k: stepped[k] if is_trainable[k] else v for k, v in flat.items()}
    params = scopes.unflatten(new)
    ema = state.ema_params
    if ema is not None:
      ema = scopes.unflatten(
        {
          k: optax.incremental_update(new[k], v, 1.0 - ema_decay) if ema_follows[k] else v
          for k, v in scopes.flatten(ema).items()
        }
      )
    metrics['grad_norm'] = optax.tree.norm(grads)
    return state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      ema_params=ema,
    ), metrics

  return step
