"""TF-Slim's inception preprocessing, as pure numpy functions of one image.

Same numbers as slim's `inception_preprocessing` in fast mode, so ImageNet weights trained with
it see the inputs they expect: train = distorted bounding-box crop, bilinear resize, random
left-right flip, brightness/saturation jitter, clip, scale to [-1, 1]; eval = central crop,
bilinear resize, scale to [-1, 1]. Resizing reproduces TF1's `resize_bilinear` with
`align_corners=False` (no half-pixel offset, no antialiasing), which slim used for both.
Randomness comes only from the `rng` passed in, so a pipeline controls it per record.

Each transform is split into `draw` (the random parameters of one example, its "view": drawn on
the host, so a resumed pipeline draws the same ones) and `apply` (the arithmetic). `apply` is the
reference of `augment.apply`, which does the same on the accelerator for a batch.

The evaluation view follows the training view (`eval_central_fraction`): a model trained on whole
images is judged on whole images, one trained on slim's distorted crops on slim's central crop.
"""

import math

import ml_collections
import numpy as np

from pneumo_jax.errors import ConfigError

SLIM_CENTRAL_FRACTION = 0.875  # slim's eval crop: what ImageNet weights were evaluated with.

# slim's distorted_bounding_box_crop defaults; the "object" is the whole image.
_MIN_OBJECT_COVERED = 0.1
_ASPECT_RATIO_RANGE = (0.75, 1.33)
_AREA_RANGE = (0.05, 1.0)
_MAX_ATTEMPTS = 100
# slim's distort_color, fast mode.
_MAX_BRIGHTNESS_DELTA = 32.0 / 255.0
_SATURATION_RANGE = (0.5, 1.5)


def train(
  image: np.ndarray,
  rng: np.random.Generator,
  size: int,
  *,
  random_crop: bool = True,
  random_flip: bool = True,
  color_distortion: bool = True,
) -> np.ndarray:
  """uint8 [H, W, C] → float32 [size, size, 3] in [-1, 1], randomly distorted as slim trains.

  With every switch off this is a plain resize of the whole image (no central crop).
  """
  _check(image)
  view = draw(
    *image.shape[:2],
    rng,
    random_crop=random_crop,
    random_flip=random_flip,
    color_distortion=color_distortion,
  )
  return apply(image, view, size)


def draw(
  height: int,
  width: int,
  rng: np.random.Generator,
  *,
  random_crop: bool = True,
  random_flip: bool = True,
  color_distortion: bool = True,
) -> dict[str, np.ndarray]:
  """The random view `train` takes of a height × width image: {'box': int32 [4] (top, left, h,
  w), 'flip': bool, 'colour': float32 [4] (on, brightness_first, delta, factor)}.

  Consumes `rng` in the order `train` always did (box, flip, colour; each only when switched
  on), so a pipeline's draws, hence its batches and resumption, do not depend on where the view
  is applied. Switched off: the whole image, no flip, colour (0, 0, 0, 1).
  """
  box = _distorted_box(height, width, rng) if random_crop else (0, 0, height, width)
  flip = bool(random_flip and rng.random() < 0.5)
  colour = (0.0, 0.0, 0.0, 1.0)
  if color_distortion:
    # slim draws one of four colour orderings; in fast mode only ordering 0 puts brightness first.
    brightness_first = rng.integers(4) == 0
    delta = rng.uniform(-_MAX_BRIGHTNESS_DELTA, _MAX_BRIGHTNESS_DELTA)
    factor = rng.uniform(*_SATURATION_RANGE)
    colour = (1.0, float(brightness_first), delta, factor)
  return {
    'box': np.array(box, np.int32),
    'flip': np.bool_(flip),
    # float32 loses nothing: train always applied delta and factor to float32 pixels, where
    # numpy casts a Python float to float32 first.
    'colour': np.array(colour, np.float32),
  }


def central_view(height: int, width: int, fraction: float) -> dict[str, np.ndarray]:
  """`eval`'s view of a height × width image: slim's central crop of `fraction`, nothing random."""
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f'input.central_crop_fraction={fraction} must be in (0, 1]')
  # tf.image.central_crop's rounding: the offset is truncated, the size is what remains.
  top, left = int((height - height * fraction) / 2), int((width - width * fraction) / 2)
  return {
    'box': np.array((top, left, height - 2 * top, width - 2 * left), np.int32),
    'flip': np.bool_(False),
    'colour': np.array((0.0, 0.0, 0.0, 1.0), np.float32),
  }


def apply(image: np.ndarray, view: dict[str, np.ndarray], size: int) -> np.ndarray:
  """uint8 [H, W, C] (C 1 or 3) → float32 [size, size, 3] in [-1, 1]: `view` applied as slim.

  Crop to the box, resize, flip, colour distortion (then clipped to [0, 1]), scale. A grey image
  gives exactly what its 3-channel repetition gives: saturation leaves equal channels equal.
  """
  _check(image)
  top, left, h, w = (int(v) for v in view['box'])
  if min(top, left) < 0 or min(h, w) < 1 or top + h > image.shape[0] or left + w > image.shape[1]:
    raise ValueError(f'box {view["box"]} does not fit an image of shape {image.shape}')
  out = _resize_bilinear(image[top : top + h, left : left + w], size)
  out = np.broadcast_to(out, (size, size, 3))
  if view['flip']:
    out = out[:, ::-1]
  on, brightness_first, delta, factor = view['colour']
  if on:
    if brightness_first:
      out = _adjust_saturation(out + delta, factor)
    else:
      out = _adjust_saturation(out, factor) + delta
    out = np.clip(out, 0.0, 1.0)
  return _to_signed(out)


