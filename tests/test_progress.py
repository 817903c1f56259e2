"""Progress of the long waits: a bar on a terminal, a log line each ~10% in a log file; the
dataset build and the feature cache build show it; a cached phase draws its first batch."""

import io
import logging
import os
import pty
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import two_phase
from pneumo_jax import progress
from pneumo_jax.data import dataset_for, folder_builder, pipeline
from pneumo_jax.models import taps
from pneumo_jax.training import feature_cache, loop
from pneumo_jax.training.monitor import Monitor


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def _lines(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.name == 'absl']


def test_a_log_gets_a_line_each_tenth(monkeypatch, caplog):
  monkeypatch.setattr(progress, '_MIN_SECONDS', 0.0)
  with caplog.at_level(logging.INFO, logger='absl'):
    assert list(progress.track(range(25), 'Reading images', 25, 'img')) == list(range(25))
  lines = _lines(caplog)
  # 10% of 25 is 2.5 images: lines at 3, 5, 8, 10, … 25.
  assert [line.split(' ')[2] for line in lines] == [
    f'{n}/25' for n in (3, 5, 8, 10, 13, 15, 18, 20, 23, 25)
  ]
  assert lines[-1].startswith('Reading images: 25/25 100% [00:00<00:00, ')
  assert lines[-1].endswith('img/s]')


def test_a_quick_pass_logs_only_its_end(caplog):
  shown = progress.Progress('Writing the train split', 10, 'img')
  with caplog.at_level(logging.INFO, logger='absl'), shown:
    for _ in range(10):
      shown.update()
  assert len(_lines(caplog)) == 1
  assert _lines(caplog)[0].startswith('Writing the train split: 10/10 100% [')


def test_rate_and_eta_count_from_a_resume(monkeypatch):
  clock = iter([100.0, 110.0])  # Created at 100 s, asked at 110 s.
  monkeypatch.setattr(progress.time, 'monotonic', lambda: next(clock))
  shown = progress.Progress('Training', 100, 'step', initial=40, lines=False)
  shown.update(20)  # 20 steps in 10 s since the resume at 40: 2 steps/s, 40 left.
  assert shown.status() == '60% [00:10<00:20, 2.00step/s]'


def test_the_eta_recovers_from_a_pause(monkeypatch):
  """A feature cache built between two training records (1,000 s) weighs less with each record:
  after 13 more records of 10 steps in 10 s, the ETA of the last 100 steps is within 1.5× of
  the truth (100 s), where the average since the start would give 760 s."""
  now = [0.0]
  monkeypatch.setattr(progress.time, 'monotonic', lambda: now[0])
  shown = progress.Progress('Training', 250, 'step', lines=False)
  for seconds in [10, 1000] + [10] * 13:
    now[0] += seconds
    shown.update(10)
    status = shown.status()
  minutes, seconds = re.search(r'<(\d+):(\d+),', status).groups()
  assert 100 <= 60 * int(minutes) + int(seconds) < 150, status


def test_a_terminal_gets_a_bar_and_no_log_lines(monkeypatch, caplog):
  """Even one that tells no size: a fresh pseudo-terminal is 0 × 0, as under `script` or
  `docker run -t`, where tqdm alone would draw nothing."""
  main, side = pty.openpty()
  with os.fdopen(side, 'w') as terminal, caplog.at_level(logging.INFO, logger='absl'):
    monkeypatch.setattr(sys, 'stderr', terminal)
    list(progress.track(range(50), 'Caching train features', 50, 'img'))
    terminal.flush()
    shown = os.read(main, 1 << 16).decode()
  os.close(main)
  assert '\r' in shown and 'Caching train features: 100%|' in shown and '50/50' in shown
  assert 'img/s]' in shown and not _lines(caplog)


def test_other_processes_show_nothing(monkeypatch, caplog):
  terminal = _Terminal()
  monkeypatch.setattr(sys, 'stderr', terminal)
  with caplog.at_level(logging.INFO, logger='absl'):
    list(progress.track(range(5), 'Reading images', 5, 'img', active=False))
  monkeypatch.setattr(sys, 'stderr', io.StringIO())
  with caplog.at_level(logging.INFO, logger='absl'):
    list(progress.track(range(5), 'Reading images', 5, 'img', active=False))
  assert not terminal.getvalue() and not _lines(caplog)


