"""The grey window: which values of a grey image deeper than 8 bits become black and white.

The rule (dataset.grey_window) maps linearly from black → 0 to white → 255, rounded half to even
and clipped, so that a film looks the same whichever way it was exported. This file imports only
numpy: `--mode export` copies it beside the export's serve.py, which reads 16-bit files by the
run's rule without pneumo_jax. In pneumo_jax, `dicom.GreyWindow` applies it to DICOM and to
16-bit PNG/TIFF; the SavedModel's TF ops (pneumo_jax/export/tf_images.py) implement it again,
and tests/test_grey_window.py keeps the two equal.
"""

import numpy as np

# dataset.grey_window's choices (configs/default.py says what each does).
RULES = ('file', 'percentile', 'fixed', 'full_range')
# 'percentile': the per-image range, wide enough to keep nearly all of the film, narrow enough
# that a few hot or dead pixels (burnt-in labels, collimator edges) do not set it.
PERCENTILES = (0.5, 99.5)
SAMPLE16 = (0.0, 65535.0)  # A 16-bit file's sample range: its 'full_range'.


def bounds(
  rule: str,
  values: np.ndarray,
  file_range: tuple[float, float],
  full_range: tuple[float, float],
  fixed_range: tuple[float, float] | None = None,
) -> tuple[float, float]:
  """(black, white) for `values` under `rule`; the caller knows the image's 'file' range (a
  DICOM file's own window, else its stored bits) and its 'full_range' (its sample type's)."""
  if rule == 'file':
    return file_range
  if rule == 'full_range':
    return full_range
  if rule == 'fixed':
    return fixed_range
  low, high = np.percentile(values, PERCENTILES)
  return float(low), float(high)


def to_uint8(values: np.ndarray, black: float, white: float) -> np.ndarray:
  """Linear `black` → 0, `white` → 255, rounded and clipped; a flat range (the percentiles of a
  blank image) gives black rather than a division by zero."""
  if white <= black:
    return np.zeros(values.shape, np.uint8)
  scaled = (np.asarray(values, np.float64) - black) * (255.0 / (white - black))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def bits_range(grey: np.ndarray) -> tuple[float, float]:
  """A 16-bit file's 'file' range: 0 to the top of the smallest depth from 8 to 16 bits that
  holds its brightest pixel. The file cannot say how many of its bits are used, and exports of
  10–14-bit films are common: 12-bit data's 4095 is white, not grey level 16."""
  bits = int(np.clip(int(grey.max()).bit_length(), 8, 16))
  return 0.0, 2.0**bits - 1


def grey16_to_8(
  grey: np.ndarray, rule: str, fixed_range: tuple[float, float] | None = None
) -> np.ndarray:
  """A 16-bit grey PNG or TIFF's pixels [H, W] → uint8 [H, W] under `rule`."""
  return to_uint8(grey, *bounds(rule, grey, bits_range(grey), SAMPLE16, fixed_range))
