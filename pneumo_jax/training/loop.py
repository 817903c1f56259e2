"""train_and_evaluate: the training loop, in named stages.

`train_and_evaluate` holds WORKDIR's lock and returns a finished run's summary at once; otherwise
a `_Training` owns the run. It sets up the dataset and the state (resumed, pretrained or fresh),
decides which phases train from a feature cache, then trains phase by phase: `_start_phase`
builds the phase's optimizer, model, cache and step, `_run_phase` runs the steps, and after each
`_after_step` does what `due` says is due (log, evaluate and keep the best, checkpoint, stop on
a signal). Running it again on the same WORKDIR resumes from the newest checkpoint that
restores: same step, phase, optimizer state and next batch.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
from absl import logging
from jax.sharding import Mesh

import pneumo_jax
from pneumo_jax import checkpoints, distributed, locks, scopes, sharding
from pneumo_jax.data import dataset_for, folder_builder, pipeline, preprocess
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import inference, metrics
from pneumo_jax.models import backbone_of, build_model
from pneumo_jax.training import cached_steps, feature_cache, interrupt, optim
from pneumo_jax.training.monitor import Monitor, read_records
from pneumo_jax.training.phases import (
  Phase,
  batch_norm_train,
  class_weights,
  frozen_paths,
  phase_at,
  resolve_phases,
  trained_paths,
)
from pneumo_jax.training.step import TrainState, make_train_step

SUMMARY_FILE = 'summary.json'
# XLA options for a program that runs once (initialisation): without backend optimisation it
# compiles in about half the time and still runs in a second.
_RUN_ONCE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def due(step: int, every: int) -> bool:
  """Whether an action done every `every` steps (0: never) is due after step `step`: the one
  rule of the loop's periodic actions, as big_vision's `itstime`."""
  return bool(every) and step % every == 0


def train_step_for(
  config: ml_collections.ConfigDict,
  model: Any,
  tx: Any,
  trainable: Any,
  *,
  class_weights: np.ndarray | None = None,
  ema_mask: Any = None,
  feature_taps: Mapping[str, str] | None = None,
) -> Callable:
  """The loop's (unjitted) train step for `model`, with the config's loss, EMA and input size
  and its backbone's aux head; `feature_taps`: a feature cache's (`Cache.taps`), for batches of
  cached features. Benchmarks time this same step."""
  backbone = backbone_of(config)
  return make_train_step(
    model,
    tx,
    trainable,
    aux_loss_weight=config.aux_loss_weight,
    label_smoothing=config.label_smoothing,
    class_weights=class_weights,
    ema_decay=config.ema_decay,
    ema_mask=ema_mask,
    aux_logits=backbone.aux_logits,
    image_size=config.input.image_size,
    feature_taps=feature_taps,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns the summary.

  Holds the workdir's lock throughout, so a second run on it stops at once (locks.BusyError). A
  run that already finished returns its summary before touching anything else. The first
  SIGINT/SIGTERM during training saves a checkpoint after the current step and raises
  interrupt.Stopped.
  """
  phases = resolve_phases(config)
  with locks.workdir_lock(workdir), contextlib.ExitStack() as cleanup:
    summary = _finished(workdir, phases[-1].end)
    if summary:
      logging.info('%s already finished (%d steps).', workdir, summary['step'])
      return summary
    return _Training(config, workdir, phases, cleanup).run()


def _finished(workdir: str, total: int) -> dict[str, Any] | None:
  """The summary of a run that ended (all steps or early stopping) with this many steps."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get('status') == 'done' and summary['num_steps'] == total else None


def _state_dict(state: TrainState) -> dict[str, Any]:
  d = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  return {k: v for k, v in d.items() if v is not None}


class _PhaseOptimizer(NamedTuple):
  """A phase's optimizer: which parameters it trains (a boolean tree), its learning-rate
  schedule over the phase's own steps, and the optax transformation."""

  trainable: Any
  schedule: optax.Schedule
  tx: optax.GradientTransformation


