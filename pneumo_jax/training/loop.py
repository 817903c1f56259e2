"""train_and_evaluate: the one training loop (phases, logging, evaluation, checkpoints, resume).

Running it again on the same WORKDIR resumes from the latest checkpoint: same step, same phase,
same optimizer state, same next batch.
"""

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pneumo_jax import checkpoints, distributed, locks, scopes, sharding
from pneumo_jax.data import dataset_for, folder_builder, pipeline, preprocess
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import inference, metrics
from pneumo_jax.models import backbone_of, build_model
from pneumo_jax.training import feature_cache, interrupt, optim
from pneumo_jax.training.feature_cache import Cut
from pneumo_jax.training.monitor import Monitor, read_records
from pneumo_jax.training.step import TrainState, make_train_step

SUMMARY_FILE = 'summary.json'


class Phase(NamedTuple):
  """Steps (start, end] of the run, trained with `cfg` (the config with the phase's overrides)."""

  name: str
  start: int
  end: int
  cfg: ml_collections.ConfigDict


def resolve_phases(config: ml_collections.ConfigDict) -> list[Phase]:
  """config.phases (named, in order) → Phases; none → one phase from the top-level fields."""
  if not config.phases:
    return [Phase('main', 0, config.num_steps, config)]
  phases, start = [], 0
  for name, overrides in config.phases.items():
    if 'num_steps' not in overrides or overrides.num_steps <= 0:
      raise ConfigError(f'config.phases.{name}.num_steps must be a positive number of steps')
    cfg = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
      if key not in (
        'num_steps',
        'trainable_scopes',
        'batch_norm',
        'schedule',
        'optimizer',
        'feature_cache',
      ):
        raise ConfigError(
          f'config.phases.{name}.{key} is not a per-phase field; use num_steps, '
          'trainable_scopes, batch_norm, schedule, optimizer or feature_cache'
        )
      if isinstance(value, ml_collections.ConfigDict):
        cfg[key].update(value)
      else:
        cfg[key] = value
    phases.append(Phase(name, start, start + overrides.num_steps, cfg))
    start += overrides.num_steps
  return phases


