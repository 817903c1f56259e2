"""A cached phase's steps bound by the device: features resident there, several steps a dispatch.

From a feature cache a step is a small head on pooled features, so the per-step path's host work
(dispatching the whole state, ~400 leaves; gathering the batch from the memory-mapped cache and
putting it on the devices) weighs on it. Here the phase's training features and labels are put on
the devices once, each batch is gathered there by record index and view, and the steps up to the
next logged, evaluated or saved one run in one dispatch (`lax.scan`, each count compiled once),
unless one step a dispatch measures faster (XLA:CPU runs a conv-heavy head 2–3× slower inside a
multi-step program). Only the leaves a step changes are carried and donated: the trainable
parameters, the batch-norm statistics of their scopes, the optimizer state and the EMA. The rest
enter once per dispatch, read only.

The body is the loop's own step (`make_train_step`) on the same batch, with the same dropout key
(`fold_in(dropout_rng, step)`), and the host's stream of record indices and flips
(`pipeline.train_iterator(read_images=False)`) still decides every batch. So batch order, resume
position and each process's share of a global batch are the per-step path's, and the results are
its results up to XLA's fusion inside a loop (tests/test_cached_steps.py).
"""

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from pneumo_jax import distributed, scopes, sharding
from pneumo_jax.training.step import TrainState

MAX_STEPS = 64  # Steps one dispatch may run.
_DISPATCH_SECS = 1.0  # A dispatch's aim: time-based actions and Ctrl-C wait about this long.
_ONE_STEP_TIMINGS = 3  # The first runs after a compile are slower: the fastest of 3 counts.
_MEMORY_SHARE = 4  # The features may take a quarter of a device's (or the host's) free memory.


@dataclasses.dataclass(frozen=True)
class _Part:
  """Which leaves of one tree (structure `treedef`) are carried, by position in its leaf order:
  by position, splitting a state takes 0.8 ms where path-keyed dicts of its ~400 leaves took 4.7
  (under cProfile, of a 299 px head-only step's ~12 ms on 2 cores)."""

  treedef: Any
  inside: tuple[bool, ...]

  @classmethod
  def of(cls, tree: Any, carried: Callable[[str], bool]) -> '_Part':
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return cls(treedef, tuple(carried('/'.join(k.key for k in p)) for p, _ in leaves))

  def split(self, tree: Any) -> tuple[list[Any], list[Any]]:
    """(the carried leaves, the others), each in the tree's order."""
    leaves = self.treedef.flatten_up_to(tree)
    inside = [x for x, i in zip(leaves, self.inside, strict=True) if i]
    return inside, [x for x, i in zip(leaves, self.inside, strict=True) if not i]

  def merge(self, inside: Sequence[Any], outside: Sequence[Any]) -> Any:
    ins, outs = iter(inside), iter(outside)
    return self.treedef.unflatten([next(ins) if i else next(outs) for i in self.inside])


