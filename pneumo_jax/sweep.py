"""Hyper-parameter sweeps and k-fold cross-validation: many trials of one config, one table.

A sweep is a config file that defines `get_sweep()` next to `get_config()`: a list of override
dicts keyed by dotted config paths (`{'schedule.learning_rate': 0.01}`), built with `product`,
`zip` and `folds`. `run` trains every trial as its own `main.py --nosweep` process (a crash or
leaked memory stays in its trial), in a sub-workdir named after its overrides, and ranks them in
WORKDIR/results.{csv,md}. Running the same command again skips finished trials, resumes
interrupted ones from their checkpoints and retries failed ones, so a sweep survives restarts.
"""

import builtins
import concurrent.futures
import copy
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import ml_collections
from absl import logging

from pneumo_jax import locks
from pneumo_jax.errors import ConfigError, NotFoundError
from pneumo_jax.evaluation import metrics

Overrides = dict[str, Any]
# An axis: a list of override dicts, or {path: values, ...} standing for one axis per path.
Axis = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]

FOLD_KEY = 'dataset.fold'
_NUM_FOLDS_KEY = 'dataset.num_folds'
_DATA_DIR_KEY = 'dataset.data_dir'
_MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]')  # Characters a trial's directory name replaces.
_TAIL_LINES = 15


# ---------------------------------------------------------------- building the list of trials


def _merge(dicts: Sequence[Mapping[str, Any]]) -> Overrides:
  out: Overrides = {}
  for d in dicts:
    for k, v in d.items():
      if k in out:
        raise ConfigError(f'sweep axes both set {k!r}: combine its values in one axis instead')
      out[k] = v
  return out


def _as_axes(axis: Axis, combine) -> list[Overrides]:
  """A list of dicts passes through; {path: values} becomes its per-path axes, combined."""
  if isinstance(axis, Mapping):
    for k, values in axis.items():
      if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f'sweep axis {k!r} needs a list of values, got {values!r}')
    return combine(*([{k: v} for v in values] for k, values in axis.items()))
  if isinstance(axis, str) or not all(isinstance(d, Mapping) for d in axis):
    raise ConfigError('a sweep axis is a list of override dicts or a {path: values} dict, '
                     f'got {axis!r}')
  return [dict(d) for d in axis]


def product(*axes: Axis) -> list[Overrides]:
  """Every combination of the axes' entries; the first axis varies slowest.

  `product({'schedule.learning_rate': [0.1, 0.01]}, folds(5))` gives 10 trials, each learning
  rate's five folds together. A dict with several paths is their own product, in order.
  """
  lists = [_as_axes(a, product) for a in axes]
  return [_merge(combo) for combo in itertools.product(*lists)]


def zip(*axes: Axis) -> list[Overrides]:
  """The axes' entries side by side: the i-th trial merges every axis's i-th entry.

  `zip({'schedule.name': ['fixed', 'warmup_cosine'], 'schedule.warmup_steps': [0, 500]})` gives
  two trials. All axes must have the same length.
  """
  lists = [_as_axes(a, zip) for a in axes]
  lengths = {len(x) for x in lists}
  if len(lengths) > 1:
    raise ConfigError(f'sweep.zip needs axes of one length, got lengths {[len(x) for x in lists]}')
  return [_merge(combo) for combo in builtins.zip(*lists, strict=True)]


def folds(k: int) -> list[Overrides]:
  """k-fold cross-validation: one trial per validation fold."""
  if not isinstance(k, int) or k < 2:
    raise ConfigError(f'sweep.folds needs an integer k >= 2, got {k!r}')
  return [{_NUM_FOLDS_KEY: k, FOLD_KEY: i} for i in range(k)]


# ---------------------------------------------------------------- naming trial directories


def _canonical(overrides: Mapping[str, Any]) -> str:
  """The same text for the same overrides, whatever their order."""
  return json.dumps(sorted(overrides.items()), default=repr)


