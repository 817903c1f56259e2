"""Explanations: guided-ReLU gradient semantics, Grad-CAM against the closed-form CAM, the layer's
grid check, the annotated panels, and (the test that means something) Grad-CAM finding a planted
patch in a trained model."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pneumo_jax import checkpoints
from pneumo_jax.data import preprocess
from pneumo_jax.evaluation import explain
from pneumo_jax.models import build_model
from pneumo_jax.models.inception_v3 import BACKBONE, InceptionV3
from pneumo_jax.modes import explain as explain_mode
from pneumo_jax.training import loop
from tests import reference

SIZE = 107  # The smallest input at which Mixed_7c has more than one cell (2×2).


def test_guided_relu_passes_only_positive_gradients_through_positive_inputs():
  x = jnp.array([-2.0, -0.5, 0.5, 1.0, 3.0])
  w = jnp.array([1.0, -1.0, 2.0, -3.0, 0.5])  # Upstream gradients of both signs.
  np.testing.assert_array_equal(explain.guided_relu(x), nn.relu(x))
  guided = jax.grad(lambda x: jnp.sum(w * explain.guided_relu(x)))(x)
  plain = jax.grad(lambda x: jnp.sum(w * nn.relu(x)))(x)
  np.testing.assert_array_equal(guided, [0.0, 0.0, 2.0, 0.0, 0.5])
  np.testing.assert_array_equal(plain, [0.0, 0.0, 2.0, -3.0, 0.5])
  # Through a chain: a negative gradient from above is stopped at the outer unit.
  g = jax.grad(lambda x: -explain.guided_relu(2.0 * explain.guided_relu(x)))(1.0)
  assert g == 0.0
  assert jax.jit(jax.grad(lambda x: explain.guided_relu(explain.guided_relu(x) * 3.0)))(1.0) == 3


@pytest.fixture(scope='module')
def random_model():
  model = InceptionV3(num_classes=3, depth_multiplier=0.25, create_aux_logits=False)
  images = jax.random.uniform(jax.random.key(0), (2, SIZE, SIZE, 3), minval=-1, maxval=1)
  variables = reference.random_variables(model, SIZE, seed=1)
  # Non-zero head biases would not change Grad-CAM; random ones make the class scores differ.
  variables['params']['Logits']['Conv2d_1c_1x1']['biases'] = jnp.array([0.3, -0.2, 0.1])
  return model, variables, images


@pytest.fixture(scope='module')
def explained(random_model):
  model, variables, images = random_model
  return jax.device_get(
    explain.explain(
      model, variables, images, layer='Mixed_7c', cells=BACKBONE.cell_centres['Mixed_7c']
    )
  )


def test_outputs_shapes_and_ranges(random_model, explained):
  _, _, images = random_model
  out = explained
  assert out['probs'].shape == (2, 3)
  np.testing.assert_allclose(out['probs'].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(out['target'], out['probs'].argmax(-1))
  assert out['grad_cam'].shape == (2, SIZE, SIZE)
  assert out['grad_cam'].min() >= 0.0
  np.testing.assert_allclose(out['grad_cam'].max(axis=(1, 2)), 1.0, rtol=1e-6)
  assert out['guided_backprop'].shape == images.shape
  assert np.abs(out['guided_backprop']).max() > 0
  np.testing.assert_allclose(
    out['guided_grad_cam'], out['guided_backprop'] * out['grad_cam'][..., None], rtol=1e-6
  )


def test_grad_cam_at_last_block_is_the_class_activation_map(random_model, explained):
  """With only global average pooling and a 1×1 conv after Mixed_7c, the class score's gradient
  is the same in every cell, so Grad-CAM reduces to Zhou et al.'s CAM: relu(A · W[:, c])."""
  model, variables, images = random_model
  _, end_points = jax.jit(model.apply)(variables, images)
  acts = np.asarray(end_points['Mixed_7c'])  # [2, 2, 2, K]
  assert acts.shape[1:3] == (2, 2)
  w = np.asarray(variables['params']['Logits']['Conv2d_1c_1x1']['weights'])[0, 0]
  for b, c in enumerate(explained['target']):
    cam = np.maximum(acts[b] @ w[:, c], 0)
    cam = cam / cam.max()
    # Cell (i, j) is centred on input pixel 37 + 32 * (i, j).
    for i in range(2):
      for j in range(2):
        assert explained['grad_cam'][b, 37 + 32 * i, 37 + 32 * j] == pytest.approx(
          cam[i, j], abs=1e-5
        )