@dataclasses.dataclass(frozen=True)
class Carried:
  """The leaves a cached phase's step changes: trainable parameters, the batch-norm statistics
  of their top-level scopes (a superset of those that learn) and the EMA's leaves (every leaf
  some phase trains: a frozen one keeps converging to its value)."""

  params: _Part
  batch_stats: _Part
  ema: _Part | None

  @classmethod
  def of(cls, state: TrainState, trainable: Any, ema_mask: Any) -> 'Carried':
    trained = {k for k, t in scopes.flatten(trainable).items() if t}
    tops = {k.split('/')[0] for k in trained}
    averaged = {k for k, t in scopes.flatten(ema_mask).items() if t}
    return cls(
      _Part.of(state.params, trained.__contains__),
      _Part.of(state.batch_stats, lambda k: k.split('/')[0] in tops),
      None if state.ema_params is None else _Part.of(state.ema_params, averaged.__contains__),
    )

  def split(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """(carry: the changing leaves, as lists, with the step and optimizer state; rest: the
    others)."""
    params, batch_stats = self.params.split(state.params), self.batch_stats.split(state.batch_stats)
    ema = (None, None) if self.ema is None else self.ema.split(state.ema_params)
    carry = TrainState(
      step=state.step,
      params=params[0],
      batch_stats=batch_stats[0],
      opt_state=state.opt_state,
      ema_params=ema[0],
    )
    return carry, {'params': params[1], 'batch_stats': batch_stats[1], 'ema': ema[1]}

  def merge(self, carry: TrainState, rest: dict[str, Any]) -> TrainState:
    """The whole state again, nested as the model and checkpoints expect."""
    ema = None if self.ema is None else self.ema.merge(carry.ema_params, rest['ema'])
    return TrainState(
      step=carry.step,
      params=self.params.merge(carry.params, rest['params']),
      batch_stats=self.batch_stats.merge(carry.batch_stats, rest['batch_stats']),
      opt_state=carry.opt_state,
      ema_params=ema,
    )

  def carry(self, state: TrainState) -> TrainState:
    return self.split(state)[0]


def _steps_loop(train_step: Callable, carried: Carried, batch_sharding: Any) -> Callable:
  """run(carry, rest, (features, labels), rows, step, dropout_rng) → (carry, metrics): one step
  per column of rows['index'] from `step`, on those records in the views rows['view'], all
  gathered on the device before the loop; each metric stacked over the steps."""

  def run(carry, rest, table, rows, step, dropout_rng):
    features, labels = table
    index, view = rows['index'].T, rows['view'].T  # [steps, batch]
    # One gather for all the dispatch's steps, each device its rows of every batch.
    batches = {'features': {h: f[index, view] for h, f in features.items()}, 'label': labels[index]}

    def one(carry: TrainState, xs: Any) -> tuple[TrainState, dict[str, jax.Array]]:
      i, batch = xs
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
      rng = jax.random.fold_in(dropout_rng, step + i)
      state, metrics = train_step(carried.merge(carry, rest), batch, rng)
      return carried.carry(state), metrics

    if index.shape[0] == 1:  # No loop at all: XLA:CPU runs a lone step faster outside one.
      carry, metrics = one(carry, (jnp.int32(0), jax.tree.map(lambda x: x[0], batches)))
      return carry, jax.tree.map(lambda m: m[None], metrics)
    steps = jnp.arange(index.shape[0], dtype=jnp.int32)
    return jax.lax.scan(one, carry, (steps, batches))

  return run


def fits_on_devices(nbytes: int, mesh: Mesh) -> bool:
  """Whether `nbytes` of features may stay on every local device of `mesh`: within a share of
  the smallest one's free memory (the host's available memory for a CPU device)."""
  free = []
  for device in mesh.local_devices:
    stats = device.memory_stats()  # None on a CPU.
    if stats and 'bytes_limit' in stats:
      free.append(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
    else:
      free.append(os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'))
  return nbytes * _MEMORY_SHARE <= min(free)


class CachedSteps:
  """Runs a cached phase's steps on device-resident features, several per dispatch.

  Args:
    train_step: the loop's unjitted step (`loop.train_step_for` with the cache's taps).
    features: the cache's training features, tap → [N, views, ...] (numpy or memory-mapped).
    labels: the training split's labels, [N] or [N, F], indexed like the features.
    carried: the leaves the step changes (`Carried.of`).
    mesh: the run's mesh; the features are replicated on it, batches split over it.
    dropout_rng: the run's dropout key; step s draws with fold_in(dropout_rng, s).
  """

  def __init__(
    self,
    train_step: Callable,
    features: Mapping[str, np.ndarray],
    labels: np.ndarray,
    carried: Carried,
    mesh: Mesh,
    dropout_rng: jax.Array,
    max_steps: int = MAX_STEPS,
  ):
    self.carried, self.mesh, self.dropout_rng = carried, mesh, dropout_rng
    self.max_steps = max_steps
    self.compiled: set[int] = set()  # Step counts compiled so far (one program each).
    self.views = next(iter(features.values())).shape[1]
    replicated = sharding.replicated(mesh)
    self.table = jax.device_put(
      ({h: np.asarray(f) for h, f in features.items()}, np.asarray(labels)), replicated
    )
    # Seconds a step, measured once (compile excluded) for one step a dispatch and for the first
    # larger count: the loop stays only if it is faster (on XLA:CPU, measured, a conv-heavy head
    # runs 2–3× slower inside a multi-step program; a small one 6× faster).
    self.seconds: dict[int, float] = {}
    self._timings: list[float] = []  # One-step dispatches: the fastest of a few counts.
    self._run = jax.jit(
      _steps_loop(train_step, carried, sharding.batch_sharding(mesh)),
      donate_argnums=0,
      out_shardings=(replicated, replicated),
    )

  def steps(self, due_in: int) -> int:
    """How many steps the next dispatch runs: up to the next step where the loop acts
    (`due_in`) and `max_steps`; one until one step's time is measured, then a power of two near
    `_DISPATCH_SECS` of device time (few counts: each compiles once)."""
    if 1 not in self.seconds:
      return 1
    fit = 2 ** int(np.log2(max(1.0, _DISPATCH_SECS / self.seconds[1])))
    return min(due_in, self.max_steps, fit)

  def __call__(
    self, state: TrainState, batches: Sequence[dict[str, np.ndarray]], step: int
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """Runs one step per batch (this process's block of each, read without images) from
    `step`; returns the new state and each metric stacked over the steps."""
    n = len(batches)
    index = np.stack([b['index'] for b in batches], axis=1).astype(np.int32)
    view = np.stack([b['flip'] for b in batches], axis=1).astype(np.int32)
    if self.views == 1:
      view = np.zeros_like(view)
    rows = sharding.shard_batch({'index': index, 'view': view}, self.mesh)
    carry, rest = self.carried.split(state)
    timed = n in self.compiled and n not in self.seconds and len(self.seconds) < 2
    start = time.perf_counter()
    carry, metrics = self._run(carry, rest, self.table, rows, np.int32(step), self.dropout_rng)
    self.compiled.add(n)
    if timed:
      jax.block_until_ready(carry)
      self._timings.append((time.perf_counter() - start) / n)
    if timed and (n > 1 or len(self._timings) == _ONE_STEP_TIMINGS):
      # Process 0's measurement decides for all: every process must dispatch the same steps.
      self.seconds[n] = float(distributed.share_text(repr(min(self._timings))))
      self._timings.clear()
      logging.info('Cached steps, %d a dispatch: %.2f ms a step.', n, 1e3 * self.seconds[n])
      if n > 1 and self.seconds[n] >= self.seconds[1]:
        self.max_steps = 1
        logging.info('Cached steps: one a dispatch, faster here than %d in a loop.', n)
    return self.carried.merge(carry, rest), metrics