def _digest(overrides: Mapping[str, Any]) -> str:
  return hashlib.sha1(_canonical(overrides).encode()).hexdigest()[:8]


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each dotted path → its shortest tail of components that no other path ends with."""
  parts = {k: k.split('.') for k in keys}
  out = {}
  for k, p in parts.items():
    others = [q for j, q in parts.items() if j != k]
    n = next((n for n in range(1, len(p)) if all(q[-n:] != p[-n:] for q in others)), len(p))
    out[k] = '.'.join(p[-n:])
  return out


def _readable(overrides: Mapping[str, Any], short: Mapping[str, str]) -> tuple[str, bool]:
  """'key=value,...' by short key, with unsafe characters replaced; and whether any were."""
  parts = [f'{short[k]}={_UNSAFE.sub("_", str(v))}' for k, v in overrides.items()]
  return ','.join(parts), any(_UNSAFE.search(str(v)) for v in overrides.values())


def trial_names(trials: Sequence[Mapping[str, Any]],
                common: Mapping[str, Any] | None = None) -> list[str]:
  """Readable, file-system-safe, unique names, e.g. 'learning_rate=0.01,fold=0'.

  A name lists its trial's overrides by the shortest unambiguous key, so the same sweep always
  gets the same names. The command line's overrides (`common`, shared by every trial) add one
  digest of them to every name, so a changed command never reuses another's directories; a value
  with characters a file name cannot keep, or a name too long, ends in a digest of all its
  overrides instead.
  """
  keys = list(dict.fromkeys(k for t in trials for k in t))
  short = _short_keys(keys)
  common = dict(common or {})
  names, seen = [], {}
  for t in trials:
    name, lossy = _readable({k: t[k] for k in keys if k in t}, short)
    name = name or 'base'
    if lossy or len(name) > _MAX_NAME_CHARS:
      name = f'{name[:_MAX_NAME_CHARS]},{_digest({**common, **t})}'
    elif common:
      name = f'{name},{_digest(common)}'
    if name in seen:
      raise ConfigError(f'sweep trials {seen[name]} and {dict(t)} both get the name {name!r}; '
                       'make their overrides differ')
    seen[name] = dict(t)
    names.append(name)
  return names


# ---------------------------------------------------------------- loading and checking a sweep


def _load_module(config_file: str) -> ModuleType:
  path = config_file.split(':', 1)[0]
  if not os.path.isfile(path):
    raise NotFoundError(f'sweep config {path!r} does not exist')
  spec = importlib.util.spec_from_file_location('pneumo_jax_sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def is_sweep(config_file: str) -> bool:
  """Whether the config file (may end in ':arg') defines get_sweep(): main.py's dispatch."""
  return hasattr(_load_module(config_file), 'get_sweep')


def _apply(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str) -> None:
  try:
    config.update_from_flattened_dict(dict(overrides))
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'overrides {dict(overrides)} from {where} do not fit the config: {e}') from e


def expand(config_file: str, overrides: Mapping[str, Any] | None = None,
           ) -> tuple[ml_collections.ConfigDict, list[Overrides]]:
  """The sweep's base config (with the command line's overrides) and its checked trials.

  Every trial's overrides are applied to a copy of the locked config here, so a misspelt path or
  a wrongly typed value fails before any process starts.
  """
  overrides = dict(overrides or {})
  module = _load_module(config_file)
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'{config_file} defines no get_sweep(): it is not a sweep config')
  config = module.get_config(*config_file.split(':', 1)[1:])  # ':arg' as config_flags passes it.
  config.lock()
  _apply(config, overrides, 'the command line')
  if config.best_metric not in metrics.HIGHER_IS_BETTER:
    raise ConfigError(f'best_metric={config.best_metric!r} is not one of '
                     f'{sorted(metrics.HIGHER_IS_BETTER)}')
  trials = module.get_sweep()
  if not trials or not all(isinstance(t, Mapping) for t in trials):
    raise ConfigError(f'{config_file}: get_sweep() must return a non-empty list of override dicts')
  for t in trials:
    clash = sorted(set(t) & set(overrides))
    if clash:
      raise ConfigError(f'{clash} are swept by {config_file}; drop them from the command line')
    if 'best_metric' in t:
      raise ConfigError(f'{config_file}: trials must share best_metric to be ranked together')
    _apply(copy.deepcopy(config), t, f'{config_file} get_sweep()')
  if len({_canonical(t) for t in trials}) < len(trials):
    raise ConfigError(f'{config_file}: get_sweep() lists the same trial twice')
  return config, [dict(t) for t in trials]


