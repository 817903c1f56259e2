"""Cached steps on device-resident features, several a dispatch, give the per-step path's
numbers: parameters, optimizer state, batch-norm statistics, EMA and metrics; in the loop too."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import _assert_same, _killed_after_step_3, _state
from test_step import on_four_devices

from configs import default
from pneumo_jax import scopes, sharding
from pneumo_jax.models import build_model, taps
from pneumo_jax.models.inception_v3 import BACKBONE
from pneumo_jax.training import cached_steps, feature_cache, loop, optim, phases
from pneumo_jax.training.step import TrainState

HEADS = 'Logits,AuxLogits'
_RECORDS, _BATCH = 10, 4
_DISPATCHES = (1, 3, 2)  # Steps per dispatch: a lone step, and counts below the loop's width.


def _setup():
  """A head-only phase cached at the heads' pools: state, step, random features with flips."""
  config = default.get_config()
  config.input.image_size, config.trainable_scopes, config.ema_decay = 75, HEADS, 0.5
  config.input.random_crop = config.input.color_distortion = False
  model = build_model(config, 4, batch_norm_train=phases.batch_norm_train(config))
  images = jnp.zeros((1, 75, 75, 3))
  # Drawn, not initialised: a cached step never runs the frozen layers, so no compile of them.
  shapes = jax.eval_shape(lambda k: model.init(k, images, train=False), jax.random.key(0))
  rng = np.random.default_rng(0)
  variables = {
    'params': jax.tree.map(
      lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype), shapes['params']
    ),
    'batch_stats': jax.tree.map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes['batch_stats']
    ),
  }
  trainable = scopes.mask(variables['params'], HEADS)
  cut = feature_cache.plan(config, BACKBONE, [k for k, t in scopes.flatten(trainable).items() if t])
  shapes = jax.eval_shape(
    lambda v: taps.capture(model, v, images, cut.cut.taps, tuple(cut.cut.taps), train=False),
    variables,
  )
  features = {
    h: rng.normal(size=(_RECORDS, 2, *s.shape[1:])).astype(np.float32) for h, s in shapes.items()
  }
  tx = optim.make_optimizer(
    config.optimizer, optim.make_schedule(config.schedule, 10), trainable, BACKBONE.weight_decay
  )
  step = loop.train_step_for(
    config,
    model,
    tx,
    trainable,
    class_weights=np.array([1.0, 2.0, 0.5, 1.0], np.float32),
    ema_mask=trainable,
    feature_taps=cut.cut.taps,
  )
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
    ema_params=jax.tree.map(jnp.copy, variables['params']),
  )
  cache = feature_cache.Cache('', cut.cut.taps, features, {})
  return state, step, trainable, cache


def paths_compared() -> dict[str, np.ndarray]:
  """The state and metrics after sum(_DISPATCHES) steps both ways ('per_step/…', 'cached/…')."""
  state, step, trainable, cache = _setup()
  mesh = sharding.make_mesh()
  state = jax.device_put(state, sharding.replicated(mesh))
  labels = np.random.default_rng(1).integers(0, 4, _RECORDS).astype(np.int32)
  draw = np.random.default_rng(2)
  batches = [
    {
      'index': draw.permutation(_RECORDS)[:_BATCH].astype(np.int32),
      'flip': draw.random(_BATCH) < 0.5,
    }
    for _ in range(sum(_DISPATCHES))
  ]
  for b in batches:
    b['label'] = labels[b['index']]
  dropout = jax.random.key(7)
  jitted = jax.jit(step, donate_argnums=0)
  per_step, per_step_metrics = jax.tree.map(jnp.copy, state), []
  for i, b in enumerate(batches):
    batch = sharding.shard_batch(cache.train_batch(b), mesh)
    per_step, m = jitted(per_step, batch, jax.random.fold_in(dropout, i))
    per_step_metrics.append(m)
  resident = cached_steps.CachedSteps(
    step,
    cache.train,
    labels,
    cached_steps.Carried.of(state, trainable, trainable),
    mesh,
    dropout,
    max_steps=4,
  )
  initial = jax.device_get(state)  # `state` is donated below.
  cached, cached_metrics, at = state, [], 0
  for n in _DISPATCHES:
    cached, stacked = resident(cached, batches[at : at + n], at)
    cached_metrics += [{k: v[i] for k, v in stacked.items()} for i in range(n)]
    at += n
  out = {'devices': np.asarray(jax.device_count())}
  leaves = jax.tree_util.tree_leaves_with_path(initial.params)
  out |= {f'initial/.params{jax.tree_util.keystr(p)}': np.asarray(v) for p, v in leaves}
  for name, s, ms in (('per_step', per_step, per_step_metrics), ('cached', cached, cached_metrics)):
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(s))
    out |= {f'{name}/{jax.tree_util.keystr(p)}': np.asarray(v) for p, v in leaves}
    out |= {f'{name}/metrics/{k}': np.stack([m[k] for m in ms]) for k in ms[0]}
  return out


