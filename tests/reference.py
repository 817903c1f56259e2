"""Independent reference networks for parity tests, with weights that make parity meaningful.

Default initialisers make InceptionV3 nearly input-independent (BN offsets dominate), so a port
that ignored its input would still "match". `nontrivial_value` re-draws every variable instead:
He-scaled kernels, small non-zero offsets and biases, moving means != 0, variances in [0.5, 2].
Framework-neutral helpers come first; each reference framework gets its own clearly named builder.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------- neutral helpers


def random_images(batch: int, size: int, seed: int) -> np.ndarray:
  """Images in the model's [-1, 1] input range, float32 [batch, size, size, 3]."""
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
  """max |actual - expected| / max |expected|: scale-free, and no division by near-zeros."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def nontrivial_value(kind: str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
  """A random value for a variable of the given kind (its slim/Keras leaf name).

  kind: 'weights'/'kernel' (He normal over fan-in), 'biases'/'bias'/'beta' (normal, std 0.1),
  'gamma' (uniform [0.5, 1.5]), 'moving_mean' (normal, std 0.1), 'moving_variance' (uniform
  [0.5, 2]).
  """
  shape = tuple(shape)
  if kind in ('weights', 'kernel'):
    fan_in = int(np.prod(shape[:-1]))
    value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
  elif kind in ('biases', 'bias', 'beta', 'moving_mean'):
    value = rng.normal(0.0, 0.1, shape)
  elif kind == 'gamma':
    value = rng.uniform(0.5, 1.5, shape)
  elif kind == 'moving_variance':
    value = rng.uniform(0.5, 2.0, shape)
  else:
    raise ValueError(f'no rule for a variable of kind {kind!r}')
  return value.astype(np.float32)


def random_variables(model: Any, size: int, seed: int = 0) -> dict[str, Any]:
  """{'params', 'batch_stats'} for a pneumo_jax model at `size` px, drawn by `nontrivial_value`
  from `jax.eval_shape` of its init: no init is compiled (InceptionV3's takes ~15 s on 2 cores)."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  return {
    c: traverse_util.unflatten_dict(
      {
        k: nontrivial_value(k[-1], v.shape, rng)
        for k, v in traverse_util.flatten_dict(shapes[c]).items()
      }
    )
    for c in ('params', 'batch_stats')
  }


# ---------------------------------------------------------------------------- TensorFlow 1.x


def _tf():
  """TensorFlow with TF-Slim's import work-around (tf-slim 1.1.0 expects `ops.Tensor`)."""
  import tensorflow as tf
  from tensorflow.python.framework import ops

  ops.Tensor = tf.Tensor
  return tf


def write_tf_checkpoint(arrays: Mapping[str, np.ndarray], path: str, version: str = 'V2') -> str:
  """Writes a name-based TF checkpoint ('V1' single file or 'V2' prefix) holding `arrays`.

  Returns the path to give `tf.train.load_checkpoint`. Used to forge checkpoints (tampered,
  with optimizer slots, ...) that a real training run would write.
  """
  tf = _tf()
  with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    variables = {
      name: tf.compat.v1.Variable(value, name=f'v{i}')
      for i, (name, value) in enumerate(arrays.items())
    }
    sess.run(tf.compat.v1.global_variables_initializer())
    saver = tf.compat.v1.train.Saver(var_list=variables, write_version=_saver_version(tf, version))
    return saver.save(sess, path, write_meta_graph=False)


def _saver_version(tf: Any, version: str) -> int:
  if version not in ('V1', 'V2'):
    raise ValueError(f'checkpoint version must be V1 or V2, got {version!r}')
  return getattr(tf.compat.v1.train.SaverDef, version)


# ---------------------------------------------------------------------------- TF-Slim


@dataclasses.dataclass
class SlimReference:
  """A TF-Slim InceptionV3 graph with re-drawn weights, in one TF1 session.

  `eval_points` come from the net built with is_training=False, `train_points` from a second
  tower on the same variables built with is_training=True (batch statistics, dropout on).
  """

  tf: Any
  session: Any
  images: Any
  eval_points: dict[str, Any]
  train_points: dict[str, Any]
  bn_updates: list[Any]
  values: dict[str, np.ndarray]  # checkpoint name → the value drawn for it.

  def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every slim endpoint of the inference-mode net."""
    return self.session.run(self.eval_points, {self.images: images})

  def train_outputs(
    self, images: np.ndarray, names: Sequence[str]
  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One training-mode forward: (`names` endpoints, every variable after the BN updates).

    The variables are reset to their drawn values afterwards, so the reference stays reusable.
    """
    points = {n: self.train_points[n] for n in names}
    out, _ = self.session.run((points, self.bn_updates), {self.images: images})
    updated = self._read()
    self._assign(self.values)
    return out, updated

  def save(self, path: str, version: str = 'V2') -> str:
    """Saves every variable under its slim name; returns the path for `tf.train.load_checkpoint`."""
    with self.session.graph.as_default():
      saver = self.tf.compat.v1.train.Saver(write_version=_saver_version(self.tf, version))
      return saver.save(self.session, path, write_meta_graph=False)

  def _variables(self) -> dict[str, Any]:
    return {v.op.name: v for v in self.session.graph.get_collection('variables')}

  def _read(self) -> dict[str, np.ndarray]:
    return self.session.run(self._variables())

  def _assign(self, values: Mapping[str, np.ndarray]) -> None:
    variables = self._variables()
    with self.session.graph.as_default():
      self.session.run(
        [variables[n].initializer for n in values],
        {variables[n].initial_value: v for n, v in values.items()},
      )


