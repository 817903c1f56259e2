"""Where the model looks: Grad-CAM, guided backpropagation and guided Grad-CAM.

Grad-CAM (Selvaraju et al. 2017) weighs a layer's feature maps by the spatial mean of the class
score's gradient w.r.t. them, then places each cell at its receptive field's centre in the image
(not a plain resize: InceptionV3's VALID stem shifts the cells). The layer's output is reached
without touching the model by intercepting the named submodule's `__call__` (flax
`nn.intercept_methods`) and adding a zero perturbation whose gradient is the gradient w.r.t.
that output. Guided backpropagation (Springenberg et al. 2015) runs the same weights with a ReLU
whose backward pass lets only positive gradients through positive inputs, via the model's
`activation` field. Their product, guided Grad-CAM, is sharp like the latter and class-specific
like the former.

Everything here is a pure function of (model, variables, images): jitted, batched, and it runs
on however many devices the images are sharded over.
"""

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import logging
from PIL import Image

DEFAULT_LAYER = 'Mixed_7c'


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
  """ReLU forward; backward passes a gradient only where both it and the input are positive."""
  return jax.nn.relu(x)


def _guided_relu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jax.nn.relu(x), x


def _guided_relu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


def _on_layer_output(layer: str, fn: Callable[[jax.Array], jax.Array], found: list[bool]):
  """An interceptor replacing the output y of the submodule at path `layer` with fn(y)."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and '/'.join(context.module.path) == layer:
      found.append(True)
      return fn(out)
    return out

  return interceptor


def _forward(model: nn.Module, variables: Any, images: jax.Array, layer: str,
             delta: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(logits, output of `layer`), with `delta` added to that output on its way on."""
  captured, found = [], []

  def perturb(y: jax.Array) -> jax.Array:
    captured.append(y)
    return y if delta is None else y + delta.astype(y.dtype)

  with nn.intercept_methods(_on_layer_output(layer, perturb, found)):
    logits, _ = model.apply(variables, images, train=False)
  if not found:
    raise ValueError(
        f'explain layer {layer!r} is not a submodule of the model; use a scope path such as '
        "'Mixed_5d', 'Mixed_6e' or 'Mixed_7c' (slim endpoint names)")
  return logits, captured[0]


def _one_hot_scores(logits: jax.Array, target: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """The class to explain (the prediction unless given) and its one-hot cotangent."""
  if target is None:
    target = jnp.argmax(logits, axis=-1)
  return target, jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)


# Where the cells of InceptionV3's endpoints sit in the input: cell i's receptive field is centred
# on input pixel offset + stride * i. Only the stem's VALID layers and the stride-2 reductions
# (Mixed_6a, Mixed_7a) move centres (each VALID k×k op adds stride_in * (k - 1) / 2 to the
# offset); the SAME layers in between keep them. Plain resizing would stretch the cells over the
# whole image instead, misplacing the outer ones (by 19 px for Mixed_7c at 299 px input).
_CELL_CENTRES: dict[str, tuple[float, float]] = {
    'Conv2d_1a_3x3': (1, 2), 'Conv2d_2a_3x3': (3, 2), 'Conv2d_2b_3x3': (3, 2),
    'MaxPool_3a_3x3': (5, 4), 'Conv2d_3b_1x1': (5, 4), 'Conv2d_4a_3x3': (9, 4),
    'MaxPool_5a_3x3': (13, 8), 'Mixed_5b': (13, 8), 'Mixed_5c': (13, 8), 'Mixed_5d': (13, 8),
    'Mixed_6a': (21, 16), 'Mixed_6b': (21, 16), 'Mixed_6c': (21, 16), 'Mixed_6d': (21, 16),
    'Mixed_6e': (21, 16), 'Mixed_7a': (37, 32), 'Mixed_7b': (37, 32), 'Mixed_7c': (37, 32),
}


def _upsampling(n_out: int, n_in: int, layer: str) -> np.ndarray:
  """[n_out, n_in] linear interpolation from cell centres to pixels, constant past the ends.

  Layers outside the table (sub-block paths) fall back to stretching the cells over the image,
  as `jax.image.resize` would.
  """
  offset, stride = _CELL_CENTRES.get(layer, ((n_out / n_in - 1) / 2, n_out / n_in))
  u = np.clip((np.arange(n_out) - offset) / stride, 0, n_in - 1)
  lo = np.floor(u).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), lo), 1 - (u - lo))
  np.add.at(m, (np.arange(n_out), hi), u - lo)
  return m