def _assert_equal(out: dict[str, np.ndarray]) -> None:
  """Equal within 1e-6 (relative, or absolute near 0): XLA fuses a step inside a loop on its
  own terms, so a reduction may round differently."""
  names = sorted(k.split('/', 1)[1] for k in out if k.startswith('per_step/'))
  assert names == sorted(k.split('/', 1)[1] for k in out if k.startswith('cached/'))
  assert any('opt_state' in k for k in names) and any('ema_params' in k for k in names)
  for k in names:
    np.testing.assert_allclose(
      out[f'cached/{k}'], out[f'per_step/{k}'], rtol=1e-6, atol=1e-6, err_msg=k
    )
  trained = [k for k in names if k.startswith(".params['Logits']")]
  assert trained
  for k in trained:
    assert not np.array_equal(out[f'cached/{k}'], out[f'initial/{k}']), k
  losses = out['per_step/metrics/loss']
  assert len(losses) == sum(_DISPATCHES) and np.all(np.isfinite(losses))


def test_cached_steps_equal_the_per_step_path():
  """One device: several dispatches of 1–3 steps, flips, class weights, EMA, the aux head's
  batch norm learning."""
  _assert_equal(paths_compared())


@pytest.mark.long
def test_on_four_devices_too(tmp_path):
  """Data-parallel over 4 (fake CPU) devices: replicated features, each device gathering its
  rows of every batch."""
  out = on_four_devices('test_cached_steps', 'paths_compared', str(tmp_path / 'four.npz'))
  assert int(out.pop('devices')) == 4
  _assert_equal(out)


def _two_cached_phases(tiny_config):
  """Both phases cached (heads' pools, then Mixed_7b), logging, evaluation and checkpoints at
  steps that split the dispatches."""
  c = tiny_config(
    **{
      'input.random_crop': False,
      'input.color_distortion': False,
      'ema_decay': 0.5,
      'log_every_steps': 2,
      'eval_every_steps': 3,
      'checkpoint_every_steps': 1,
    }
  )
  c.phase_order = 'head,top'
  c.phases.head = dict(num_steps=4, trainable_scopes=HEADS)
  c.phases.top = dict(num_steps=1, trainable_scopes='Mixed_7c,' + HEADS)
  return c


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k != 'images_per_s'} for line in f]


@pytest.mark.long
def test_the_loop_trains_as_with_batches_gathered_on_the_host(tiny_config, tmp_path, monkeypatch):
  """train_and_evaluate with resident features equals its run with host-gathered batches (same
  logged records, same checkpoints); killed after step 3 and resumed, it ends in the same state;
  both draw the first batch."""
  config = _two_cached_phases(tiny_config)
  resident, resumed, host = (str(tmp_path / n) for n in ('resident', 'resumed', 'host'))
  loop.train_and_evaluate(config, resident)
  assert os.path.exists(os.path.join(resident, 'train_images.png'))
  _killed_after_step_3(config, resumed)
  loop.train_and_evaluate(config, resumed)
  _assert_same(_state(resident, 5), _state(resumed, 5))
  monkeypatch.setattr(cached_steps, 'fits_on_devices', lambda nbytes, mesh: False)
  loop.train_and_evaluate(config, host)
  assert os.path.exists(os.path.join(host, 'train_images.png'))
  expected, got = _records(host), _records(resident)
  assert [(r['step'], r['split']) for r in got] == [(r['step'], r['split']) for r in expected]
  for g, e in zip(got, expected, strict=True):
    numbers = {k for k, v in e.items() if isinstance(v, float)}
    assert {k: g[k] for k in numbers} == pytest.approx({k: e[k] for k in numbers}, rel=1e-6)
    assert {k: g[k] for k in e.keys() - numbers} == {k: e[k] for k in e.keys() - numbers}
  for step in range(1, 6):
    a, b = (scopes.flatten(_state(w, step)['params']) for w in (resident, host))
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=f'{step} {k}')
