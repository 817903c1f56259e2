"""Reading image files the one way the builder, prediction and explanations all share.

Every accepted file becomes 8-bit, whatever its format or mode: palette, alpha, 16-bit PNG/TIFF
and DICOM images are converted here so that a model never sees a file read differently at
training and at prediction time. Grey images deeper than 8 bits (DICOM, 16-bit PNG/TIFF) go
through one window rule, `GreyWindow` (dataset.grey_window; see `dicom`); 8-bit files are read
as they are, whatever it says. `load_stored` gives what the dataset stores: one channel for a
grey image (an X-ray stored as RGB is three equal copies), resized once, antialiased, to the
stored size.

Files are taken by extension (any letter case) or, whatever their name (PACS exports often have
none, or a UID's digits), by a DICOM file's 132-byte header.
"""

import glob
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pneumo_jax.data import dicom
from pneumo_jax.data.dicom import DEFAULT_WINDOW, GreyWindow
from pneumo_jax.errors import DatasetError, NotFoundError

__all__ = [
  'DEFAULT_WINDOW',
  'DatasetError',
  'GreyWindow',
  'NotFoundError',
  'expand_inputs',
  'fit',
  'is_candidate',
  'is_grey',
  'load_stored',
]

# Extensions (compared lower-cased) that the builder treats as images; any other file is taken
# only when it starts as DICOM does.
PILLOW_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
IMAGE_EXTENSIONS = PILLOW_EXTENSIONS + dicom.EXTENSIONS

# Pillow's errors for a file that is not an image, is truncated or has a broken stream.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# Lanczos (a windowed sinc over 3 lobes) is the usual quality choice for shrinking: it suppresses
# what lies above the new Nyquist frequency far better than a box (area) average, whose sinc-shaped
# response leaks it back as aliasing. Measured here (Pillow 13, one core, to 342 px): a grey
# 2500x2048 image takes 19 ms with Lanczos against 4 ms with a box, where decoding its PNG takes
# 23 ms; a 3000x3000 one 30 ms against 7. It runs once per image per build, never per step, so
# the box's speed buys nothing that matters.
RESIZE_FILTER = Image.Resampling.LANCZOS

# Modes that can only hold grey at 8 bits or fewer ('I*', 16-bit grey, is windowed apart).
_GREY_MODES = ('1', 'L', 'LA')
_SAMPLE16 = (0.0, 65535.0)  # A 16-bit PNG/TIFF's sample range: the 'full_range' window.


def is_candidate(path: str | os.PathLike[str]) -> bool:
  """True for a visible file whose extension marks it as an image (any letter case), or that
  starts as DICOM does; only files without an image extension are opened (132 bytes read)."""
  name = os.path.basename(path)
  if name.startswith('.'):
    return False
  return _extension(name) in IMAGE_EXTENSIONS or dicom.has_preamble(path)


def _extension(path: str | os.PathLike[str]) -> str:
  return os.path.splitext(path)[1].lower()


def _to_rgb8(image: Image.Image) -> np.ndarray:
  """Converts a decoded Pillow image of an 8-bit mode to a uint8 [H, W, 3] array.

  Alpha is dropped (not composited), as slim's `decode_png(channels=3)` does.
  """
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')  # Pillow wants palette transparency expanded first.
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image, dtype=np.uint8)


def _grey16_to_8(image: Image.Image, window: GreyWindow) -> np.ndarray:
  """A Pillow 'I*' image (16-bit grey PNG or TIFF) → uint8 [H, W] by `window`, whose 'file'
  range is the smallest depth of 8 to 16 bits that holds the brightest pixel: a 16-bit file
  cannot say how many of its bits are used, and exports of 10–14-bit films are common."""
  grey = np.asarray(image)
  bits = int(np.clip(int(grey.max()).bit_length(), 8, 16))
  return dicom.to_uint8(grey, *window.bounds(grey, (0.0, 2.0**bits - 1), _SAMPLE16))


def _to_stored8(image: Image.Image, window: GreyWindow) -> np.ndarray:
  """A decoded Pillow image → uint8 [H, W, 1] when grey, else [H, W, 3] (as `_to_rgb8`)."""
  if image.mode.startswith('I'):  # 'I;16', 'I;16B', 'I': how Pillow opens 16-bit grey.
    return _grey16_to_8(image, window)[..., None]
  if image.mode == 'F':  # Pillow would clip it to 0–255, which turns a 0–1 film black.
    raise ValueError('floating-point pixels are not read; export the image as 16-bit integers')
  if image.mode in _GREY_MODES:
    return np.asarray(image.convert('L') if image.mode != 'L' else image, np.uint8)[..., None]
  return _one_if_grey(_to_rgb8(image))  # Palette, RGB(A), CMYK...


