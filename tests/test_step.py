"""The train step: what moves and what must not, its cost, and its data parallelism."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from pneumo_jax import scopes, sharding
from pneumo_jax.data import augment, preprocess
from pneumo_jax.models.inception_v3 import BACKBONE, InceptionV3
from pneumo_jax.training import optim, phases
from pneumo_jax.training.step import TrainState, make_train_step
from tests import reference

HEAD = 'Logits,AuxLogits'
SIZE, BATCH, CLASSES = 75, 4, 3


def _setup(trainable: str, bn_train, seed=0, dtype=jnp.float32, ema_decay=0.0, ema_scopes=None):
  model = InceptionV3(num_classes=CLASSES, batch_norm_train=bn_train, dtype=dtype)
  variables = reference.random_variables(model, SIZE, seed)
  mask = scopes.mask(variables['params'], trainable)
  c = default.get_config().optimizer
  tx = optim.make_optimizer(c, optax.constant_schedule(0.01), mask, BACKBONE.weight_decay)
  step = make_train_step(
    model,
    tx,
    mask,
    aux_loss_weight=0.4,
    label_smoothing=0.1,
    class_weights=None,
    ema_decay=ema_decay,
    aux_logits=BACKBONE.aux_logits,
    ema_mask=ema_scopes and scopes.mask(variables['params'], ema_scopes),
    image_size=SIZE,
  )
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
    ema_params=jax.tree.map(np.copy, variables['params']) if ema_decay else None,
  )
  return model, step, state


def _batch(seed=1):
  """Stored uint8 images of the input size, whole and unflipped: the net sees them as they are."""
  r = np.random.default_rng(seed)
  view = preprocess.central_view(SIZE, SIZE, 1.0)
  return {
    'image': r.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
    **{k: np.stack([v] * BATCH) for k, v in view.items()},
    'label': r.integers(0, CLASSES, BATCH).astype(np.int32),
  }


def _moved(before, after):
  b, a = scopes.flatten(before), scopes.flatten(after)
  return {k for k in b if not np.array_equal(np.asarray(b[k]), np.asarray(a[k]))}


@pytest.fixture(scope='module')
def head_only():
  _, step, state = _setup(HEAD, scopes.parse(HEAD))
  step = jax.jit(step)
  new = state
  for i in range(2):
    new, metrics = step(new, _batch(i), jax.random.key(i))
  return state, new, metrics


def test_head_only_step_leaves_backbone_bitwise_unchanged(head_only):
  before, after, metrics = head_only
  moved = _moved(before.params, after.params)
  assert moved and all(k.startswith(('Logits/', 'AuxLogits/')) for k in moved)
  assert 'Logits/Conv2d_1c_1x1/weights' in moved
  moved_stats = _moved(before.batch_stats, after.batch_stats)
  assert moved_stats and all(k.startswith('AuxLogits/') for k in moved_stats), moved_stats
  assert np.isfinite(float(metrics['total_loss'])) and float(metrics['grad_norm']) > 0


def test_ema_leaves_frozen_weights_bitwise_and_averages_the_rest():
  """Frozen leaves: the EMA is the weight itself, bit for bit (checkpoints store it once, in
  base/; averaging would round it: 0.1·w + 0.9·w ≠ w in float32). Trainable ones: the usual
  average. `ema_mask` leaves (trained in another phase) are averaged even while frozen: their EMA
  starts 1 off here and moves a tenth of the way to the weight."""
  decay = 0.9
  _, step, state = _setup(HEAD, scopes.parse(HEAD), ema_decay=decay, ema_scopes='Mixed_7c,' + HEAD)
  flat = scopes.flatten(state.ema_params)
  state = state.replace(
    ema_params=scopes.unflatten(
      {k: v + 1 if k.startswith('Mixed_7c/') else v for k, v in flat.items()}
    )
  )
  new, _ = jax.jit(step)(state, _batch(), jax.random.key(0))
  p0, p1 = scopes.flatten(state.params), scopes.flatten(new.params)
  e0, e1 = scopes.flatten(state.ema_params), scopes.flatten(new.ema_params)
  for k in p1:
    if k.startswith(('Logits/', 'AuxLogits/', 'Mixed_7c/')):
      want = (1 - decay) * np.asarray(p1[k]) + decay * np.asarray(e0[k])
      np.testing.assert_allclose(e1[k], want, rtol=1e-6, atol=1e-6, err_msg=k)
    else:
      np.testing.assert_array_equal(e1[k], p0[k], err_msg=k)
  assert not np.array_equal(e1['Logits/Conv2d_1c_1x1/weights'], p1['Logits/Conv2d_1c_1x1/weights'])


def test_all_bn_in_train_mode_corrupts_frozen_statistics():
  """The seed's pitfall, reproduced: frozen weights, yet backbone statistics drift."""
  _, step, state = _setup(HEAD, None)
  new, _ = jax.jit(step)(state, _batch(), jax.random.key(0))
  assert not _moved(state.params, new.params) - {
    k for k in scopes.flatten(state.params) if k.startswith(('Logits/', 'AuxLogits/'))
  }
  assert 'Conv2d_1a_3x3/BatchNorm/moving_mean' in _moved(state.batch_stats, new.batch_stats)


