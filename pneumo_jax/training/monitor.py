"""A window into training: metrics.jsonl, TensorBoard, console progress, image grid, curves."""

import json
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter

from pneumo_jax import progress

METRICS_FILE = 'metrics.jsonl'


class Monitor:
  """Writes each logged record to metrics.jsonl (for scripts) and TensorBoard, and shows progress
  (`progress.Progress`): a bar (rate, ETA, latest metrics) on a terminal, otherwise each record
  logged with its rate and ETA, so that log files stay readable.

  Only process 0 writes; the others keep quiet.
  """

  def __init__(self, workdir: str, total_steps: int, first_step: int, active: bool = True):
    """Starting at `first_step` (a resume), drops the records a killed run logged after its last
    checkpoint: they are about to be logged again."""
    self.workdir, self.total, self.active = workdir, total_steps, active
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard')) if active else None
    # Its lines off: write() logs each record with its status instead.
    self._progress = progress.Progress(
      'Training', total_steps, 'step', initial=first_step, active=active, lines=False
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
    if split == 'train':
      self._progress.update(step - self._progress.count, postfix=shown)
    if not self._progress.terminal:
      status = f' | {self._progress.status()}' if split == 'train' else ''
      logging.info('[%s] step %d/%d %s%s', split, step, self.total, shown, status)
    elif split != 'train':
      self._progress.write(f'[{split}] step {step}: {shown}')

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
      ax.set_title(_label_text(labels[i], names), fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(self.workdir, 'train_images.png'), dpi=80)
    grid = np.clip((images[:n] + 1) / 2, 0, 1)
    self._tb.add_images('train/preprocessed', grid, 0, dataformats='NHWC')

  def close(self) -> None:
    self._progress.close()
    if self.active:
      self._tb.close()
      plot_curves(self.workdir)


def _label_text(label: np.ndarray, names: Sequence[str]) -> str:
  """A class's name, or a multi-label film's findings present ('?': ignored), else 'none'."""
  if np.ndim(label) == 0:
    return names[int(label)]
  shown = [n + ('?' if y < 0 else '') for n, y in zip(names, label, strict=True) if y]
  return ', '.join(shown) or 'none'


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