class _PhaseSetup(NamedTuple):
  """What a phase trains with: its optimizer, its feature cache (None: the whole network runs),
  the jitted step, the training batches of the cache's kind, when the cache's training
  features fit on the devices the steps that run there several a dispatch (else None: one
  step a dispatch, batches gathered on the host), and the cache validation reads (None: the
  whole network runs)."""

  optimizer: _PhaseOptimizer
  cache: feature_cache.Cache | None
  train_step: Callable
  batches: Iterator[dict[str, Any]]
  resident: cached_steps.CachedSteps | None
  validation_cache: feature_cache.Cache | None


@dataclasses.dataclass
class _BestSoFar:
  """The validation results so far: the latest, the best by `metric` and its step, and the
  evaluations since the best (early stopping counts them)."""

  metric: str
  value: float | None = None
  step: int = 0
  best: dict[str, Any] = dataclasses.field(default_factory=dict)
  last: dict[str, Any] = dataclasses.field(default_factory=dict)
  evals_since: int = 0

  def recover(self, best_step: int | None, records: list[dict[str, Any]]) -> None:
    """On resume: the best (the checkpoint at `best_step`) and the evaluations since, from the
    logged validation records."""
    evals = [r for r in records if r['split'] == 'validation']
    for r in evals:
      if r['step'] == best_step:
        self.step, self.best = best_step, {k: r[k] for k in metrics.HIGHER_IS_BETTER}
        self.value = self.best[self.metric]
    if evals:
      self.last = {k: evals[-1][k] for k in metrics.HIGHER_IS_BETTER}
      self.evals_since = sum(r['step'] > self.step for r in evals)

  def add(self, step: int, result: Mapping[str, Any]) -> bool:
    """Records the evaluation of `step`; True when it is a new best (the first always is)."""
    self.last = {k: result[k] for k in metrics.HIGHER_IS_BETTER}
    value = self.last[self.metric]
    if self.value is not None and not metrics.better(self.metric, value, self.value):
      self.evals_since += 1
      return False
    self.value, self.step, self.best, self.evals_since = value, step, dict(self.last), 0
    return True