def test_chosen_class_and_other_layers(random_model, explained):
  model, variables, images = random_model
  other = (explained['target'] + 1) % 3
  out = jax.device_get(
    explain.explain(
      model,
      variables,
      images,
      jnp.asarray(other),
      layer='Mixed_5d',
      cells=BACKBONE.cell_centres['Mixed_5d'],
    )
  )
  np.testing.assert_array_equal(out['target'], other)
  np.testing.assert_allclose(out['probs'], explained['probs'], rtol=1e-5)
  assert out['grad_cam'].shape == (2, SIZE, SIZE)
  assert not np.allclose(out['guided_backprop'], explained['guided_backprop'])


def test_unknown_layer_is_a_clear_error(random_model):
  model, variables, images = random_model
  with pytest.raises(ValueError, match="'Mixed_9z' is not a submodule"):
    explain.explain(model, variables, images, layer='Mixed_9z')


def test_layer_grid_is_known_before_compiling(random_model):
  model, variables, _ = random_model
  assert explain.layer_grid(model, variables, 75, 'Mixed_7c') == (1, 1)
  assert explain.layer_grid(model, variables, SIZE, 'Mixed_7c') == (2, 2)
  assert explain.layer_grid(model, variables, 299, 'Mixed_7c') == (8, 8)
  assert explain.layer_grid(model, variables, 75, 'Mixed_5d') == (7, 7)
  with pytest.raises(ValueError, match="'Mixed_9z' is not a submodule"):
    explain.layer_grid(model, variables, 299, 'Mixed_9z')


@pytest.mark.parametrize('grid', [(1, 1), (2, 2)])
def test_grid_warning_for_one_or_two_cells(grid):
  finer = explain_mode._finer_layers(BACKBONE, 'Mixed_7c', 75)
  assert finer == ['Mixed_6e', 'Mixed_5d']  # At least 3×3 cells at 75 px, from the backbone.
  message = explain.grid_warning('Mixed_7c', grid, 75, finer)
  assert message is not None and '\n' not in message
  assert f'Mixed_7c is a {grid[0]}×{grid[1]} grid for 75×75' in message
  assert 'nearly uniform' in message and 'Mixed_6e or Mixed_5d' in message
  assert 'input.image_size' in message


@pytest.mark.parametrize('grid', [(3, 3), (8, 8), (35, 35)])
def test_no_grid_warning_from_three_cells(grid):
  assert explain.grid_warning('Mixed_5d', grid, 299) is None


NAMES = ('normal', 'mild', 'severe')


@pytest.fixture(scope='module')
def grey_explained(random_model, stage_folder):
  """Two of the synthetic X-rays (grey, three equal channels) as the model sees them at SIZE px,
  and their explanations (same shapes as `explained`: no new compile)."""
  model, variables, _ = random_model
  files = [os.path.join(stage_folder, f'stage_{s}', f'{s}_0001.png') for s in (3, 1)]
  views = []
  for file in files:
    with Image.open(file) as image:
      views.append(preprocess.eval(np.asarray(image.convert('RGB')), SIZE))
  views = np.stack(views)
  assert np.array_equal(views[..., 0], views[..., 2])
  return views, jax.device_get(
    explain.explain(
      model,
      variables,
      jnp.asarray(views),
      layer='Mixed_7c',
      cells=BACKBONE.cell_centres['Mixed_7c'],
    )
  )


def _one(result, row=0):
  return {k: v[row] for k, v in result.items()}


def _image_axes(fig):
  """The panels (the axes that show images), left to right; the colour bar shows none."""
  return sorted((ax for ax in fig.axes if ax.images), key=lambda ax: ax.get_position().x0)