# ---------------------------------------------------------------- running trials


@dataclasses.dataclass(frozen=True)
class _Trial:
  name: str
  overrides: Overrides  # The sweep's own; the command line's apply to every trial.
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


def _result(trial: _Trial, status: str, error: str = '', log_tail: str = '') -> dict[str, Any]:
  summary = _read_summary(trial.workdir) or {}
  return {
      'name': trial.name, 'workdir': trial.workdir, 'overrides': trial.overrides,
      'status': status, 'error': error, 'log_tail': log_tail,
      **{k: summary.get(k) for k in ('step', 'num_steps', 'wall_time_s', 'best_step')},
      'final': summary.get('final') or {}, 'best': summary.get('best') or {},
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
    raise ConfigError(f'{trial.workdir} holds a trial of {previous}, not of {origin}: '
                     'give each sweep its own --workdir')


def _run_trial(trial: _Trial, argv: list[str], env: dict[str, str],
               record: dict[str, Any]) -> dict[str, Any]:
  """Runs one trial to its end, appending its output to log.txt; never raises for a bad run."""
  os.makedirs(trial.workdir, exist_ok=True)
  with open(os.path.join(trial.workdir, 'trial.json'), 'w') as f:
    json.dump(record, f, indent=2, default=repr)
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
  why = (f'exit {returncode}: {last}' if returncode
         else 'exit 0 without a finished summary.json')
  return _result(trial, 'failed', why, '\n'.join(lines[-_TAIL_LINES:]))


def _default_command() -> list[str]:
  main = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'main.py')
  if not os.path.isfile(main):
    raise NotFoundError(f'no {main} to run trials with; pass command=[python, main.py]')
  return [sys.executable, main]


def _prepare_data(config: ml_collections.ConfigDict, trials: Sequence[_Trial],
                  injected: Mapping[str, Any]) -> None:
  """Builds each distinct dataset of `trials`, one at a time, before any trial starts.

  Trials sharing a data_dir then only read their dataset: started side by side they would race
  to build it. A bad dataset.source_dir fails here, once, rather than in every trial.
  """
  from pneumo_jax import data  # TFDS: imported only when a sweep really runs.

  built = set()
  for trial in trials:
    cfg = copy.deepcopy(config)
    _apply(cfg, {**injected, **trial.overrides}, trial.name)
    key = _canonical(cfg.dataset.to_dict())
    if key not in built:
      built.add(key)
      data.dataset_for(cfg, trial.workdir)


