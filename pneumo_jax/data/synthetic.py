"""The demo's generated data: grey "chest X-rays" graded into four profusion stages.

Each image is a grey body with two darker lung fields holding small bright round opacities,
the way pneumoconiosis shows small rounded opacities whose profusion (ILO categories 0–3) rises
with the stage. Brightness, contrast, lung position and size, rib shadows and noise vary from
image to image, so a model must look at the opacities rather than at global grey levels. A few
files are deliberately awkward (16-bit grey, palette, RGBA, an upper-case .JPG, a hidden file,
a README) so that the demo exercises the builder's format handling.
"""

import json
import os
import shutil

import numpy as np
from PIL import Image

from pneumo_jax.data.images import DatasetError

_MARKER = '.synthetic_complete.json'  # Written last: its presence means the folder is complete.
# Opacities per image at each stage: (low, high) of a uniform draw. Stage 0 has a few stray ones.
_OPACITIES = ((0, 2), (5, 9), (13, 19), (26, 36))
# (class index, file name) of the awkward files; each replaces a regular image of its class.
_AWKWARD = ((0, 'grey16.png'), (1, 'palette.png'), (2, 'rgba.png'), (3, 'upper_case.JPG'))


def make_stage_folder(path: str, *, images_per_class: int = 120, image_size: int = 128,
                      seed: int = 0) -> None:
  """Writes the 4-class folder stage_0 … stage_3 at `path` unless a complete one is there.

  The folder is written under a temporary name and renamed when complete, so an interrupted
  run leaves nothing that looks finished.

  Raises:
    DatasetError: `path` holds something else, or a folder made with other settings.
  """
  params = {'images_per_class': images_per_class, 'image_size': image_size, 'seed': seed}
  marker = os.path.join(path, _MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      found = json.load(f)
    if found != params:
      raise DatasetError(f'{path!r} holds synthetic images made with {found}, not {params}; '
                         'delete it or choose another dataset.source_dir')
    return
  if os.path.isdir(path) and not os.listdir(path):
    os.rmdir(path)  # An empty folder is just a placeholder.
  elif os.path.exists(path):
    raise DatasetError(f'{path!r} exists but is not a complete synthetic folder (no {_MARKER}); '
                       'delete it or choose another dataset.source_dir')
  if images_per_class < 5 or image_size < 32:
    raise DatasetError(f'synthetic data needs images_per_class >= 5 (got {images_per_class}) '
                       f'and image_size >= 32 (got {image_size})')
  tmp = f'{path}.incomplete-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  awkward = dict(_AWKWARD)
  for stage in range(len(_OPACITIES)):
    folder = os.path.join(tmp, f'stage_{stage}')
    os.makedirs(folder)
    for i in range(images_per_class):
      rng = np.random.default_rng([seed, stage, i])
      pixels = _xray(rng, stage, image_size)
      name = awkward[stage] if i == 0 and stage in awkward else f'{stage}_{i:04d}.png'
      _save(pixels, os.path.join(folder, name))
  with open(os.path.join(tmp, 'stage_0', '.DS_Store'), 'wb') as f:
    f.write(b'\x00\x00\x00\x01Bud1')  # What a file browser leaves behind; not an image.
  with open(os.path.join(tmp, 'README.txt'), 'w') as f:
    f.write('Synthetic chest X-rays made by pneumo_jax.data.synthetic: one folder per stage;\n'
            'bright round opacities in the lung fields grow more profuse with the stage.\n')
  with open(os.path.join(tmp, _MARKER), 'w') as f:
    json.dump(params, f)
  os.rename(tmp, path)


def _save(grey: np.ndarray, path: str) -> None:
  """Saves a uint8 grey image in the format its name asks for."""
  name = os.path.basename(path)
  image = Image.fromarray(grey)
  if name == 'grey16.png':
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # Full 16-bit range.
  elif name == 'palette.png':
    image.convert('RGB').quantize(64).save(path)
  elif name == 'rgba.png':
    rgba = image.convert('RGBA')
    rgba.putalpha(200)
    rgba.save(path)
  elif name.endswith('.JPG'):
    image.save(path, format='JPEG', quality=95)
  else:
    image.save(path)


def _xray(rng: np.random.Generator, stage: int, size: int) -> np.ndarray:
  """One uint8 [size, size] frontal chest image of the given stage."""
  y, x = np.mgrid[0:size, 0:size] / size
  # Body: a bright rounded trunk on a dark background.
  cy, cx = 0.55 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
  trunk = _soft_ellipse(y, x, cy, cx, 0.48 * rng.uniform(0.95, 1.05), 0.42, 0.03)
  image = 25 + 135 * trunk
  # Lungs: two darker fields either side of the mediastinum, with rib shadows across them.
  lungs = np.zeros_like(image)
  lung_fields = []
  for side in (-1, 1):
    ly = cy - 0.05 + rng.normal(0, 0.025)
    lx = cx + side * rng.uniform(0.17, 0.21)
    ry, rx = rng.uniform(0.26, 0.32), rng.uniform(0.11, 0.14)
    lungs = np.maximum(lungs, _soft_ellipse(y, x, ly, lx, ry, rx, 0.02))
    lung_fields.append((ly, lx, ry, rx))
  ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (y * rng.uniform(9, 11) - 6 * (x - cx) ** 2)
                           + rng.uniform(0, 2 * np.pi))
  image -= lungs * (70 - 12 * ribs)
  # Opacities: small bright round blobs inside the lung fields.
  count = rng.integers(_OPACITIES[stage][0], _OPACITIES[stage][1] + 1)
  for _ in range(count):
    ly, lx, ry, rx = lung_fields[rng.integers(2)]
    r, a = np.sqrt(rng.uniform(0, 0.8)), rng.uniform(0, 2 * np.pi)
    oy, ox = ly + r * ry * np.sin(a), lx + r * rx * np.cos(a)
    radius = rng.uniform(0.014, 0.022)  # Gaussian sigma: 1–2 px even at 75 px.
    image += rng.uniform(40, 65) * np.exp(-((y - oy) ** 2 + (x - ox) ** 2) / (2 * radius ** 2))
  # Nuisance: exposure (contrast, brightness) and sensor noise.
  image = (image - 90) * rng.uniform(0.85, 1.15) + 90 + rng.uniform(-15, 15)
  image += rng.normal(0, rng.uniform(2, 6), image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _soft_ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                  edge: float) -> np.ndarray:
  """1 inside the ellipse, 0 outside, with a smooth edge about `edge` wide."""
  d = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
  return 1.0 / (1.0 + np.exp((d - 1.0) * min(ry, rx) / edge))
