"""Where the model looks: Grad-CAM, guided backpropagation and guided Grad-CAM.

Grad-CAM (Selvaraju et al. 2017) weighs a layer's feature maps by the spatial mean of the class
score's gradient w.r.t. them and places each cell at its receptive field's centre (InceptionV3's
VALID stem shifts the cells); the layer's output is reached by intercepting the named submodule
(flax `nn.intercept_methods`) and adding a zero perturbation. Guided backpropagation (Springenberg
et al. 2015) runs the same weights with a ReLU that passes only positive gradients through
positive inputs (the model's `activation` field). Their product, guided Grad-CAM, is sharp like
the latter and class-specific like the former.

`explain` is a pure function of (model, variables, images): jitted, batched, and it runs on
however many devices the images are sharded over. `panel_figure` turns one image's result into a
figure a clinician can read (`write_panel` saves it as a PNG): the input as the model saw it,
Grad-CAM with a colour bar and guided Grad-CAM side by side on that same framing, titled with the
prediction, the truth, the layer and the checkpoint step. `layer_grid` and `grid_warning` check
before any compile that the layer's grid is fine enough for Grad-CAM to say where the model looks.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from pneumo_jax import atomic, heads
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation.metrics import PRESENT_AT


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


def _forward(
  model: nn.Module, variables: Any, images: jax.Array, layer: str, delta: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """(logits, output of `layer`), with `delta` added to that output on its way on."""
  captured, found = [], []

  def perturb(y: jax.Array) -> jax.Array:
    captured.append(y)
    return y if delta is None else y + delta.astype(y.dtype)

  with nn.intercept_methods(_on_layer_output(layer, perturb, found)):
    logits, _ = model.apply(variables, images, train=False)
  if not found:
    raise ConfigError(
      f'--layer={layer!r} is not a submodule of the model; give a layer path '
      "(the backbone's Grad-CAM layers are listed by --helpfull under --layer)"
    )
  return logits, captured[0]


def _one_hot_scores(scores: jax.Array, target: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """The class to explain (the prediction unless given) and its one-hot cotangent, over the
  head's class scores (`heads`: softmax's logits, the ordinal head's log-probabilities)."""
  if target is None:
    target = jnp.argmax(scores, axis=-1)
  return target, jax.nn.one_hot(target, scores.shape[-1], dtype=scores.dtype)


def _upsampling(n_out: int, n_in: int, cells: tuple[float, float] | None) -> np.ndarray:
  """[n_out, n_in] linear interpolation from cell centres to pixels, constant past the ends.

  `cells` is the layer's (offset, stride): cell i is centred on pixel offset + stride * i (the
  backbone's `cell_centres`; plain resizing would misplace the outer cells, by 19 px for
  InceptionV3's Mixed_7c at 299 px). Without it (a sub-block path) the cells are stretched over
  the image, as `jax.image.resize` would.
  """
  offset, stride = cells or ((n_out / n_in - 1) / 2, n_out / n_in)
  u = np.clip((np.arange(n_out) - offset) / stride, 0, n_in - 1)
  lo = np.floor(u).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), lo), 1 - (u - lo))
  np.add.at(m, (np.arange(n_out), hi), u - lo)
  return m


def _grad_cam(
  model: nn.Module,
  variables: Any,
  images: jax.Array,
  target: jax.Array | None,
  layer: str,
  cells: tuple[float, float] | None,
) -> dict[str, jax.Array]:
  head = heads.get(model.head)
  shape = jax.eval_shape(lambda x: _forward(model, variables, x, layer)[1], images)

  def scored(delta: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    logits, acts = _forward(model, variables, images, layer, delta)
    return (head.scores(logits), acts), logits

  (scores, acts), vjp, logits = jax.vjp(scored, jnp.zeros(shape.shape, shape.dtype), has_aux=True)
  target, cotangent = _one_hot_scores(scores, target)
  (grads,) = vjp((cotangent, jnp.zeros_like(acts)))
  weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # [B, K]: one weight per feature map.
  cam = jax.nn.relu(jnp.einsum('bhwk,bk->bhw', acts.astype(jnp.float32), weights))
  rows = _upsampling(images.shape[1], cam.shape[1], cells)
  cols = _upsampling(images.shape[2], cam.shape[2], cells)
  cam = jnp.einsum('yh,bhw,xw->byx', rows, cam, cols)
  peak = cam.max(axis=(1, 2), keepdims=True)
  cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
  return {'probs': head.probs(logits.astype(jnp.float32)), 'target': target, 'grad_cam': cam}


def _guided_backprop(
  model: nn.Module, variables: Any, images: jax.Array, target: jax.Array
) -> jax.Array:
  guided = model.clone(activation=guided_relu)
  head = heads.get(model.head)
  scores, vjp = jax.vjp(lambda x: head.scores(guided.apply(variables, x, train=False)[0]), images)
  (grads,) = vjp(_one_hot_scores(scores, target)[1])
  return grads.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('model', 'layer', 'cells'))
