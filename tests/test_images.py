"""load_stored: every accepted format becomes the same 8-bit RGB (one channel when
grey), resized antialiased by fit; unreadable files fail clearly."""

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
  out = images.load_stored(path, None, channels=3)
  assert out.dtype == np.uint8 and out.shape == (12, 24, 3)
  np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_16_bit_is_scaled_not_clipped(tmp_path):
  values = np.array([[0, 257, 32768, 65535]], np.uint16)
  Image.fromarray(values).save(tmp_path / 'a.png')
  np.testing.assert_array_equal(
    images.load_stored(tmp_path / 'a.png', None, channels=3)[0, :, 0], [0, 1, 128, 255]
  )


def test_jpeg_any_case(tmp_path):
  Image.fromarray(RGB).save(tmp_path / 'a.JPG', format='JPEG', quality=98)
  out = images.load_stored(tmp_path / 'a.JPG', None, channels=3)
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
    images.load_stored(path, None, channels=3)
  # The reader's message fits every caller; only the builder suggests dataset.skip_corrupt.
  assert 'skip_corrupt' not in str(e.value)


def test_missing_file_names_the_path(tmp_path):
  with pytest.raises(images.DatasetError, match=r'nope\.png'):
    images.load_stored(tmp_path / 'nope.png', None, channels=3)


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


def _save_palette_grey(path):
  Image.fromarray(_grey3(GREY)).quantize(256).save(path)


@pytest.mark.parametrize(
  'name, save, channels',
  [
    ('grey.png', lambda p: Image.fromarray(GREY).save(p), 1),
    ('grey16.png', lambda p: Image.fromarray(GREY.astype(np.uint16) * 257).save(p), 1),
    ('binary.bmp', lambda p: Image.fromarray(GREY > 100).save(p), 1),
    ('grey_alpha.png', lambda p: Image.fromarray(np.dstack([GREY, GREY])).save(p), 1),
    ('palette_grey.png', _save_palette_grey, 1),
    ('rgb_equal.png', lambda p: Image.fromarray(_grey3(GREY)).save(p), 1),
    ('rgb_equal.jpg', lambda p: Image.fromarray(_grey3(GREY)).save(p, quality=90), 1),
    ('rgb.png', lambda p: Image.fromarray(RGB).save(p), 3),
    ('palette_rgb.png', lambda p: Image.fromarray(RGB).quantize(256).save(p), 3),
  ],
)
def test_load_stored_keeps_one_channel_for_grey(tmp_path, name, save, channels):
  path = tmp_path / name
  save(path)
  native = images.load_stored(path, None)
  assert native.dtype == np.uint8 and native.shape == (12, 24, channels)
  # The same pixels as the file read as RGB, one channel when the three are equal.
  with Image.open(path) as image:
    rgb = images._to_rgb8(image)
  np.testing.assert_array_equal(np.broadcast_to(native, (12, 24, 3)), rgb)
  stored = images.load_stored(path, 16)
  assert stored.shape == (16, 16, channels)
  np.testing.assert_array_equal(stored, images.fit(native, 16))


def test_load_stored_channels(tmp_path):
  Image.fromarray(GREY).save(tmp_path / 'grey.png')
  Image.fromarray(RGB).save(tmp_path / 'rgb.png')
  grey = images.load_stored(tmp_path / 'grey.png', 8)
  np.testing.assert_array_equal(
    images.load_stored(tmp_path / 'grey.png', 8, channels=3), np.repeat(grey, 3, axis=-1)
  )
  assert images.load_stored(tmp_path / 'rgb.png', 8, channels=3).shape == (8, 8, 3)
  with pytest.raises(images.DatasetError, match=r"rgb\.png' is in colour"):
    images.load_stored(tmp_path / 'rgb.png', 8, channels=1)
  with pytest.raises(images.DatasetError, match=r'nope\.png'):
    images.load_stored(tmp_path / 'nope.png', 8)


def test_fit_antialiases():
  board = ((np.indices((512, 512)).sum(axis=0) % 2) * 255).astype(np.uint8)[..., None]
  assert set(np.unique(board[::8, ::8])) == {0}  # Naive subsampling sees one colour.
  out = images.fit(board, 64)
  assert out.shape == (64, 64, 1) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - 127).max() <= 2
  rgb = images.fit(np.repeat(board, 3, axis=-1), 64)
  np.testing.assert_array_equal(rgb, np.repeat(out, 3, axis=-1))  # Channels resized alike.


def test_fit_squashes_and_skips_no_ops():
  wide = np.zeros((10, 40, 3), np.uint8)
  wide[:, 20:] = 200
  out = images.fit(wide, 20)
  assert out.shape == (20, 20, 3)  # The whole image, squashed (no crop).
  assert out[:, 0].max() == 0 and out[:, -1].min() == 200
  square = np.zeros((20, 20, 1), np.uint8)
  assert images.fit(square, 20) is square
  assert images.fit(wide, None) is wide
