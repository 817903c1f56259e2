"""load_stored: every accepted format becomes the same 8-bit RGB (one channel when
grey), resized antialiased by fit; 16-bit grey is windowed by dataset.grey_window's rule while
8-bit files ignore it; unreadable files fail clearly. (DICOM: test_dicom.py.)"""

import os
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pneumo_jax.data import images
from pneumo_jax.errors import ConfigError

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
    ('grey16.tif', lambda p: Image.fromarray(GREY.astype(np.uint16) * 257).save(p), _grey3(GREY)),
    ('rgb.TIFF', lambda p: Image.fromarray(RGB).save(p), RGB),
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


# A 12-bit film in a 16-bit file (0–4095), as most X-ray exports are.
FILM12 = np.random.default_rng(3).integers(0, 4096, (20, 30), dtype=np.uint16)
FILM12[0, 0] = 4095


def _onto8(x: np.ndarray, low: float, high: float) -> np.ndarray:
  return np.clip(np.rint((x.astype(float) - low) / (high - low) * 255), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('name', ['film.png', 'film.tif', 'film.TIFF'])
@pytest.mark.parametrize(
  'rule, fixed, expected',
  [
    # The smallest depth that holds 4095 is 12 bits: 4095 → 255.
    ('file', None, lambda x: _onto8(x, 0, 4095)),
    ('full_range', None, lambda x: _onto8(x, 0, 65535)),  # The old rule: nearly black.
    ('fixed', (1000.0, 2999.0), lambda x: _onto8(x, 1000, 2999)),  # No rounding ties.
    ('percentile', None, lambda x: _onto8(x, *np.percentile(x, [0.5, 99.5]))),
  ],
)
def test_16_bit_grey_window(tmp_path, name, rule, fixed, expected):
  Image.fromarray(FILM12).save(tmp_path / name)
  window = images.GreyWindow(rule, fixed)
  out = images.load_stored(tmp_path / name, None, window=window)
  assert out.dtype == np.uint8 and out.shape == (20, 30, 1)
  np.testing.assert_array_equal(out[..., 0], expected(FILM12))


@pytest.mark.parametrize('brightest, bits', [(200, 8), (255, 8), (256, 9), (1023, 10), (16383, 14)])
def test_16_bit_file_rule_finds_the_used_bits(tmp_path, brightest, bits):
  values = np.array([[0, 1, brightest // 2, brightest]], np.uint16)
  Image.fromarray(values).save(tmp_path / 'a.png')
  out = images.load_stored(tmp_path / 'a.png', None)[0, :, 0]
  np.testing.assert_array_equal(out, _onto8(values[0], 0, 2**bits - 1))


@pytest.mark.parametrize('rule, fixed', [('percentile', None), ('fixed', (10.0, 20.0))])
def test_8_bit_files_ignore_the_window(tmp_path, rule, fixed):
  Image.fromarray(GREY).save(tmp_path / 'grey.png')
  Image.fromarray(GREY).save(tmp_path / 'grey.tif')
  Image.fromarray(RGB).save(tmp_path / 'rgb.jpg', quality=90)
  window = images.GreyWindow(rule, fixed)
  for name in ('grey.png', 'grey.tif', 'rgb.jpg'):
    path = tmp_path / name
    np.testing.assert_array_equal(
      images.load_stored(path, 16, window=window), images.load_stored(path, 16), err_msg=name
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


def test_floating_point_tiff_is_refused(tmp_path):
  Image.fromarray(np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)).save(tmp_path / 'f.tif')
  with pytest.raises(images.DatasetError, match=r"f\.tif' .*floating-point pixels are not read"):
    images.load_stored(tmp_path / 'f.tif', None)


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
    ('e.tif', True),
    ('f.TIFF', True),
    ('g.dcm', True),
    ('h.DICOM', True),
    ('.hidden.png', False),
    ('.hidden.dcm', False),
    ('README.txt', False),
    ('IM0001', False),  # Named only (no such file): an extensionless file needs its header.
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
  with Image.open(path) as image:  # 16-bit grey ('I;16') is windowed, not converted.
    rgb = _grey3(GREY) if image.mode.startswith('I') else images._to_rgb8(image)
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


def _png(path, height=40, width=40):
  Image.fromarray(np.full((height, width), 90, np.uint8)).save(path)
  return path


@pytest.mark.parametrize('name', ['loop.png', 'loop'])
def test_link_loops_and_dangling_links_are_named_never_raised(tmp_path, name):
  """is_candidate never raises; the reader names the path and the cause as a DatasetError."""
  loop, dangling = tmp_path / name, tmp_path / f'dangling_{name}'
  os.symlink(loop, loop)
  os.symlink(tmp_path / 'gone.png', dangling)
  assert images.is_candidate(loop) is name.endswith('.png')  # No extension: nothing to go by.
  assert images.is_candidate(dangling) is name.endswith('.png')
  with pytest.raises(images.DatasetError, match=re.escape(f"{loop}': a symbolic link loop")):
    images.load_stored(loop, None)
  with pytest.raises(images.DatasetError, match=f'{dangling}.: a dangling symbolic link to .*gone'):
    images.load_stored(dangling, 32)


def test_fifo_is_no_candidate(tmp_path):
  os.mkfifo(tmp_path / 'pipe')  # Reading its header would block forever.
  assert not images.is_candidate(tmp_path / 'pipe')
  with pytest.raises(images.DatasetError, match='not a regular file'):
    images.load_stored(tmp_path / 'pipe', None)


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads any file')
def test_unreadable_permission_is_named(tmp_path):
  path = _png(tmp_path / 'locked.png')
  path.chmod(0)
  with pytest.raises(images.DatasetError, match=r'locked\.png.: Permission denied'):
    images.load_stored(path, None)


@pytest.mark.parametrize(
  'height, width, match',
  [
    (1, 1, r"tiny\.png': 1x1 px, under dataset\.min_image_side=32 px.*dataset\.min_image_side"),
    (
      40,
      4000,
      r'4000x40 px, its aspect ratio 100 exceeds dataset\.max_aspect_ratio=4;.*max_aspect',
    ),
    (2000, 40, r'40x2000 px, its aspect ratio 50 exceeds'),
  ],
)
def test_suspect_rule_names_the_file_its_size_and_the_field(tmp_path, height, width, match):
  rule = images.SuspectRule(min_side=32, max_aspect_ratio=4.0)
  path = _png(tmp_path / 'tiny.png', height, width)
  with pytest.raises(images.DatasetError, match=match):
    images.load_stored(path, 40, suspect=rule)
  assert images.load_stored(path, 40).shape == (40, 40, 1)  # No rule: read as before.
  assert images.load_stored(path, 40, suspect=images.SuspectRule()).shape == (40, 40, 1)


def test_suspect_rule_passes_films_at_its_bounds(tmp_path):
  rule = images.SuspectRule(min_side=32, max_aspect_ratio=4.0)
  for height, width in ((32, 128), (128, 32), (300, 240)):
    images.load_stored(_png(tmp_path / 'ok.png', height, width), 40, suspect=rule)


@pytest.mark.parametrize(
  'field, value',
  [
    ('min_image_side', -1),
    ('min_image_side', 2.5),
    ('min_image_side', True),
    ('max_aspect_ratio', 0.5),
    ('max_aspect_ratio', -1.0),
    ('max_aspect_ratio', float('inf')),
  ],
)
def test_suspect_rule_from_config_checks_its_fields(field, value):
  good = {'min_image_side': 32, 'max_aspect_ratio': 4.0}
  assert images.SuspectRule.from_config(ml_collections.ConfigDict(good)) == (
    images.SuspectRule(32, 4.0)
  )
  cfg = ml_collections.ConfigDict({**good, field: value})  # As a --config override can set it.
  with pytest.raises(ConfigError, match=f'dataset.{field}='):
    images.SuspectRule.from_config(cfg)


def test_non_utf8_names_are_read(tmp_path):
  """A name Python gives with lone surrogates (os.fsdecode of non-UTF-8 bytes) reads as any."""
  name = os.fsdecode(b'caf\xe9.png')
  path = _png(tmp_path / name)
  assert images.is_candidate(path)
  assert images.expand_inputs([str(tmp_path)]) == [str(path)]
  assert images.load_stored(path, None).shape == (40, 40, 1)


def test_expand_inputs_reads_a_csvs_path_column(tmp_path):
  """Relative to the CSV's folder or absolute; a listed file that is missing is named."""
  sub = tmp_path / 'films'
  sub.mkdir()
  a, b = _png(sub / 'a.png'), _png(tmp_path / 'b.png')
  (sub / 'list.csv').write_text(f'label,path\nx,a.png\ny,{b}\nz,\n')
  assert images.expand_inputs([str(sub / 'list.csv')]) == [str(a), str(b)]
  (sub / 'gone.csv').write_text('path\na.png\nnope.png\n')
  with pytest.raises(images.NotFoundError, match=r"nope\.png' \(listed in .*gone\.csv'"):
    images.expand_inputs([str(sub / 'gone.csv')])
  (sub / 'bare.csv').write_text('file\na.png\n')
  with pytest.raises(images.DatasetError, match=r"bare\.csv' has no path column"):
    images.expand_inputs([str(sub / 'bare.csv')])