def test_panel_title_names_prediction_truth_layer_and_step(grey_explained):
  views, result = grey_explained
  one = _one(result)
  predicted = int(one['probs'].argmax())
  wrong = (predicted + 1) % 3
  fig = explain.panel_figure(views[0], one, NAMES, layer='Mixed_7c', step=1234, true_label=wrong)
  title = fig.get_suptitle()
  assert f'predicted {NAMES[predicted]} ({one["probs"][predicted]:.1%})' in title
  assert f'true {NAMES[wrong]} (wrong)' in title
  assert 'layer Mixed_7c' in title and 'step 1234' in title
  assert 'explaining' not in title  # The explained class is the prediction.
  assert len(title.splitlines()) <= 2

  right = explain.panel_figure(
    views[0], one, NAMES, layer='Mixed_7c', step=1, true_label=predicted
  ).get_suptitle()
  assert f'true {NAMES[predicted]} (correct)' in right
  assert (
    'true'
    not in explain.panel_figure(views[0], one, NAMES, layer='Mixed_7c', step=1).get_suptitle()
  )


def test_panel_title_names_an_explained_class_other_than_the_prediction(grey_explained):
  views, result = grey_explained
  one = _one(result)
  predicted = int(one['probs'].argmax())
  other = (predicted + 1) % 3
  one['target'] = np.array(other)  # As explain(..., target) returns it; the rest only draws.
  fig = explain.panel_figure(views[0], one, NAMES, layer='Mixed_7c', step=5)
  title = fig.get_suptitle()
  assert f'explaining {NAMES[other]} ({one["probs"][other]:.1%})' in title
  assert f'predicted {NAMES[predicted]} ({one["probs"][predicted]:.1%})' in title
  assert NAMES[other] in _image_axes(fig)[1].get_title()


def test_panels_of_a_grey_film_are_grey_on_the_model_framing(grey_explained):
  views, result = grey_explained
  fig = explain.panel_figure(views[0], _one(result), NAMES, layer='Mixed_7c', step=0)
  a, b, c = _image_axes(fig)
  assert len(fig.axes) == 4  # The three panels and the colour bar.
  for ax in (a, b, c):
    for image in ax.images:
      assert image.get_array().shape[:2] == (SIZE, SIZE)
  for ax in (a, c):
    (image,) = ax.images
    assert image.get_array().ndim == 2 and image.get_cmap().name == 'gray'
  np.testing.assert_allclose(a.images[0].get_array(), views[0][..., 0])
  base, heat = b.images
  np.testing.assert_allclose(base.get_array(), views[0][..., 0])
  np.testing.assert_allclose(heat.get_array(), result['grad_cam'][0])
  assert heat.get_cmap().name == 'jet' and 0 < heat.get_alpha() < 1
  guided = np.asarray(c.images[0].get_array())
  assert guided.min() >= 0 and guided.max() == pytest.approx(1.0)


def test_panel_input_of_a_colour_image_is_rgb(random_model, explained):
  _, _, images = random_model
  view = np.asarray(images[1])
  a, b, c = _image_axes(
    explain.panel_figure(view, _one(explained, 1), NAMES, layer='Mixed_7c', step=0)
  )
  np.testing.assert_array_equal(a.images[0].get_array(), explain.to_uint8(view))
  assert b.images[0].get_array().shape == (SIZE, SIZE, 3)
  assert c.images[0].get_array().shape == (SIZE, SIZE)  # Guided Grad-CAM is grey for any input.


def test_panel_has_a_grad_cam_colour_bar(grey_explained):
  views, result = grey_explained
  fig = explain.panel_figure(views[0], _one(result), NAMES, layer='Mixed_7c', step=0)
  (bar,) = [ax for ax in fig.axes if not ax.images]
  assert bar.get_ylabel() == 'Grad-CAM (relative)'
  assert bar.get_ylim() == (0.0, 1.0)


@pytest.mark.parametrize(('size', 'shown'), [(SIZE, 3 * SIZE), (299, 299)])
def test_panels_show_whole_screen_pixels_per_input_pixel(size, shown):
  """Small inputs are enlarged by a whole factor (nearest pixel), a 299 px input is shown 1:1."""
  rng = np.random.default_rng(0)
  result = {
    'probs': np.array([0.2, 0.5, 0.3]),
    'target': np.array(1),
    'grad_cam': rng.uniform(0, 1, (size, size)),
    'guided_grad_cam': rng.normal(size=(size, size, 3)),
  }
  fig = explain.panel_figure(
    rng.uniform(-1, 1, (size, size, 3)), result, NAMES, layer='Mixed_5d', step=0
  )
  for ax in _image_axes(fig):
    box = ax.get_window_extent()
    assert (box.width, box.height) == pytest.approx((shown, shown))
    assert all(image.get_interpolation() == 'nearest' for image in ax.images)


