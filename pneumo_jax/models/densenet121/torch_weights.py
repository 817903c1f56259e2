"""torchvision `densenet121` state dicts (`.pth`, read with torch alone), torchxrayvision's
one-channel X-ray weights among them.

torchxrayvision's DenseNet-121 takes one grey channel scaled to [-1024, 1024]; this backbone's
conv0 sees ImageNet's normalisation on three channels. `read` folds the difference into conv0's
kernel and norm0's moving mean (`fold_xrv_normalisation`): exact wherever conv0's 7×7 window lies
inside the image, not in its 3-pixel zero-padded border (docs/densenet121.md has the algebra and
the size of the difference).
"""

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from pneumo_jax import scopes
from pneumo_jax.errors import WeightsError
from pneumo_jax.models import weights
from pneumo_jax.models.densenet121 import net

_TORCH_FIX = 'give the state dict of torchvision.models.densenet121, saved with torch.save'
# torchvision's `_load_state_dict` rewrites keys of its first release this way.
_OLD_TORCH_KEY = re.compile(
  r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$'
)
# Buffers that are not weights: BN's update counter, torchxrayvision's calibration thresholds.
_TORCH_SKIPPED = re.compile(r'(.*\.num_batches_tracked|op_threshs)$')


def _torch_key(layer: net.Layer, variable: str) -> str:
  prefix = 'classifier' if layer.kind == 'dense' else 'features.' + layer.path.replace('/', '.')
  return f'{prefix}.{variable}'


def _read_state(path: str) -> dict[str, Any]:
  """The state dict in a torch.save file, its tensors as float32 numpy arrays."""
  try:
    import torch
  except ImportError as e:
    raise WeightsError(f'reading {path} (a PyTorch file) needs PyTorch: pip install torch') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    pickled = re.search(r'GLOBAL (\S+)', str(e))
    if pickled:
      raise WeightsError(
        f'{path} pickles Python objects ({pickled.group(1)}), not just tensors, as '
        "torchxrayvision's released weights do: load it where that class imports and save its "
        'state_dict(), e.g. torch.save(xrv.models.DenseNet(weights="densenet121-res224-all")'
        '.state_dict(), "xrv_densenet121.pth").'
      ) from e
    raise WeightsError(f'{path} is not a PyTorch state dict file; {_TORCH_FIX}.') from e
  except (RuntimeError, OSError, EOFError, ValueError) as e:
    raise WeightsError(f'{path} is not a PyTorch file ({e}); {_TORCH_FIX}.') from e
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise WeightsError(f'{path} holds no state dict (names → tensors); {_TORCH_FIX}.')
  return {key: value.to(torch.float32).numpy(force=True) for key, value in state.items()}


def read(path: str, *, fold_xrv_normalisation: bool = True) -> dict[str, Any]:
  """A torchvision densenet121 state dict file → {'params', 'batch_stats'} (numpy)."""
  weights.require_file(path, net.WEIGHT_FORMATS)
  return from_state(_read_state(path), path, fold_xrv_normalisation=fold_xrv_normalisation)


def from_state(
  state: Mapping[str, np.ndarray], source: str, *, fold_xrv_normalisation: bool = True
) -> dict[str, Any]:
  """A torchvision densenet121 state dict as numpy arrays → {'params', 'batch_stats'} (numpy).

  Takes any key style torchvision loads (its first release's `norm.1`, a DataParallel `module.`
  prefix). OIHW kernels become HWIO, the classifier's [out, in] weight [in, out]. A 1-channel
  conv0 (torchxrayvision's) becomes a 3-channel one: with `fold_xrv_normalisation`, for inputs
  preprocessed as ImageNet's; otherwise for torchxrayvision's scaling on all three channels
  (docs/densenet121.md derives both and says where the first is inexact). `source` names the weights
  in errors.
  """
  found = {}
  for key, value in state.items():
    key = _OLD_TORCH_KEY.sub(r'\1\2', key.removeprefix('module.'))
    if not _TORCH_SKIPPED.fullmatch(key):
      found[key] = np.asarray(value, np.float32)
  top = found.get('classifier.weight')
  num_classes = top.shape[0] if top is not None and top.ndim == 2 else 1000
  stem = found.get('features.conv0.weight')
  in_channels = 1 if stem is not None and stem.ndim == 4 and stem.shape[1] == 1 else 3
  arrays = {}
  for layer in net.layer_table(num_classes, in_channels):
    for collection, name, _, torch_name in net.VARIABLES[layer.kind]:
      value = found.pop(_torch_key(layer, torch_name), None)
      if value is not None:
        if layer.kind == 'conv' and value.ndim == 4:
          value = value.transpose(2, 3, 1, 0)
        elif layer.kind == 'dense' and value.ndim == 2:
          value = value.T
        arrays[f'{collection}/{layer.path}/{name}'] = value
  arrays |= {f'{key} (torch)': value for key, value in found.items()}  # Not in the model.
  weights.check_names_and_shapes(arrays, net.expected_shapes(num_classes, in_channels), source)
  if in_channels == 1:
    _spread_grey_stem(arrays, fold_xrv_normalisation)
  return scopes.unflatten(arrays)


def _spread_grey_stem(arrays: dict[str, np.ndarray], fold: bool) -> None:
  """Turns a 1-channel conv0 into a 3-channel one in place (docs/densenet121.md)."""
  kernel = arrays['params/conv0/kernel']  # [7, 7, 1, 64]
  if not fold:
    arrays['params/conv0/kernel'] = np.repeat(kernel / 3, 3, axis=2)
    return
  std, mean = np.asarray(net.IMAGENET_STD, np.float64), np.asarray(net.IMAGENET_MEAN, np.float64)
  k64 = kernel.astype(np.float64)
  arrays['params/conv0/kernel'] = (k64 * (2048 * std / 3)[:, None]).astype(np.float32)
  offset = (2048 * mean.mean() - 1024) * k64.sum(axis=(0, 1, 2))
  arrays['batch_stats/norm0/mean'] = (arrays['batch_stats/norm0/mean'] - offset).astype(np.float32)


def _torch_pickle(path: str) -> bytes:
  """The pickled part of a torch.save file, where its keys are (not its tensor data)."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      name = next((n for n in z.namelist() if n.endswith('data.pkl')), None)
      return z.read(name) if name else b''
  with open(path, 'rb') as f:  # The legacy format pickles the dict before the storages.
    return f.read(1 << 20)


def recognise(path: str) -> bool:
  """Whether `path` is a DenseNet-121 state dict: denseblock3 has 24 layers, denseblock4 16
  (DenseNet-161/169/201 have more), judged from its keys alone."""
  if not os.path.isfile(path):
    return False
  try:
    keys = _torch_pickle(path)
  except (OSError, zipfile.BadZipFile):
    return False
  return all(
    (f'features.denseblock{b}.denselayer{n}.'.encode() in keys) == present
    for b, n, present in ((3, 24, True), (3, 25, False), (4, 16, True), (4, 17, False))
  )
