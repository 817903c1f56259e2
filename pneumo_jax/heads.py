"""The classifier heads (`config.model.head`): how many outputs K classes need, the training loss,
and logits → K class probabilities.

- 'softmax': K logits, softmax cross-entropy (with slim's label smoothing).
- 'ordinal': CORN (Shi, Cao and Raschka, "Deep neural networks for rank-consistent ordinal
  regression based on conditional probabilities", 2021), for ordered classes such as stages
  0–3. K − 1 outputs, output k the logit of the conditional P(y > k | y > k − 1); their running
  products are P(y > k), non-increasing in k by construction, and the class probabilities are
  the differences of those, non-negative and summing to one. Task k trains, as a binary logistic
  regression, only on the examples with y ≥ k (y > k − 1: those for which its condition holds).
- 'sigmoid': multi-label findings (`dataset.task='multilabel'`), as CheXNet and torchxrayvision:
  one logit and one binary cross-entropy per finding, independent of the others. Labels are
  [B, F] with 1 present, 0 absent and -1 ignored (an uncertain or blank label under 'ignore'):
  an ignored label is left out of the loss, so it adds no gradient.

A module's `num_classes` is K, the run's classes (the findings, for 'sigmoid'), whatever the head;
its classifier layers have `outputs(K)` channels. Everything that turns logits into a loss,
probabilities or a class (the train step, inference, Grad-CAM, export) asks `get(model.head)`,
so a new head is a class here and a name in `HEADS`; `multilabel` says which labels it takes.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pneumo_jax.errors import ConfigError


def _binary_cross_entropy(
  logits: jax.Array,
  positive: jax.Array,
  used: jax.Array,
  weights: jax.Array,
  label_smoothing: float,
) -> jax.Array:
  """The weighted sum of the binary cross-entropies of the used (example, task) pairs over their
  number. Label smoothing is slim's rule applied to each binary task: the target moves
  `label_smoothing` of its mass evenly onto both outcomes (1 → 1 − ε/2, 0 → ε/2)."""
  targets = positive * (1.0 - label_smoothing) + label_smoothing / 2
  losses = optax.sigmoid_binary_cross_entropy(logits, targets)
  return jnp.sum(losses * used * weights) / jnp.maximum(jnp.sum(used), 1.0)


class _SingleLabel:
  """What the heads of one class per example (labels [B] in 0 … K − 1) share."""

  multilabel = False

  @staticmethod
  def example_weights(labels: jax.Array, class_weights: np.ndarray | None) -> jax.Array:
    """[B]: each example's class weight (`class_weights` [K]; None → 1)."""
    if class_weights is None:
      return jnp.ones(labels.shape, jnp.float32)
    return jnp.asarray(class_weights, jnp.float32)[labels]

  @classmethod
  def accuracy(cls, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of examples whose most probable class is their label."""
    return jnp.mean(jnp.argmax(cls.scores(logits), -1) == labels)


class Softmax(_SingleLabel):
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


class Ordinal(_SingleLabel):
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
    `corn_loss`; `weights` (per example, e.g. its class weight) multiply each of its terms, and
    label smoothing is slim's, per binary task."""
    tasks = jnp.arange(num_classes - 1)
    used = (labels[:, None] >= tasks).astype(jnp.float32)  # [B, K − 1]: task k's examples.
    above = (labels[:, None] > tasks).astype(jnp.float32)
    return _binary_cross_entropy(
      logits.astype(jnp.float32), above, used, weights[:, None], label_smoothing
    )

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


class Sigmoid:
  """F independent findings: a logit and a binary cross-entropy each."""

  name = 'sigmoid'
  multilabel = True

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
    """The weighted binary cross-entropy of every used label (labels ≥ 0, [B, F]) over their
    number; `weights` [B, F] from `example_weights`."""
    del num_classes  # The labels' width.
    used = (labels >= 0).astype(jnp.float32)
    positive = (labels > 0).astype(jnp.float32)
    return _binary_cross_entropy(
      logits.astype(jnp.float32), positive, used, weights, label_smoothing
    )

  @staticmethod
  def example_weights(labels: jax.Array, class_weights: np.ndarray | None) -> jax.Array:
    """[B, F]: each label's weight, `class_weights` [F, 2] (finding, negative | positive);
    None → 1. An ignored label's weight does not matter: it is left out of the loss."""
    if class_weights is None:
      return jnp.ones(labels.shape, jnp.float32)
    w = jnp.asarray(class_weights, jnp.float32)
    return jnp.where(labels > 0, w[:, 1], w[:, 0])

  @staticmethod
  def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The fraction of used labels that the logit's sign (probability 0.5) gets right."""
    used = labels >= 0
    right = used & ((logits > 0) == (labels > 0))
    return jnp.sum(right) / jnp.maximum(jnp.sum(used), 1)

  @staticmethod
  def probs(logits: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(logits)

  @staticmethod
  def scores(logits: jax.Array) -> jax.Array:
    """A finding's score for Grad-CAM: its logit."""
    return logits


Head = type[Softmax] | type[Ordinal] | type[Sigmoid]
HEADS: dict[str, Head] = {h.name: h for h in (Softmax, Ordinal, Sigmoid)}
# The head a `dataset.task` trains unless `model.head` says otherwise.
DEFAULT_HEADS = {'single': Softmax.name, 'multilabel': Sigmoid.name}


def get(name: str) -> Head:
  """The head `config.model.head` names."""
  if name not in HEADS:
    raise ConfigError(f'model.head={name!r} is not a head; use one of {sorted(HEADS)}')
  return HEADS[name]


def _default_head(task: str) -> str:
  return DEFAULT_HEADS.get(task, Softmax.name)  # An unknown task: validate names it.


def default_for(task: ml_collections.FieldReference) -> ml_collections.FieldReference:
  """A config field that reads as the default head of whichever task the field `task`
  (config.dataset.task) holds when it is read, until a value is set: 'sigmoid' for
  'multilabel', 'softmax' for 'single'."""
  # The lazy op models.head_scopes_of is built with.
  return task._apply_op(_default_head)
