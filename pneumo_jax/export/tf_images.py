"""Image files decoded in TensorFlow ops as pneumo_jax reads them with Pillow, for the SavedModel.

`decoder` gives the pixels `images.load_stored` gives before its resize (grey repeated to RGB),
and maps a 16-bit grey PNG to 8 bits by the run's grey window: the TF twin of
data/grey_window.py, in float64 with numpy's percentile arithmetic and rounding, so that the
pixels are predict's exactly (tests/test_grey_window.py keeps the two equal). TensorFlow is the
`export` extra's, so it is imported where it is used.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from pneumo_jax.data import grey_window
from pneumo_jax.data.dicom import GreyWindow

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def decoder(window: GreyWindow) -> Callable[[Any], Any]:
  """A function of one file's bytes (scalar tf.string) → uint8 [H, W, 3], the pixels Pillow gives
  images.load_stored before its resize (grey repeated), a 16-bit grey PNG windowed by `window`."""
  import tensorflow as tf

  def decode(data: Any) -> Any:
    # IHDR's bit depth and colour type: 16-bit grey. Pillow keeps the high byte of other 16-bit
    # PNGs (grey + alpha, RGB), which decode_image does too.
    grey16 = tf.logical_and(
      tf.equal(tf.strings.substr(data, 0, 8), _PNG_SIGNATURE),
      tf.equal(tf.strings.substr(data, 24, 2), b'\x10\x00'),
    )

    def png16() -> Any:
      grey = tf.io.decode_png(data, channels=1, dtype=tf.uint16)
      return tf.image.grayscale_to_rgb(grey16_to_8(grey, window))

    def other() -> Any:
      # Pillow decodes JPEG with libjpeg's accurate integer DCT; TF's default is the fast one.
      return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
      )

    return tf.cond(grey16, png16, other)

  return decode


def grey16_to_8(grey: Any, window: GreyWindow) -> Any:
  """uint16 tensor [H, W, ...] → uint8, as grey_window.grey16_to_8 maps a 16-bit grey file."""
  import tensorflow as tf

  if window.rule == 'file':
    brightest = tf.cast(tf.reduce_max(grey), tf.int32)
    bits = tf.reduce_sum(tf.cast(brightest >= 2 ** tf.range(16), tf.int32))  # int.bit_length()
    black, white = 0.0, tf.cast(2 ** tf.clip_by_value(bits, 8, 16) - 1, tf.float64)
  elif window.rule == 'full_range':
    black, white = grey_window.SAMPLE16
  elif window.rule == 'fixed':
    black, white = window.fixed_range
  else:
    black, white = percentiles(grey, grey_window.PERCENTILES)
  black, white = tf.cast(black, tf.float64), tf.cast(white, tf.float64)
  scaled = (tf.cast(grey, tf.float64) - black) * (255.0 / (white - black))
  grey8 = tf.cast(tf.clip_by_value(tf.round(scaled), 0, 255), tf.uint8)
  return tf.where(white > black, grey8, tf.zeros_like(grey8))  # A flat range gives black.


def percentiles(grey: Any, at: tuple[float, float]) -> tuple[Any, Any]:
  """np.percentile(grey, at) of a uint16 tensor, by the same float64 steps as numpy's default
  'linear' method; its order statistics come from a histogram, not a sort of the film."""
  import tensorflow as tf

  flat = tf.reshape(tf.cast(grey, tf.int32), [-1])
  count = tf.size(flat)
  virtual = tf.cast(count - 1, tf.float64) * np.true_divide(at, 100)
  below = tf.floor(virtual)
  gamma = virtual - below
  # The k-th smallest value is the first whose cumulative count exceeds k.
  cumulative = tf.cumsum(tf.math.bincount(flat, minlength=2**16))
  lower = tf.cast(below, tf.int32)
  a, b = (
    tf.cast(tf.searchsorted(cumulative, k, side='right'), tf.float64)
    for k in (lower, tf.minimum(lower + 1, count - 1))
  )
  lerp = tf.where(gamma >= 0.5, b - (b - a) * (1 - gamma), a + (b - a) * gamma)
  return lerp[0], lerp[1]
