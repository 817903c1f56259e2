"""The grey window's two implementations, numpy (data/grey_window.py, which pneumo_jax and an
export's serve.py share) and TF ops (the SavedModel's), give the same pixels on the same 16-bit
images under every rule; and the readers of 16-bit files and DICOM apply the numpy one."""

import numpy as np
import pytest
from PIL import Image

from pneumo_jax.data import grey_window, images
from pneumo_jax.data.dicom import GreyWindow

WINDOWS = (
  GreyWindow('file'),
  GreyWindow('full_range'),
  GreyWindow('fixed', (1.0, 511.0)),  # 255 / 510 = 0.5: ties to round half to even; both clips.
  GreyWindow('fixed', (100.25, 3000.5)),
  GreyWindow('percentile'),
)


def _films() -> dict[str, np.ndarray]:
  """16-bit grey images that tell the rules apart: 12-bit, under 8 bits (the 'file' rule's
  floor), exactly 8 and 9 bits, the whole 16-bit range, flat (equal percentiles), and 8 pixels
  whose 99.5th percentile differs in the last bit unless numpy's interpolation is followed."""
  rng = np.random.default_rng(0)
  arrays = {
    'twelve_bit': rng.integers(0, 4096, (37, 29)),
    'dim': rng.integers(0, 200, (23, 31)),
    'eight_bit_top': np.array([[0, 255], [17, 128]]),
    'nine_bit_floor': np.array([[0, 256], [3, 300]]),
    'full': rng.integers(0, 65536, (16, 16)),
    'flat': np.full((5, 7), 1000),
    'last_bit': np.array([[0, 0, 0, 0], [0, 0, 0, 1001]]),
  }
  return {name: a.astype(np.uint16) for name, a in arrays.items()}


def test_numpy_and_tf_windows_give_the_same_pixels():
  tf = pytest.importorskip('tensorflow')
  from pneumo_jax.export import tf_images

  for name, grey in _films().items():
    want = list(np.percentile(grey, grey_window.PERCENTILES))
    got = tf_images.percentiles(tf.constant(grey), grey_window.PERCENTILES)
    assert [float(p) for p in got] == want, name
    for window in WINDOWS:
      numpy_pixels = grey_window.grey16_to_8(grey, window.rule, window.fixed_range)
      tf_pixels = tf_images.grey16_to_8(tf.constant(grey[..., None]), window).numpy()[..., 0]
      np.testing.assert_array_equal(tf_pixels, numpy_pixels, err_msg=f'{name}, {window}')


def test_each_rule_maps_as_documented():
  twelve = np.array([[0, 4095], [2048, 100]], np.uint16)
  assert grey_window.bits_range(twelve) == (0.0, 4095.0)
  assert grey_window.bits_range(np.array([[3]], np.uint16)) == (0.0, 255.0)  # 8 bits at least.
  np.testing.assert_array_equal(grey_window.grey16_to_8(twelve, 'file'), [[0, 255], [128, 6]])
  np.testing.assert_array_equal(grey_window.grey16_to_8(twelve, 'full_range'), [[0, 16], [8, 0]])
  np.testing.assert_array_equal(
    grey_window.grey16_to_8(twelve, 'fixed', (100.0, 355.0)), [[0, 255], [255, 0]]
  )
  flat = np.full((3, 3), 7, np.uint16)
  np.testing.assert_array_equal(grey_window.grey16_to_8(flat, 'percentile'), np.zeros((3, 3)))


def test_16_bit_files_are_read_by_the_shared_rule(tmp_path):
  """images.load_stored (training and predict) maps a 16-bit PNG as grey_window does."""
  for name, grey in _films().items():
    path = tmp_path / f'{name}.png'
    Image.fromarray(grey).save(path)
    for window in WINDOWS:
      want = grey_window.grey16_to_8(grey, window.rule, window.fixed_range)
      got = images.load_stored(path, None, window=window)[..., 0]
      np.testing.assert_array_equal(got, want, err_msg=f'{name}, {window}')
