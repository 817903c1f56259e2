"""The classifier heads (`config.model.head`): how many outputs K classes need, the training loss,
and logits → K class probabilities.

- 'softmax': K logits, softmax cross-entropy (with slim's label smoothing).
- 'ordinal': CORN (Shi, Cao and Raschka, "Deep neural networks for rank-consistent ordinal
  regression based on conditional probabilities", 2021), for ordered classes such as stages
  0–3. K − 1 outputs, output k the logit of the conditional P(y > k | y > k − 1); their running
  products are P(y > k), non-increasing in k by construction, and the class probabilities are
  the differences of those, non-negative and summing to one. Task k trains, as a binary logistic
  regression, only on the examples with y ≥ k (y > k − 1: those for which its condition holds).

A module's `num_classes` is K, the run's classes, whatever the head; its classifier layers have
`outputs(K)` channels. Everything that turns logits into a loss, probabilities or a class
(the train step, inference, Grad-CAM, export) asks `get(model.head)`, so a new head is a class
here and a name in `HEADS`.
"""

import jax
import jax.numpy as jnp
import optax

from pneumo_jax.errors import ConfigError


class Softmax:
  """K logits and a softmax over them."""

  name = 'softmax'

  @staticmethod
  def outputs(num_classes: int) -> int:
    return num_classes

  @staticmethod
  def classes(outputs: int) -> int:
    return outputs

  @staticmethod
  def loss(
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    label_smoothing: float,
    weights: jax.Array,
  ) -> jax.Array:
    """Per-example-weighted mean cross-entropy, with slim's label smoothing (the one-hot target
    moves `label_smoothing` of its mass evenly onto all K classes)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.mean(losses * weights)

  @staticmethod
  def probs(logits: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits, axis=-1)

  @staticmethod
  def scores(logits: jax.Array) -> jax.Array:
    """Per-class scores whose gradient explains a class (Grad-CAM): the logits themselves."""
    return logits


class Ordinal:
  """CORN: K − 1 conditional "y > k" logits for K ordered classes."""

  name = 'ordinal'

  @staticmethod
  def outputs(num_classes: int) -> int:
    return num_classes - 1

  @staticmethod
  def classes(outputs: int) -> int:
    return outputs + 1

  @staticmethod
  def loss(
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    label_smoothing: float,
    weights: jax.Array,
  ) -> jax.Array:
    """CORN's loss: the binary cross-entropy of each task k over the examples with y ≥ k,
    summed and divided by the number of (example, task) pairs used, as coral_pytorch's
    `corn_loss`.

    `weights` (per example, e.g. its class weight) multiply each of its terms. Label smoothing
    is slim's rule applied to each binary task: the target 1{y > k} moves `label_smoothing` of
    its mass evenly onto both outcomes (1 → 1 − ε/2, 0 → ε/2).
    """
    logits = logits.astype(jnp.float32)
    tasks = jnp.arange(num_classes - 1)
    used = (labels[:, None] >= tasks).astype(jnp.float32)  # [B, K − 1]: task k's examples.
    above = (labels[:, None] > tasks).astype(jnp.float32)
    targets = above * (1.0 - label_smoothing) + label_smoothing / 2
    losses = optax.sigmoid_binary_cross_entropy(logits, targets)
    return jnp.sum(losses * used * weights[:, None]) / jnp.maximum(jnp.sum(used), 1.0)

  @staticmethod
  def log_probs(logits: jax.Array) -> jax.Array:
    """log P(y = k), [..., K]: log P(y > k − 1) + log P(y ≤ k | y > k − 1), in log space so a
    confident class keeps its gradient (Grad-CAM's score)."""
    above = jnp.cumsum(jax.nn.log_sigmoid(logits), axis=-1)  # log P(y > k), k = 0 … K − 2.
    reached = jnp.concatenate([jnp.zeros_like(above[..., :1]), above], axis=-1)  # P(y > k − 1)
    stop = jax.nn.log_sigmoid(-logits)  # log P(y = k | y ≥ k), k = 0 … K − 2; 1 for K − 1.
    return reached + jnp.concatenate([stop, jnp.zeros_like(stop[..., :1])], axis=-1)

  @classmethod
  def probs(cls, logits: jax.Array) -> jax.Array:
    return jnp.exp(cls.log_probs(logits))

  @classmethod
  def scores(cls, logits: jax.Array) -> jax.Array:
    """Grad-CAM's score of class k: log P(y = k)."""
    return cls.log_probs(logits)


Head = type[Softmax] | type[Ordinal]
HEADS: dict[str, Head] = {h.name: h for h in (Softmax, Ordinal)}


def get(name: str) -> Head:
  """The head `config.model.head` names."""
  if name not in HEADS:
    raise ConfigError(f'model.head={name!r} is not a head; use one of {sorted(HEADS)}')
  return HEADS[name]
