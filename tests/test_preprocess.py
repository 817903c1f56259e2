"""Inception preprocessing: eval against TF-Slim's own ops; train's randomness statistically."""

import numpy as np
import pytest
from scipy import stats

from pneumo_jax.data import preprocess


@pytest.fixture(scope='module')
def natural():
  """A 300×400 RGB image with smooth gradients, shapes, edges and noise."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:300, 0:400] / 300.0
  image = np.stack([120 + 80 * np.sin(3 * x), 60 + 150 * y, 200 - 100 * x * y], axis=-1)
  image[((y - 0.5) ** 2 + (x - 0.6) ** 2) < 0.04] = (230, 40, 40)
  image[60:140, 250:330] = (20, 20, 160)
  image += rng.normal(0, 12, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def tf():
  return pytest.importorskip('tensorflow')


def slim_eval(tf, image, size, central_fraction):
  """slim's preprocess_for_eval, op for op (research/slim/preprocessing)."""
  x = tf.image.convert_image_dtype(tf.constant(image), tf.float32)
  if central_fraction:
    x = tf.image.central_crop(x, central_fraction=central_fraction)
  x = tf.compat.v1.image.resize_bilinear(x[None], [size, size], align_corners=False)[0]
  return ((x - 0.5) * 2.0).numpy()


@pytest.mark.parametrize('size, fraction', [(299, 0.875), (75, 0.875), (107, 1.0), (512, 0.5)])
def test_matches_tf_slim_eval(tf, natural, size, fraction):
  ours = preprocess.eval(natural, size, central_fraction=fraction)
  ref = slim_eval(tf, natural, size, fraction)
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  mad = np.abs(ours - ref).mean() / 2  # In [0, 1] units.
  print(f'eval {size}px fraction {fraction}: mean |ours - slim| = {mad:.2e} (in [0, 1] units)')
  assert mad <= 1 / 255
  assert np.abs(ours - ref).max() < 1e-4  # In fact the same arithmetic.


def test_saturation_matches_tf(tf):
  rng = np.random.default_rng(1)
  image = rng.uniform(-0.2, 1.2, (20, 30, 3)).astype(np.float32)  # Brightness may leave [0, 1].
  for factor in (0.5, 0.9, 1.5):
    ref = tf.image.adjust_saturation(image, factor).numpy()
    np.testing.assert_allclose(preprocess._adjust_saturation(image, factor), ref, atol=1e-5)


def test_crop_distribution_matches_tf(tf):
  """Our boxes and tf.image.sample_distorted_bounding_box's follow the same law."""
  h, w, n = 300, 400, 1500
  rng = np.random.default_rng(2)
  ours = np.array([preprocess._distorted_box(h, w, rng)[2:] for _ in range(n)])
  theirs = []
  for i in range(n):
    _, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      [h, w, 3],
      tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=[i, 7],
      min_object_covered=0.1,
      aspect_ratio_range=(0.75, 1.33),
      area_range=(0.05, 1.0),
      max_attempts=100,
    )
    theirs.append(size.numpy()[:2])
  theirs = np.array(theirs)
  for name, f in [
    ('area', lambda b: b[:, 0] * b[:, 1] / (h * w)),
    ('aspect', lambda b: b[:, 1] / b[:, 0]),
  ]:
    p = stats.ks_2samp(f(ours), f(theirs)).pvalue
    assert p > 1e-3, f'{name} distributions differ (KS p={p:.1e})'


def test_train_shape_and_range_for_any_input(natural):
  rng = np.random.default_rng(3)
  for image in (natural, natural[:1, :1], natural[:7, :300], natural[:250, :9]):
    for size in (75, 107):
      out = preprocess.train(image, rng, size)
      assert out.shape == (size, size, 3) and out.dtype == np.float32
      assert out.min() >= -1.0 and out.max() <= 1.0


def test_crop_areas_are_sane():
  rng = np.random.default_rng(4)
  boxes = np.array([preprocess._distorted_box(300, 400, rng) for _ in range(2000)])
  top, left, h, w = boxes.T
  area = h * w / (300 * 400)
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 300) and np.all(left + w <= 400)
  assert area.min() >= 0.1  # min_object_covered of the whole image.
  assert 0.3 < np.median(area) < 0.45 and area.max() > 0.9  # Height, not area, is uniform.
  aspect = w / h
  assert aspect.min() > 0.74 and aspect.max() < 1.34


def test_flip_happens_about_half_the_time(natural):
  plain = preprocess.train(
    natural,
    np.random.default_rng(0),
    80,
    random_crop=False,
    random_flip=False,
    color_distortion=False,
  )
  flips = []
  for seed in range(60):
    out = preprocess.train(
      natural, np.random.default_rng(seed), 80, random_crop=False, color_distortion=False
    )
    if np.array_equal(out, plain):
      flips.append(False)
    else:
      np.testing.assert_array_equal(out, plain[:, ::-1])
      flips.append(True)
  assert 15 < sum(flips) < 45


def test_switches_off_is_deterministic_whole_image_resize(natural):
  outs = [
    preprocess.train(
      natural,
      np.random.default_rng(s),
      90,
      random_crop=False,
      random_flip=False,
      color_distortion=False,
    )
    for s in range(3)
  ]
  assert all(np.array_equal(outs[0], o) for o in outs)
  np.testing.assert_array_equal(outs[0], preprocess.eval(natural, 90, central_fraction=1.0))


def test_color_distortion_keeps_grey_grey_and_bounded():
  grey = np.full((50, 50, 3), 128, np.uint8)
  base = preprocess.eval(grey, 80, central_fraction=1.0)
  for seed in range(20):
    out = preprocess.train(grey, np.random.default_rng(seed), 80)
    assert np.ptp(out, axis=-1).max() < 1e-6  # Saturation cannot colour a grey pixel.
    shift = out.mean() - base.mean()
    assert abs(shift) <= 2 * 32 / 255 + 1e-6  # Brightness ±32/255 in [0, 1] → ±64/255 here.


def test_rejects_bad_input(natural):
  with pytest.raises(ValueError, match='central_crop_fraction=0'):
    preprocess.eval(natural, 80, central_fraction=0.0)
  with pytest.raises(ValueError, match='uint8'):
    preprocess.train(natural.astype(np.float32), np.random.default_rng(0), 80)