def test_panel_refuses_an_explanation_of_another_framing(grey_explained):
  views, result = grey_explained
  with pytest.raises(ValueError, match=f'explanation is {SIZE}×{SIZE} but the view is 99×99'):
    explain.panel_figure(views[0][:99, :99], _one(result), NAMES, layer='Mixed_7c', step=0)


def test_guided_grey_is_the_channel_sum_with_outliers_capped():
  grad = np.zeros((20, 20, 3))
  grad[..., 0], grad[..., 1] = 1.0, -3.0  # |sum| = 2 everywhere; the channels differ.
  grad[0, 0] = [100.0, 0.0, 0.0]  # One outlier (under 1% of the pixels) must not blacken the rest.
  grey = explain.guided_grey(grad)
  assert grey.shape == (20, 20)
  np.testing.assert_allclose(grey[1:, :], 1.0)
  assert grey[0, 0] == 1.0
  grad[..., 2] = 2.0  # Now the channels cancel: a grey film's value has no effect here.
  grad[0, 0] = [0.0, 0.0, 0.5]
  grey = explain.guided_grey(grad)
  np.testing.assert_array_equal(grey[1:, :], 0.0)
  np.testing.assert_array_equal(explain.guided_grey(np.zeros((4, 4, 3))), 0.0)


def test_write_panel_writes_one_png_atomically(tmp_path, grey_explained, monkeypatch):
  views, result = grey_explained
  path = str(tmp_path / 'out' / 'scan.png')  # The folder does not exist yet.
  fig = explain.panel_figure(views[0], _one(result), NAMES, layer='Mixed_7c', step=7, true_label=2)
  assert explain.write_panel(path, fig) == path
  assert os.listdir(tmp_path / 'out') == ['scan.png']  # No temporary file left behind.
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.mode == 'RGBA'
    size = image.size
    image.verify()
  assert size[0] > 3 * 3 * SIZE and size[1] > 3 * SIZE
  before = (tmp_path / 'out' / 'scan.png').read_bytes()

  def killed(self, f, **kwargs):
    f.write(b'\x89PNG half')
    raise KeyboardInterrupt

  monkeypatch.setattr(explain.Figure, 'savefig', killed)
  with pytest.raises(KeyboardInterrupt):
    explain.write_panel(
      path, explain.panel_figure(views[1], _one(result, 1), NAMES, layer='Mixed_7c', step=8)
    )
  assert os.listdir(tmp_path / 'out') == ['scan.png']
  assert (tmp_path / 'out' / 'scan.png').read_bytes() == before


# --- The planted patch: a trained model's Grad-CAM must point at what decides the class. ---

PATCH_SIZE = 96  # Input size: Mixed_7c would be 1×1 here, so Grad-CAM looks at Mixed_5d (9×9).
PATCH_LAYER = 'Mixed_5d'


PLANTED_CLASSES = ('horizontal', 'none', 'vertical')  # Sorted, as the dataset numbers them.


