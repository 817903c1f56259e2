"""A window into training: metrics.jsonl, TensorBoard, console progress, image grid, curves."""

import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import tqdm
from absl import logging
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

METRICS_FILE = 'metrics.jsonl'


class Monitor:
  """Writes each logged record to metrics.jsonl (for scripts) and TensorBoard, and shows progress:
  a tqdm bar (rate, ETA, latest metrics) on a terminal, log lines with rate and ETA otherwise,
  so that log files stay readable.

  Only process 0 writes; the others keep quiet.
  """

  def __init__(self, workdir: str, total_steps: int, first_step: int, active: bool = True):
    """Starting at `first_step` (a resume), drops the records a killed run logged after its last
    checkpoint: they are about to be logged again."""
    self.workdir, self.total, self.active = workdir, total_steps, active
    self._start_time, self._start_step = time.time(), first_step
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard')) if active else None
    self._bar = (
      tqdm.tqdm(total=total_steps, initial=first_step, unit='step', dynamic_ncols=True)
      if active and sys.stderr.isatty()
      else None
    )
    if active:
      kept = [r for r in read_records(workdir) if r['step'] <= first_step]
      with open(os.path.join(workdir, METRICS_FILE), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    record = {'step': step, 'split': split, **scalars}
    with open(os.path.join(self.workdir, METRICS_FILE), 'a') as f:
      f.write(json.dumps(record) + '\n')
    for k, v in scalars.items():
      if v is not None:
        self._tb.add_scalar(f'{split}/{k}', v, step)
    self._tb.flush()
    shown = ' '.join(f'{k} {v:.4g}' for k, v in scalars.items() if isinstance(v, float | int))
    if self._bar is None:
      logging.info(
        '[%s] step %d/%d %s%s',
        split,
        step,
        self.total,
        shown,
        self._eta(step) if split == 'train' else '',
      )
    elif split == 'train':
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(shown)
    else:
      self._bar.write(f'[{split}] step {step}: {shown}')

  def _eta(self, step: int) -> str:
    done = step - self._start_step
    rate = done / max(time.time() - self._start_time, 1e-9)
    left = (self.total - step) / rate if rate > 0 else float('inf')
    return f' | {100 * step / self.total:.0f}% {rate:.2f} steps/s ETA {left / 60:.1f} min'

  def image_grid(self, images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> None:
    """The first training batch as the net sees it (train_images.png and TensorBoard), to check
    the augmentation and labels by eye."""
    if not self.active:
      return
    n = min(len(images), 16)
    cols = 4
    rows = -(-n // cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
      ax.axis('off')
    for i, ax in zip(range(n), axes.flat, strict=False):
      ax.imshow(np.clip((images[i] + 1) / 2, 0, 1))
      ax.set_title(names[int(labels[i])], fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(self.workdir, 'train_images.png'), dpi=80)
    grid = np.clip((images[:n] + 1) / 2, 0, 1)
    self._tb.add_images('train/preprocessed', grid, 0, dataformats='NHWC')

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self.active:
      self._tb.close()
      plot_curves(self.workdir)


def read_records(workdir: str) -> list[dict]:
  """metrics.jsonl's records, oldest first ([] before the first)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def plot_curves(workdir: str) -> str | None:
  """curves.png: every scalar of metrics.jsonl against step, train and validation together;
  None (nothing written) before the first record, as in a run stopped before its first step."""
  records = read_records(workdir)
  if not records:
    return None
  keys = sorted(
    {
      k
      for r in records
      for k, v in r.items()
      if k not in ('step', 'split') and isinstance(v, float | int)
    }
  )
  rows = -(-len(keys) // 3)
  fig = Figure(figsize=(12, 3 * rows))
  axes = fig.subplots(rows, 3, squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for key, ax in zip(keys, axes.flat, strict=False):
    ax.axis('on')
    for split in sorted({r['split'] for r in records}):
      pts = [
        (r['step'], r[key])
        for r in records
        if r['split'] == split and key in r and r[key] is not None
      ]
      if pts:
        ax.plot(*zip(*pts, strict=True), label=split, marker='.' if split != 'train' else None)
    ax.set_title(key)
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(workdir, 'curves.png')
  fig.savefig(path, dpi=80)
  return path