def test_head_only_step_skips_the_backbone_backward_pass():
  """XLA's own FLOP count: head-only ≈ forward, full fine-tuning ≈ 3× forward."""
  batch, key = _batch(), jax.random.key(0)
  model, head_step, state = _setup(HEAD, scopes.parse(HEAD))
  fwd = jax.jit(
    lambda v, x: model.apply(v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])
  )
  flops = lambda f, *a: f.lower(*a).compile().cost_analysis()['flops']
  images = augment.from_batch(batch, SIZE)
  forward = flops(fwd, {'params': state.params, 'batch_stats': state.batch_stats}, images)
  head = flops(jax.jit(head_step), state, batch, key)
  _, full_step, full_state = _setup('.*', None)
  full = flops(jax.jit(full_step), full_state, batch, key)
  print(
    f'forward {forward:.3g} head {head:.3g} ({head / forward:.2f}x) '
    f'full {full:.3g} ({full / forward:.2f}x)'
  )
  assert head <= 1.25 * forward
  assert 2.5 * forward <= full <= 3.5 * forward


def test_mixed_precision_step_keeps_float32_parameters():
  _, step, state = _setup(HEAD, scopes.parse(HEAD), dtype=jnp.bfloat16)
  new, metrics = jax.jit(step)(state, _batch(), jax.random.key(0))
  assert np.isfinite(float(metrics['total_loss']))
  assert {v.dtype for v in jax.tree.leaves((new.params, new.batch_stats))} == {np.dtype('float32')}
  assert _moved(state.params, new.params)


def test_balanced_class_weights():
  """From the train labels; a class no train image has still gets a weight (as if counted once)."""
  c = default.get_config()
  c.class_weighting = 'balanced'
  labels = np.repeat([0, 1, 2], [60, 20, 20])
  w = phases.class_weights(c, labels, num_classes=4)
  np.testing.assert_allclose(w, [100 / 240, 100 / 80, 100 / 80, 100 / 4])
  c.class_weighting = ''
  assert phases.class_weights(c, labels) is None


def data_parallel_run() -> dict[str, np.ndarray]:
  """Two steps of a top-blocks fine-tune, jitted over a mesh of every visible device."""
  top = 'Mixed_7c,Logits,AuxLogits'
  _, step, state = _setup(top, scopes.parse(top))
  mesh = sharding.make_mesh()
  repl = sharding.replicated(mesh)
  step = jax.jit(
    step, in_shardings=(repl, sharding.batch_sharding(mesh), repl), out_shardings=(repl, repl)
  )
  state = jax.device_put(state, repl)
  for i in range(2):
    state, _ = step(state, sharding.shard_batch(_batch(i), mesh), jax.random.key(i))
  return {
    'n': np.asarray(jax.device_count()),
    **{k: np.asarray(v) for k, v in scopes.flatten(state.params).items()},
    **{'bs/' + k: np.asarray(v) for k, v in scopes.flatten(state.batch_stats).items()},
  }


_FOUR_DEVICE_WORKER = textwrap.dedent("""
    import importlib
    import sys
    import numpy as np
    sys.path.insert(0, 'tests')
    module, function, out = sys.argv[1:]
    np.savez(out, **getattr(importlib.import_module(module), function)())
""")


def on_four_devices(module: str, function: str, out: str) -> dict[str, np.ndarray]:
  """The arrays tests/<module>.py's `function()` returns when run over 4 fake CPU devices: in a
  subprocess, as the flag must precede JAX's start (this process has one CPU device)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  subprocess.run(
    [sys.executable, '-c', _FOUR_DEVICE_WORKER, module, function, out],
    check=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  return dict(np.load(out))


def test_four_devices_match_one(tmp_path):
  """Data-parallel over 4 (fake CPU) devices gives the single-device result: global batch norm
  statistics and gradients, not per-device ones."""
  one = data_parallel_run()
  four = on_four_devices('test_step', 'data_parallel_run', str(tmp_path / 'four.npz'))
  assert int(one['n']) == 1 and int(four['n']) == 4
  assert set(four) == set(one)
  changed = 0
  for k in set(one) - {'n'}:
    np.testing.assert_allclose(one[k], four[k], rtol=2e-4, atol=2e-6, err_msg=k)
    changed += k.startswith('bs/Mixed_7c')
  assert changed