def run(config_file: str, workdir: str, overrides: Mapping[str, Any] | None = None,
        parallel: int = 1, command: Sequence[str] | None = None,
        prepare_data: bool = True) -> list[dict[str, Any]]:
  """Runs the sweep in `config_file` under `workdir`; returns one result per trial, in order.

  Args:
    config_file: a config module defining get_config() and get_sweep() (may end in ':arg').
    workdir: trials go to workdir/<name>; the tables to workdir/results.{csv,md}.
    overrides: the command line's `--config.a.b=v` values (flat dotted dict), for every trial.
    parallel: how many trial processes run at once.
    command: the trial program, given `--config F --workdir D --nosweep --config.k=v ...`;
      default: this Python running the repository's main.py.
    prepare_data: build the trials' datasets here first (see _prepare_data); False leaves it to
      the trials, for trial programs that need no data.

  Each result holds name, workdir, overrides, status ('done' | 'failed'), error (exit code and
  last output line), log_tail, step, num_steps, wall_time_s, best_step, final and best.
  Trials share dataset.data_dir = workdir/data unless it is set, so a dataset is built once.
  """
  if parallel < 1:
    raise ConfigError(f'--sweep_parallel must be >= 1, got {parallel}')
  base = list(command or _default_command())
  overrides = dict(overrides or {})
  config, sweep = expand(config_file, overrides)
  injected = {}
  if not config.dataset.data_dir and not any(_DATA_DIR_KEY in t for t in sweep):
    injected[_DATA_DIR_KEY] = os.path.abspath(os.path.join(workdir, 'data'))
  names = trial_names(sweep, overrides)
  trials = [_Trial(n, t, os.path.join(workdir, n))
            for n, t in builtins.zip(names, sweep, strict=True)]
  with locks.workdir_lock(workdir):  # One sweep per workdir; trials lock their own.
    origin = _origin(config_file)
    results: dict[str, dict[str, Any]] = {}
    pending = []
    for trial in trials:
      _check_origin(trial, origin)
      done = _is_done(_read_summary(trial.workdir))
      results[trial.name] = _result(trial, 'done' if done else 'pending')
      if not done:
        pending.append(trial)
    logging.info('sweep %s: %d trials, %d finished before, %d to run, %d at a time',
                 config_file, len(trials), len(trials) - len(pending), len(pending), parallel)
    if prepare_data:
      _prepare_data(config, pending, injected)

    def write_tables():
      _write_results(workdir, [results[t.name] for t in trials], config.best_metric,
                     config_file, overrides)

    env = dict(os.environ)
    if parallel > 1:  # One GPU shared by several processes: each takes memory as it needs it.
      env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    write_tables()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
      futures = []
      for trial in pending:
        argv = [*base, '--config', config_file, '--workdir', trial.workdir, '--nosweep',
                *(_flag(k, v) for k, v in {**overrides, **injected, **trial.overrides}.items())]
        record = {'config': origin, 'overrides': {**overrides, **trial.overrides}, 'argv': argv}
        futures.append(pool.submit(_run_trial, trial, argv, env, record))
      try:
        for future in concurrent.futures.as_completed(futures):
          result = future.result()
          results[result['name']] = result
          logging.info('sweep trial %s: %s %s', result['name'], result['status'], result['error'])
          write_tables()
      except BaseException:  # Ctrl-C included: start no more trials; running ones get the signal.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return [results[t.name] for t in trials]


# ---------------------------------------------------------------- ranking and tables


def _score(result: Mapping[str, Any], metric: str) -> float | None:
  """The best checkpoint's value of `metric` (the checkpoint a user keeps); else the last one."""
  if result['status'] != 'done':
    return None
  value = result['best'].get(metric)
  value = result['final'].get(metric) if value is None else value
  return None if value is None else float(value)


def _numbers(result: Mapping[str, Any]) -> dict[str, float]:
  """A done trial's metrics as flat 'best/<m>' and 'final/<m>' columns."""
  if result['status'] != 'done':
    return {}
  out = {f'best/{k}': float(v) for k, v in result['best'].items() if v is not None}
  out.update({f'final/{k}': float(v) for k, v in result['final'].items() if v is not None})
  return out