def explain(
  model: nn.Module,
  variables: Any,
  images: jax.Array,
  target: jax.Array | None = None,
  *,
  layer: str,
  cells: tuple[float, float] | None = None,
) -> dict[str, jax.Array]:
  """Explains a batch of preprocessed images ([B, H, W, 3] in [-1, 1]).

  Args:
    model: the classifier (its `activation` is swapped for guided backpropagation).
    variables: {'params', 'batch_stats'}.
    images: the batch; may be sharded over devices along B.
    target: [B] class ids to explain; None → each image's predicted class.
    layer: scope path of the submodule whose output Grad-CAM weighs.
    cells: where its cells sit in the input, (offset, stride) in pixels: the backbone's
      `cell_centres[layer]`; None stretches them over the image.

  Returns:
    'probs' [B, C]; 'target' [B]; 'grad_cam' [B, H, W] in [0, 1] (each map divided by its
    maximum, all zeros where no feature votes for the class); 'guided_backprop' [B, H, W, 3]
    (gradient of the class score w.r.t. the image); 'guided_grad_cam' = their product.
  """
  out = _grad_cam(model, variables, images, target, layer, cells)
  out['guided_backprop'] = _guided_backprop(model, variables, images, out['target'])
  out['guided_grad_cam'] = out['guided_backprop'] * out['grad_cam'][..., None]
  return out


def layer_grid(model: nn.Module, variables: Any, image_size: int, layer: str) -> tuple[int, int]:
  """The (rows, columns) of cells in `layer`'s output for square `image_size` inputs.

  Traced with `jax.eval_shape` (nothing is compiled), so callers can check the layer before
  explaining anything; an unknown layer raises the same ValueError as `explain`.
  """
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  acts = jax.eval_shape(lambda v, x: _forward(model, v, x, layer)[1], variables, image)
  return acts.shape[1], acts.shape[2]


def grid_warning(
  layer: str, grid: tuple[int, int], image_size: int, earlier: Sequence[str] = ()
) -> str | None:
  """A one-line warning when `layer` has at most 2×2 cells at this input size, else None.

  Grad-CAM can only be as fine as the layer's grid, placed at its cells' centres: with one cell
  the map is constant, with 2×2 it is one smooth ramp across the image.
  """
  if max(grid) > 2:
    return None
  such = f' such as {" or ".join(earlier)}' if earlier else ''
  return (
    f'Grad-CAM at {layer} is a {grid[0]}×{grid[1]} grid for {image_size}×{image_size} '
    f'inputs: the Grad-CAM map is then nearly uniform; choose an earlier layer{such}, or a '
    'larger input.image_size'
  )


