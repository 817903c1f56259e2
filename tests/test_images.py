"""load_image: every accepted format becomes the same 8-bit RGB; unreadable files fail clearly."""

import re

import numpy as np
import pytest
from PIL import Image

from pneumo_jax.data import images

GREY = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (12, 1))  # [12, 24] ramp.
RGB = np.stack([GREY, 255 - GREY, np.full_like(GREY, 77)], axis=-1)


def _grey3(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1)


@pytest.mark.parametrize(
  'name, save, expected',
  [
    ('grey.png', lambda p: Image.fromarray(GREY).save(p), _grey3(GREY)),
    ('rgb.PNG', lambda p: Image.fromarray(RGB).save(p), RGB),
    ('rgb.bmp', lambda p: Image.fromarray(RGB).save(p), RGB),
    ('rgba.png', lambda p: Image.fromarray(np.dstack([RGB, np.full_like(GREY, 9)])).save(p), RGB),
    ('palette.png', lambda p: Image.fromarray(RGB).quantize(256).save(p), RGB),
    ('grey16.png', lambda p: Image.fromarray(GREY.astype(np.uint16) * 257).save(p), _grey3(GREY)),
    ('binary.png', lambda p: Image.fromarray(GREY > 100).save(p), _grey3((GREY > 100) * 255)),
  ],
)
def test_formats_become_rgb8(tmp_path, name, save, expected):
  path = tmp_path / name
  save(path)
  out = images.load_image(path)
  assert out.dtype == np.uint8 and out.shape == (12, 24, 3)
  np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_16_bit_is_scaled_not_clipped(tmp_path):
  values = np.array([[0, 257, 32768, 65535]], np.uint16)
  Image.fromarray(values).save(tmp_path / 'a.png')
  np.testing.assert_array_equal(images.load_image(tmp_path / 'a.png')[0, :, 0], [0, 1, 128, 255])


def test_jpeg_any_case(tmp_path):
  Image.fromarray(RGB).save(tmp_path / 'a.JPG', format='JPEG', quality=98)
  out = images.load_image(tmp_path / 'a.JPG')
  assert out.shape == (12, 24, 3)
  assert np.abs(out.astype(int) - RGB).mean() < 4  # Lossy, but the same picture.


@pytest.mark.parametrize(
  'name, content',
  [
    ('not_an_image.png', b'hello, world'),
    ('truncated.png', None),
    ('truncated.jpg', None),
  ],
)
def test_unreadable_names_the_path(tmp_path, name, content):
  path = tmp_path / name
  if content is None:
    fmt = 'PNG' if name.endswith('png') else 'JPEG'
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format=fmt)
    content = path.read_bytes()[: len(path.read_bytes()) // 2]
  path.write_bytes(content)
  with pytest.raises(images.DatasetError, match=re.escape(name)) as e:
    images.load_image(path)
  # The reader's message fits every caller; only the builder suggests dataset.skip_corrupt.
  assert 'skip_corrupt' not in str(e.value)


def test_missing_file_names_the_path(tmp_path):
  with pytest.raises(images.DatasetError, match=r'nope\.png'):
    images.load_image(tmp_path / 'nope.png')


@pytest.mark.parametrize(
  'name, expected',
  [
    ('a.png', True),
    ('b.JPEG', True),
    ('c.Jpg', True),
    ('d.bmp', True),
    ('.hidden.png', False),
    ('README.txt', False),
    ('e.tif', False),
    ('.DS_Store', False),
  ],
)
def test_is_candidate(name, expected):
  assert images.is_candidate(name) is expected


def test_expand_inputs_refuses_missing_paths_listing_all(tmp_path):
  Image.fromarray(RGB).save(tmp_path / 'a.png')
  (tmp_path / 'empty').mkdir()
  named = [
    str(tmp_path / 'a.png'),
    str(tmp_path / 'typo.png'),
    str(tmp_path / '*.jpg'),
    str(tmp_path / 'empty'),
  ]
  with pytest.raises(images.NotFoundError) as e:
    images.expand_inputs(named)
  for bad in named[1:]:
    assert repr(bad) in str(e.value)
  assert repr(named[0]) not in str(e.value)
  assert images.expand_inputs(named[:1] * 2) == named[:1]