def rank(results: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
  """Trials and cross-validation groups, best first.

  Trials whose overrides differ only in dataset.fold form a group (two or more), ranked by its
  mean over done folds. Order: complete entries by score, then groups missing folds, then
  entries with no score. Each entry: name, overrides (without the fold), trials (its results,
  by fold), score, complete, mean and std (per 'best/<m>' / 'final/<m>' column; std is the
  sample standard deviation over folds, 0 for a lone trial), wall_time_s (total), rank (None
  without a score) and best (the first entry, when complete).
  """
  short = _short_keys(list(dict.fromkeys(k for r in results for k in r['overrides'])))
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in results:
    rest = {k: v for k, v in r['overrides'].items() if k != FOLD_KEY}
    key = _canonical(rest) if FOLD_KEY in r['overrides'] else r['name']
    groups.setdefault(key, []).append(r)
  entries = []
  for members in groups.values():
    if len(members) > 1:
      members = sorted(members, key=lambda r: r['overrides'][FOLD_KEY])
      overrides = {k: v for k, v in members[0]['overrides'].items() if k != FOLD_KEY}
      name = _readable(overrides, short)[0] or 'folds'
    else:
      overrides, name = dict(members[0]['overrides']), members[0]['name']
    scores = [s for s in (_score(r, metric) for r in members) if s is not None]
    columns = [_numbers(r) for r in members if r['status'] == 'done']
    keys = list(dict.fromkeys(k for c in columns for k in c))
    mean = {k: statistics.fmean([c[k] for c in columns if k in c]) for k in keys}
    std = {k: _std([c[k] for c in columns if k in c]) for k in keys}
    entries.append({
        'name': name, 'overrides': overrides, 'trials': list(members),
        'score': statistics.fmean(scores) if scores else None,
        'complete': len(scores) == len(members), 'mean': mean, 'std': std,
        'wall_time_s': sum(r['wall_time_s'] for r in members if r['wall_time_s']) or None,
    })
  sign = -1.0 if metrics.HIGHER_IS_BETTER[metric] else 1.0
  def order(e):
    if e['score'] is None:
      return (2, 0.0)
    return (0 if e['complete'] else 1, sign * e['score'])
  entries.sort(key=order)
  for i, e in enumerate(entries):
    e['rank'] = i + 1 if e['score'] is not None else None
    e['best'] = i == 0 and e['score'] is not None and e['complete']
  return entries


def _std(values: Sequence[float]) -> float:
  return statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4f}' if math.isfinite(value) else str(value)
  return str(value)