def build_slim_reference(
  image_size: int,
  *,
  batch_size: int = 2,
  num_classes: int = 1001,
  create_aux_logits: bool = True,
  seed: int = 0,
) -> SlimReference:
  """`tf_slim.nets.inception_v3` (the seed's network) in graph mode, weights re-drawn."""
  tf = _tf()
  import tf_slim
  from tf_slim.nets import inception_v3

  graph = tf.Graph()
  with graph.as_default():
    images = tf.compat.v1.placeholder(tf.float32, [batch_size, image_size, image_size, 3])
    # A named collection sidesteps tf-slim's broken default UPDATE_OPS path under TF 2.x.
    arg_scope = inception_v3.inception_v3_arg_scope(updates_collections='bn_update_ops')
    with tf_slim.arg_scope(arg_scope):
      kwargs = dict(num_classes=num_classes, create_aux_logits=create_aux_logits)
      _, eval_points = inception_v3.inception_v3(images, is_training=False, **kwargs)
      _, train_points = inception_v3.inception_v3(
        images, is_training=True, reuse=True, scope='InceptionV3', **kwargs
      )
    session = tf.compat.v1.Session(graph=graph)
    rng = np.random.default_rng(seed)
    values = {
      v.op.name: nontrivial_value(v.op.name.rsplit('/', 1)[-1], v.shape, rng)
      for v in tf.compat.v1.global_variables()
    }
    reference = SlimReference(
      tf=tf,
      session=session,
      images=images,
      eval_points=eval_points,
      train_points=train_points,
      bn_updates=tf.compat.v1.get_collection('bn_update_ops'),
      values=values,
    )
  reference._assign(values)
  return reference


# ---------------------------------------------------------------------------- Keras
# The caller sets KERAS_BACKEND before keras is first imported; any backend works.

# Keras's InceptionV3 names its Mixed blocks' outputs mixed0..mixed10; slim's endpoint for each.
KERAS_TO_SLIM_ENDPOINTS = {
  f'mixed{i}': slim
  for i, slim in enumerate(
    (
      'Mixed_5b',
      'Mixed_5c',
      'Mixed_5d',
      'Mixed_6a',
      'Mixed_6b',
      'Mixed_6c',
      'Mixed_6d',
      'Mixed_6e',
      'Mixed_7a',
      'Mixed_7b',
      'Mixed_7c',
    )
  )
}

# Layer-name prefixes Keras generates (`<prefix>_<n>`, n counting creations of the class).
_KERAS_AUTO_PREFIXES = (
  'conv2d',
  'batch_normalization',
  'activation',
  'max_pooling2d',
  'average_pooling2d',
  'concatenate',
)


def build_keras_reference(seed: int = 0) -> Any:
  """keras.applications.InceptionV3 (1000 classes, logits out) with every weight re-drawn.

  Built on an input of unknown height and width: its builder accepts that through `input_tensor`
  even with the top, and the global average pool makes the classifier size-independent, so one
  model serves 299 px and small inputs alike (its variables are those of the 299 px model).
  """
  import keras

  model = keras.applications.InceptionV3(
    weights=None, classifier_activation=None, input_tensor=keras.Input((None, None, 3))
  )
  rng = np.random.default_rng(seed)
  for variable in model.weights:
    variable.assign(nontrivial_value(variable.name, variable.shape, rng))
  return model


def keras_endpoints(model: Any) -> Any:
  """A Keras model returning {'logits', 'mixed0', …, 'mixed10'} of `model`."""
  import keras

  outputs = {name: model.get_layer(name).output for name in KERAS_TO_SLIM_ENDPOINTS}
  return keras.Model(model.inputs[0], {**outputs, 'logits': model.output})


def _keras2_names(model: Any) -> dict[str, str]:
  """Keras 3 layer name → the name Keras 2 gave it (`conv2d_1`, … in creation order; `input_1`).

  Both number generated names per class in creation order, Keras 3 from 0 (unsuffixed) and per
  process, Keras 2 from 1; explicit names (mixed0, predictions, …) stay.
  """
  import re

  numbered: dict[str, list[tuple[int, str]]] = {}
  renamed = {}
  for layer in model.layers:
    prefix, number = re.fullmatch(r'(.+?)(?:_(\d+))?', layer.name).groups()
    if prefix in _KERAS_AUTO_PREFIXES:
      numbered.setdefault(prefix, []).append((int(number or -1), layer.name))
    else:
      renamed[layer.name] = 'input_1' if layer.__class__.__name__ == 'InputLayer' else layer.name
  for prefix, layers in numbered.items():
    for rank, (_, name) in enumerate(sorted(layers)):
      renamed[name] = f'{prefix}_{rank + 1}'
  return renamed


def save_keras_legacy_h5(model: Any, path: str) -> None:
  """Writes `model`'s weights in the layout of Keras's official ImageNet InceptionV3 download.

  That file came from Keras 2's `save_weights`: attribute `layer_names` lists every layer in the
  model's (topological) layer order, which is how a loader matches them, not creation order;
  each layer is a group with attribute `weight_names` ('conv2d_1/kernel:0', …) whose datasets sit
  at `<layer>/<layer>/<var>:0`; layers are named as Keras 2 named them.
  """
  import h5py
  import keras

  names = _keras2_names(model)
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = np.array([names[la.name].encode() for la in model.layers])
    f.attrs['backend'] = b'tensorflow'
    f.attrs['keras_version'] = b'2.1.2'  # A Keras 2 writer (the official file's exact one aside).
    for layer in model.layers:
      name = names[layer.name]
      group = f.create_group(name)
      weight_names = [f'{name}/{v.name}:0' for v in layer.weights]
      group.attrs['weight_names'] = np.array([w.encode() for w in weight_names], dtype='S')
      for weight_name, variable in zip(weight_names, layer.weights, strict=True):
        group.create_dataset(weight_name, data=keras.ops.convert_to_numpy(variable))
