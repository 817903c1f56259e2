"""DICOM files, and the grey window that maps every high-bit-depth grey image to 8 bits.

X-rays come as DICOM (often compressed, often without an extension) or as 16-bit PNG/TIFF
exports holding 10–14 bits. Both become the 8-bit images the model sees through one rule,
`GreyWindow` (config: dataset.grey_window; its arithmetic is `grey_window`'s), so that the same
film looks the same whichever way it was exported. A DICOM image goes, in the standard's order,
through its modality LUT (rescale slope/intercept), then its VOI LUT or window centre/width when
the rule is 'file', then to 8 bits, then MONOCHROME1 is inverted (so bone is always bright).

pydicom decodes the pixels, RLE itself and the compressed transfer syntaxes through permissive
plugins: Pillow (JPEG baseline, 8-bit extended), GDCM (JPEG lossless, JPEG-LS) and
pylibjpeg-openjpeg (JPEG 2000). 12-bit JPEG extended needs pylibjpeg-libjpeg (GPLv3), which only
the `dicom-gpl` extra installs; a file that needs it says so. Multi-frame, palette-colour, colour
deeper than 8 bits and non-image objects (SR, waveforms, RT plans...) are refused with a
DatasetError naming the file.
"""

import importlib.util
import os
from typing import NamedTuple

import ml_collections
import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from pneumo_jax.data import grey_window
from pneumo_jax.data.grey_window import to_uint8
from pneumo_jax.errors import ConfigError, DatasetError

EXTENSIONS = ('.dcm', '.dicom')
_PREAMBLE = 128  # A DICOM file (Part 10) starts with a 128-byte preamble, then b'DICM'.
_MONOCHROME = ('MONOCHROME1', 'MONOCHROME2')
# What the opt-in GPL decoder (pylibjpeg-libjpeg, the `dicom-gpl` extra) reads. Without it, Pillow
# and GDCM read all of these but 12-bit JPEG extended, which pydicom hands to neither.
_LIBJPEG_SYNTAXES = (*uid.JPEGTransferSyntaxes, *uid.JPEGLSTransferSyntaxes)


class GreyWindow(NamedTuple):
  """Which values of a high-bit-depth grey image become black (0) and white (255): the rule of
  `grey_window`, with its setting, as the config gives it."""

  rule: str = 'file'  # One of grey_window.RULES.
  fixed_range: tuple[float, float] | None = None  # (low, high) for rule 'fixed'.

  @classmethod
  def from_config(cls, dataset_cfg: ml_collections.ConfigDict) -> 'GreyWindow':
    """dataset.grey_window and grey_window_range, checked.

    Raises:
      ConfigError: naming the field and the values it accepts.
    """
    rule, given = dataset_cfg.grey_window, dataset_cfg.grey_window_range
    if rule not in grey_window.RULES:
      raise ConfigError(f'dataset.grey_window={rule!r}: use one of {list(grey_window.RULES)}')
    if rule != 'fixed':
      if given is not None:
        raise ConfigError(
          f'dataset.grey_window_range={given} has no effect with dataset.grey_window={rule!r}: '
          "set dataset.grey_window='fixed' or unset the range"
        )
      return cls(rule)
    if not (
      isinstance(given, tuple | list)
      and len(given) == 2
      and all(isinstance(v, int | float) and np.isfinite(v) for v in given)
      and given[0] < given[1]
    ):
      raise ConfigError(
        "dataset.grey_window='fixed' needs dataset.grey_window_range=(low, high), two numbers "
        f'with low < high in the values of the images (after DICOM rescale), not {given!r}: '
        "e.g. --config.dataset.grey_window_range='(0, 4095)'"
      )
    return cls(rule, (float(given[0]), float(given[1])))

  def bounds(
    self,
    values: np.ndarray,
    file_range: tuple[float, float],
    full_range: tuple[float, float],
  ) -> tuple[float, float]:
    """(black, white) for `values` under this rule (`grey_window.bounds`)."""
    return grey_window.bounds(self.rule, values, file_range, full_range, self.fixed_range)


DEFAULT_WINDOW = GreyWindow()  # dataset.grey_window's default, 'file'.


def has_preamble(path: str | os.PathLike[str]) -> bool:
  """True when `path` starts as a DICOM file does; reads 132 bytes, never raises."""
  try:
    with open(path, 'rb') as f:
      head = f.read(_PREAMBLE + 4)
  except OSError:
    return False
  return head[_PREAMBLE:] == b'DICM'


# identifiers()'s keys → the DICOM attribute each holds.
IDENTIFIERS = {
  'patient_id': 'PatientID',
  'study_uid': 'StudyInstanceUID',
  'sop_uid': 'SOPInstanceUID',
}


def identifiers(path: str | os.PathLike[str]) -> dict[str, str]:
  """A DICOM file's PatientID, StudyInstanceUID and SOPInstanceUID (IDENTIFIERS' keys; '' for
  one it lacks), so that results join back to a PACS; {} for a file that is not DICOM or whose
  header cannot be read. Reads the header only, never the pixels; never raises."""
  if os.path.splitext(path)[1].lower() not in EXTENSIONS and not has_preamble(path):
    return {}
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
  except Exception:  # Not DICOM after all, or broken: the reader lists it.
    return {}
  found = {key: str(ds.get(keyword) or '').strip() for key, keyword in IDENTIFIERS.items()}
  if not found['sop_uid'] and 'file_meta' in ds:
    found['sop_uid'] = str(ds.file_meta.get('MediaStorageSOPInstanceUID') or '').strip()
  return found