def _planted(rng, n):
  """Grey-noise images of 96–107 px with, at a random place inside the central crop, a square
  patch of horizontal or vertical stripes (as bright on average as the background), or none.

  The class is only the patch's texture. A "none" class makes the model detect each texture
  where it is: with two textures alone, it may learn one and call its absence the other.
  Returns (uint8 RGB image, label, uint8 RGB patch mask) tuples.
  """
  out = []
  for i in range(n):
    s, label = int(rng.integers(96, 108)), i % 3
    image = rng.normal(128, 30, (s, s)).clip(0, 255)
    p = int(rng.integers(s // 6, s // 4))
    top, left = rng.integers(int(0.1 * s), int(0.9 * s) - p + 1, 2)
    mask = np.zeros((s, s), np.uint8)
    if PLANTED_CLASSES[label] != 'none':
      stripes = np.where(np.arange(p) // 2 % 2, 230.0, 26.0)
      vertical = PLANTED_CLASSES[label] == 'vertical'
      image[top : top + p, left : left + p] = stripes[None, :] if vertical else stripes[:, None]
      mask[top : top + p, left : left + p] = 255
    out.append(
      (
        np.repeat(image.astype(np.uint8)[..., None], 3, -1),
        label,
        np.repeat(mask[..., None], 3, -1),
      )
    )
  return out


def _grown(mask, by):
  """The bounding box of a (rectangular) mask, grown by `by` pixels on each side."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  out = np.zeros_like(mask)
  out[max(rows[0] - by, 0) : rows[-1] + by + 1, max(cols[0] - by, 0) : cols[-1] + by + 1] = True
  return out


@pytest.mark.long  # ~60 s of training from scratch.
def test_grad_cam_finds_the_planted_patch(tmp_path, tiny_config):
  """Trains on 240 planted-patch images (100 steps from scratch), then asks where Grad-CAM's
  maximum falls on 96 held-out ones. At 96 px Mixed_7c is a single cell, so Grad-CAM looks at
  Mixed_5d (9×9 cells, 8 px apart). Measured: the maximum lies in the patch in ~80% of the
  images and within half a cell (4 px) of it in ~95%; a map blind to the patch would manage
  ~10% (the grown patch's share of the image)."""
  for i, (image, label, _) in enumerate(_planted(np.random.default_rng(0), 240)):
    folder = tmp_path / 'images' / PLANTED_CLASSES[label]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f'{i:03d}.png')
  c = tiny_config(
    **{
      'dataset.source_dir': str(tmp_path / 'images'),
      'dataset.validation_fraction': 0.1,
      'input.image_size': PATCH_SIZE,
      'input.batch_size': 16,
      'input.eval_batch_size': 24,
      # Whole images, unaugmented, at train and eval time: the stripes keep their frequency.
      'input.random_crop': False,
      'input.color_distortion': False,
      'input.central_crop_fraction': 1.0,
      'model.depth_multiplier': 0.25,
      'model.create_aux_logits': False,
      'init_checkpoint': '',
      'trainable_scopes': '.*',
      # From scratch in 100 steps, BN moving averages (decay 0.9997) would still be at their
      # initial values: keep every BN in inference mode so that training and inference agree.
      'batch_norm': 'frozen',
      'optimizer.name': 'adam',
      'optimizer.epsilon': 1e-8,
      'optimizer.weight_decay': 0.0,
      'schedule.name': 'warmup_cosine',
      'schedule.learning_rate': 1e-3,
      'schedule.warmup_steps': 10,
      'schedule.end_learning_rate': 0.0,
      'num_steps': 100,
      'log_every_steps': 50,
      'eval_every_steps': 0,
      'checkpoint_every_steps': 100,
      'best_metric': 'accuracy',
    }
  )
  workdir = str(tmp_path / 'run')
  assert loop.train_and_evaluate(c, workdir)['final']['accuracy'] >= 0.9

  held_out = _planted(np.random.default_rng(1), 96)
  view = lambda x: preprocess.eval(x, PATCH_SIZE, central_fraction=1.0)
  images = np.stack([view(x) for x, _, _ in held_out])
  labels = np.array([y for _, y, _ in held_out])
  variables, _ = checkpoints.load_for_inference(workdir)
  model = build_model(c, len(PLANTED_CLASSES), create_aux_logits=False)
  out = jax.device_get(
    explain.explain(
      model,
      variables,
      jnp.asarray(images),
      layer=PATCH_LAYER,
      cells=BACKBONE.cell_centres[PATCH_LAYER],
    )
  )
  accuracy = (out['target'] == labels).mean()
  inside, near = [], []
  for cam, (_, label, mask) in zip(out['grad_cam'], held_out, strict=True):
    if PLANTED_CLASSES[label] == 'none':
      continue
    mask = view(mask)[..., 0] > 0
    peak = cam >= cam.max() - 1e-6  # A plateau where the peak is an edge cell.
    inside.append((peak & mask).any())
    near.append((peak & _grown(mask, 4)).any())
  print(
    f'planted patch: accuracy {accuracy:.3f}; Grad-CAM maximum in the patch '
    f'{np.mean(inside):.3f}, within 4 px {np.mean(near):.3f} ({len(inside)} images)'
  )
  assert accuracy >= 0.9
  assert np.mean(near) >= 0.85
  assert np.mean(inside) >= 0.6
