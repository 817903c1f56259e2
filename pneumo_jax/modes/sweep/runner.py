"""Running a sweep: one process per trial, skip/resume/retry, the shared datasets built first,
and the tables rewritten as each trial ends.

A multi-process run (docs/multihost.md) is the exception: its processes are joined already, so
they go through the trials together, one after another, inside themselves; process 0 writes.
"""

import concurrent.futures
import copy
import dataclasses
import json
import logging as logging_lib
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from pneumo_jax import distributed, locks, validate
from pneumo_jax.errors import ConfigError, UserError
from pneumo_jax.modes.sweep import grid, report

_DATA_DIR_KEY = 'dataset.data_dir'
_TAIL_LINES = 15


@dataclasses.dataclass(frozen=True)
class _Trial:
  name: str
  overrides: grid.Overrides  # The sweep's own; the command line's apply to every trial.
  workdir: str


def _flag(key: str, value: Any) -> str:
  return f'--config.{key}={value if isinstance(value, str) else repr(value)}'


def _read_summary(trial_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(trial_dir, 'summary.json')) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _is_done(summary: dict[str, Any] | None) -> bool:
  return bool(summary) and summary.get('status') == 'done'


def _result(
  trial: _Trial,
  status: str,
  error: str = '',
  log_tail: str = '',
  summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
  summary = summary or _read_summary(trial.workdir) or {}
  return {
    'name': trial.name,
    'workdir': trial.workdir,
    'overrides': trial.overrides,
    'status': status,
    'error': error,
    'log_tail': log_tail,
    **{k: summary.get(k) for k in ('step', 'num_steps', 'wall_time_s', 'best_step')},
    'final': summary.get('final') or {},
    'best': summary.get('best') or {},
  }


def _origin(config_file: str) -> str:
  """The config file as an absolute path (with its ':arg'): what trial.json records."""
  file, *arg = config_file.split(':', 1)
  return ':'.join([os.path.abspath(file), *arg])


def _check_origin(trial: _Trial, origin: str) -> None:
  """Refuses a trial directory that another sweep config's same-named trial wrote."""
  try:
    with open(os.path.join(trial.workdir, 'trial.json')) as f:
      previous = json.load(f)['config']
  except FileNotFoundError:
    return
  if previous != origin:
    raise ConfigError(
      f'{trial.workdir} holds a trial of {previous}, not of {origin}: '
      'give each sweep its own --workdir'
    )


def _write_record(trial: _Trial, record: dict[str, Any]) -> None:
  """trial.json: the sweep config, the trial's overrides and the command that runs it alone."""
  os.makedirs(trial.workdir, exist_ok=True)
  with open(os.path.join(trial.workdir, 'trial.json'), 'w') as f:
    json.dump(record, f, indent=2, default=repr)


def _run_trial(
  trial: _Trial, argv: list[str], env: dict[str, str], record: dict[str, Any]
) -> dict[str, Any]:
  """Runs one trial to its end, appending its output to log.txt; never raises for a bad run."""
  _write_record(trial, record)
  log_path = os.path.join(trial.workdir, 'log.txt')
  with open(log_path, 'ab') as log:
    log.write(f'==== {time.strftime("%Y-%m-%d %H:%M:%S")} {" ".join(argv)}\n'.encode())
    log.flush()
    start = log.tell()
    returncode = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
  if _is_done(_read_summary(trial.workdir)):
    return _result(trial, 'done')
  with open(log_path, 'rb') as f:
    f.seek(start)
    lines = f.read().decode(errors='replace').strip().splitlines()
  last = lines[-1].strip() if lines else ''
  why = f'exit {returncode}: {last}' if returncode else 'exit 0 without a finished summary.json'
  return _result(trial, 'failed', why, '\n'.join(lines[-_TAIL_LINES:]))


def _train_here(
  trial: _Trial, config: ml_collections.ConfigDict, record: dict[str, Any]
) -> dict[str, Any]:
  """Runs one trial in this process, as every process of a multi-process run does at the same
  time; process 0 writes trial.json and appends its log lines to log.txt. A trial that fails
  on a user error or a non-finite loss (the same on every process) is recorded as failed."""
  from pneumo_jax.modes import train  # Imports the training stack: only when it runs here.

  lead = jax.process_index() == 0
  handler = None
  if lead:
    _write_record(trial, record)
    handler = logging_lib.FileHandler(os.path.join(trial.workdir, 'log.txt'))
    handler.setFormatter(logging.PythonFormatter())
    for quiet in logging.get_absl_handler().filters:  # What the console leaves out (main.py's).
      handler.addFilter(quiet)
    logging.get_absl_logger().addHandler(handler)
    logging.info(
      '==== %s (in process, %d processes)', ' '.join(record['argv']), jax.process_count()
    )
  try:
    summary = train.run(config, trial.workdir)
  except (UserError, FloatingPointError) as e:
    return _result(trial, 'failed', f'{type(e).__name__}: {e}')
  finally:
    if handler:
      logging.get_absl_logger().removeHandler(handler)
      handler.close()
  return _result(trial, 'done', summary=summary)


def _trial_config(
  config: ml_collections.ConfigDict, trial: _Trial, injected: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  cfg = copy.deepcopy(config)
  grid.apply_overrides(cfg, {**injected, **trial.overrides}, trial.name)
  return cfg


def _prepare_data(
  config: ml_collections.ConfigDict, trials: Sequence[_Trial], injected: Mapping[str, Any]
) -> None:
  """Checks every trial's config, then builds each distinct dataset of `trials`, one at a time,
  before any trial starts.

  Trials sharing a data_dir then only read their dataset: started side by side they would race
  to build it. A bad setting or dataset.source_dir fails here, once, rather than in every trial.
  """
  from pneumo_jax import data  # TFDS: imported only when a sweep really runs.

  configs = []
  for trial in trials:
    cfg = _trial_config(config, trial, injected)
    try:
      validate.check(cfg)
    except ConfigError as e:
      raise ConfigError(f'sweep trial {trial.name}: {e}') from e
    configs.append(cfg)
  built = set()
  for trial, cfg in zip(trials, configs, strict=True):
    key = grid.canonical(cfg.dataset.to_dict())
    if key not in built:
      built.add(key)
      data.dataset_for(cfg, trial.workdir)


def run(
  config_file: str,
  workdir: str,
  overrides: Mapping[str, Any] | None = None,
  parallel: int = 1,
  command: Sequence[str] | None = None,
  prepare_data: bool = True,
  in_process: bool = False,
) -> list[dict[str, Any]]:
  """Runs the sweep in `config_file` under `workdir`; returns one result per trial, in order.

  Args:
    config_file: a config module defining get_config() and get_sweep() (may end in ':arg').
    workdir: trials go to workdir/<name>; the tables to workdir/results.{csv,md}.
    overrides: the command line's `--config.a.b=v` values (flat dotted dict), for every trial.
    parallel: how many trial processes run at once.
    command: the trial program, given `--config F --workdir D --nosweep --config.k=v ...`;
      default: `python -m pneumo_jax` with this Python, which works for an installed package as
      well as a checkout.
    prepare_data: build the trials' datasets here first (see _prepare_data); False leaves it to
      the trials, for trial programs that need no data.
    in_process: run the trials in this process, one at a time (`command` then only names the
      trial's equivalent command in trial.json): how the processes of a multi-process run go
      through a sweep together.

  Each result holds name, workdir, overrides, status ('done' | 'failed'), error (exit code and
  last output line), log_tail, step, num_steps, wall_time_s, best_step, final and best.
  Trials share dataset.data_dir = workdir/data unless it is set, so a dataset is built once.
  """
  if parallel < 1:
    raise ConfigError(f'--sweep_parallel must be >= 1, got {parallel}')
  if in_process and parallel > 1:
    raise ConfigError(
      '--sweep_parallel: a multi-process sweep runs its trials one at a time, each on all '
      'processes; leave it at 1'
    )
  overrides = dict(overrides or {})
  config, sweep = grid.expand(config_file, overrides)
  injected = {}
  if not config.dataset.data_dir and not any(_DATA_DIR_KEY in t for t in sweep):
    injected[_DATA_DIR_KEY] = os.path.abspath(os.path.join(workdir, 'data'))
  names = grid.trial_names(sweep, overrides)
  trials = [_Trial(n, t, os.path.join(workdir, n)) for n, t in zip(names, sweep, strict=True)]
  with locks.workdir_lock(workdir):  # One sweep per workdir; trials lock their own.
    sweep_run = _SweepRun(
      config_file,
      workdir,
      config,
      overrides,
      injected,
      trials,
      list(command or [sys.executable, '-m', 'pneumo_jax']),
      in_process,
    )
    pending = sweep_run.pending()
    logging.info(
      'sweep %s: %d trials, %d finished before, %d to run, %d at a time',
      config_file,
      len(trials),
      len(trials) - len(pending),
      len(pending),
      parallel,
    )
    if prepare_data:
      _prepare_data(config, pending, injected)
    sweep_run.write_tables()
    if in_process:
      sweep_run.train_here(pending)
    else:
      sweep_run.train_in_processes(pending, parallel)
    return [sweep_run.results[t.name] for t in trials]


@dataclasses.dataclass
class _SweepRun:
  """One run of a sweep: its trials, their results so far, and how each trial is launched."""

  config_file: str
  workdir: str
  config: ml_collections.ConfigDict
  overrides: dict[str, Any]  # The command line's, for every trial.
  injected: dict[str, Any]  # Set for every trial by the sweep itself (the shared data_dir).
  trials: list[_Trial]
  command: list[str]
  in_process: bool
  results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def pending(self) -> list[_Trial]:
    """The trials not finished before (process 0's reading, in a multi-process run: every
    process must run the same trials); fills `results` with each trial's status."""
    origin = _origin(self.config_file)
    pending = []
    for trial in self.trials:
      _check_origin(trial, origin)
      done = _is_done(_read_summary(trial.workdir))
      self.results[trial.name] = _result(trial, 'done' if done else 'pending')
      if not done:
        pending.append(trial)
    if self.in_process:
      names_left = json.loads(distributed.share_text(json.dumps([t.name for t in pending])))
      pending = [t for t in self.trials if t.name in names_left]
    return pending

  def write_tables(self) -> None:
    if self.in_process and jax.process_index():
      return
    report.write_results(
      self.workdir,
      [self.results[t.name] for t in self.trials],
      self.config.best_metric,
      self.config_file,
      self.overrides,
    )

  def record_of(self, trial: _Trial) -> dict[str, Any]:
    """trial.json's record: the config, the trial's overrides, the command that runs it alone."""
    argv = [
      *self.command,
      '--config',
      self.config_file,
      '--workdir',
      trial.workdir,
      '--nosweep',
      *(_flag(k, v) for k, v in {**self.overrides, **self.injected, **trial.overrides}.items()),
    ]
    overrides = {**self.overrides, **trial.overrides}
    return {'config': _origin(self.config_file), 'overrides': overrides, 'argv': argv}

  def train_here(self, pending: list[_Trial]) -> None:
    """Runs `pending` in this process, one after another."""
    for trial in pending:
      cfg = _trial_config(self.config, trial, self.injected)
      self._finished(_train_here(trial, cfg, self.record_of(trial)))

  def train_in_processes(self, pending: list[_Trial], parallel: int) -> None:
    """Runs `pending` as trial processes, `parallel` at a time."""
    env = dict(os.environ)
    # Trials import what this process imports (a config's `from configs import …` included)
    # from wherever it was started: its script's folder, or the current one under `-m`.
    here = os.path.abspath(sys.path[0] or os.curdir)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (here, env.get('PYTHONPATH')) if p)
    if parallel > 1:  # One GPU shared by several processes: each takes memory as it needs it.
      env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
      futures = []
      for trial in pending:
        record = self.record_of(trial)
        futures.append(pool.submit(_run_trial, trial, record['argv'], env, record))
      try:
        for future in concurrent.futures.as_completed(futures):
          self._finished(future.result())
      except BaseException:  # Ctrl-C included: start no more trials; running ones get the signal.
        pool.shutdown(wait=False, cancel_futures=True)
        raise

  def _finished(self, result: dict[str, Any]) -> None:
    self.results[result['name']] = result
    logging.info('sweep trial %s: %s %s', result['name'], result['status'], result['error'])
    self.write_tables()