def read(path: str | os.PathLike[str], window: GreyWindow) -> np.ndarray:
  """A single-frame DICOM image → uint8 [H, W, 1] (grey, windowed by `window`) or [H, W, 3]
  (8-bit RGB, or YBR which pydicom converts to RGB; colour ignores the window).

  Raises:
    DatasetError: the file cannot be read, holds no image or an unsupported one; names it.
  """
  name, syntax = os.fspath(path), None
  try:
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.get('TransferSyntaxUID')
    _check_supported(ds, name)
    pixels = ds.pixel_array
    if ds.PhotometricInterpretation not in _MONOCHROME:
      return pixels
    return _grey8(ds, pixels, window)[..., None]
  except DatasetError:
    raise
  except Exception as e:  # pydicom and its plugins raise many kinds for a broken file.
    why = ' '.join(str(e).split())  # pydicom lists each plugin's failure on its own line.
    coded = f' ({syntax.name})' if syntax else ''
    raise DatasetError(
      f'cannot read DICOM {name!r}{coded}: {type(e).__name__}: {why}{_gpl_hint(syntax)}'
    ) from e


def _gpl_hint(syntax: uid.UID | None) -> str:
  """What to install when the opt-in GPL decoder would read `syntax` and is not installed."""
  if syntax not in _LIBJPEG_SYNTAXES or importlib.util.find_spec('libjpeg') is not None:
    return ''
  return (
    f'; {syntax.name} is also read by pylibjpeg-libjpeg (GPLv3, not installed by default): pip '
    "install 'pneumo_jax[dicom-gpl]'"
  )


def _check_supported(ds: Dataset, name: str) -> None:
  """Refuses what is no single picture that can become 8 bits, saying what it is instead."""
  if 'PixelData' not in ds:
    kind = ds.SOPClassUID.name if 'SOPClassUID' in ds else ds.get('Modality') or 'unknown kind'
    raise DatasetError(f'DICOM {name!r} holds no image ({kind}: no Pixel Data): remove it')
  frames = int(ds.get('NumberOfFrames') or 1)
  if frames > 1:
    raise DatasetError(
      f'DICOM {name!r} has {frames} frames; only single-frame images are read: save the '
      'frame to use as its own file'
    )
  photometric = ds.get('PhotometricInterpretation')
  if photometric in _MONOCHROME and ds.SamplesPerPixel == 1:
    return
  if ds.SamplesPerPixel == 3 and ds.BitsAllocated == 8:
    return  # RGB or YBR_*: pydicom gives RGB.
  raise DatasetError(
    f'DICOM {name!r} is {photometric} with {ds.SamplesPerPixel} sample(s) of '
    f'{ds.BitsAllocated} bits; only greyscale (MONOCHROME1/2) and 8-bit colour are read: '
    'convert it to greyscale'
  )


def _grey8(ds: Dataset, pixels: np.ndarray, window: GreyWindow) -> np.ndarray:
  """Modality LUT, then the window (the file's VOI under rule 'file'), then MONOCHROME1
  inverted: uint8 [H, W]."""
  values = apply_modality_lut(pixels, ds)
  file_range = _modality_range(ds, ds.BitsStored)
  if window.rule == 'file' and (voi := _voi(values, ds)) is not None:
    values, file_range = voi
  grey = to_uint8(values, *window.bounds(values, file_range, _modality_range(ds, ds.BitsAllocated)))
  return 255 - grey if ds.PhotometricInterpretation == 'MONOCHROME1' else grey


def _modality_range(ds: Dataset, bits: int) -> tuple[float, float]:
  """The modality LUT's image of every value `bits` can store (signed per PixelRepresentation)."""
  low = -(2 ** (bits - 1)) if ds.PixelRepresentation else 0
  mapped = apply_modality_lut(np.array([low, low + 2**bits - 1]), ds)
  return float(mapped.min()), float(mapped.max())


def _voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, tuple[float, float]] | None:
  """(the file's VOI applied to `values`, that VOI's output range), None without one.

  The two halves of pydicom's apply_voi_lut, called apart because each has its own output range:
  the LUT's entries (a LUT is meant to span the display, whatever its descriptor's bit depth
  says), or windowing's, which is what it gives for inputs far below and above the window.
  As apply_voi_lut does, the LUT is preferred when the file has both.
  """
  luts = ds.get('VOILUTSequence')
  if luts and None not in (luts[0].get('LUTDescriptor'), luts[0].get('LUTData')):
    entries, first, depth = luts[0].LUTDescriptor
    if depth == 8:  # pydicom 3.0.2 indexes an 8-bit LUT with uint8 indices, which wrap past
      luts[0].LUTDescriptor = [entries, first, 16]  # 255; its 16-bit path reads the same data.
    table = apply_voi(np.arange(first, first + (entries or 2**16)), ds)
    return apply_voi(values, ds), (float(table.min()), float(table.max()))
  if None not in (ds.get('WindowCenter'), ds.get('WindowWidth')):
    ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
    return apply_windowing(values, ds), (float(ends[0]), float(ends[1]))
  return None