class _Training:
  """One run in WORKDIR: its dataset, model state and step, checkpoints, log and best so far.
  Only its own stages change them."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    phases: list[Phase],
    cleanup: contextlib.ExitStack,
  ):
    self.started = time.time()
    distributed.check_shared(workdir, 'WORKDIR')
    self.config, self.workdir, self.phases = config, workdir, phases
    self.lead = jax.process_index() == 0
    self.builder = dataset_for(config, workdir)  # A wrong source_dir fails before any write.
    self.names = folder_builder.label_names(self.builder)
    if self.lead:
      checkpoints.save_label_names(workdir, self.names)
    _log_label_counts(self.builder, self.names)
    train_labels = folder_builder.split_labels(self.builder, 'train')
    self.class_weights = class_weights(config, train_labels, num_classes=len(self.names))
    self.mesh = sharding.make_mesh()
    self.replicated = sharding.replicated(self.mesh)
    self.backbone = backbone_of(config)
    self.eval_model = build_model(config, len(self.names))
    if self.lead:
      with open(os.path.join(workdir, checkpoints.CONFIG_FILE), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
    self.init_rng, self.dropout_rng = jax.random.split(jax.random.key(config.seed))
    self.latest = checkpoints.manager(workdir, keep=config.keep_checkpoints, cleanup=True)
    self.best_checkpoints = checkpoints.manager(workdir, checkpoints.BEST_DIR, keep=1, cleanup=True)
    self.best = _BestSoFar(config.best_metric)
    # Closing the batches stops grain's worker processes.
    self.batches = cleanup.enter_context(_TrainBatches(self.builder, config, self.mesh))
    self.step = 0
    self.checkpointed_at = self.started

  def run(self) -> dict[str, Any]:
    """Sets up, trains every phase not yet done, and returns the summary (written by process 0)."""
    variables = self._initial_variables()
    self.step = self.latest.latest_step() or 0
    decisions = {p.name: self._cache_decision(p, variables) for p in self.phases}
    self.batches.reading(cached=decisions[phase_at(self.phases, self.step).name].cached)
    self._restore_or_start(variables)
    self.monitor = Monitor(self.workdir, self.phases[-1].end, self.step, active=self.lead)
    self.best.recover(self.best_checkpoints.latest_step(), read_records(self.workdir))
    self.log = _TrainLog(self.monitor, self.latest, self.config)
    stopped_early = False
    with interrupt.StopOnSignal() as self.stop:
      for phase in self.phases:
        if self.step < phase.end and not stopped_early:
          stopped_early = self._run_phase(phase, decisions[phase.name])
    self._close()
    return self._summary(stopped_early)

  # Set-up.

  def _initial_variables(self) -> dict[str, Any]:
    """{'params', 'batch_stats'} of a fresh model, on the mesh."""
    size = self.config.input.image_size
    init = jax.jit(
      lambda r: self.eval_model.init(r, jnp.zeros((1, size, size, 3)), train=False),
      out_shardings=self.replicated,
    )
    compiled = init.lower(self.init_rng).compile(compiler_options=_RUN_ONCE_COMPILER_OPTIONS)
    variables = compiled(self.init_rng)
    return {'params': variables['params'], 'batch_stats': variables['batch_stats']}

  def _restore_or_start(self, variables: dict[str, Any]) -> None:
    """Sets `state` and `base` (where the leaves no phase changes are kept): from the newest
    checkpoint that restores (damaged ones set aside), else from config.init_checkpoint or
    `variables`, writing base/."""
    config = self.config
    if not self.step and not config.init_checkpoint:
      logging.warning(
        '*' * 70 + '\nNO PRETRAINED WEIGHTS: config.init_checkpoint is empty, so '
        f'{self.backbone.name} starts from RANDOM initialisation.\nFine-tuning needs ImageNet '
        'weights: see converters/ and the README.\n' + '*' * 70
      )
    frozen = frozen_paths(variables, self.phases)
    self.ema_mask = scopes.unflatten(
      {k: k not in frozen['params'] for k in scopes.flatten(variables['params'])}
    )
    self.state = jax.device_put(  # On the mesh from the start, or the step compiles twice.
      TrainState(
        step=jnp.zeros([], jnp.int32),
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=None,
        ema_params=self._fresh_ema(variables['params']),
      ),
      self.replicated,
    )
    while self.step:
      if self._resumed(frozen):
        return
    if config.init_checkpoint:
      loaded = checkpoints.load_init(
        config.init_checkpoint,
        variables,
        config.exclude_scopes,
        config.ignore_missing_vars,
        self.workdir,
        self.backbone,
      )
      loaded = jax.device_put(loaded, self.replicated)
      self.state = self.state.replace(
        params=loaded['params'],
        batch_stats=loaded['batch_stats'],
        ema_params=self._fresh_ema(loaded['params']),
      )
    self.base = checkpoints.write_base(self.workdir, _state_dict(self.state), frozen)

  def _resumed(self, frozen: dict[str, set[str]]) -> bool:
    """Restores checkpoint `step`; when it is damaged, sets it aside, moves `step` to the next
    newest (0: none) and returns False."""
    phase = next(p for p in self.phases if p.start < self.step <= p.end)
    opt_state = self._optimizer(phase).tx.init(self.state.params)
    target = _state_dict(self.state.replace(opt_state=opt_state))
    try:
      restored, base = checkpoints.restore(self.latest, self.step, target, self.batches.current)
    except checkpoints.DamagedCheckpointError as e:
      moved = checkpoints.set_aside(self.latest, self.step)
      self.step = self.latest.latest_step() or 0
      logging.warning(
        '%s. Moved it to %s for inspection; resuming from %s.',
        e,
        moved,
        f'step {self.step}' if self.step else 'the start (no other checkpoint)',
      )
      return False
    self.state, self.base = TrainState(**restored), base and base.within(frozen)
    logging.info(
      'Resumed from %s at step %d (phase %r).', self.latest.directory, self.step, phase.name
    )
    return True

  def _fresh_ema(self, params: Any) -> Any:
    """A copy of `params` (params and EMA are donated to the step separately); None: no EMA."""
    return jax.tree.map(jnp.copy, params) if self.config.ema_decay else None

  def _optimizer(self, phase: Phase) -> _PhaseOptimizer:
    trainable = scopes.mask(self.state.params, phase.cfg.trainable_scopes)
    if not any(scopes.flatten(trainable).values()):
      raise ConfigError(
        f'trainable_scopes={phase.cfg.trainable_scopes!r} (phase {phase.name!r}) '
        'matches no parameter; patterns match parameter paths such as '
        f'{self.backbone.logits_bias!r} from their start'
      )
    schedule = optim.make_schedule(phase.cfg.schedule, phase.end - phase.start)
    tx = optim.make_optimizer(phase.cfg.optimizer, schedule, trainable, self.backbone.weight_decay)
    return _PhaseOptimizer(trainable, schedule, tx)

  # The cache decision.

  def _cache_decision(self, phase: Phase, variables: dict[str, Any]) -> feature_cache.Decision:
    """Whether `phase` trains from a feature cache: the config's plan, when its cache fits on
    disk. Process 0's disk decides for all: every process must train the phase the same way."""
    trainable = scopes.flatten(scopes.mask(variables['params'], phase.cfg.trainable_scopes))
    decision = feature_cache.plan(phase.cfg, self.backbone, [k for k, t in trainable.items() if t])
    if not decision.cached:
      return decision
    shortfall = feature_cache.disk_shortfall(
      self.workdir, self.builder, phase.cfg, decision.cut, self.eval_model, variables
    )
    shortfall = distributed.share_text(shortfall or '')
    return feature_cache.Decision(None, shortfall) if shortfall else decision

  # One phase.

  def _run_phase(self, phase: Phase, decision: feature_cache.Decision) -> bool:
    """Trains `phase` from `step` to its end; True when early stopping ended the run."""
    setup = self._start_phase(phase, decision)
    self.checkpointed_at = time.time()
    while self.step < phase.end:
      if setup.resident:
        self._train_resident_steps(phase, setup)
      else:
        self._train_one_step(setup)
      if self._after_step(phase, setup):
        return True
    return False

  def _start_phase(self, phase: Phase, decision: feature_cache.Decision) -> _PhaseSetup:
    """The phase's optimizer (its state fresh when the phase starts now), model, cache, step
    and batches."""
    optimizer = self._optimizer(phase)
    if self.step == phase.start:
      init = jax.jit(optimizer.tx.init, out_shardings=self.replicated)
      self.state = self.state.replace(opt_state=init(self.state.params))
    logging.info(
      'Phase %r: steps %d–%d, trainable %r, batch norm %r.',
      phase.name,
      phase.start,
      phase.end,
      phase.cfg.trainable_scopes,
      phase.cfg.batch_norm,
    )
    model = self._phase_model(phase, decision.cached, optimizer.trainable)
    cache = self._phase_cache(phase, decision, model)
    train_step = train_step_for(
      self.config,
      model,
      optimizer.tx,
      optimizer.trainable,
      class_weights=self.class_weights,
      ema_mask=self.ema_mask,
      feature_taps=cache.taps if cache else None,
    )
    jitted = jax.jit(
      train_step,
      in_shardings=(self.replicated, None, self.replicated),  # Batches come on the mesh.
      out_shardings=(self.replicated, self.replicated),
      donate_argnums=0,
    )
    batches = self.batches.reading(cached=cache is not None)
    resident = cache and self._resident_steps(phase, cache, train_step, optimizer.trainable)
    validation = cache and self._validation_cache(phase, decision, cache)
    return _PhaseSetup(optimizer, cache, jitted, batches, resident or None, validation or None)

  def _validation_cache(
    self, phase: Phase, decision: feature_cache.Decision, cache: feature_cache.Cache
  ) -> feature_cache.Cache | None:
    """The phase's cache, unless validation scores an EMA that differs from the weights that
    made the cache's features: when an earlier phase trained a layer below the cut."""
    if self.state.ema_params is None:
      return cache
    earlier = [p for p in self.phases if p.end <= phase.start]
    trained = {
      k for k in trained_paths(self.state.params, earlier) if k.split('/')[0] in decision.cut.frozen
    }
    if not trained:
      return cache
    logging.info(
      'Phase %r validates through the whole network: the EMA of %s, which an earlier phase '
      'trained, differs from the weights its feature cache was built with.',
      phase.name,
      min(trained),
    )
    return None

  def _resident_steps(
    self, phase: Phase, cache: feature_cache.Cache, train_step: Callable, trainable: Any
  ) -> cached_steps.CachedSteps | None:
    """The phase's steps on device-resident features, if its training features fit there
    (process 0's devices decide for all: every process must step the same way)."""
    nbytes = sum(f.nbytes for f in cache.train.values())
    if not distributed.share_flag(cached_steps.fits_on_devices(nbytes, self.mesh)):
      logging.info(
        'Phase %r gathers its batches on the host: its %.1f GB of features would not fit on '
        'the devices.',
        phase.name,
        nbytes / 1e9,
      )
      return None
    return cached_steps.CachedSteps(
      train_step,
      cache.train,
      folder_builder.split_labels(self.builder, 'train'),
      cached_steps.Carried.of(self.state, trainable, self.ema_mask),
      self.mesh,
      self.dropout_rng,
    )

  def _phase_model(self, phase: Phase, cached: bool, trainable: Any) -> nn.Module:
    """The phase's training model, with its batch-norm rule; a cached phase runs only the heads
    that train (a frozen aux head adds no gradient)."""
    aux = self.backbone.aux_logits
    heads = {'create_aux_logits': aux in _trained_scopes(trainable)} if cached and aux else {}
    return build_model(
      self.config, len(self.names), batch_norm_train=batch_norm_train(phase.cfg), **heads
    )

  def _phase_cache(
    self, phase: Phase, decision: feature_cache.Decision, model: nn.Module
  ) -> feature_cache.Cache | None:
    if not decision.cached:
      logging.info(
        'Phase %r runs the whole network: no feature cache, as %s.', phase.name, decision.reason
      )
      return None
    return feature_cache.load_or_build(
      self.workdir,
      self.builder,
      phase.cfg,
      self.backbone,
      model,
      {'params': self.state.params, 'batch_stats': self.state.batch_stats},
      decision.cut,
      self.mesh,
      # Nothing changed since the last checkpoint (or the start): a signal stops the build.
      interrupted=lambda: self._stop_if_asked(self.stop.agreed()),
    )

  # The step loop.

  def _train_one_step(self, setup: _PhaseSetup) -> None:
    batch = next(setup.batches)
    if self.step == 0 and self.lead:
      self._image_grid(batch)
    if setup.cache:
      batch = sharding.shard_batch(setup.cache.train_batch(batch), self.mesh)
    rng = jax.random.fold_in(self.dropout_rng, self.step)
    self.state, step_metrics = setup.train_step(self.state, batch, rng)
    self.step += 1
    self.log.add(step_metrics)

  def _train_resident_steps(self, phase: Phase, setup: _PhaseSetup) -> None:
    """Steps up to the next one after which `_after_step` acts by count (log, evaluate, save,
    the phase's end), in one dispatch (at most `setup.resident.steps` allows). Actions due by
    time, and signals, wait for the dispatch's end."""
    config, every = self.config, (self.log.every_steps,)
    every += (config.eval_every_steps, config.checkpoint_every_steps)
    next_due = min([phase.end, *((self.step // e + 1) * e for e in every if e)])
    batches = [next(setup.batches) for _ in range(setup.resident.steps(next_due - self.step))]
    if self.step == 0 and self.lead:
      self._image_grid(batches[0])
    self.state, stacked = setup.resident(self.state, batches, self.step)
    self.step += len(batches)
    self.log.add(stacked, steps=len(batches))

  def _image_grid(self, batch: dict[str, Any]) -> None:
    """The run's first batch as the net sees it (train_images.png): from its images, or, read
    without them in a cached phase, its records in the views the cache build used."""
    if 'index' in batch:
      index, flip = batch['index'][:16], batch['flip'][:16]
      images = pipeline.view_images(self.builder, self.config.input, index, flip)
      labels = batch['label'][:16]
    else:
      images = _first_images(batch, self.config.input.image_size)
      labels = sharding.local_rows(batch['label'])[:16]
    self.monitor.image_grid(images, labels, self.names)

  def _after_step(self, phase: Phase, setup: _PhaseSetup) -> bool:
    """The periodic actions due now, in order: log, evaluate and keep the best, checkpoint, stop
    on a signal. The metrics are logged (once) before anything else, so a non-finite loss stops
    the run before it is evaluated or saved. True when early stopping ends the run."""
    step, now, config = self.step, time.time(), self.config
    last = step == phase.end
    evaluate = last or due(step, config.eval_every_steps)
    save = (
      last
      or due(step, config.checkpoint_every_steps)
      or _elapsed(self.checkpointed_at, now, config.checkpoint_every_secs)
    )
    logged = evaluate or save or self.log.due(step, now)
    if logged:
      self.log.flush(step, float(setup.optimizer.schedule(step - phase.start)))
    stopped_early = evaluate and self._evaluate_and_keep_best(setup.validation_cache)
    signum = self.stop.agreed()  # After the actions above: a signal during them counts now.
    if save or stopped_early or signum:
      if not logged:
        self.log.flush(step, float(setup.optimizer.schedule(step - phase.start)))
      checkpoints.save(self.latest, step, _state_dict(self.state), setup.batches, self.base)
      self.checkpointed_at = now
    self._stop_if_asked(signum)  # Saved just above, with the data iterator: resume loses nothing.
    if stopped_early:
      logging.info(
        'Early stopping at step %d: no %s improvement in %d evaluations.',
        step,
        config.best_metric,
        config.early_stopping_patience,
      )
    return stopped_early

  def _evaluate_and_keep_best(self, cache: feature_cache.Cache | None) -> bool:
    """Evaluates on validation, saves a new best; True when early stopping should end the run."""
    improved = self.best.add(self.step, self._evaluate(cache))
    self.monitor.write(self.step, 'validation', self.best.last)
    if improved:
      if self.step in self.best_checkpoints.all_steps():
        # Saved before this run resumed from an earlier checkpoint (a damaged one set aside, or a
        # stop between the two saves); the resumed run recomputes the same state.
        self.best_checkpoints.delete(self.step)
      checkpoints.save(self.best_checkpoints, self.step, _state_dict(self.state), base=self.base)
    patience = self.config.early_stopping_patience
    return bool(patience) and self.best.evals_since >= patience

  def _evaluate(self, cache: feature_cache.Cache | None) -> dict[str, Any]:
    """Validation metrics of the state (its EMA when kept), from the phase's cache if it has one."""
    variables = {
      'params': self.state.ema_params if self.state.ema_params is not None else self.state.params,
      'batch_stats': self.state.batch_stats,
    }
    if cache:
      labels = folder_builder.split_labels(self.builder, 'validation')
      batches = cache.validation_batches(
        labels, sharding.round_up(self.config.input.eval_batch_size)
      )
    else:
      batches = pipeline.eval_batches(
        self.builder,
        'validation',
        self.config.input,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        put=inference.put_inputs(self.mesh),
      )
    out = inference.predict(
      self.eval_model,
      variables,
      batches,
      self.mesh,
      image_size=self.config.input.image_size,
      feature_taps=cache.taps if cache else None,
    )
    return metrics.compute(out['label'], out['probs'], self.names)

  # The end.

  def _stop_if_asked(self, signum: int | None) -> None:
    """Ends the run at `step` when `signum` came (callers have saved everything up to it)."""
    if signum:
      self._close()
      raise interrupt.Stopped(self.step, signum)

  def _close(self) -> None:
    self.latest.wait_until_finished()
    self.best_checkpoints.wait_until_finished()
    self.monitor.close()

  def _summary(self, stopped_early: bool) -> dict[str, Any]:
    summary = {
      'status': 'done',
      'step': self.step,
      'num_steps': self.phases[-1].end,
      'wall_time_s': time.time() - self.started,
      'metric': self.config.best_metric,
      'final': self.best.last,
      'best': self.best.best,
      'best_step': self.best.step,
      'stopped_early': stopped_early,
      'pneumo_jax_version': pneumo_jax.__version__,
    }
    if self.lead:
      with open(os.path.join(self.workdir, SUMMARY_FILE), 'w') as f:
        json.dump(summary, f, indent=2)
    return summary


class _TrainBatches:
  """The run's one stream of training batches, read with images (put on the mesh in the
  background) or, in a cached phase, as record indices and views. Switching kinds carries the
  position over, so the phases read one stream, and a checkpoint resumes it in either kind."""

  def __init__(
    self, builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict, mesh: Mesh
  ):
    self.builder, self.config, self.mesh = builder, config, mesh
    self.current: Any = None
    self.cached: bool | None = None

  def reading(self, cached: bool) -> Any:
    """The stream, of the kind a cached (or uncached) phase reads."""
    if self.current is not None and cached == self.cached:
      return self.current
    new = pipeline.train_iterator(
      self.builder,
      self.config.input,
      seed=self.config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      read_images=not cached,
      put=None if cached else functools.partial(sharding.shard_batch, mesh=self.mesh),
    )
    if self.current is not None:
      new.set_state(self.current.get_state())
      self.current.close()
    self.current, self.cached = new, cached
    return new

  def __enter__(self) -> '_TrainBatches':
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.current is not None:
      self.current.close()


class _TrainLog:
  """Collects per-step metrics on device; fetches them only when logging (keeps steps async)."""

  def __init__(
    self, monitor: Monitor, latest: ocp.CheckpointManager, config: ml_collections.ConfigDict
  ):
    self.monitor, self.latest = monitor, latest
    self.batch_size = config.input.batch_size
    self.every_steps, self.every_secs = config.log_every_steps, config.log_every_secs
    self.pending: list[tuple[dict[str, jax.Array], int | None]] = []
    self.since = time.time()

  def add(self, step_metrics: dict[str, jax.Array], steps: int | None = None) -> None:
    """One step's metrics, or (`steps` given) several steps' stacked along a first axis (the
    first `steps` entries count)."""
    self.pending.append((step_metrics, steps))

  def due(self, step: int, now: float) -> bool:
    return due(step, self.every_steps) or _elapsed(self.since, now, self.every_secs)

  def flush(self, step: int, learning_rate: float) -> None:
    """Logs the mean since the last flush; stops on a non-finite loss before anything is saved."""
    if not self.pending:
      return
    got = []
    for m, steps in jax.device_get(self.pending):
      got += [m] if steps is None else [{k: v[i] for k, v in m.items()} for i in range(steps)]
    for i, m in enumerate(got):
      if not math.isfinite(float(m['total_loss'])):
        self.latest.wait_until_finished()
        raise FloatingPointError(
          f'loss is {float(m["total_loss"])} at step {step - len(got) + i + 1}: training '
          f'stopped. The last good checkpoint is step {self.latest.latest_step()} in '
          f'{self.latest.directory}; lower the learning rate or set optimizer.grad_clip_norm.'
        )
    now = time.time()
    scalars = {k: float(np.mean([m[k] for m in got])) for k in got[0]}
    scalars['learning_rate'] = learning_rate
    scalars['images_per_s'] = len(got) * self.batch_size / max(now - self.since, 1e-9)
    self.monitor.write(step, 'train', scalars)
    self.pending.clear()
    self.since = now


def _elapsed(since: float, now: float, every_secs: float) -> bool:
  """Whether an action done every `every_secs` seconds (0: never) is due, last done at `since`."""
  return bool(every_secs) and now - since >= every_secs


def _log_label_counts(builder: tfds.core.DatasetBuilder, names: list[str]) -> None:
  """Logs each split's images per class, or per finding how many are present, absent, ignored."""
  for split, c in folder_builder.label_counts(builder).items():
    if c.ndim == 2:
      per = ', '.join(f'{n}={"/".join(map(str, k))}' for n, k in zip(names, c, strict=True))
      logging.info('%s: %d images, per finding present/absent/ignored %s', split, c[0].sum(), per)
    else:
      per = ', '.join(f'{n}={k}' for n, k in zip(names, c, strict=True))
      logging.info('%s: %d images, per class %s', split, c.sum(), per)


def _trained_scopes(trainable: Any) -> set[str]:
  return {k.split('/')[0] for k, t in scopes.flatten(trainable).items() if t}


def _first_images(batch: dict[str, Any], size: int) -> np.ndarray:
  """Up to 16 of this process's images of a batch as the net sees them (the numpy reference of
  the device's augmentation), for the first batch's image grid."""
  host = {k: sharding.local_rows(v)[:16] for k, v in batch.items() if k != 'label'}
  return np.stack(
    [
      preprocess.apply(host['image'][i], {k: host[k][i] for k in ('box', 'flip', 'colour')}, size)
      for i in range(len(host['image']))
    ]
  )
