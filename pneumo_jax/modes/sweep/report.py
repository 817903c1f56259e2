"""Reporting a sweep: the ranking (trials and cross-validation fold groups, best first) and the
results.csv / results.md tables that `run` rewrites as each trial ends.
"""

import csv
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from pneumo_jax.evaluation import metrics
from pneumo_jax.modes.sweep.grid import FOLD_KEY, canonical, readable, short_keys


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
  short = short_keys(list(dict.fromkeys(k for r in results for k in r['overrides'])))
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in results:
    rest = {k: v for k, v in r['overrides'].items() if k != FOLD_KEY}
    key = canonical(rest) if FOLD_KEY in r['overrides'] else r['name']
    groups.setdefault(key, []).append(r)
  entries = []
  for members in groups.values():
    if len(members) > 1:
      members = sorted(members, key=lambda r: r['overrides'][FOLD_KEY])
      overrides = {k: v for k, v in members[0]['overrides'].items() if k != FOLD_KEY}
      name = readable(overrides, short)[0] or 'folds'
    else:
      overrides, name = dict(members[0]['overrides']), members[0]['name']
    scores = [s for s in (_score(r, metric) for r in members) if s is not None]
    columns = [_numbers(r) for r in members if r['status'] == 'done']
    keys = list(dict.fromkeys(k for c in columns for k in c))
    mean = {k: statistics.fmean([c[k] for c in columns if k in c]) for k in keys}
    std = {k: _std([c[k] for c in columns if k in c]) for k in keys}
    entries.append(
      {
        'name': name,
        'overrides': overrides,
        'trials': list(members),
        'score': statistics.fmean(scores) if scores else None,
        'complete': len(scores) == len(members),
        'mean': mean,
        'std': std,
        'wall_time_s': sum(r['wall_time_s'] for r in members if r['wall_time_s']) or None,
      }
    )
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


def write_results(
  workdir: str,
  results: Sequence[Mapping[str, Any]],
  metric: str,
  title: str,
  common: Mapping[str, Any],
) -> None:
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
  header = [
    'rank',
    'best',
    'row',
    'name',
    'status',
    *keys,
    'step',
    'num_steps',
    'best_step',
    'wall_time_s',
    *columns,
    'error',
  ]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, header)
    writer.writeheader()
    for e in entries:
      shared = {'rank': e['rank'] or '', 'best': '*' if e['best'] else ''}
      grouped = len(e['trials']) > 1
      for r in e['trials']:
        writer.writerow(
          {
            **shared,
            'row': 'fold' if grouped else 'trial',
            'name': r['name'],
            'status': r['status'],
            **{k: r['overrides'].get(k, '') for k in keys},
            **{k: r[k] for k in ('step', 'num_steps', 'best_step', 'wall_time_s')},
            **_numbers(r),
            'error': r['error'],
          }
        )
      if grouped:
        for row in ('mean', 'std'):
          writer.writerow(
            {
              **shared,
              'row': row,
              'name': e['name'],
              'status': f'{_folds_done(e)} done',
              **{k: e['overrides'].get(k, '') for k in keys},
              'wall_time_s': e['wall_time_s'] if row == 'mean' else '',
              **e[row],
            }
          )


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
    f'# Sweep results: {title}',
    '',
    f"Ranked by the best checkpoint's `{metric}` ({direction} is better); ★ marks the best. "
    'Other metrics are from the last validation evaluation. Trials that differ only in '
    '`dataset.fold` rank by their mean over folds (± sample standard deviation).',
    '',
    f'{len(results)} trials: {done} done, {failed} failed, {len(results) - done - failed} '
    "pending. Each trial's files are in `<name>/`.",
  ]
  if common:
    lines += ['', 'Command-line overrides: ' + ', '.join(f'`{k}={v}`' for k, v in common.items())]
  return lines


def _markdown_ranking(entries, keys: list[str], columns: list[str], metric: str) -> list[str]:
  keys = [k for k in keys if k != FOLD_KEY]
  lines = [
    '',
    *_table_head(
      [
        'rank',
        '',
        'name',
        *keys,
        *_metric_heads(columns, metric),
        'best step',
        'steps',
        'wall time',
        'status',
      ]
    ),
  ]
  for e in entries:
    r = e['trials'][0]
    if len(e['trials']) > 1:
      status, steps = f'{_folds_done(e)} folds done', ['', '']
    else:
      step = f'{r["step"]}/{r["num_steps"]}' if r['step'] is not None else ''
      status, steps = r['status'], [_cell(r['best_step']), step]
    lines.append(
      _row(
        [
          _cell(e['rank']),
          '★' if e['best'] else '',
          f'`{e["name"]}`',
          *(_cell(str(e['overrides'].get(k, ''))) for k in keys),
          *(_entry_value(e, c) for c in _shown(columns)),
          *steps,
          _duration(e['wall_time_s']),
          status,
        ]
      )
    )
  return lines


def _markdown_folds(entries, columns: list[str], metric: str) -> list[str]:
  lines = []
  heads = _metric_heads(columns, metric)
  for e in entries:
    if len(e['trials']) < 2:
      continue
    lines += [
      '',
      f'## Folds of `{e["name"]}`',
      '',
      *_table_head(['fold', 'name', *heads, 'best step', 'wall time', 'status']),
    ]
    for r in e['trials']:
      nums = _numbers(r)
      lines.append(
        _row(
          [
            str(r['overrides'][FOLD_KEY]),
            f'`{r["name"]}`',
            *(_cell(nums.get(c)) for c in _shown(columns)),
            _cell(r['best_step']),
            _duration(r['wall_time_s']),
            r['status'],
          ]
        )
      )
    lines.append(
      _row(
        [
          'mean ± std',
          '',
          *(_entry_value(e, c) for c in _shown(columns)),
          '',
          _duration(e['wall_time_s']),
          '',
        ]
      )
    )
  return lines


def _markdown_failures(results) -> list[str]:
  lines = []
  for r in results:
    if r['status'] == 'failed':
      lines += [
        '',
        f'`{r["name"]}`: {r["error"]} (full output: `{r["name"]}/log.txt`)',
        '',
        '```',
        r['log_tail'],
        '```',
      ]
  return ['', '## Failures', *lines] if lines else []