def batch_norm_train(cfg: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The model's `batch_norm_train` for a phase, from `batch_norm`:

  'trainable' (default, the Keras rule): BN learns only inside the trainable scopes;
  'frozen': every BN runs in inference mode (Keras's advice once a pretrained base is unfrozen);
  'all': every BN normalises with batch statistics, as the seed's slim run did.
  """
  rule = cfg.batch_norm
  if rule == 'trainable':
    return scopes.parse(cfg.trainable_scopes)
  if rule == 'frozen':
    return ()
  if rule == 'all':
    return None
  raise ConfigError(f"config.batch_norm={rule!r} is unknown; use 'trainable', 'frozen' or 'all'")


def frozen_paths(variables: dict[str, Any], phases: list[Phase]) -> dict[str, set[str]]:
  """{'params', 'batch_stats'} → paths of the leaves no phase changes: params outside every
  phase's trainable scopes, moving statistics of the batch norms no phase trains. Checkpoints
  leave them out; they are kept once, in WORKDIR/base."""
  trained = {
    k
    for p in phases
    for k, t in scopes.flatten(scopes.mask(variables['params'], p.cfg.trainable_scopes)).items()
    if t
  }
  rules = [batch_norm_train(p.cfg) for p in phases]
  params = scopes.flatten(variables['params'])
  by_layer = collections.defaultdict(list)  # Layer path → its parameters' paths.
  for k in params:
    by_layer[k.rpartition('/')[0]].append(k)

  def learns(path: str) -> bool:
    """A batch norm's statistics at `P/<stat>` move when its rule matches a parameter under P/
    (every backbone decides by its own BN parameters' paths, e.g. `P/beta` or `P/bias`)."""
    own = by_layer.get(path.rpartition('/')[0])
    return not own or any(r is None or any(scopes.matches(r, k) for k in own) for r in rules)

  return {
    'params': set(params) - trained,
    'batch_stats': {k for k in scopes.flatten(variables['batch_stats']) if not learns(k)},
  }


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


def class_weights(cfg: ml_collections.ConfigDict, counts: np.ndarray) -> np.ndarray | None:
  """'balanced' → n / (k · count_c), scikit-learn's rule; '' → none."""
  if not cfg.class_weighting:
    return None
  if cfg.class_weighting != 'balanced':
    raise ConfigError(f"config.class_weighting={cfg.class_weighting!r}: use '' or 'balanced'")
  return counts.sum() / (len(counts) * np.maximum(counts, 1))


def _state_dict(state: TrainState) -> dict[str, Any]:
  d = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  return {k: v for k, v in d.items() if v is not None}


class _Run:
  """Everything train_and_evaluate shares between phases."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir
    self.lead = jax.process_index() == 0
    self.builder = dataset_for(config, workdir)
    self.names = folder_builder.label_names(self.builder)
    if self.lead:
      checkpoints.save_label_names(workdir, self.names)
    counts = {
      s: np.bincount(folder_builder.split_labels(self.builder, s), minlength=len(self.names))
      for s in self.builder.info.splits
    }
    for split, c in counts.items():
      logging.info(
        '%s: %d images, per class %s',
        split,
        c.sum(),
        ', '.join(f'{n}={k}' for n, k in zip(self.names, c, strict=True)),
      )
    self.class_weights = class_weights(config, counts['train'])
    self.mesh = sharding.make_mesh()
    self.backbone = backbone_of(config)
    self.eval_model = build_model(config, len(self.names))
    self.best_value: float | None = None
    self.best_step = 0
    self.evals_since_best = 0
    self.last_eval: dict[str, Any] = {}
    self.best_eval: dict[str, Any] = {}

  def recover_best(self, best_step: int | None, records: list[dict[str, Any]]) -> None:
    """On resume: the best so far and the evaluations since, from the logged validation records."""
    evals = [r for r in records if r['split'] == 'validation']
    for r in evals:
      if r['step'] == best_step:
        self.best_step, self.best_eval = best_step, {k: r[k] for k in metrics.HIGHER_IS_BETTER}
        self.best_value = self.best_eval[self.config.best_metric]
    if evals:
      self.last_eval = {k: evals[-1][k] for k in metrics.HIGHER_IS_BETTER}
      self.evals_since_best = sum(r['step'] > self.best_step for r in evals)

  def evaluate(
    self, state: TrainState, monitor: Monitor, cache: feature_cache.Cache | None
  ) -> dict[str, Any]:
    """Validation metrics of `state` (its EMA when kept), from the phase's cache if it has one."""
    variables = {
      'params': state.ema_params if state.ema_params is not None else state.params,
      'batch_stats': state.batch_stats,
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
    result = metrics.compute(out['label'], out['probs'], self.names)
    self.last_eval = {k: result[k] for k in metrics.HIGHER_IS_BETTER}
    monitor.write(int(state.step), 'validation', self.last_eval)
    return result


_ONE_SHOT = {'xla_backend_optimization_level': 0}  # XLA options for programs that run once.


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
    return _train(config, workdir, phases, cleanup)


def _finished(workdir: str, total: int) -> dict[str, Any] | None:
  """The summary of a run that ended (all steps or early stopping) with this many steps."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if summary.get('status') == 'done' and summary['num_steps'] == total else None


def _train(
  config: ml_collections.ConfigDict,
  workdir: str,
  phases: list[Phase],
  cleanup: contextlib.ExitStack,
) -> dict[str, Any]:
  t_start = time.time()
  distributed.check_shared(workdir, 'WORKDIR')
  run = _Run(config, workdir)  # Builds the dataset: a wrong source_dir fails before any write.
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  total = phases[-1].end

  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  size = config.input.image_size
  repl = sharding.replicated(run.mesh)
  init = jax.jit(
    lambda r: run.eval_model.init(r, jnp.zeros((1, size, size, 3)), train=False), out_shardings=repl
  )
  # Initialisation runs once: compiled without backend optimisation it takes half the time
  # (6.6 s against 13 s for InceptionV3 on 2 CPU cores) and runs in a second.
  variables = init.lower(init_rng).compile(compiler_options=_ONE_SHOT)(init_rng)
  variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}

  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints, cleanup=True)
  best_mngr = checkpoints.manager(workdir, checkpoints.BEST_DIR, keep=1, cleanup=True)
  step = mngr.latest_step() or 0
  cuts = {p.name: _cut(run, p, variables, workdir) for p in phases}
  stream = cleanup.enter_context(_Stream(run))  # Closing it stops grain's worker processes.
  train_iter = stream.get(
    isinstance(cuts[next((p for p in phases if step < p.end), phases[-1]).name], Cut)
  )
  if not step and not config.init_checkpoint:
    logging.warning(
      '*' * 70 + '\nNO PRETRAINED WEIGHTS: config.init_checkpoint is empty, so '
      f'{run.backbone.name} starts from RANDOM initialisation.\nFine-tuning needs ImageNet '
      'weights: see converters/ and the README.\n' + '*' * 70
    )

  def optimizer(phase: Phase):
    trainable = scopes.mask(variables['params'], phase.cfg.trainable_scopes)
    if not any(scopes.flatten(trainable).values()):
      raise ConfigError(
        f'trainable_scopes={phase.cfg.trainable_scopes!r} (phase {phase.name!r}) '
        'matches no parameter; patterns match parameter paths such as '
        f'{run.backbone.logits_bias!r} from their start'
      )
    schedule = optim.make_schedule(phase.cfg.schedule, phase.end - phase.start)
    return (
      trainable,
      schedule,
      optim.make_optimizer(phase.cfg.optimizer, schedule, trainable, run.backbone.weight_decay),
    )

  frozen = frozen_paths(variables, phases)
  ema_mask = scopes.unflatten(
    {k: k not in frozen['params'] for k in scopes.flatten(variables['params'])}
  )

  def fresh_ema(params):  # A copy: params and EMA are donated to the step separately.
    return jax.tree.map(jnp.copy, params) if config.ema_decay else None

  state = jax.device_put(  # On the mesh from the start, or the step compiles twice.
    TrainState(
      step=jnp.zeros([], jnp.int32),
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=None,
      ema_params=fresh_ema(variables['params']),
    ),
    repl,
  )
  if step:
    phase = next(p for p in phases if p.start < step <= p.end)
    target = _state_dict(state.replace(opt_state=optimizer(phase)[2].init(state.params)))
    restored, base = checkpoints.restore(mngr, step, target, train_iter)
    state, base = TrainState(**restored), base and base.within(frozen)
    logging.info('Resumed from %s at step %d (phase %r).', mngr.directory, step, phase.name)
  elif config.init_checkpoint:
    loaded = checkpoints.load_init(
      config.init_checkpoint,
      variables,
      config.exclude_scopes,
      config.ignore_missing_vars,
      workdir,
      run.backbone,
    )
    loaded = jax.device_put(loaded, repl)
    state = state.replace(
      params=loaded['params'],
      batch_stats=loaded['batch_stats'],
      ema_params=fresh_ema(loaded['params']),
    )
  if not step:
    base = checkpoints.write_base(workdir, _state_dict(state), frozen)
  monitor = Monitor(workdir, total, step, active=run.lead)
  run.recover_best(best_mngr.latest_step(), read_records(workdir))
  log = _TrainLog(monitor, mngr, config.input.batch_size)
  stopped_early = False
  with interrupt.StopOnSignal() as stop:

    def stop_if_asked(signum: int | None) -> None:
      """Ends the run at `step` when `signum` came (callers have saved everything up to it)."""
      if signum:
        mngr.wait_until_finished()
        best_mngr.wait_until_finished()
        monitor.close()
        raise interrupt.Stopped(step, signum)

    for phase in phases:
      if step >= phase.end or stopped_early:
        continue
      trainable, schedule, tx = optimizer(phase)
      if step == phase.start:
        state = state.replace(opt_state=jax.jit(tx.init, out_shardings=repl)(state.params))
      logging.info(
        'Phase %r: steps %d–%d, trainable %r, batch norm %r.',
        phase.name,
        phase.start,
        phase.end,
        phase.cfg.trainable_scopes,
        phase.cfg.batch_norm,
      )
      cut = cuts[phase.name]
      cached = isinstance(cut, Cut)
      model = build_model(
        config,
        len(run.names),
        batch_norm_train=batch_norm_train(phase.cfg),
        # A cached phase runs only the heads that train (a frozen aux head adds no gradient).
        **(
          {'create_aux_logits': run.backbone.aux_logits in _trained_scopes(trainable)}
          if cached and run.backbone.aux_logits
          else {}
        ),
      )
      cache = None
      if cached:
        cache = feature_cache.load_or_build(
          workdir,
          run.builder,
          phase.cfg,
          run.backbone,
          model,
          {'params': state.params, 'batch_stats': state.batch_stats},
          cut,
          run.mesh,
          # Nothing changed since the last checkpoint (or the start): a signal stops the build.
          interrupted=lambda: stop_if_asked(stop.agreed()),
        )
      else:
        logging.info(
          'Phase %r runs the whole network: no feature cache, as %s.',
          phase.name,
          cut,
        )
      train_iter = stream.get(cached)
      train_step = jax.jit(
        train_step_for(
          config,
          model,
          tx,
          trainable,
          class_weights=run.class_weights,
          ema_mask=ema_mask,
          feature_taps=cache.taps if cache else None,
        ),
        in_shardings=(repl, None, repl),  # Batches arrive on the mesh (pipeline's `put`).
        out_shardings=(repl, repl),
        donate_argnums=0,
      )
      t_ckpt = time.time()
      while step < phase.end:
        batch = next(train_iter)
        if cache:
          batch = sharding.shard_batch(cache.train_batch(batch), run.mesh)
        elif step == 0 and run.lead:
          monitor.image_grid(
            _first_images(batch, size), sharding.local_rows(batch['label'])[:16], run.names
          )
        state, m = train_step(state, batch, jax.random.fold_in(dropout_rng, step))
        step += 1
        log.add(m)
        last = step == phase.end
        now = time.time()
        if (
          last
          or _due(step, config.log_every_steps)
          or (config.log_every_secs and now - log.since >= config.log_every_secs)
        ):
          log.flush(step, float(schedule(step - phase.start)))
        if last or _due(step, config.eval_every_steps):
          log.flush(step, float(schedule(step - phase.start)))
          stopped_early = _evaluate_and_keep_best(run, state, monitor, best_mngr, base, cache)
        asked = stop.agreed()
        if (
          last
          or stopped_early
          or asked
          or _due(step, config.checkpoint_every_steps)
          or (config.checkpoint_every_secs and now - t_ckpt >= config.checkpoint_every_secs)
        ):
          log.flush(step, float(schedule(step - phase.start)))
          checkpoints.save(mngr, step, _state_dict(state), train_iter, base)
          t_ckpt = now
        stop_if_asked(asked)  # Saved just above, with the data iterator: resume loses nothing.
        if stopped_early:
          logging.info(
            'Early stopping at step %d: no %s improvement in %d evaluations.',
            step,
            config.best_metric,
            config.early_stopping_patience,
          )
          break
  mngr.wait_until_finished()
  best_mngr.wait_until_finished()
  monitor.close()
  summary = {
    'status': 'done',
    'step': step,
    'num_steps': total,
    'wall_time_s': time.time() - t_start,
    'metric': config.best_metric,
    'final': run.last_eval,
    'best': run.best_eval,
    'best_step': run.best_step,
    'stopped_early': stopped_early,
  }
  if run.lead:
    with open(os.path.join(workdir, SUMMARY_FILE), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary


class _Stream:
  """The training batches, read with images (put on the mesh in the background) or, in a cached
  phase, as record indices and views; switching kinds carries the position over, so the phases
  read one stream, and a checkpoint resumes it in either kind."""

  def __init__(self, run: _Run):
    self.run = run
    self.it: Any = None
    self.cached: bool | None = None

  def get(self, cached: bool) -> Any:
    if self.it is not None and cached == self.cached:
      return self.it
    new = pipeline.train_iterator(
      self.run.builder,
      self.run.config.input,
      seed=self.run.config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      read_images=not cached,
      put=None if cached else functools.partial(sharding.shard_batch, mesh=self.run.mesh),
    )
    if self.it is not None:
      new.set_state(self.it.get_state())
      self.it.close()
    self.it, self.cached = new, cached
    return new

  def __enter__(self) -> '_Stream':
    return self

  def __exit__(self, *exc: Any) -> None:
    if self.it is not None:
      self.it.close()


def _trained_scopes(trainable: Any) -> set[str]:
  return {k.split('/')[0] for k, t in scopes.flatten(trainable).items() if t}


def _cut(run: _Run, phase: Phase, variables: dict[str, Any], workdir: str) -> Cut | str:
  """Where `phase` trains from a feature cache, else why it does not."""
  trainable = scopes.flatten(scopes.mask(variables['params'], phase.cfg.trainable_scopes))
  cut = feature_cache.plan(phase.cfg, run.backbone, [k for k, t in trainable.items() if t])
  if isinstance(cut, str):
    return cut
  # Process 0's disk decides for all: every process must train the phase the same way.
  full = feature_cache.room(workdir, run.builder, phase.cfg, cut, run.eval_model, variables)
  return distributed.share_text(full or '') or cut


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


class _TrainLog:
  """Collects per-step metrics on device; fetches them only when logging (keeps steps async)."""

  def __init__(self, monitor: Monitor, mngr: Any, batch_size: int):
    self.monitor, self.mngr, self.batch_size = monitor, mngr, batch_size
    self.pending: list[dict[str, jax.Array]] = []
    self.since = time.time()

  def add(self, step_metrics: dict[str, jax.Array]) -> None:
    self.pending.append(step_metrics)

  def flush(self, step: int, learning_rate: float) -> None:
    """Logs the mean since the last flush; stops on a non-finite loss before anything is saved."""
    if not self.pending:
      return
    got = jax.device_get(self.pending)
    for i, m in enumerate(got):
      if not math.isfinite(float(m['total_loss'])):
        self.mngr.wait_until_finished()
        raise FloatingPointError(
          f'loss is {float(m["total_loss"])} at step {step - len(got) + i + 1}: training '
          f'stopped. The last good checkpoint is step {self.mngr.latest_step()} in '
          f'{self.mngr.directory}; lower the learning rate or set optimizer.grad_clip_norm.'
        )
    now = time.time()
    scalars = {k: float(np.mean([m[k] for m in got])) for k in got[0]}
    scalars['learning_rate'] = learning_rate
    scalars['images_per_s'] = len(got) * self.batch_size / max(now - self.since, 1e-9)
    self.monitor.write(step, 'train', scalars)
    self.pending.clear()
    self.since = now


def _due(step: int, every: int) -> bool:
  return bool(every) and step % every == 0


def _evaluate_and_keep_best(
  run: _Run,
  state: TrainState,
  monitor: Monitor,
  best_mngr: Any,
  base: checkpoints.Base | None,
  cache: feature_cache.Cache | None,
) -> bool:
  """Evaluates on validation, saves a new best; True when early stopping should end the run."""
  config = run.config
  run.evaluate(state, monitor, cache)
  value = run.last_eval[config.best_metric]
  if run.best_value is None or metrics.better(config.best_metric, value, run.best_value):
    run.best_value, run.best_step, run.best_eval = value, int(state.step), dict(run.last_eval)
    run.evals_since_best = 0
    checkpoints.save(best_mngr, int(state.step), _state_dict(state), base=base)
  else:
    run.evals_since_best += 1
  patience = config.early_stopping_patience
  return bool(patience) and run.evals_since_best >= patience
