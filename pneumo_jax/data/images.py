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

import csv
import dataclasses
import errno
import glob
import os
import stat
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image

from pneumo_jax.data import dicom, grey_window
from pneumo_jax.data.dicom import DEFAULT_WINDOW, GreyWindow
from pneumo_jax.errors import ConfigError, DatasetError, NotFoundError

__all__ = [
  'DEFAULT_WINDOW',
  'DatasetError',
  'GreyWindow',
  'NotFoundError',
  'SuspectRule',
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


@dataclasses.dataclass(frozen=True)
class SuspectRule:
  """Which decoded images are too degenerate to be films (a 1x1 icon, a 20000x20 strip), so that
  they are listed instead of being squashed to the input size without a word. 0 turns a bound
  off."""

  min_side: int = 0  # dataset.min_image_side: fewer pixels than this on either side.
  max_aspect_ratio: float = 0.0  # dataset.max_aspect_ratio: longer side / shorter side above it.

  @classmethod
  def from_config(cls, dataset_cfg: ml_collections.ConfigDict) -> 'SuspectRule':
    """dataset.min_image_side and dataset.max_aspect_ratio, checked.

    Raises:
      ConfigError: naming the field and the values it accepts.
    """
    side, ratio = dataset_cfg.min_image_side, dataset_cfg.max_aspect_ratio
    if isinstance(side, bool) or not isinstance(side, int) or side < 0:
      raise ConfigError(
        f'dataset.min_image_side={side!r}: use a whole number of pixels >= 0 (0 turns it off)'
      )
    if (
      isinstance(ratio, bool)
      or not isinstance(ratio, int | float)
      or not (ratio == 0 or 1 <= ratio < float('inf'))
    ):
      raise ConfigError(
        f'dataset.max_aspect_ratio={ratio!r}: use a number >= 1 (longer / shorter side), or 0 '
        'to turn it off'
      )
    return cls(int(side), float(ratio))

  def check(self, path: str | os.PathLike[str], height: int, width: int) -> None:
    """Raises DatasetError naming the file, its pixel size and the field to change when a
    height x width image breaks the rule."""
    short, long = min(height, width), max(height, width)
    if self.min_side and short < self.min_side:
      why, field = f'under dataset.min_image_side={self.min_side} px', 'min_image_side'
    elif self.max_aspect_ratio and long > self.max_aspect_ratio * short:
      why = f'its aspect ratio {long / short:.3g} exceeds dataset.max_aspect_ratio='
      why, field = why + f'{self.max_aspect_ratio:g}', 'max_aspect_ratio'
    else:
      return
    raise DatasetError(
      f'suspicious image {os.fspath(path)!r}: {width}x{height} px, {why}; check the file, or '
      f'change --config.dataset.{field} (0 turns the rule off)'
    )


def is_candidate(path: str | os.PathLike[str]) -> bool:
  """True for a visible file whose extension marks it as an image (any letter case), or that
  starts as DICOM does; only files without an image extension are opened (132 bytes read).

  Never raises: what cannot be looked at (a link loop, a dangling link, a file it may not read)
  is taken by its extension alone, for the reader to list it with its cause.
  """
  name = os.path.basename(path)
  if name.startswith('.'):
    return False
  if _extension(name) in IMAGE_EXTENSIONS:
    return True
  try:
    if not stat.S_ISREG(os.stat(path).st_mode):
      return False  # A FIFO would block the header's read; a socket or device is no image.
  except (OSError, ValueError):
    return False
  return dicom.has_preamble(path)


def _unopenable(path: str | os.PathLike[str]) -> str | None:
  """Why `path` cannot be opened as a regular file (a link loop, a dangling link, no permission,
  not a file), or None when it can."""
  try:
    st = os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      return 'a symbolic link loop'
    if e.errno == errno.ENOENT and os.path.islink(path):
      return f'a dangling symbolic link to {os.readlink(path)!r}'
    return e.strerror or str(e)
  if not stat.S_ISREG(st.st_mode):
    return 'a folder' if stat.S_ISDIR(st.st_mode) else 'not a regular file'
  if not os.access(path, os.R_OK):
    return os.strerror(errno.EACCES)
  return None


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
  """A Pillow 'I*' image (16-bit grey PNG or TIFF) → uint8 [H, W] by `window` (the shared rule,
  `grey_window.grey16_to_8`, which serve.py applies too)."""
  return grey_window.grey16_to_8(np.asarray(image), window.rule, window.fixed_range)


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
  as .dcm but broken is reported as DICOM, and a Pillow file costs no extra read. A path that is
  no readable file (see `_unopenable`) is named with its cause.
  """
  if why := _unopenable(path):
    raise DatasetError(f'cannot read image {os.fspath(path)!r}: {why}')
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
  suspect: SuspectRule | None = None,
) -> np.ndarray:
  """What the dataset stores for `path`: uint8 [S, S, C], S = `stored_size` (None: the file's
  own height and width), C = 1 when the image is grey (grey, 16-bit or 1-bit modes, grey
  palettes, greyscale DICOM, RGB with equal channels), else 3 (RGB: alpha dropped, palettes
  expanded; colour DICOM).

  `channels` = 3 repeats a grey image's channel, as a dataset that also holds colour images
  stores it; None keeps the file's own C. `window` maps grey deeper than 8 bits to 8
  (`GreyWindow.from_config(config.dataset)`). Passing the dataset's C
  (`folder_builder.stored_shape`) and window gives exactly the record the builder stored.
  `suspect` refuses a decoded image of degenerate size (`SuspectRule.from_config`).

  Raises:
    DatasetError: unreadable file (names the path and the cause: also a link loop, a dangling
      link or no permission), a suspicious one, or a colour image where `channels` = 1.
  """
  if channels not in (None, 1, 3):
    raise ValueError(f'channels={channels} must be None, 1 or 3')
  image = _read(path, window)
  if suspect is not None:
    suspect.check(path, *image.shape[:2])
  image = fit(image, stored_size)
  if channels is None or channels == image.shape[-1]:
    return image
  if channels == 3:
    return np.repeat(image, 3, axis=-1)
  raise DatasetError(
    f'image {os.fspath(path)!r} is in colour, but the dataset holds grey (1-channel) images: '
    'convert it to grey first'
  )


def csv_paths(path: str) -> list[str]:
  """The files a CSV lists in its `path` column (dataset.labels_csv's format: relative to the
  CSV's folder, or absolute; decoded as UTF-8, other bytes kept as in a file name), in order,
  blank cells left out.

  Raises:
    DatasetError: the CSV cannot be read or has no `path` column; names it.
  """
  try:
    with open(path, 'rb') as f:
      text = f.read().decode('utf-8', 'surrogateescape').removeprefix('\ufeff')
  except OSError as e:
    raise DatasetError(f'cannot read the CSV {path!r}: {e.strerror or e}') from e
  reader = csv.DictReader(text.splitlines(keepends=True))
  if 'path' not in (reader.fieldnames or ()):
    raise DatasetError(
      f'--inputs {path!r} has no path column (its header: {reader.fieldnames or []}); a CSV '
      'given as input lists its files in a column named path, relative to its folder or absolute'
    )
  folder = os.path.dirname(os.path.abspath(path))
  return [os.path.join(folder, row['path']) for row in reader if row['path']]


def expand_inputs(inputs: Sequence[str]) -> list[str]:
  """Files to predict: named files as given (whatever their extension: the user asked for them),
  folders' image files (`is_candidate`; recursively, sorted), glob patterns' matches (sorted;
  folders among them expanded), the files a named `.csv` lists (`csv_paths`), without repeats.

  Raises:
    NotFoundError: a named path does not exist, a pattern matches nothing, a folder holds no
      image, a CSV lists a file that does not exist, or nothing was named; every such input is
      listed, before anything is read.
    DatasetError: a named CSV without a path column.
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
      elif _extension(path) == '.csv':
        listed = csv_paths(path)
        gone = [p for p in listed if not os.path.lexists(p)]
        missing += [f'{p!r} (listed in {path!r}: no such file)' for p in gone[:5]]
        if len(gone) > 5:
          missing.append(f'and {len(gone) - 5} more listed in {path!r}')
        files += listed
      else:
        files.append(path)
  if missing:
    raise NotFoundError(
      '--inputs: ' + '; '.join(missing) + '. Check the paths (a pattern in '
      'quotes is expanded here; unquoted, by the shell).'
    )
  return list(dict.fromkeys(files))
