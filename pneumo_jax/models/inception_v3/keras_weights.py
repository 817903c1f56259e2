"""Reading Keras InceptionV3 weights (.h5) into pneumo_jax's InceptionV3 variables.

Used by `init_checkpoint` (a raw `.h5` is read once and cached as orbax) and by `python -m
converters.keras_to_orbax`. Takes both layouts Keras writes: the legacy one of the official ImageNet
download (`<layer>/<layer>/<var>:0`, under `model_weights/` in a whole-model save), matched to a
model by the order of its `layer_names`, and Keras 3's `*.weights.h5`
(`layers/<class>_<k>/vars/<i>`). Neither is keyed by architecture, so Keras itself loads the file
into `keras.applications.InceptionV3` (rejecting another network's), whose layers, walked in
creation order, pair one to one with slim's conv scopes sorted by name; every shape is checked.

What comes out: 1000 ImageNet classes in Keras's order, with no "background" class 0 (slim's
checkpoint has 1001) and no aux head, i.e. variables for `InceptionV3(num_classes=1000,
create_aux_logits=False)`. The `predictions` dense layer becomes `Logits/Conv2d_1c_1x1` (a 1×1
kernel) and the model returns its logits (Keras's model adds the softmax). To fine-tune with an aux
head, keep `AuxLogits` in exclude_scopes: it starts afresh. Keras's batch norm has no scale and
epsilon 0.001, as slim's (checked below).

Needs Keras 3 with any backend (Keras's default, TensorFlow, when installed, else JAX).
"""

import importlib.util
import os
import warnings
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from pneumo_jax import scopes
from pneumo_jax.errors import NotFoundError, WeightsError
from pneumo_jax.models import weights
from pneumo_jax.models.inception_v3.net import BN_EPSILON, InceptionV3

NUM_CLASSES = 1000
_OFFICIAL = 'inception_v3_weights_tf_dim_ordering_tf_kernels.h5'


def target_model() -> InceptionV3:
  """The pneumo_jax model the converted variables are for."""
  return InceptionV3(num_classes=NUM_CLASSES, create_aux_logits=False)


def _check_file(path: str) -> None:
  """Clear errors for what Keras would report obscurely: no file, not HDF5, misnamed layout."""
  if not os.path.isfile(path):
    raise NotFoundError(f'{path} does not exist; give a Keras InceptionV3 .h5 file')
  if not h5py.is_hdf5(path):
    raise WeightsError(f'{path} is not an HDF5 file; give a Keras InceptionV3 .h5 file')
  with h5py.File(path, 'r') as f:
    keras3 = 'layers' in f and 'layer_names' not in f.attrs and 'model_weights' not in f
  if keras3 != path.endswith('.weights.h5'):
    want = 'end in .weights.h5' if keras3 else 'not end in .weights.h5'
    layout = "Keras 3's" if keras3 else 'the legacy Keras'
    raise WeightsError(
      f'{path} has {layout} layout, so its name must {want} (Keras reads a file '
      'by its name): rename it'
    )


def _load_keras(path: str) -> Any:
  """keras.applications.InceptionV3 (1000 classes, logits out) holding the weights in `path`."""
  if importlib.util.find_spec('tensorflow') is None:
    os.environ.setdefault('KERAS_BACKEND', 'jax')
  import keras

  model = keras.applications.InceptionV3(
    weights=None, classes=NUM_CLASSES, classifier_activation=None
  )
  try:
    with warnings.catch_warnings():  # Keras 3 warns about every layer-less container it skips.
      warnings.simplefilter('ignore')
      model.load_weights(path)
  except (ValueError, KeyError, TypeError) as e:
    reason = str(e).strip().split('\n')[0]
    raise WeightsError(
      f'{path} is not the weights of a Keras InceptionV3 with its 1000-class top (as '
      f'keras.applications.InceptionV3(weights=...) or {_OFFICIAL}; the _notop file lacks the '
      f'classifier). Keras says: {reason}'
    ) from e
  return model


