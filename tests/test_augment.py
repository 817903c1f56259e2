"""Augmentation on the device (augment.apply) against its numpy reference (preprocess.apply), and
the split of preprocess.train into draw and apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pneumo_jax.data import augment, preprocess
from pneumo_jax.errors import ConfigError

# Same views, so the same sample indices and lerp weights: what remains is float32 rounding of
# values in [0, 1] (XLA's reciprocal for /255, FMA contraction, saturation's op order), a few
# ulps (~6e-7 seen). A pixel shift or a wrong weight would differ by ~1e-2 or more.
TOLERANCE = 1e-5


def random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def stack(views: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([v[k] for v in views]) for k in views[0]}


def views_for(height: int, width: int) -> list[dict[str, np.ndarray]]:
  """Drawn views with every switch on (covering both flips and both colour orders) and the
  central views of fractions 1 and 0.875."""
  drawn = [preprocess.draw(height, width, np.random.default_rng(s)) for s in range(12)]
  flips = {bool(v['flip']) for v in drawn}
  orders = {bool(v['colour'][1]) for v in drawn}
  assert flips == orders == {False, True}, 'seeds no longer cover both flips and colour orders'
  return [*drawn, *(preprocess.central_view(height, width, f) for f in (1.0, 0.875))]


@pytest.mark.parametrize('shape', [(40, 56, 3), (48, 48, 1)])
@pytest.mark.parametrize('size', [75, 33])  # Upsampling and downsampling.
def test_device_matches_numpy(shape, size):
  image = random_image(shape)
  views = views_for(*shape[:2])
  ref = np.stack([preprocess.apply(image, v, size) for v in views])
  batch = {'image': np.broadcast_to(image, (len(views), *shape)), **stack(views)}
  out = np.asarray(augment.from_batch(batch, size))  # One jitted call, mixed boxes.
  assert out.shape == (len(views), size, size, 3) and out.dtype == np.float32
  error = np.abs(out - ref).max()
  print(f'{shape} → {size}: max |device - numpy| = {error:.1e}')
  assert error <= TOLERANCE


@pytest.mark.parametrize('size', [299, 75, 33])
def test_sample_positions_are_numpy_exactly(size):
  """Every side up to 1024: the same indices and weights as numpy's float32 arithmetic."""
  sides = np.arange(1, 1025, dtype=np.int32)
  lo, hi, weight = jax.jit(jax.vmap(lambda n: augment._taps(n, 1024, size)))(sides)
  pos = np.arange(size, dtype=np.float32) * (sides[:, None].astype(np.float32) / np.float32(size))
  np.testing.assert_array_equal(lo, np.floor(pos))
  np.testing.assert_array_equal(hi, np.minimum(np.ceil(pos), sides[:, None] - 1))
  np.testing.assert_array_equal(weight, pos - np.floor(pos))


def test_grey_equals_repeated_rgb():
  grey = random_image((48, 48, 1), seed=1)
  rgb = np.repeat(grey, 3, axis=-1)
  views = views_for(48, 48)
  for view in views:
    np.testing.assert_array_equal(preprocess.apply(grey, view, 33), preprocess.apply(rgb, view, 33))
  views = stack(views)
  on_device = [
    augment.apply(np.stack([x] * len(views['box'])), **views, size=33) for x in (grey, rgb)
  ]
  assert np.abs(np.asarray(on_device[0]) - np.asarray(on_device[1])).max() <= TOLERANCE


@pytest.mark.parametrize(
  'switches',
  [
    {},
    {'random_crop': False},
    {'random_flip': False},
    {'color_distortion': False},
    {'random_crop': False, 'random_flip': False, 'color_distortion': False},
  ],
)
def test_train_is_apply_of_draw(switches):
  """draw consumes the generator exactly as train does, so the views and what follows are kept."""
  image = random_image((30, 40, 3), seed=2)
  for seed in range(8):
    rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
    ours = preprocess.apply(image, preprocess.draw(30, 40, rng_b, **switches), 25)
    np.testing.assert_array_equal(preprocess.train(image, rng_a, 25, **switches), ours)
    assert rng_a.random() == rng_b.random()


def test_draw_consumes_the_generator_as_before():
  """The pre-refactor train's sequence of draws, spelt out."""
  view = preprocess.draw(300, 400, np.random.default_rng(0))
  rng = np.random.default_rng(0)
  box = preprocess._distorted_box(300, 400, rng)
  flip = rng.random() < 0.5
  brightness_first = rng.integers(4) == 0
  delta = rng.uniform(-32 / 255, 32 / 255)
  factor = rng.uniform(0.5, 1.5)
  np.testing.assert_array_equal(view['box'], box)
  assert view['box'].dtype == np.int32 and view['flip'] == flip
  np.testing.assert_array_equal(
    view['colour'], np.array([1.0, brightness_first, delta, factor], np.float32)
  )
  off = preprocess.draw(300, 400, rng, random_crop=False, random_flip=False, color_distortion=False)
  np.testing.assert_array_equal(off['box'], [0, 0, 300, 400])
  assert not off['flip']
  np.testing.assert_array_equal(off['colour'], [0, 0, 0, 1])


def test_central_view():
  view = preprocess.central_view(300, 400, 0.875)
  np.testing.assert_array_equal(view['box'], [18, 25, 264, 350])  # tf.image.central_crop's.
  np.testing.assert_array_equal(preprocess.central_view(300, 400, 1.0)['box'], [0, 0, 300, 400])
  for fraction in (0.0, 1.5):
    with pytest.raises(ConfigError, match='central_crop_fraction'):
      preprocess.central_view(300, 400, fraction)


def test_stored_size():
  assert preprocess.stored_size(299) == 342
  assert preprocess.stored_size(224) == 256


def test_bf16_and_vmap():
  images = np.stack([random_image((40, 56, 3), seed=s) for s in range(4)])
  views = stack(views_for(40, 56)[:4])
  full = augment.apply(images, **views, size=33)
  half = augment.apply(images, **views, size=33, dtype=jnp.bfloat16)
  assert half.shape == (4, 33, 33, 3) and half.dtype == jnp.bfloat16
  assert np.abs(np.asarray(half, np.float32) - np.asarray(full)).max() <= 2**-8
  # Vmappable: two groups of two give what one batch of four gives.
  grouped = {k: v.reshape(2, 2, *v.shape[1:]) for k, v in {'images': images, **views}.items()}
  nested = jax.vmap(lambda i, b, f, c: augment.apply(i, b, f, c, 33))(*grouped.values())
  np.testing.assert_array_equal(np.asarray(nested).reshape(full.shape), full)