def _duration(seconds: float | None) -> str:
  if not seconds:
    return ''
  m, s = divmod(round(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s' if m else f'{s}s'


def _write_results(workdir: str, results: Sequence[Mapping[str, Any]], metric: str,
                   title: str, common: Mapping[str, Any]) -> None:
  """Writes workdir/results.csv (every trial, plus mean/std rows per fold group) and results.md."""
  entries = rank(results, metric)
  keys = list(dict.fromkeys(k for r in results for k in r['overrides']))
  columns = [f'best/{metric}']
  columns += list(dict.fromkeys(k for r in results for k in _numbers(r) if k not in columns))
  _write_csv(os.path.join(workdir, 'results.csv'), entries, keys, columns)
  md = _markdown_head(results, metric, title, common)
  md += _markdown_ranking(entries, keys, columns, metric)
  md += _markdown_folds(entries, columns, metric)
  md += _markdown_failures(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')


def _write_csv(path: str, entries, keys: list[str], columns: list[str]) -> None:
  header = ['rank', 'best', 'row', 'name', 'status', *keys, 'step', 'num_steps', 'best_step',
            'wall_time_s', *columns, 'error']
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, header)
    writer.writeheader()
    for e in entries:
      shared = {'rank': e['rank'] or '', 'best': '*' if e['best'] else ''}
      grouped = len(e['trials']) > 1
      for r in e['trials']:
        writer.writerow({
            **shared, 'row': 'fold' if grouped else 'trial', 'name': r['name'],
            'status': r['status'], **{k: r['overrides'].get(k, '') for k in keys},
            **{k: r[k] for k in ('step', 'num_steps', 'best_step', 'wall_time_s')},
            **_numbers(r), 'error': r['error'],
        })
      if grouped:
        for row in ('mean', 'std'):
          writer.writerow({
              **shared, 'row': row, 'name': e['name'], 'status': f'{_folds_done(e)} done',
              **{k: e['overrides'].get(k, '') for k in keys},
              'wall_time_s': e['wall_time_s'] if row == 'mean' else '', **e[row],
          })


def _folds_done(entry: Mapping[str, Any]) -> str:
  return f'{sum(r["status"] == "done" for r in entry["trials"])}/{len(entry["trials"])}'


def _cell(value: Any) -> str:
  return _fmt(value).replace('|', '\\|')


def _row(cells: Sequence[str]) -> str:
  return '| ' + ' | '.join(cells) + ' |'


def _table_head(heads: Sequence[str]) -> list[str]:
  return [_row(heads), '|' + ' --- |' * len(heads)]


def _shown(columns: list[str]) -> list[str]:
  """The markdown's metric columns: the ranking metric's best value, then the last eval's."""
  return columns[:1] + [c for c in columns[1:] if c.startswith('final/')]


def _metric_heads(columns: list[str], metric: str) -> list[str]:
  return [f'{metric} (best)'] + [c.split('/', 1)[1] for c in _shown(columns)[1:]]


def _entry_value(entry: Mapping[str, Any], column: str) -> str:
  """One trial's value, or a group's 'mean ± std'."""
  if len(entry['trials']) == 1:
    return _cell(_numbers(entry['trials'][0]).get(column))
  if column not in entry['mean']:
    return ''
  return f'{_fmt(entry["mean"][column])} ± {_fmt(entry["std"][column])}'


def _markdown_head(results, metric: str, title: str, common: Mapping[str, Any]) -> list[str]:
  done = sum(r['status'] == 'done' for r in results)
  failed = sum(r['status'] == 'failed' for r in results)
  direction = 'higher' if metrics.HIGHER_IS_BETTER[metric] else 'lower'
  lines = [
      f'# Sweep results: {title}', '',
      f"Ranked by the best checkpoint's `{metric}` ({direction} is better); ★ marks the best. "
      'Other metrics are from the last validation evaluation. Trials that differ only in '
      '`dataset.fold` rank by their mean over folds (± sample standard deviation).', '',
      f'{len(results)} trials: {done} done, {failed} failed, {len(results) - done - failed} '
      "pending. Each trial's files are in `<name>/`.",
  ]
  if common:
    lines += ['', 'Command-line overrides: ' + ', '.join(f'`{k}={v}`' for k, v in common.items())]
  return lines


def _markdown_ranking(entries, keys: list[str], columns: list[str], metric: str) -> list[str]:
  keys = [k for k in keys if k != FOLD_KEY]
  lines = ['', *_table_head(['rank', '', 'name', *keys,
                             *_metric_heads(columns, metric), 'best step', 'steps', 'wall time',
                             'status'])]
  for e in entries:
    r = e['trials'][0]
    if len(e['trials']) > 1:
      status, steps = f'{_folds_done(e)} folds done', ['', '']
    else:
      step = f'{r["step"]}/{r["num_steps"]}' if r['step'] is not None else ''
      status, steps = r['status'], [_cell(r['best_step']), step]
    lines.append(_row([
        _cell(e['rank']), '★' if e['best'] else '', f'`{e["name"]}`',
        *(_cell(str(e['overrides'].get(k, ''))) for k in keys),
        *(_entry_value(e, c) for c in _shown(columns)), *steps, _duration(e['wall_time_s']),
        status]))
  return lines


def _markdown_folds(entries, columns: list[str], metric: str) -> list[str]:
  lines = []
  heads = _metric_heads(columns, metric)
  for e in entries:
    if len(e['trials']) < 2:
      continue
    lines += ['', f'## Folds of `{e["name"]}`', '',
              *_table_head(['fold', 'name', *heads, 'best step', 'wall time', 'status'])]
    for r in e['trials']:
      nums = _numbers(r)
      lines.append(_row([str(r['overrides'][FOLD_KEY]), f'`{r["name"]}`',
                         *(_cell(nums.get(c)) for c in _shown(columns)), _cell(r['best_step']),
                         _duration(r['wall_time_s']), r['status']]))
    lines.append(_row(['mean ± std', '', *(_entry_value(e, c) for c in _shown(columns)), '',
                       _duration(e['wall_time_s']), '']))
  return lines


def _markdown_failures(results) -> list[str]:
  lines = []
  for r in results:
    if r['status'] == 'failed':
      lines += ['', f'`{r["name"]}`: {r["error"]} (full output: `{r["name"]}/log.txt`)', '',
                '```', r['log_tail'], '```']
  return ['', '## Failures', *lines] if lines else []