def to_uint8(image: np.ndarray) -> np.ndarray:
  """A preprocessed image in [-1, 1] back to uint8 for display."""
  return np.clip(np.rint((np.asarray(image) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def guided_grey(grad: np.ndarray, percentile: float = 99.0) -> np.ndarray:
  """A guided (Grad-CAM) gradient [H, W, 3] as one grey channel in [0, 1]: |Σ_c grad|, divided by
  its `percentile`-th percentile and clipped.

  Why the channel sum: for a grey film the three channels hold one number, and the gradient with
  respect to that number is exactly the sum of the three. The channels' gradients differ only
  because the first convolution's ImageNet weights treat red, green and blue differently, which
  is what showed as rainbow noise; for colour inputs the sum is the sensitivity to a pixel's
  brightness. Why the absolute value and the percentile: that is how SmoothGrad (Smilkov et al.
  2017) renders gradient maps, since a handful of extreme pixels would otherwise leave the rest of
  the map black. All zeros stay all zeros.
  """
  grey = np.abs(np.asarray(grad, np.float64).sum(axis=-1))
  top = np.percentile(grey, percentile)
  return np.clip(grey / top, 0.0, 1.0) if top > 0 else np.zeros_like(grey)


_DPI = 100
# Inputs smaller than this (in pixels) are enlarged by a whole factor, drawn with nearest-pixel
# interpolation: crisp cells rather than a blur. A 299 px input is drawn 1:1.
_MIN_PANEL_PX = 256
CAM_LABEL = 'Grad-CAM (relative)'


def _title(
  label_names: Sequence[str],
  probs: np.ndarray,
  target: int,
  layer: str,
  step: int,
  true_label: int | None,
  multilabel: bool,
) -> str:
  second = f'layer {layer} · checkpoint step {step}'
  if multilabel:  # Independent findings: those present, then the one explained.
    present = [f'{n} ({p:.1%})' for n, p in zip(label_names, probs, strict=True) if p >= PRESENT_AT]
    first = f'present: {", ".join(present)}' if present else 'no finding present'
    return f'{first}\nexplaining {label_names[target]} ({probs[target]:.1%}) · {second}'
  predicted = int(probs.argmax())
  first = f'predicted {label_names[predicted]} ({probs[predicted]:.1%})'
  if true_label is not None:
    verdict = 'correct' if true_label == predicted else 'wrong'
    first += f' · true {label_names[true_label]} ({verdict})'
  if target != predicted:
    second = f'explaining {label_names[target]} ({probs[target]:.1%}) · {second}'
  return f'{first}\n{second}'


def panel_figure(
  view: np.ndarray,
  result: dict[str, np.ndarray],
  label_names: Sequence[str],
  *,
  layer: str,
  step: int,
  true_label: int | None = None,
  multilabel: bool = False,
) -> Figure:
  """One image's explanation as a Figure of three panels on the model input's exact framing.

  (a) the input as the model saw it (grey when its channels are equal), (b) Grad-CAM over it with
  a colour bar, (c) guided Grad-CAM in grey (`guided_grey`); the title names the prediction, the
  truth if known, the explained class if it is not the prediction, the layer and the step (for
  findings, `multilabel`: the findings present, at PRESENT_AT, and the one explained). Axes
  are placed in pixels so that every image pixel covers a whole number of screen pixels.

  Args:
    view: the preprocessed model input, [H, W, 3] in [-1, 1].
    result: one image's rows of `explain`'s output.
    label_names: the class (finding) names, by id.
    layer: the layer Grad-CAM weighed (as passed to `explain`).
    step: the checkpoint's training step.
    true_label: the image's class id, if known.
  """
  view = np.asarray(view, np.float32)
  cam = np.asarray(result['grad_cam'])
  h, w = view.shape[:2]
  if cam.shape != (h, w):
    raise ValueError(
      f'the explanation is {cam.shape[0]}×{cam.shape[1]} but the view is {h}×{w}; '
      'pass the preprocessed image the model explained'
    )
  target = int(result['target'])
  scale = max(1, -(-_MIN_PANEL_PX // max(h, w)))
  pw, ph = scale * w, scale * h
  pad, gap, bar_w, bar_labels, panel_title, title = 12, 16, 12, 50, 24, 56
  a_left = pad
  b_left = a_left + pw + gap
  bar_left = b_left + pw + gap // 2
  c_left = bar_left + bar_w + bar_labels
  width, height = c_left + pw + pad, pad + ph + panel_title + title
  fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)

  def axes(left: int, box_w: int = pw) -> Any:
    return fig.add_axes((left / width, pad / height, box_w / width, ph / height))

  grey = np.allclose(view, view[..., :1], atol=1e-6)  # A grey film: one channel, grey colormap.

  def show_input(ax: Any) -> None:
    if grey:
      ax.imshow(view[..., 0], cmap='gray', vmin=-1.0, vmax=1.0, interpolation='nearest')
    else:
      ax.imshow(to_uint8(view), interpolation='nearest')

  a, b, c = axes(a_left), axes(b_left), axes(c_left)
  show_input(a)
  a.set_title(f'(a) model input, {h}×{w}')
  show_input(b)
  norm = Normalize(0.0, 1.0)
  b.imshow(cam, cmap='jet', norm=norm, alpha=0.45, interpolation='nearest')
  b.set_title(f'(b) Grad-CAM: {label_names[target]}')
  # Its own fully opaque mappable: the overlay's alpha would wash out the bar's colours.
  fig.colorbar(
    ScalarMappable(norm, 'jet'), cax=axes(bar_left, bar_w), label=CAM_LABEL, ticks=[0, 0.5, 1]
  )
  c.imshow(
    guided_grey(result['guided_grad_cam']), cmap='gray', vmin=0.0, vmax=1.0, interpolation='nearest'
  )
  c.set_title(f'(c) guided Grad-CAM: {label_names[target]}')
  for ax in (a, b, c):
    ax.set_axis_off()
  fig.suptitle(
    _title(label_names, np.asarray(result['probs']), target, layer, step, true_label, multilabel),
    y=1 - 6 / height,
    va='top',
  )
  return fig


def write_panel(path: str, fig: Figure) -> str:
  """Writes a `panel_figure` as a PNG at `path` (creating its folder) and returns `path`.

  Written through `atomic.atomic_file`: a killed run leaves the old file or the new one.
  """
  with atomic.atomic_file(path) as tmp, open(tmp, 'wb') as f:
    fig.savefig(f, format='png', dpi=_DPI)
  return path
