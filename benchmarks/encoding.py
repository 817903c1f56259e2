"""How the builder should encode stored-size records: disk size against read time, measured.

  python -m benchmarks.encoding [--images 200] [--source_size 1024] [--stored_size 342]

Generates one folder of X-ray-like grey images (smooth anatomy-like shading, rib-like bands,
noise, small round opacities), builds it at --stored_size once per encoding in
`folder_builder.ENCODINGS` and once at full resolution (PNG, the old layout), and prints per
build: build time, disk bytes per image (the array_record shards), and the mean time to read and
decode one record through `builder.as_data_source(split)[i]` (single thread, every record, best
of --passes after a warm pass, so the OS's file cache holds the shards: this is decode cost, not
disk speed), with ratios against the raw 'bytes' encoding. ArrayRecord zstd-compresses every
record and pads each shard file to a multiple of 64 KiB; the sizes include both.
"""

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from PIL import Image

from configs import default
from pneumo_jax.data import folder_builder

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 200, 'Generated images (two classes).', lower_bound=10)
flags.DEFINE_integer('source_size', 1024, 'Side of the generated images.', lower_bound=64)
flags.DEFINE_integer('stored_size', 342, 'Side the builds store.', lower_bound=8)
flags.DEFINE_integer('passes', 3, 'Timed read passes over every record (best kept).', lower_bound=1)

_BASELINE = 'bytes'


def write_images(root: Path, n: int, size: int, seed: int = 0) -> None:
  """n grey PNGs of size × size in root/{clear,opaque}; the second class has more opacities."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
  for i in range(n):
    cls = ('clear', 'opaque')[i % 2]
    # Body: bright mediastinum and edges, two darker lung fields (ellipses), soft edges.
    img = 170 - 40 * np.exp(-(((x - 0.5) / 0.5) ** 2))
    for cx in (0.3, 0.7):
      cx += rng.normal(0, 0.02)
      r = ((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.33) ** 2
      img -= 90 / (1 + np.exp(np.minimum((r - 1) * 8, 60)))
    img += 12 * np.sin(2 * np.pi * (y * rng.uniform(7, 10) + 0.3 * np.abs(x - 0.5)))  # Ribs.
    for _ in range(rng.integers(2, 5) + 6 * (cls == 'opaque')):  # Small round opacities.
      cx, cy, rad = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.005, 0.03)
      # Only the window where the blob is visible, to keep generation fast.
      r0, r1 = int((cy - 4 * rad) * size), int((cy + 4 * rad) * size) + 1
      c0, c1 = int((cx - 4 * rad) * size), int((cx + 4 * rad) * size) + 1
      wx, wy = x[r0:r1, c0:c1], y[r0:r1, c0:c1]
      img[r0:r1, c0:c1] += 40 * np.exp(-(((wx - cx) ** 2 + (wy - cy) ** 2) / rad**2))
    img += rng.standard_normal(img.shape, np.float32) * 6
    (root / cls).mkdir(parents=True, exist_ok=True)
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / cls / f'{i:04d}.png', compress_level=1)


def disk_bytes(builder) -> int:
  return sum(p.stat().st_size for p in Path(builder.data_path).glob('*.array_record*'))


def read_seconds(builder, passes: int) -> tuple[float, tuple[int, ...], np.dtype]:
  """Mean seconds per record over every record, best of `passes` after one warm pass."""
  sources = [builder.as_data_source(s) for s in builder.info.splits]
  n = sum(len(ds) for ds in sources)
  best = float('inf')
  for p in range(passes + 1):
    start = time.perf_counter()
    for ds in sources:
      for i in range(len(ds)):
        image = ds[i]['image']
    if p:  # The first pass warms the file cache and TFDS's readers.
      best = min(best, (time.perf_counter() - start) / n)
  return best, image.shape, image.dtype


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS logs every build at length; the table suffices.
  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    source = Path(tmp) / 'images'
    start = time.perf_counter()
    write_images(source, FLAGS.images, FLAGS.source_size)
    print(
      f'{FLAGS.images} images of {FLAGS.source_size}² written in '
      f'{time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs'
    )
    cfg = default.get_config().dataset
    cfg.source_dir = str(source)
    runs = [(e, FLAGS.stored_size, e) for e in folder_builder.ENCODINGS]
    runs.append(('full-res png', None, 'png'))
    rows = []
    for name, size, encoding in runs:
      start = time.perf_counter()
      builder = folder_builder.build(cfg, os.path.join(tmp, name), size, encoding=encoding)
      built = time.perf_counter() - start
      n = sum(s.num_examples for s in builder.info.splits.values())
      seconds, shape, dtype = read_seconds(builder, FLAGS.passes)
      rows.append((name, built, disk_bytes(builder) / n, seconds, shape, dtype))
    base = {r[0]: r for r in rows}[_BASELINE]
    print(
      f'{"encoding":<13} {"build s":>8} {"bytes/img":>10} {"× raw":>6} '
      f'{"read ms/rec":>12} {"× raw":>6}  decoded'
    )
    for name, built, size, seconds, shape, dtype in rows:
      print(
        f'{name:<13} {built:8.1f} {size:10,.0f} {size / base[2]:6.2f} '
        f'{seconds * 1e3:12.3f} {seconds / base[3]:6.2f}  {dtype}{list(shape)}'
      )


if __name__ == '__main__':
  app.run(main)
