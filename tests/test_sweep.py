"""Sweeps: grid expansion, trial names, skip/resume/retry, failures, ranking, CV aggregation.

Trials run a tiny fake program (stdlib only, milliseconds) in place of `python -m pneumo_jax`, so
the runner's bookkeeping is tested without training; one end-to-end test runs the real tiny sweep.
"""

import csv
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys

import pytest

from pneumo_jax import validate
from pneumo_jax.errors import ConfigError
from pneumo_jax.modes import sweep
from pneumo_jax.modes.sweep import runner
from pneumo_jax.modes.sweep.grid import FOLD_KEY, trial_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fake trial: logs its call, fails for learning rate 0.5 (unless FAKE_OK is set), optionally waits
# for a concurrent peer, and writes summary.json with metrics derived from its overrides.
_FAKE_TRIAL = r"""
import json, os, sys, time
args = sys.argv[1:]
workdir = args[args.index('--workdir') + 1]
cfg = dict(a[len('--config.'):].split('=', 1) for a in args if a.startswith('--config.'))
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(os.path.basename(workdir) + '\n')
with open(os.path.join(workdir, 'argv.json'), 'w') as f:
  json.dump(args, f)
lr, fold = float(cfg['schedule.learning_rate']), int(cfg.get('dataset.fold', 0))
if lr == 0.5 and not os.environ.get('FAKE_OK'):
  print('training...')
  sys.exit('ValueError: loss is NaN at step 3')
peer = False
if os.environ.get('FAKE_BARRIER'):
  barrier = os.environ['FAKE_BARRIER']
  open(os.path.join(barrier, os.path.basename(workdir)), 'w').close()
  for _ in range(600):
    if len(os.listdir(barrier)) >= 2:
      peer = True
      break
    time.sleep(0.05)
kappa = lr * 10 + fold / 100
metrics = {'kappa': kappa, 'accuracy': kappa / 2, 'loss': 1 - kappa}
summary = {'status': 'done', 'step': 4, 'num_steps': 4, 'wall_time_s': 10.0 + fold,
           'metric': 'kappa', 'final': {k: v - 0.05 for k, v in metrics.items()},
           'best': metrics, 'best_step': 2, 'peer': peer}
with open(os.path.join(workdir, 'summary.json'), 'w') as f:
  json.dump(summary, f)
"""
FAKE = [sys.executable, '-c', _FAKE_TRIAL]

_SWEEP_CONFIG = """
import ml_collections
from pneumo_jax.modes import sweep

def get_config():
  c = ml_collections.ConfigDict()
  c.dataset = ml_collections.ConfigDict({{'data_dir': '', 'num_folds': 0, 'fold': 0}})
  c.schedule = ml_collections.ConfigDict({{'learning_rate': 0.01, 'name': 'fixed'}})
  c.best_metric = {metric!r}
  return c

def get_sweep():
  return {sweep}
"""


def _config(tmp_path, sweep_expr: str, metric: str = 'kappa') -> str:
  path = tmp_path / 'sweep_config.py'
  path.write_text(_SWEEP_CONFIG.format(sweep=sweep_expr, metric=metric))
  return str(path)


@pytest.fixture
def calls(tmp_path, monkeypatch):
  """Reads back the names of the trials the fake program ran (sorted; a name per run)."""
  path = tmp_path / 'calls.txt'
  monkeypatch.setenv('FAKE_CALLS', str(path))
  return lambda: sorted(path.read_text().split()) if path.exists() else []


def _run(config: str, workdir: str, **kwargs) -> list[dict]:
  """sweep.run with the fake trial program, which needs no dataset."""
  return sweep.run(config, workdir, command=FAKE, prepare_data=False, **kwargs)


def _csv(workdir) -> list[dict[str, str]]:
  with open(os.path.join(workdir, 'results.csv')) as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------- grids


def test_product_varies_first_axis_slowest():
  grid = sweep.product({'a.x': [1, 2]}, [{'b': 'p'}, {'b': 'q'}])
  assert grid == [
    {'a.x': 1, 'b': 'p'},
    {'a.x': 1, 'b': 'q'},
    {'a.x': 2, 'b': 'p'},
    {'a.x': 2, 'b': 'q'},
  ]
  assert sweep.product({'a.x': [1, 2], 'b': ['p', 'q']}) == grid


