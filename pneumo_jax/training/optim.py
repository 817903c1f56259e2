"""Optimizer, learning-rate schedule and trainable-scope mask, from the config.

Optimizers carry TF-Slim's `train_image_classifier.py` defaults (set in configs/default.py) and
follow TensorFlow's update rules where optax's differ in ways that matter to a slim user: RMSProp
starts its mean square at 1 and applies the learning rate inside the momentum, as
`tf.train.RMSPropOptimizer` does. Only parameters matched by the trainable scopes get updates
(`optax.multi_transform` with `set_to_zero` elsewhere), and only their conv kernels get weight
decay, added to the gradient as slim's L2 regularizer would.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pneumo_jax import scopes
from pneumo_jax.errors import ConfigError


def make_schedule(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step within the phase."""
  lr = cfg.learning_rate
  if cfg.name == 'fixed':
    return optax.constant_schedule(lr)
  if cfg.name == 'exponential':
    return optax.exponential_decay(lr, cfg.decay_steps, cfg.decay_rate, staircase=cfg.staircase)
  if cfg.name == 'polynomial':
    return optax.polynomial_schedule(lr, cfg.end_learning_rate, cfg.power, num_steps)
  if cfg.name == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, cfg.warmup_steps, max(num_steps, cfg.warmup_steps + 1), cfg.end_learning_rate
    )
  raise ConfigError(
    f'config.schedule.name={cfg.name!r} is unknown; use one of '
    'fixed, exponential, polynomial, warmup_cosine'
  )


class FtrlState(NamedTuple):
  accumulator: Any
  linear: Any


def ftrl(
  learning_rate: optax.ScalarOrSchedule,
  *,
  learning_rate_power: float = -0.5,
  initial_accumulator_value: float = 0.1,
  l1: float = 0.0,
  l2: float = 0.0,
) -> optax.GradientTransformation:
  """FTRL-Proximal as `tf.train.FtrlOptimizer` computes it (optax has none).

  Returns updates (new - old parameter), so it composes with `optax.apply_updates`.
  """
  sched = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

  def init(params):
    acc = jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params)
    return (
      FtrlState(acc, jax.tree.map(jnp.zeros_like, params)),
      optax.ScaleByScheduleState(jnp.zeros([], jnp.int32)),
    )

  def update(grads, state, params):
    (s, count), lr = state, sched(state[1].count)
    p = -learning_rate_power

    def one(g, acc, lin, w):
      new_acc = acc + g * g
      lin = lin + g - (new_acc**p - acc**p) / lr * w
      quad = new_acc**p / lr + 2.0 * l2
      new_w = jnp.where(jnp.abs(lin) > l1, (jnp.sign(lin) * l1 - lin) / quad, 0.0)
      return new_w - w, new_acc, lin

    out = jax.tree.map(one, grads, s.accumulator, s.linear, params)
    pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=lambda x: isinstance(x, tuple))
    return pick(0), (
      FtrlState(pick(1), pick(2)),
      optax.ScaleByScheduleState(optax.safe_increment(count.count)),
    )

  return optax.GradientTransformation(init, update)


def _base(
  cfg: ml_collections.ConfigDict, lr: optax.Schedule, decayed: Callable[[Any], Any]
) -> optax.GradientTransformation:
  name = cfg.name
  if name == 'rmsprop':  # tf.train.RMSPropOptimizer: ms starts at 1, lr inside momentum.
    return optax.chain(
      optax.scale_by_rms(decay=cfg.rmsprop_decay, eps=cfg.epsilon, initial_scale=1.0),
      optax.scale_by_learning_rate(lr),
      optax.trace(decay=cfg.rmsprop_momentum),
    )
  if name == 'momentum':
    return optax.sgd(lr, momentum=cfg.momentum)
  if name == 'sgd':
    return optax.sgd(lr)
  if name == 'adam':
    return optax.adam(lr, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.epsilon)
  if name == 'adamw':
    return optax.adamw(
      lr,
      b1=cfg.adam_beta1,
      b2=cfg.adam_beta2,
      eps=cfg.epsilon,
      weight_decay=cfg.adamw_weight_decay,
      mask=decayed,
    )
  if name == 'adagrad':
    return optax.adagrad(
      lr, initial_accumulator_value=cfg.adagrad_initial_accumulator_value, eps=0.0
    )
  if name == 'adadelta':
    return optax.adadelta(lr, rho=cfg.adadelta_rho, eps=cfg.epsilon)
  if name == 'ftrl':
    return ftrl(
      lr,
      learning_rate_power=cfg.ftrl_learning_rate_power,
      initial_accumulator_value=cfg.ftrl_initial_accumulator_value,
      l1=cfg.ftrl_l1,
      l2=cfg.ftrl_l2,
    )
  raise ConfigError(
    f'config.optimizer.name={name!r} is unknown; use one of rmsprop, momentum, '
    'sgd, adam, adamw, adagrad, adadelta, ftrl'
  )


def _matching(patterns: str) -> Callable[[Any], Any]:
  """A mask function: True for the leaves whose parameter path a pattern matches (the backbone's
  `weight_decay`, e.g. slim's conv kernels). Works on the masked trees `multi_transform` hands
  its inner transforms."""

  def mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
      lambda path, _: scopes.matches(patterns, '/'.join(k.key for k in path)), params
    )

  return mask


def make_optimizer(
  cfg: ml_collections.ConfigDict, schedule: optax.Schedule, trainable: Any, weight_decay: str
) -> optax.GradientTransformation:
  """The full transform: decay + clip + base optimizer on trainable leaves, zero elsewhere.

  Args:
    cfg: config.optimizer.
    schedule: the phase's learning-rate schedule.
    trainable: a tree of bools shaped like the params (see `scopes.mask`).
    weight_decay: regexes over parameter paths selecting what `cfg.weight_decay` (and adamw's
      decoupled decay) apply to: the backbone's `weight_decay`.
  """
  chain = []
  decayed = _matching(weight_decay)
  if cfg.weight_decay:
    chain.append(optax.add_decayed_weights(cfg.weight_decay, mask=decayed))
  if cfg.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(_base(cfg, schedule, decayed))
  labels = jax.tree.map(lambda t: 'train' if t else 'freeze', trainable)
  return optax.multi_transform(
    {'train': optax.chain(*chain), 'freeze': optax.set_to_zero()}, labels
  )
