"""Classifies image files with the exported grader: python serve.py FILE... (CSV on stdout).

Needs jax, numpy and Pillow only. Reads a file as pneumo_jax's --mode predict does (8-bit RGB,
a grey image's channel repeated, 16-bit grey PNG/TIFF mapped to 8 bits by the run's grey window,
alpha dropped, resized with Pillow's LANCZOS to the stored size), then calls model.jax_export,
which holds the rest. DICOM is refused: convert it with pneumo_jax, or use its --mode predict.
The grey window is grey_window.py's, the file beside this one (pneumo_jax's own rule).
"""

import csv
import importlib.util
import json
import os
import sys

import jax
import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, 'metadata.json')) as f:
  METADATA = json.load(f)
WINDOW = METADATA['grey_window']  # The run's dataset.grey_window.
# Loaded by its path, so that this file works however it is loaded (as a script, imported, or
# from a spec) without putting its folder on sys.path.
_spec = importlib.util.spec_from_file_location('grey_window', os.path.join(HERE, 'grey_window.py'))
grey_window = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grey_window)


class DicomError(ValueError):
  """A DICOM file, which this script does not read."""


def grey8(grey: np.ndarray, window: dict = WINDOW) -> np.ndarray:
  """16-bit grey [H, W] → uint8 [H, W] by metadata.json's `grey_window`."""
  return grey_window.grey16_to_8(grey, window['rule'], window.get('range'))


def is_dicom(path: str) -> bool:
  """By extension, or by the b'DICM' after a DICOM file's 128-byte preamble, as pneumo_jax."""
  if path.lower().endswith(('.dcm', '.dicom')):
    return True
  with open(path, 'rb') as f:
    return f.read(132)[128:] == b'DICM'


def load(path: str) -> np.ndarray:
  """uint8 [S, S, 3] for the image file at `path`."""
  if is_dicom(path):
    raise DicomError(
      f'{path} is DICOM, which serve.py does not read: run pneumo_jax --mode predict on it, or '
      'convert it to PNG with pneumo_jax first (its docs/serving.md, "DICOM")'
    )
  side = METADATA['stored_size']
  with Image.open(path) as image:
    image.load()
    if image.mode.startswith('I'):  # 16-bit grey PNG/TIFF.
      image = Image.fromarray(grey8(np.asarray(image)))
    elif image.mode == 'P' and 'transparency' in image.info:
      image = image.convert('RGBA')
    image = image.convert('RGB')
  if image.size != (side, side):
    image = image.resize((side, side), Image.Resampling.LANCZOS)
  return np.asarray(image, np.uint8)


def predict(paths: list[str], batch: int = 32) -> np.ndarray:
  """float32 [len(paths), C] class probabilities (findings': a sigmoid each, from the exported
  head), columns as METADATA['labels']."""
  with open(os.path.join(HERE, METADATA['jax_export']['file']), 'rb') as f:
    model = jax.export.deserialize(bytearray(f.read()))
  chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
  return np.concatenate([np.asarray(model.call(np.stack([load(p) for p in c]))) for c in chunks])


def prediction(row: np.ndarray) -> str:
  """The most probable class; for findings (metadata `multilabel`), those at probability 0.5 or
  more, joined by '|' (as pneumo_jax's CSVs)."""
  labels = METADATA['labels']
  if METADATA['multilabel']:
    return '|'.join(name for name, p in zip(labels, row, strict=True) if p >= 0.5)
  return labels[int(np.argmax(row))]


def main(paths: list[str]) -> None:
  """Writes path, prediction and each class's (finding's) probability as CSV rows on stdout."""
  labels = METADATA['labels']
  try:
    probabilities = predict(paths)
  except DicomError as e:
    sys.exit(f'error: {e}')
  writer = csv.writer(sys.stdout)
  writer.writerow(['path', 'prediction', *labels])
  for path, row in zip(paths, probabilities, strict=True):
    writer.writerow([path, prediction(row), *(f'{p:.6f}' for p in row)])


if __name__ == '__main__':
  main(sys.argv[1:])