def test_training_logs_each_record_with_its_status(tmp_path, caplog):
  monitor = Monitor(str(tmp_path), total_steps=10, first_step=0)
  with caplog.at_level(logging.INFO, logger='absl'):
    monitor.write(5, 'train', {'loss': 1.5})
    monitor.write(5, 'validation', {'kappa': 0.25})
  monitor.close()
  train, validation = _lines(caplog)
  assert train.startswith('[train] step 5/10 loss 1.5 | 50% [') and train.endswith('step/s]')
  assert validation == '[validation] step 5/10 kappa 0.25'


def _cached_config(tiny_config):
  """configs/two_phase.py shrunk to the tiny set: both phases train from a feature cache."""
  c, tiny = two_phase.get_config(), tiny_config()
  for field in ('source_dir', 'data_dir', 'validation_fraction'):
    c.dataset[field] = tiny.dataset[field]
  c.input.update(image_size=75, batch_size=4, eval_batch_size=8)
  c.phases.head.num_steps, c.phases.top.num_steps = 2, 1
  c.phases.top.schedule.warmup_steps = 0
  c.update(eval_every_steps=0, checkpoint_every_steps=0, log_every_steps=1)
  return c


def _train_pass(config, builder, tmp_path):
  """The input config and views with which a feature cache build reads the train split (its
  backbone passes left out)."""
  reads = {}

  def compute(*args):  # _compute's arguments after those _build binds.
    split, input_cfg, _, views = args[-4:]
    reads[split] = input_cfg, views
    return {}, 0

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(feature_cache, '_compute', compute)
    feature_cache._build(
      path=str(tmp_path / feature_cache.CACHE_DIR / 'key'),  # _build empties its parent.
      builder=builder,
      cfg=config,
      model=None,
      variables=None,
      cut=feature_cache.Cut({}, ()),
      evaluated=(),
      mesh=None,
      interrupted=lambda: None,
    )
  return reads['train']


def test_view_images_are_what_the_cache_build_feeds_the_network(tiny_config, tmp_path):
  config = _cached_config(tiny_config)
  builder = dataset_for(config, str(tmp_path))
  framing, views = _train_pass(config, builder, tmp_path)
  assert views == (False, True)  # Flipped or not: the build feeds both.
  batch = next(pipeline.eval_batches(builder, 'train', framing))
  index = batch['index'][batch['mask']]
  inputs = {k: jnp.asarray(batch[k]) for k in ('image', 'box', 'flip', 'colour')}
  got = {}
  for flip in (False, True):
    fed = taps.inputs({**inputs, 'flip': jnp.full_like(inputs['flip'], flip)}, 75)
    got[flip] = pipeline.view_images(builder, config.input, index, np.full(len(index), flip))
    assert got[flip].shape == (len(index), 75, 75, 3) and got[flip].dtype == np.float32
    np.testing.assert_allclose(got[flip], np.asarray(fed)[batch['mask']], atol=1e-5)
  # Not vacuous: the films differ, and a flip shows.
  assert not np.allclose(got[False][0], got[False][1])
  assert not np.allclose(got[False], got[True])
  np.testing.assert_array_equal(got[True], got[False][:, :, ::-1])
  mixed = pipeline.view_images(builder, config.input, index[:2], np.array([False, True]))
  np.testing.assert_array_equal(mixed, [got[False][0], got[True][1]])


@pytest.mark.long
def test_a_cached_two_phase_run_draws_its_first_batch_and_shows_progress(
  tiny_config, tmp_path, caplog
):
  config = _cached_config(tiny_config)
  config.dataset.data_dir = str(tmp_path / 'data')  # Built here, so that its passes show.
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.INFO, logger='absl'):
    loop.train_and_evaluate(config, workdir)
  assert os.path.exists(os.path.join(workdir, 'train_images.png'))
  builder = dataset_for(config, workdir)
  train, val = (len(folder_builder.split_labels(builder, s)) for s in ('train', 'validation'))
  ends = [
    'Reading images: 24/24 100% [',
    f'Writing the train split: {train}/{train} 100% [',
    f'Writing the validation split: {val}/{val} 100% [',
    f'Caching train features (2 views each): {train}/{train} 100% [',
    f'Caching validation features: {val}/{val} 100% [',
  ]
  lines = _lines(caplog)
  for end in ends:
    assert any(line.startswith(end) for line in lines), (end, lines)
  # A quick pass over a few images logs only its end.
  assert not [line for line in lines if line.startswith('Reading images') and '100%' not in line]