def _grad_cam(model: nn.Module, variables: Any, images: jax.Array, target: jax.Array | None,
              layer: str) -> dict[str, jax.Array]:
  shape = jax.eval_shape(lambda x: _forward(model, variables, x, layer)[1], images)
  (logits, acts), vjp = jax.vjp(
      lambda d: _forward(model, variables, images, layer, d), jnp.zeros(shape.shape, shape.dtype))
  target, cotangent = _one_hot_scores(logits, target)
  (grads,) = vjp((cotangent, jnp.zeros_like(acts)))
  if acts.shape[1] * acts.shape[2] == 1:  # Known while tracing: warns once per compilation.
    logging.warning('Grad-CAM at %s is a single cell for %dx%d inputs, so it cannot say where '
                    'the model looks; pick an earlier layer (Mixed_6e, Mixed_5d).', layer,
                    *images.shape[1:3])
  weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # [B, K]: one weight per feature map.
  cam = jax.nn.relu(jnp.einsum('bhwk,bk->bhw', acts.astype(jnp.float32), weights))
  rows = _upsampling(images.shape[1], cam.shape[1], layer)
  cols = _upsampling(images.shape[2], cam.shape[2], layer)
  cam = jnp.einsum('yh,bhw,xw->byx', rows, cam, cols)
  peak = cam.max(axis=(1, 2), keepdims=True)
  cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
  return {'probs': jax.nn.softmax(logits.astype(jnp.float32)), 'target': target, 'grad_cam': cam}


def _guided_backprop(model: nn.Module, variables: Any, images: jax.Array,
                     target: jax.Array) -> jax.Array:
  guided = model.clone(activation=guided_relu)
  logits, vjp = jax.vjp(lambda x: guided.apply(variables, x, train=False)[0], images)
  (grads,) = vjp(_one_hot_scores(logits, target)[1])
  return grads.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('model', 'layer'))
def explain(model: nn.Module, variables: Any, images: jax.Array, target: jax.Array | None = None,
            *, layer: str = DEFAULT_LAYER) -> dict[str, jax.Array]:
  """Explains a batch of preprocessed images ([B, H, W, 3] in [-1, 1]).

  Args:
    model: the classifier (its `activation` is swapped for guided backpropagation).
    variables: {'params', 'batch_stats'}.
    images: the batch; may be sharded over devices along B.
    target: [B] class ids to explain; None → each image's predicted class.
    layer: scope path of the submodule whose output Grad-CAM weighs.

  Returns:
    'probs' [B, C]; 'target' [B]; 'grad_cam' [B, H, W] in [0, 1] (each map divided by its
    maximum, all zeros where no feature votes for the class); 'guided_backprop' [B, H, W, 3]
    (gradient of the class logit w.r.t. the image); 'guided_grad_cam' = their product.
  """
  out = _grad_cam(model, variables, images, target, layer)
  out['guided_backprop'] = _guided_backprop(model, variables, images, out['target'])
  out['guided_grad_cam'] = out['guided_backprop'] * out['grad_cam'][..., None]
  return out


def to_uint8(image: np.ndarray) -> np.ndarray:
  """A preprocessed image in [-1, 1] back to uint8 for display."""
  return np.clip(np.rint((np.asarray(image) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """A [0, 1] map as a jet-coloured layer over a uint8 [H, W, 3] image."""
  heat = matplotlib.colormaps['jet'](np.asarray(cam))[..., :3] * 255.0
  return np.rint((1 - alpha) * image + alpha * heat).astype(np.uint8)


def gradient_image(grad: np.ndarray) -> np.ndarray:
  """A gradient [H, W, 3] as a viewable uint8 image: zero is mid-grey, ±3 std saturate."""
  grad = np.asarray(grad, np.float64)
  grad = (grad - grad.mean()) / (grad.std() + 1e-12)
  return np.clip(np.rint(127.5 + grad * 127.5 / 3.0), 0, 255).astype(np.uint8)


def write(out_dir: str, name: str, source: str, view: np.ndarray, result: dict[str, np.ndarray],
          label_names: Sequence[str]) -> list[str]:
  """Writes one image's explanation files under `out_dir`; returns their paths.

  `<name>_original<ext>` is a byte copy of `source`; the others are PNGs on the image as the model
  saw it (`view`, preprocessed, in [-1, 1]) and carry the explained class in their names:
  `<name>_<class>_gradcam.png` (heatmap over the image), `..._guided_backprop.png`,
  `..._guided_gradcam.png`. `result` holds one image's rows of `explain`'s output.
  """
  os.makedirs(out_dir, exist_ok=True)
  original = os.path.join(out_dir, f'{name}_original{os.path.splitext(source)[1].lower()}')
  shutil.copyfile(source, original)
  stem = os.path.join(out_dir, f'{name}_{label_names[int(result["target"])]}')
  images = {
      'gradcam': heatmap_overlay(to_uint8(view), result['grad_cam']),
      'guided_backprop': gradient_image(result['guided_backprop']),
      'guided_gradcam': gradient_image(result['guided_grad_cam']),
  }
  paths = [original]
  for kind, pixels in images.items():
    paths.append(f'{stem}_{kind}.png')
    Image.fromarray(pixels).save(paths[-1])
  return paths
