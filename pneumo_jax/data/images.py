"""Reading image files the one way the builder, prediction and explanations all share.

Every accepted file becomes 8-bit, whatever its mode: palette, alpha and 16-bit images are
converted here so that a model never sees a file read differently at training and at prediction
time. `load_stored` gives what the dataset stores: one channel for a grey image (an X-ray stored
as RGB is three equal copies), resized once, antialiased, to the stored size.
"""

import glob
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pneumo_jax.errors import DatasetError, NotFoundError

__all__ = [
  'DatasetError',
  'NotFoundError',
  'expand_inputs',
  'fit',
  'is_candidate',
  'is_grey',
  'load_stored',
]

# Extensions (compared lower-cased) that the builder treats as images; anything else is skipped.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')

# Pillow's errors for a file that is not an image, is truncated or has a broken stream.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# Lanczos (a windowed sinc over 3 lobes) is the usual quality choice for shrinking: it suppresses
# what lies above the new Nyquist frequency far better than a box (area) average, whose sinc-shaped
# response leaks it back as aliasing. Measured here (Pillow 13, one core, to 342 px): a grey
# 2500x2048 image takes 19 ms with Lanczos against 4 ms with a box, where decoding its PNG takes
# 23 ms; a 3000x3000 one 30 ms against 7. It runs once per image per build, never per step, so
# the box's speed buys nothing that matters.
RESIZE_FILTER = Image.Resampling.LANCZOS

# Modes that can only hold grey ('I*' is how Pillow opens 16-bit grey PNGs).
_GREY_MODES = ('1', 'L', 'LA')


def is_candidate(name: str) -> bool:
  """True for a visible file whose extension marks it as an image (any letter case)."""
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb8(image: Image.Image) -> np.ndarray:
  """Converts a decoded Pillow image of any mode to a uint8 [H, W, 3] array.

  16-bit grey is rescaled over its full range (65535 → 255, rounded), as TF's
  `convert_image_dtype` does, instead of being clipped at 255 as Pillow's own conversion would.
  Alpha is dropped (not composited), as slim's `decode_png(channels=3)` does.
  """
  if image.mode.startswith('I'):  # 'I;16', 'I;16B', 'I' (how Pillow opens 16-bit grey PNGs).
    return np.repeat(_grey16_to_8(image)[..., None], 3, axis=-1)
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')  # Pillow wants palette transparency expanded first.
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image, dtype=np.uint8)


def _grey16_to_8(image: Image.Image) -> np.ndarray:
  """A Pillow 'I*' image → uint8 [H, W]: the one 16-bit rule both readers share."""
  grey = np.asarray(image).astype(np.float64)
  return np.clip(np.rint(grey * (255.0 / 65535.0)), 0, 255).astype(np.uint8)


def _to_stored8(image: Image.Image) -> np.ndarray:
  """A decoded Pillow image → uint8 [H, W, 1] when grey, else [H, W, 3] (as `_to_rgb8`)."""
  if image.mode.startswith('I'):
    return _grey16_to_8(image)[..., None]
  if image.mode in _GREY_MODES:
    return np.asarray(image.convert('L') if image.mode != 'L' else image, np.uint8)[..., None]
  rgb = _to_rgb8(image)  # Palette, RGB(A), CMYK...: grey only if every pixel is.
  return np.ascontiguousarray(rgb[..., :1]) if is_grey(rgb) else rgb


def _read(path: str | os.PathLike[str]) -> np.ndarray:
  """Decodes `path` fully (`_to_stored8`), raising DatasetError naming the path."""
  try:
    with Image.open(path) as image:
      image.load()  # Decode now: a truncated file must fail here, not later in a worker.
      return _to_stored8(image)
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
  path: str | os.PathLike[str], stored_size: int | None, *, channels: int | None = None
) -> np.ndarray:
  """What the dataset stores for `path`: uint8 [S, S, C], S = `stored_size` (None: the file's
  own height and width), C = 1 when the image is grey (grey, 16-bit or 1-bit modes, grey
  palettes, RGB with equal channels), else 3 (RGB: alpha dropped, palettes expanded).

  `channels` = 3 repeats a grey image's channel, as a dataset that also holds colour images
  stores it; None keeps the file's own C. Passing the dataset's C (`folder_builder.stored_shape`)
  gives exactly the record the builder stored for the file.

  Raises:
    DatasetError: unreadable file (names the path), or a colour image where `channels` = 1.
  """
  if channels not in (None, 1, 3):
    raise ValueError(f'channels={channels} must be None, 1 or 3')
  image = fit(_read(path), stored_size)
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
  folders' image files (recursively, sorted), glob patterns' matches (sorted; folders among
  them expanded), without repeats.

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
          if is_candidate(name)
        )
        if not found:
          missing.append(f'{given!r} (folder {path!r} holds no {"/".join(IMAGE_EXTENSIONS)} file)')
        files += found
      else:
        files.append(path)
  if missing:
    raise NotFoundError(
      '--inputs: ' + '; '.join(missing) + '. Check the paths (a pattern in '
      'quotes is expanded here; unquoted, by the shell).'
    )
  return list(dict.fromkeys(files))
