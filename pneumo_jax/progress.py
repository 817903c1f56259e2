"""Progress of the long waits: training's steps, the dataset build's read and write passes, the
feature cache's backbone passes. One facility, so they all read alike.

On a terminal (stderr a tty) a tqdm bar: count, rate, elapsed and ETA. Otherwise (stderr sent to
a file, CI) the same fields as a log line each ~10% of the way and one at the end, no more often
than every `_MIN_SECONDS`: a log file stays readable, and a pass over ten images logs one line.
"""

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import tqdm
from absl import logging

T = TypeVar('T')

_LINE_EVERY = 0.1  # Fraction of the total between two log lines.
_MIN_SECONDS = 2.0  # Between two log lines, the last excepted.
_SMOOTHING = 0.3  # Of the rate's moving average: tqdm's default for its bar.
# tqdm's own fields (as its bar shows them), without the bar.
_STATUS = '{percentage:.0f}% [{elapsed}<{remaining}, {rate_fmt}]'
_LINE = '{desc}: {n_fmt}/{total_fmt} ' + _STATUS
_SIZE = {'ncols': 100, 'nrows': 20}  # tqdm's screen on a terminal that does not tell its own.


class Progress:
  """`total` units of work (`unit`: 'step', 'img'…) described as `what`, from `initial` done (a
  resumed run). Advance it with `update`; close it (or use it as a context manager) when done.

  With `lines` off it logs nothing itself (the caller logs its own lines, with `status`).
  Inactive (another process than the one that reports), it shows nothing.
  """

  def __init__(
    self,
    what: str,
    total: int,
    unit: str,
    *,
    initial: int = 0,
    active: bool = True,
    lines: bool = True,
  ) -> None:
    self.what, self.total, self.unit, self.count = what, total, unit, initial
    self.active, self._lines = active, lines and active
    self._start = self._logged_at = time.monotonic()
    # The rate: moving averages of the units done and the time taken between reports.
    self._reported, self._reported_at, self._units, self._seconds = initial, self._start, 0.0, 0.0
    self._next_line = self._next_mark(initial)
    self.terminal = active and sys.stderr.isatty()
    sized = self.terminal and _has_size()
    # leave=None: a bar nested under another (a cache built while training's bar is up) goes
    # when done; a bar of its own stays.
    self._bar = (
      tqdm.tqdm(
        total=total,
        initial=initial,
        desc=what,
        unit=unit,
        leave=None,
        dynamic_ncols=sized,
        **({} if sized else _SIZE),
      )
      if self.terminal
      else None
    )

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def update(self, n: int = 1, postfix: str | None = None) -> None:
    """`n` more units done; `postfix` (e.g. the latest metrics) is shown beside the bar."""
    self.count += n
    if self._bar is not None:
      self._bar.update(n)
      if postfix is not None:
        self._bar.set_postfix_str(postfix)
    elif self._lines and self.count >= self._next_line:
      now = time.monotonic()
      if self.count >= self.total or now - self._logged_at >= _MIN_SECONDS:
        logging.info('%s', self._format(_LINE, now))
        self._logged_at, self._next_line = now, self._next_mark(self.count)

  def status(self) -> str:
    """Percentage, elapsed, ETA and rate (recent: `_rate`), as the bar shows them."""
    return self._format(_STATUS, time.monotonic())

  def write(self, line: str) -> None:
    """Logs `line`, above the bar on a terminal."""
    if self._bar is not None:
      self._bar.write(line)
    elif self.active:
      logging.info('%s', line)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

  def _next_mark(self, count: int) -> float:
    """The count of the next log line: the next multiple of 10% above `count` (the end last)."""
    step = self.total * _LINE_EVERY
    return min((count // step + 1) * step, self.total) if step > 0 else float('inf')

  def _rate(self, now: float) -> float | None:
    """Units per second, a moving average over the reports (log lines, `status` calls) as
    tqdm's bar averages over its redraws: a pause (a feature cache built between two training
    records) or a first batch that compiles weighs less with each report, where an average
    since the start would skew the ETA for the rest of the run."""
    if now > self._reported_at:
      done, taken = self.count - self._reported, now - self._reported_at
      self._units += _SMOOTHING * (done - self._units)
      self._seconds += _SMOOTHING * (taken - self._seconds)
      self._reported, self._reported_at = self.count, now
    return self._units / self._seconds if self._seconds > 0 else None

  def _format(self, template: str, now: float) -> str:
    text = tqdm.tqdm.format_meter(
      self.count,
      self.total,
      now - self._start,
      prefix=self.what,
      unit=self.unit,
      rate=self._rate(now),
      bar_format=template,
    )
    return ' '.join(text.split())  # The bar's fields are padded to fixed widths.


def _has_size() -> bool:
  """Whether stderr's terminal tells its size. A pseudo-terminal given none (`script`,
  `docker run -t`) says 0 × 0, on which tqdm would draw nothing."""
  try:
    return min(os.get_terminal_size(sys.stderr.fileno())) > 0
  except (OSError, ValueError):  # No file descriptor (io.UnsupportedOperation is an OSError).
    return False


def track(
  items: Iterable[T], what: str, total: int, unit: str, *, active: bool = True
) -> Iterator[T]:
  """`items` as they come, shown as `Progress` (one unit each)."""
  with Progress(what, total, unit, active=active) as progress:
    for item in items:
      yield item
      progress.update()
