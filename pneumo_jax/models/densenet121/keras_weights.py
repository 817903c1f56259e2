"""Keras's DenseNet121 weights: the legacy `.h5` of the ImageNet download
(`densenet121_weights_tf_dim_ordering_tf_kernels.h5`, whose old layer names `conv1/conv`,
`conv1/bn` and `fc1000` are accepted) and Keras 3's `.weights.h5`, read with h5py alone."""

import os
from typing import Any

import numpy as np

from pneumo_jax import scopes
from pneumo_jax.errors import WeightsError
from pneumo_jax.models import weights
from pneumo_jax.models.densenet121 import net

_KERAS_CLASSES = {'conv': 'conv2d', 'norm': 'batch_normalization', 'dense': 'dense'}
_KERAS_FIX = 'give keras.applications.DenseNet121 weights with its top, as saved by save_weights'


def _h5py() -> Any:
  try:
    import h5py
  except ImportError as e:
    raise WeightsError('reading Keras .h5 weights needs h5py: pip install h5py') from e
  return h5py


def _decode(names: Any) -> list[str]:
  return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _keras_layer_name(name: str) -> str:
  """Keras 3's name for a layer of the legacy download ('conv1/conv' → 'conv1_conv')."""
  return 'predictions' if name == 'fc1000' else name.replace('/', '_')


def _keras3_groups(f: Any) -> dict[str, list[str]] | None:
  """For Keras 3's `.weights.h5` layout, {class: its `layers/<class>[_k]` groups, by k}; else
  None. Keras numbers each class's layers in the model's order, which for DenseNet121 (a chain
  with skip connections) is `net.layer_table()`'s; `other` lists groups of any other class."""
  if 'layer_names' in f.attrs or 'model_weights' in f or 'layers' not in f:
    return None
  out: dict[str, list[tuple[int, str]]] = {c: [] for c in (*_KERAS_CLASSES.values(), 'other')}
  for group in f['layers']:
    cls, _, k = group.rpartition('_')
    cls, k = (cls, int(k)) if cls in out and k.isdigit() else (group, 0)
    out[cls if cls in out else 'other'].append((k, group))
  return {c: [g for _, g in sorted(groups)] for c, groups in out.items()}


def _read_layers(f: Any) -> dict[str, dict[str, np.ndarray]]:
  """{Keras layer name: {variable name: array}} from either `.h5` layout; the legacy one names
  its layers (attribute `layer_names`, each group's `weight_names`), Keras 3's numbers them."""
  out: dict[str, dict[str, np.ndarray]] = {}
  keras3 = _keras3_groups(f)
  if keras3 is not None:
    layers = f['layers']
    for kind, cls in _KERAS_CLASSES.items():
      names = [la.keras for la in net.layer_table(0) if la.kind == kind]
      variables = [v[2] for v in net.VARIABLES[kind]]
      for i, group in enumerate(keras3[cls]):
        name = names[i] if i < len(names) else f'layers/{group}'
        out[name] = {
          (variables[int(j)] if int(j) < len(variables) else f'vars/{j}'): np.asarray(v)
          for j, v in layers[group].get('vars', {}).items()
        }
    return out | {
      f'layers/{g}': {f'vars/{j}': np.asarray(v) for j, v in layers[g]['vars'].items()}
      for g in keras3['other']
      if 'vars' in layers[g]
    }
  root = f.get('model_weights', f)
  for name in _decode(root.attrs.get('layer_names', [])):
    group = root[name]
    weights = _decode(group.attrs.get('weight_names', []))
    if weights:
      out[_keras_layer_name(name)] = {
        w.rpartition('/')[2].partition(':')[0]: np.asarray(group[w]) for w in weights
      }
  return out


def read(path: str) -> dict[str, Any]:
  """Keras DenseNet121 weights (`.h5` or `.weights.h5`) → {'params', 'batch_stats'} (numpy).

  Keras's conv kernels are HWIO and its dense kernel [in, out], as Flax's: only names change.
  """
  weights.require_file(path, net.WEIGHT_FORMATS)
  if not weights.is_hdf5(path):
    raise WeightsError(f'{path} is not an HDF5 file; {_KERAS_FIX}.')
  h5py = _h5py()
  try:
    with h5py.File(path, 'r') as f:
      found = _read_layers(f)
  except OSError as e:
    raise WeightsError(f'{path} cannot be read as HDF5 ({e}); {_KERAS_FIX}.') from e
  top = found.get('predictions', {}).get('kernel')
  num_classes = top.shape[-1] if top is not None and top.ndim == 2 else 1000
  arrays = {}
  for layer in net.layer_table(num_classes):
    values = found.pop(layer.keras, {})
    for collection, name, keras, _ in net.VARIABLES[layer.kind]:
      if keras in values:
        arrays[f'{collection}/{layer.path}/{name}'] = values.pop(keras).astype(np.float32)
    found[layer.keras] = values  # What is left is not in the model.
  arrays |= {
    f'{layer} (Keras)/{v}': value for layer, values in found.items() for v, value in values.items()
  }
  weights.check_names_and_shapes(arrays, net.expected_shapes(num_classes), path)
  return scopes.unflatten(arrays)


def recognise(path: str) -> bool:
  """Whether `path` is a Keras DenseNet121 `.h5` (by its layer names or, in Keras 3's layout,
  its count of convs and batch norms and the stem's kernel), reading no weights."""
  if not (os.path.isfile(path) and weights.is_hdf5(path)):
    return False
  with _h5py().File(path, 'r') as f:
    keras3 = _keras3_groups(f)
    if keras3 is not None:
      stem = f['layers'].get('conv2d/vars/0')
      return (
        len(keras3['conv2d']) == 120
        and len(keras3['batch_normalization']) == 121
        and stem is not None
        and stem.shape[:2] + stem.shape[3:] == (7, 7, net.STEM_FEATURES)
      )
    names = {
      _keras_layer_name(n) for n in _decode(f.get('model_weights', f).attrs.get('layer_names', []))
    }
  return {'conv4_block24_2_conv', 'conv5_block16_2_conv'} <= names and not (
    {'conv4_block25_0_bn', 'conv5_block17_0_bn'} & names
  )