def test_zip_pairs_entries_and_checks_lengths():
  assert sweep.zip({'a': [1, 2], 'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  assert sweep.zip([{'a': 1}, {'a': 2}], {'b': [3, 4]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  with pytest.raises(ValueError, match='one length'):
    sweep.zip({'a': [1, 2]}, {'b': [3]})


def test_folds_and_composition():
  assert sweep.folds(3) == [{'dataset.num_folds': 3, 'dataset.fold': i} for i in range(3)]
  grid = sweep.product(sweep.zip({'s.name': ['fixed', 'cos'], 's.warmup': [0, 5]}), sweep.folds(2))
  assert [(g['s.name'], g['s.warmup'], g['dataset.fold']) for g in grid] == [
    ('fixed', 0, 0),
    ('fixed', 0, 1),
    ('cos', 5, 0),
    ('cos', 5, 1),
  ]


@pytest.mark.parametrize(
  'bad, match',
  [
    (lambda: sweep.folds(1), 'k >= 2'),
    (lambda: sweep.product({'a': [1]}, {'a': [2]}), "both set 'a'"),
    (lambda: sweep.product({'a': 0.1}), 'list of values'),
    (lambda: sweep.product({'a': 'xy'}), 'list of values'),
    (lambda: sweep.product([0.1, 0.01]), 'list of override dicts'),
  ],
)
def test_grid_errors_say_what_to_fix(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


# ---------------------------------------------------------------- names


def test_names_are_readable_short_and_stable():
  trials = sweep.product({'schedule.learning_rate': [0.01, 1e-05]}, sweep.folds(2))
  names = trial_names(trials)
  assert names[:2] == [
    'learning_rate=0.01,num_folds=2,fold=0',
    'learning_rate=0.01,num_folds=2,fold=1',
  ]
  assert names[2] == 'learning_rate=1e-05,num_folds=2,fold=0'
  assert trial_names(trials) == names
  # Paths that share a last component keep enough of their path to stay apart.
  assert trial_names([{'a.lr': 1, 'b.lr': 2, 'c.d': 3}]) == ['a.lr=1,b.lr=2,d=3']


def test_names_are_safe_and_unique_for_awkward_values():
  trials = [
    {'trainable_scopes': 'Logits,AuxLogits'},
    {'trainable_scopes': 'Logits AuxLogits'},
    {'trainable_scopes': 'Mixed_7.*/x'},
    {'trainable_scopes': 'x' * 300},
  ]
  names = trial_names(trials)
  assert len(set(names)) == len(names)
  for n in names:
    assert re.fullmatch(r'[A-Za-z0-9._+=,-]+', n) and len(n) <= 120, n
  assert names[0].startswith('trainable_scopes=Logits_AuxLogits,')


def test_command_line_overrides_change_names():
  trials = [{'a': 1}, {'a': 2}]
  plain = trial_names(trials)
  assert plain == ['a=1', 'a=2']
  with_cli = trial_names(trials, {'num_steps': 100})
  assert [n.split(',')[0] for n in with_cli] == plain
  assert with_cli != plain
  assert len({n.split(',')[-1] for n in with_cli}) == 1  # One digest, shared by all trials.
  assert trial_names(trials, {'num_steps': 200}) != with_cli
  assert trial_names(trials, {'num_steps': 100}) == with_cli


# ---------------------------------------------------------------- running


def test_skips_done_resumes_interrupted_retries_failed(tmp_path, calls, monkeypatch):
  config = _config(tmp_path, "sweep.product({'schedule.learning_rate': [0.01, 0.5, 0.001]})")
  workdir = str(tmp_path / 'w')
  results = _run(config, workdir)
  assert calls() == ['learning_rate=0.001', 'learning_rate=0.01', 'learning_rate=0.5']
  assert [r['status'] for r in results] == ['done', 'failed', 'done']
  # The failure did not stop the others and its message is in the results and tables.
  failed = results[1]
  assert failed['error'] == 'exit 1: ValueError: loss is NaN at step 3'
  assert 'training...' in failed['log_tail']
  md = (tmp_path / 'w' / 'results.md').read_text()
  assert '## Failures' in md and 'loss is NaN at step 3' in md
  row = next(r for r in _csv(workdir) if r['name'] == 'learning_rate=0.5')
  assert row['status'] == 'failed' and 'loss is NaN' in row['error'] and row['rank'] == ''

  # An interrupted trial: its directory exists but it never wrote a finished summary.
  os.remove(tmp_path / 'w' / 'learning_rate=0.001' / 'summary.json')
  monkeypatch.setenv('FAKE_OK', '1')
  (tmp_path / 'calls.txt').unlink()
  results = _run(config, workdir)
  assert calls() == ['learning_rate=0.001', 'learning_rate=0.5']
  assert [r['status'] for r in results] == ['done'] * 3
  assert (tmp_path / 'w' / 'learning_rate=0.5' / 'log.txt').read_text().count('====') == 2

  (tmp_path / 'calls.txt').unlink()
  _run(config, workdir)
  assert calls() == []


def test_trials_share_data_dir_and_get_command_line_overrides(tmp_path, calls):
  config = _config(tmp_path, "sweep.product({'schedule.learning_rate': [0.01, 0.02]})")
  workdir = str(tmp_path / 'w')
  results = _run(config, workdir, overrides={'schedule.name': 'cosine'})
  for r in results:
    with open(os.path.join(r['workdir'], 'argv.json')) as f:
      argv = json.load(f)
    assert argv[:5] == ['--config', config, '--workdir', r['workdir'], '--nosweep']
    assert f'--config.dataset.data_dir={os.path.abspath(workdir)}/data' in argv
    assert '--config.schedule.name=cosine' in argv
  # A user-chosen data_dir is kept.
  results = _run(config, workdir, overrides={'dataset.data_dir': '/x'})
  with open(os.path.join(results[0]['workdir'], 'argv.json')) as f:
    assert '--config.dataset.data_dir=/x' in json.load(f)


def test_refuses_a_workdir_of_another_sweep_config(tmp_path, calls):
  workdir = str(tmp_path / 'w')
  _run(_config(tmp_path, "[{'schedule.learning_rate': 0.01}]"), workdir)
  other = tmp_path / 'other'
  other.mkdir()
  with pytest.raises(ValueError, match='its own --workdir'):
    _run(_config(other, "[{'schedule.learning_rate': 0.01}]"), workdir)
  assert calls() == ['learning_rate=0.01']


def test_builds_each_distinct_dataset_once_before_the_trials(tmp_path, calls, monkeypatch):
  from pneumo_jax import data

  built = []

  def dataset_for(cfg, workdir):
    ran = os.path.exists(os.path.join(workdir, 'summary.json'))
    built.append((cfg.dataset.data_dir, cfg.dataset.fold, ran))

  monkeypatch.setattr(data, 'dataset_for', dataset_for)
  monkeypatch.setattr(validate, 'check', lambda cfg: None)  # A stand-in config, not a full one.
  config = _config(
    tmp_path, "sweep.product({'schedule.learning_rate': [0.01, 0.02]}, sweep.folds(2))"
  )
  workdir = str(tmp_path / 'w')
  sweep.run(config, workdir, command=FAKE)
  data_dir = os.path.join(os.path.abspath(workdir), 'data')
  assert built == [(data_dir, 0, False), (data_dir, 1, False)]
  assert len(calls()) == 4
  built.clear()
  sweep.run(config, workdir, command=FAKE)
  assert built == []  # Nothing left to run, nothing to build.


def test_a_bad_trial_setting_fails_before_any_build_or_trial(tmp_path, calls, monkeypatch):
  from pneumo_jax import data

  monkeypatch.setattr(data, 'dataset_for', lambda cfg, workdir: pytest.fail('built a dataset'))
  with pytest.raises(ConfigError, match=r'sweep trial seed=0\S*: input\.image_size=60 is below'):
    sweep.run(
      os.path.join(REPO, 'configs', 'sweeps', 'tiny.py'),
      str(tmp_path / 'w'),
      overrides={'input.image_size': 60},
      command=FAKE,
    )
  assert calls() == []


@pytest.mark.parametrize(
  'sweep_expr, overrides, match',
  [
    ("[{'schedule.learing_rate': 0.1}]", {}, 'learing_rate'),
    ("[{'schedule.learning_rate': 'fast'}]", {}, 'learning_rate'),
    ("[{'schedule.learning_rate': 0.1}]", {'schedule.learning_rate': 0.2}, 'command line'),
    ("[{'schedule.learning_rate': 0.1}] * 2", {}, 'twice'),
    ('[]', {}, 'non-empty'),
  ],
)
def test_bad_sweeps_fail_before_any_trial(tmp_path, calls, sweep_expr, overrides, match):
  config = _config(tmp_path, sweep_expr)
  with pytest.raises(ValueError, match=match):
    _run(config, str(tmp_path / 'w'), overrides=overrides)
  assert calls() == []


def test_parallel_trials_run_side_by_side(tmp_path, calls, monkeypatch):
  barrier = tmp_path / 'barrier'
  barrier.mkdir()
  monkeypatch.setenv('FAKE_BARRIER', str(barrier))
  config = _config(tmp_path, "sweep.product({'schedule.learning_rate': [0.01, 0.02, 0.03]})")
  results = _run(config, str(tmp_path / 'w'), parallel=2)
  assert [r['status'] for r in results] == ['done'] * 3
  peers = [
    json.loads(pathlib.Path(r['workdir'], 'summary.json').read_text())['peer'] for r in results
  ]
  assert peers[:2] == [True, True]  # The first two waited for each other: both were running.


def test_a_multi_process_sweep_runs_one_trial_at_a_time(tmp_path, calls):
  config = _config(tmp_path, "sweep.product({'schedule.learning_rate': [0.01, 0.02]})")
  with pytest.raises(ValueError, match='--sweep_parallel: a multi-process sweep runs its trials'):
    _run(config, str(tmp_path / 'w'), parallel=2, in_process=True)
  assert calls() == []


def test_trials_run_this_python_on_the_package(tmp_path, monkeypatch):
  """No path to a checkout's main.py: an installed package runs its sweeps too."""
  ran = []

  def fake_run(argv, **kwargs):
    ran.append(argv)
    return subprocess.CompletedProcess(argv, 1)

  monkeypatch.setattr(runner.subprocess, 'run', fake_run)
  config = _config(tmp_path, "[{'schedule.learning_rate': 0.01}]")
  results = sweep.run(config, str(tmp_path / 'w'), prepare_data=False)
  assert ran[0][:3] == [sys.executable, '-m', 'pneumo_jax']
  assert ran[0][3:7] == ['--config', config, '--workdir', results[0]['workdir']]
  assert results[0]['status'] == 'failed'  # The stand-in wrote no summary.json.


# ---------------------------------------------------------------- ranking and aggregation


def test_ranks_best_first_and_marks_the_best(tmp_path, calls):
  config = _config(tmp_path, "sweep.product({'schedule.learning_rate': [0.02, 0.05, 0.01]})")
  workdir = str(tmp_path / 'w')
  _run(config, workdir)
  rows = _csv(workdir)
  assert [r['name'] for r in rows] == [
    'learning_rate=0.05',
    'learning_rate=0.02',
    'learning_rate=0.01',
  ]
  assert [r['rank'] for r in rows] == ['1', '2', '3']
  assert [r['best'] for r in rows] == ['*', '', '']
  assert float(rows[0]['best/kappa']) == pytest.approx(0.5)
  assert float(rows[0]['final/kappa']) == pytest.approx(0.45)
  md = pathlib.Path(workdir, 'results.md').read_text()
  table = [line for line in md.splitlines() if line.startswith('| 1 |')]
  assert len(table) == 1 and '★' in table[0] and 'learning_rate=0.05' in table[0]


def test_lower_is_better_for_loss(tmp_path, calls):
  config = _config(
    tmp_path, "sweep.product({'schedule.learning_rate': [0.02, 0.05, 0.01]})", metric='loss'
  )
  workdir = str(tmp_path / 'w')
  _run(config, workdir)
  assert [r['name'] for r in _csv(workdir)] == [
    'learning_rate=0.05',
    'learning_rate=0.02',
    'learning_rate=0.01',
  ]  # Loss = 1 - kappa.
  results = [
    {
      'name': str(i),
      'overrides': {},
      'status': 'done',
      'wall_time_s': 1.0,
      'best': {'loss': loss},
      'final': {},
    }
    for i, loss in enumerate([0.3, 0.1, 0.2])
  ]
  assert [e['name'] for e in sweep.rank(results, 'loss')] == ['1', '2', '0']
  assert [e['name'] for e in sweep.rank(results, 'kappa')] == ['0', '1', '2']  # No kappa: order.


def test_folds_aggregate_to_mean_and_std_and_rank_by_mean(tmp_path, calls):
  config = _config(
    tmp_path, "sweep.product({'schedule.learning_rate': [0.01, 0.5, 0.02]}, sweep.folds(3))"
  )
  workdir = str(tmp_path / 'w')
  results = _run(config, workdir)
  assert len(results) == 9
  entries = sweep.rank(results, 'kappa')
  assert [e['name'] for e in entries] == [
    'learning_rate=0.02,num_folds=3',
    'learning_rate=0.01,num_folds=3',
    'learning_rate=0.5,num_folds=3',
  ]
  top = entries[0]
  kappas = [0.2, 0.21, 0.22]  # lr * 10 + fold / 100, by hand.
  assert top['score'] == pytest.approx(0.21)
  assert top['mean']['best/kappa'] == pytest.approx(0.21)
  assert top['std']['best/kappa'] == pytest.approx(0.01)
  assert top['std']['best/kappa'] == pytest.approx(statistics.stdev(kappas))
  assert top['mean']['final/loss'] == pytest.approx(0.74)  # 1 - 0.21 - 0.05.
  assert top['wall_time_s'] == pytest.approx(10 + 11 + 12)
  assert entries[2]['score'] is None and not entries[2]['complete']

  rows = _csv(workdir)
  group = [r for r in rows if r['name'].startswith('learning_rate=0.02')]
  assert [r['row'] for r in group] == ['fold', 'fold', 'fold', 'mean', 'std']
  assert all(r['rank'] == '1' and r['best'] == '*' for r in group)
  assert [r['dataset.fold'] for r in group[:3]] == ['0', '1', '2']
  assert float(group[3]['best/kappa']) == pytest.approx(0.21)
  assert float(group[4]['best/kappa']) == pytest.approx(0.01)
  assert group[3]['status'] == '3/3 done'
  md = pathlib.Path(workdir, 'results.md').read_text()
  assert '## Folds of `learning_rate=0.02,num_folds=3`' in md
  assert '0.2100 ± 0.0100' in md


def test_a_group_missing_folds_ranks_after_complete_ones():
  def result(lr, fold, kappa):
    return {
      'name': f'lr={lr},fold={fold}',
      'overrides': {'lr': lr, FOLD_KEY: fold},
      'status': 'done' if kappa is not None else 'failed',
      'wall_time_s': 1.0,
      'best': {'kappa': kappa},
      'final': {},
    }

  results = [result(1, 0, 0.9), result(1, 1, None), result(2, 0, 0.5), result(2, 1, 0.6)]
  entries = sweep.rank(results, 'kappa')
  assert [(e['name'], e['complete']) for e in entries] == [('lr=2', True), ('lr=1', False)]
  assert entries[1]['score'] == pytest.approx(0.9)


# ---------------------------------------------------------------- the shipped sweep configs


@pytest.mark.parametrize('name, count', [('lr', 6), ('cv', 5), ('lr_cv', 30), ('tiny', 2)])
def test_example_sweeps_expand_against_their_configs(name, count, monkeypatch):
  monkeypatch.syspath_prepend(REPO)
  path = os.path.join(REPO, 'configs', 'sweeps', f'{name}.py')
  with open(path) as f:
    assert f.readline().startswith(f'# python main.py --config configs/sweeps/{name}.py')
  _, trials = sweep.expand(path)
  assert len(trials) == count
  assert len(set(trial_names(trials))) == count


def test_is_sweep_tells_sweep_configs_apart():
  assert sweep.is_sweep(os.path.join(REPO, 'configs', 'sweeps', 'cv.py') + ':ignored')
  assert not sweep.is_sweep(os.path.join(REPO, 'configs', 'default.py'))


@pytest.mark.long  # ~60 s; `pytest -m long` (CI) runs it.
def test_end_to_end_tiny_sweep_through_main(tmp_path, monkeypatch):
  """The real thing: main.py runs tiny.py's two trials, then a rerun finds both finished. (Heads
  only, trained from the feature cache: the quickest real trials.)"""
  workdir = str(tmp_path / 'tiny')
  heads = {'trainable_scopes': 'Logits,AuxLogits'}
  cmd = [sys.executable, 'main.py', '--config', 'configs/sweeps/tiny.py', '--workdir', workdir]
  cmd += [f'--config.{k}={v}' for k, v in heads.items()]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _csv(workdir)
  assert len(rows) == 2 and [r['status'] for r in rows] == ['done', 'done'], rows
  assert [r['best'] for r in rows] == ['*', '']
  for r in rows:
    assert r['step'] == r['num_steps'] and r['best/kappa'] != ''
  assert os.path.isdir(os.path.join(workdir, 'data'))
  monkeypatch.syspath_prepend(REPO)
  mtimes = {
    r['name']: os.path.getmtime(os.path.join(workdir, r['name'], 'summary.json')) for r in rows
  }
  tiny = os.path.join(REPO, 'configs', 'sweeps', 'tiny.py')
  results = sweep.run(tiny, workdir, overrides=heads)  # In-process: finds both trials done.
  assert [r['status'] for r in results] == ['done', 'done']
  assert {
    r['name']: os.path.getmtime(os.path.join(r['workdir'], 'summary.json')) for r in results
  } == mtimes
