"""Reading a TF-Slim InceptionV3 checkpoint into pneumo_jax's InceptionV3 variables.

Used by `init_checkpoint` (a raw `.ckpt` is read once and cached as orbax) and by `python -m
converters.slim_to_orbax`. Reads a V1 file (the released `inception_v3.ckpt`) or a V2 prefix
(`model.ckpt-6000`). The class count and the aux head (present or not, and its kernel size, which
slim picks from the input size) come from the file. What is not a network variable is skipped:
anything outside `InceptionV3/` (global_step, Adam's beta powers, ...) and the copies a training run
keeps under a variable's name (optimizer slots such as `.../weights/RMSProp`, and
`.../ExponentialMovingAverage`: the raw weights are converted, as slim's evaluation does without
--moving_average_decay). Everything else must match the model exactly.

Needs TensorFlow (`pip install pneumo_jax[convert]`); it is imported only when converting.
"""

import re

import numpy as np
from absl import logging

from pneumo_jax import scopes
from pneumo_jax.errors import WeightsError
from pneumo_jax.models import weights
from pneumo_jax.models.inception_v3.net import InceptionV3

_SCOPE = 'InceptionV3/'
_MARKER = 'InceptionV3/Conv2d_1a_3x3/weights'
_LOGITS = 'InceptionV3/Logits/Conv2d_1c_1x1/weights'
_AUX_LOGITS = 'InceptionV3/AuxLogits/Conv2d_2b_1x1/weights'
_AUX_CONV = re.compile(r'InceptionV3/AuxLogits/Conv2d_2a_(\d+)x(\d+)/weights$')
_BATCH_STATS = ('moving_mean', 'moving_variance')
_CLASSIFIERS = ('Logits/Conv2d_1c_1x1', 'AuxLogits/Conv2d_2b_1x1')


def _read(ckpt_path: str) -> dict[str, np.ndarray]:
  import tensorflow as tf

  try:
    reader = tf.train.load_checkpoint(ckpt_path)
  except (ValueError, tf.errors.OpError) as e:
    raise WeightsError(
      f'cannot read a TF checkpoint at {ckpt_path!r} (give the V1 file itself or the V2 prefix, '
      f'without .index/.data-*): {e}'
    ) from e
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _expected_shapes(
  num_classes: int, aux_kernel: tuple[int, int] | None
) -> dict[str, tuple[int, ...]]:
  """The model's variable shapes for this checkpoint's classes and aux head."""
  model = InceptionV3(num_classes=num_classes, create_aux_logits=aux_kernel is not None)
  shapes = weights.model_shapes(model, 299)
  if aux_kernel is not None and aux_kernel != (5, 5):
    # A checkpoint built for a small input has the smaller aux conv slim names after its kernel.
    kh, kw = aux_kernel
    for old in [k for k in shapes if '/AuxLogits/Conv2d_2a_5x5/' in k]:
      shape = shapes.pop(old)
      new = old.replace('Conv2d_2a_5x5', f'Conv2d_2a_{kh}x{kw}')
      shapes[new] = (kh, kw, *shape[2:]) if new.endswith('/weights') else shape
  return shapes


def _is_copy_of(name: str, variables: set[str]) -> bool:
  """True for `<variable>/<suffix>`: a training run's slot or moving-average copy of a variable."""
  return any(name[:i] in variables for i in range(len(name)) if name[i] == '/')


def read(ckpt_path: str, *, drop_background: bool = False) -> dict:
  """Reads a TF-Slim InceptionV3 checkpoint; returns numpy {'params': …, 'batch_stats': …}.

  Args:
    ckpt_path: V1 checkpoint file or V2 prefix.
    drop_background: remove slim's class 0 ("background") from Logits and AuxLogits, leaving the
      1000 ImageNet classes (needs a 1001-class checkpoint).

  Raises:
    ValueError: not an InceptionV3 checkpoint, or its variables do not match the model (the
      message lists every unknown, missing and mis-shaped one).
  """
  tensors = _read(ckpt_path)
  if _MARKER not in tensors:
    sample = ', '.join(sorted(tensors)[:5]) or 'no variables at all'
    raise WeightsError(
      f'{ckpt_path} is not a TF-Slim InceptionV3 checkpoint: it has no {_MARKER} '
      f'(it holds e.g. {sample}).'
    )
  logits = tensors.get(_LOGITS, tensors.get(_AUX_LOGITS))
  num_classes = logits.shape[-1] if logits is not None else 1001
  if drop_background and num_classes != 1001:
    raise WeightsError(
      f'--drop_background removes class 0 of a 1001-class checkpoint; {ckpt_path} has '
      f'{num_classes} classes.'
    )
  aux_kernels = [tuple(map(int, m.groups())) for n in tensors if (m := _AUX_CONV.match(n))]
  if len(aux_kernels) > 1:
    raise WeightsError(f'{ckpt_path} has several AuxLogits/Conv2d_2a_* kernels: {aux_kernels}.')
  aux_kernel = aux_kernels[0] if aux_kernels else None
  if aux_kernel is None and any(n.startswith(_SCOPE + 'AuxLogits/') for n in tensors):
    aux_kernel = (5, 5)  # Partial aux head: check it as the 299-pixel one, listing what's missing.
  expected = _expected_shapes(num_classes, aux_kernel)

  by_slim_name = {
    ('batch_stats/' if k.rsplit('/', 1)[-1] in _BATCH_STATS else 'params/') + k: k
    for k in (n[len(_SCOPE) :] for n in tensors if n.startswith(_SCOPE))
  }
  model_names = {_SCOPE + v for k, v in by_slim_name.items() if k in expected}
  arrays, skipped = {}, len(tensors)
  for key, name in by_slim_name.items():
    if key in expected or not _is_copy_of(_SCOPE + name, model_names):
      arrays[key] = tensors[_SCOPE + name]
      skipped -= 1
  weights.check_names_and_shapes(arrays, expected, ckpt_path)
  logging.info('%s: converted %d variables, skipped %d.', ckpt_path, len(arrays), skipped)

  if drop_background:
    for scope in _CLASSIFIERS:
      for leaf in ('weights', 'biases'):
        key = f'params/{scope}/{leaf}'
        if key in arrays:
          arrays[key] = arrays[key][..., 1:]
  return scopes.unflatten({k: np.asarray(v, np.float32) for k, v in arrays.items()})
