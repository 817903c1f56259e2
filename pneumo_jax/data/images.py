"""Reading image files the one way the builder, prediction and explanations all share.

Every accepted file becomes 8-bit RGB, whatever its mode: grey, palette, alpha and 16-bit images
are converted here so that a model never sees a file read differently at training and at
prediction time.
"""

import glob
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pneumo_jax.errors import DatasetError, NotFoundError

__all__ = ['DatasetError', 'NotFoundError', 'expand_inputs', 'is_candidate', 'load_image']

# Extensions (compared lower-cased) that the builder treats as images; anything else is skipped.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')

# Pillow's errors for a file that is not an image, is truncated or has a broken stream.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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
    grey = np.asarray(image).astype(np.float64)
    grey = np.clip(np.rint(grey * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')  # Pillow wants palette transparency expanded first.
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image, dtype=np.uint8)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads `path` fully into a uint8 [H, W, 3] RGB array.

  Raises:
    DatasetError: the file is missing, not an image, truncated or corrupt; names the path.
  """
  try:
    with Image.open(path) as image:
      image.load()  # Decode now: a truncated file must fail here, not later in a worker.
      return _to_rgb8(image)
  except _UNREADABLE as e:
    raise DatasetError(f'cannot read image {os.fspath(path)!r} ({type(e).__name__}: {e})') from e


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