def _inputs(nodes: Any) -> Iterator[str]:
  """Names of the layers feeding a layer, in argument order, from its serialized inbound nodes."""
  if isinstance(nodes, dict):
    if 'keras_history' in nodes:
      yield nodes['keras_history'][0]
    else:
      for v in nodes.values():
        yield from _inputs(v)
  elif isinstance(nodes, list | tuple):
    for v in nodes:
      yield from _inputs(v)


def _creation_order(model: Any) -> list[Any]:
  """The model's layers in the order Keras's InceptionV3 code creates them.

  A depth-first walk from the output that emits a layer after all its inputs, visiting inputs in
  argument order; for code that builds each concatenated branch whole, in concatenation order,
  this is the creation order. Only the public config is used, never layer names' numbers.
  """
  layers = model.get_config()['layers']
  inbound = {layer['name']: list(_inputs(layer['inbound_nodes'])) for layer in layers}
  order: list[str] = []
  seen: set[str] = set()

  def visit(name: str) -> None:
    if name not in seen:
      seen.add(name)
      for parent in inbound[name]:
        visit(parent)
      order.append(name)

  visit(model.layers[-1].name)
  return [model.get_layer(name) for name in order]


def _numpy(variable: Any) -> np.ndarray:
  import keras

  return np.asarray(keras.ops.convert_to_numpy(variable), np.float32)


def read(h5_path: str) -> dict:
  """Reads a Keras InceptionV3 `.h5`/`.weights.h5`; returns numpy {'params', 'batch_stats'}.

  Raises:
    ValueError: not a Keras InceptionV3 with the 1000-class top, or (a Keras change) its layers
      no longer pair one-to-one with the model's; the message says which.
  """
  _check_file(h5_path)
  model = _load_keras(h5_path)
  import keras

  layers = _creation_order(model)
  convs = [la for la in layers if isinstance(la, keras.layers.Conv2D)]
  norms = [la for la in layers if isinstance(la, keras.layers.BatchNormalization)]
  dense = [la for la in layers if isinstance(la, keras.layers.Dense)]
  expected = weights.model_shapes(target_model(), 299)
  slim = sorted(
    k.removeprefix('params/').removesuffix('/weights')
    for k in expected
    if k.startswith('params/') and k.endswith('/weights') and not k.startswith('params/Logits/')
  )
  if not (len(convs) == len(norms) == len(slim) and len(dense) == 1):
    raise WeightsError(
      f'keras.applications.InceptionV3 has {len(convs)} convs, {len(norms)} batch norms and '
      f'{len(dense)} dense layers; pneumo_jax expects {len(slim)}, {len(slim)} and 1.'
    )
  arrays = {}
  for scope, conv, norm in zip(slim, convs, norms, strict=True):
    if norm.scale or not norm.center or norm.epsilon != BN_EPSILON or conv.use_bias:
      raise WeightsError(
        f'Keras layers {conv.name}/{norm.name} are not slim conv + batch norm (no conv bias, '
        f'BN centre only, epsilon {BN_EPSILON}); this Keras InceptionV3 differs from slim.'
      )
    arrays[f'params/{scope}/weights'] = _numpy(conv.kernel)
    arrays[f'params/{scope}/BatchNorm/beta'] = _numpy(norm.beta)
    arrays[f'batch_stats/{scope}/BatchNorm/moving_mean'] = _numpy(norm.moving_mean)
    arrays[f'batch_stats/{scope}/BatchNorm/moving_variance'] = _numpy(norm.moving_variance)
  arrays['params/Logits/Conv2d_1c_1x1/weights'] = _numpy(dense[0].kernel)[None, None]
  arrays['params/Logits/Conv2d_1c_1x1/biases'] = _numpy(dense[0].bias)
  weights.check_names_and_shapes(arrays, expected, h5_path)
  return scopes.unflatten(arrays)