def stored_size(image_size: int) -> int:
  """The default side of the square images the dataset stores for a model input of image_size.

  ceil(image_size / 0.875) (342 for 299): slim's 0.875 central crop of the stored image is then
  image_size pixels, so it is evaluated 1:1; the whole-image resize used without random crops is
  a mild ×0.875 downscale; and slim's distorted crops get about the resolution that ImageNet's
  ~330–500 px training images gave them.
  """
  return math.ceil(image_size / SLIM_CENTRAL_FRACTION)


def eval_central_fraction(input_cfg: ml_collections.ConfigDict) -> float:
  """The eval crop that frames images as training did: input.central_crop_fraction when set,
  else 1.0 (the whole image) without random crops and slim's 0.875 with its distorted crops.

  Without random crops training resizes the whole image, so any central crop would show the
  model a zoom it never saw (and cut a film's costophrenic angles and apices). Slim's distorted
  crops cover 5–100% of the image, so its 0.875 central crop lies within what training showed.
  """
  if input_cfg.central_crop_fraction is not None:
    return float(input_cfg.central_crop_fraction)
  return SLIM_CENTRAL_FRACTION if input_cfg.random_crop else 1.0


def view_mismatch(input_cfg: ml_collections.ConfigDict) -> str | None:
  """A warning when an explicit eval crop frames images unlike training, else None."""
  fraction = eval_central_fraction(input_cfg)
  if input_cfg.random_crop or fraction == 1.0:
    return None
  return (
    f'input.central_crop_fraction={fraction} zooms evaluation images {1 / fraction:.2f}× '
    'relative to training, which sees whole images (input.random_crop=False); leave it '
    'unset (None) to evaluate on the training view'
  )


def eval(
  image: np.ndarray, size: int, *, central_fraction: float = SLIM_CENTRAL_FRACTION
) -> np.ndarray:
  """uint8 [H, W, C] → float32 [size, size, 3] in [-1, 1]: central crop and resize, as slim."""
  _check(image)
  return apply(image, central_view(*image.shape[:2], central_fraction), size)


def _check(image: np.ndarray) -> None:
  if (
    image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8 or 0 in image.shape
  ):
    raise ValueError(
      f'expected a non-empty uint8 [H, W, 1 or 3] image, got {image.dtype} {image.shape}'
    )


def _to_signed(image: np.ndarray) -> np.ndarray:
  return ((image - 0.5) * 2.0).astype(np.float32)


def _distorted_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, height, width) as `tf.image.sample_distorted_bounding_box` draws it for slim.

  Per attempt: an aspect ratio uniform in the range, a crop height uniform between the heights
  giving the smallest and largest allowed areas, then a uniform position; the crop must keep
  `_MIN_OBJECT_COVERED` of the image. After `_MAX_ATTEMPTS` failures: the whole image.
  """
  image_area = height * width
  min_area, max_area = _AREA_RANGE[0] * image_area, _AREA_RANGE[1] * image_area
  for _ in range(_MAX_ATTEMPTS):
    aspect = rng.uniform(*_ASPECT_RATIO_RANGE)
    h = int(np.rint(np.sqrt(min_area / aspect)))
    max_h = int(np.rint(np.sqrt(max_area / aspect)))
    if np.rint(max_h * aspect) > width:
      max_h = int((width + 0.5 - 1e-7) / aspect)
      if np.rint(max_h * aspect) > width:
        max_h -= 1
    max_h = min(max_h, height)
    h = min(h, max_h)
    if h < max_h:
      h += int(rng.integers(max_h - h + 1))
    w = int(np.rint(h * aspect))
    if w * h < min_area:  # Rounding made it too small: one row more.
      h += 1
      w = int(np.rint(h * aspect))
    if w * h > max_area:  # Rounding made it too large: one row less.
      h -= 1
      w = int(np.rint(h * aspect))
    if not (min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height):
      continue
    if w * h < _MIN_OBJECT_COVERED * image_area:
      continue
    top = int(rng.integers(height - h)) if h < height else 0
    left = int(rng.integers(width - w)) if w < width else 0
    return top, left, h, w
  return 0, 0, height, width


def _resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] → float32 [size, size, C] in [0, 1], as TF1's resize_bilinear.

  Output pixel i samples the input at i * in/out (align_corners=False, no half-pixel centres).
  The scale is written as one correctly rounded float32 division (as TF computes it), which
  augment.apply repeats on the device, so both sample exactly the same pixels. (For sides below
  2**24 it equals the float64 quotient rounded to float32: 53 ≥ 2 × 24 + 2 bits.)
  """

  def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.arange(size, dtype=np.float32) * (np.float32(n_in) / np.float32(size))
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(np.ceil(pos).astype(np.int64), n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)

  y0, y1, fy = taps(image.shape[0])
  x0, x1, fx = taps(image.shape[1])

  def lerp_columns(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32) / 255.0
    left, right = rows[:, x0], rows[:, x1]
    return left + (right - left) * fx[None, :, None]

  top, bottom = lerp_columns(image[y0]), lerp_columns(image[y1])
  return top + (bottom - top) * fy[:, None, None]


def _adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """Scales HSV saturation by `factor` (clipped to [0, 1]), as tf.image.adjust_saturation.

  Hue and value are kept, so each channel moves towards or away from the pixel's max in
  proportion; pixels with no positive value or no chroma become (or stay) grey at their max.
  """
  v = image.max(axis=-1, keepdims=True)
  chroma = v - image.min(axis=-1, keepdims=True)
  s = np.where(v > 0, chroma / np.where(v > 0, v, 1.0), 0.0)
  new_s = np.clip(s * factor, 0.0, 1.0)
  ratio = np.where(s > 0, new_s / np.where(s > 0, s, 1.0), 0.0)
  return (v - (v - image) * ratio).astype(np.float32)