def _one_if_grey(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, C] → [H, W, 1] when its channels are equal everywhere, else as it is."""
  return np.ascontiguousarray(image[..., :1]) if image.shape[-1] == 3 and is_grey(image) else image


def _read(path: str | os.PathLike[str], window: GreyWindow) -> np.ndarray:
  """Decodes `path` fully (`dicom.read` or `_to_stored8`), raising DatasetError naming it.

  DICOM by extension, else by header unless the extension says Pillow's, so that a DICOM saved
  as .dcm but broken is reported as DICOM, and a Pillow file costs no extra read.
  """
  ext = _extension(path)
  if ext in dicom.EXTENSIONS or (ext not in PILLOW_EXTENSIONS and dicom.has_preamble(path)):
    return _one_if_grey(dicom.read(path, window))
  try:
    with Image.open(path) as image:
      image.load()  # Decode now: a truncated file must fail here, not later in a worker.
      return _to_stored8(image, window)
  except _UNREADABLE as e:
    raise DatasetError(f'cannot read image {os.fspath(path)!r} ({type(e).__name__}: {e})') from e


def is_grey(rgb: np.ndarray) -> bool:
  """True when the three channels of `rgb` [H, W, 3] are equal everywhere (a grey picture that
  was saved in colour); storing one channel then loses nothing."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  return bool(np.array_equal(r, g) and np.array_equal(g, b))


def fit(image: np.ndarray, size: int | None) -> np.ndarray:
  """uint8 [H, W, C] (C = 1 or 3) → uint8 [size, size, C], the whole image squashed to a square
  as the training resize squashes it anyway, antialiased with `RESIZE_FILTER`; so that
  subsampling a 2,000–3,000 px X-ray does not alias small opacities away. `size` None, or an
  image already size × size, is returned as is.
  """
  if size is None or image.shape[:2] == (size, size):
    return image
  grey = image.shape[-1] == 1
  resized = Image.fromarray(image[..., 0] if grey else image).resize((size, size), RESIZE_FILTER)
  out = np.asarray(resized, dtype=np.uint8)
  return out[..., None] if grey else out


def load_stored(
  path: str | os.PathLike[str],
  stored_size: int | None,
  *,
  channels: int | None = None,
  window: GreyWindow = DEFAULT_WINDOW,
) -> np.ndarray:
  """What the dataset stores for `path`: uint8 [S, S, C], S = `stored_size` (None: the file's
  own height and width), C = 1 when the image is grey (grey, 16-bit or 1-bit modes, grey
  palettes, greyscale DICOM, RGB with equal channels), else 3 (RGB: alpha dropped, palettes
  expanded; colour DICOM).

  `channels` = 3 repeats a grey image's channel, as a dataset that also holds colour images
  stores it; None keeps the file's own C. `window` maps grey deeper than 8 bits to 8
  (`GreyWindow.from_config(config.dataset)`). Passing the dataset's C
  (`folder_builder.stored_shape`) and window gives exactly the record the builder stored.

  Raises:
    DatasetError: unreadable file (names the path), or a colour image where `channels` = 1.
  """
  if channels not in (None, 1, 3):
    raise ValueError(f'channels={channels} must be None, 1 or 3')
  image = fit(_read(path, window), stored_size)
  if channels is None or channels == image.shape[-1]:
    return image
  if channels == 3:
    return np.repeat(image, 3, axis=-1)
  raise DatasetError(
    f'image {os.fspath(path)!r} is in colour, but the dataset holds grey (1-channel) images: '
    'convert it to grey first'
  )


def expand_inputs(inputs: Sequence[str]) -> list[str]:
  """Files to predict: named files as given (whatever their extension: the user asked for them),
  folders' image files (`is_candidate`; recursively, sorted), glob patterns' matches (sorted;
  folders among them expanded), without repeats.

  Raises:
    NotFoundError: a named path does not exist, a pattern matches nothing, a folder holds no
      image, or nothing was named; every such input is listed, before anything is read.
  """
  if not inputs:
    raise NotFoundError('no --inputs given; name image files, folders or glob patterns')
  files, missing = [], []
  for given in inputs:
    pattern = os.path.expanduser(given)
    matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    if not matches or not os.path.exists(matches[0]):
      why = 'matches nothing' if glob.has_magic(pattern) else 'no such file or folder'
      missing.append(f'{given!r} ({why})')
      continue
    for path in matches:
      if os.path.isdir(path):
        found = sorted(
          os.path.join(root, name)
          for root, _, names in os.walk(path)
          for name in names
          if is_candidate(os.path.join(root, name))
        )
        if not found:
          kinds = '/'.join(IMAGE_EXTENSIONS)
          missing.append(f'{given!r} (folder {path!r} holds no {kinds} or DICOM file)')
        files += found
      else:
        files.append(path)
  if missing:
    raise NotFoundError(
      '--inputs: ' + '; '.join(missing) + '. Check the paths (a pattern in '
      'quotes is expanded here; unquoted, by the shell).'
    )
  return list(dict.fromkeys(files))
