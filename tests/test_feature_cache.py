"""Feature cache: trained layers learn what the uncached path teaches them; no stale cache is
reused; a cache that would not fit is not built."""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pneumo_jax import checkpoints, scopes
from pneumo_jax.data import dataset_for
from pneumo_jax.models import build_model
from pneumo_jax.models.inception_v3 import BACKBONE
from pneumo_jax.training import feature_cache, interrupt, loop

HEADS = 'Logits,AuxLogits'


def _config(tiny_config, cache: bool):
  """Two phases, both cacheable (flips only): heads only (cut at their pools), then a top block
  too (cut at Mixed_7b, plus the aux head's pool, as Mixed_6e stays frozen)."""
  c = tiny_config(
    **{
      'input.random_crop': False,
      'input.color_distortion': False,
      'eval_every_steps': 0,
      'checkpoint_every_steps': 0,
      'feature_cache': cache,
    }
  )
  c.phase_order = 'head,top'
  c.phases.head = dict(num_steps=3, trainable_scopes=HEADS)
  c.phases.top = dict(num_steps=1, trainable_scopes='Mixed_7c,' + HEADS)
  return c


@pytest.fixture(scope='module')
def runs(tiny_config, tmp_path_factory):
  out = {}
  for cache in (True, False):
    workdir = str(tmp_path_factory.mktemp(f'cache_{cache}'))
    summary = loop.train_and_evaluate(_config(tiny_config, cache), workdir)
    variables, _ = checkpoints.load_for_inference(workdir, 'latest')
    out[cache] = workdir, summary, scopes.flatten(variables['params'])
  return out


def test_cached_phases_learn_the_uncached_numbers(runs):
  """Same batches, flips and dropout: only float rounding differs (the frozen layers' outputs
  are computed in other batches), so parameters agree to ~1e-5 relative after 3 + 1 steps."""
  (cached_dir, cached, with_cache), (_, uncached, without) = runs[True], runs[False]
  (key,) = os.listdir(os.path.join(cached_dir, feature_cache.CACHE_DIR))  # The top phase's.
  assert sorted(os.listdir(os.path.join(cached_dir, feature_cache.CACHE_DIR, key))) == [
    'done.json',
    'train_AuxLogits.npy',
    'train_Mixed_7b.npy',
    'validation_Mixed_7b.npy',
  ]
  moved = [k for k in with_cache if k.startswith(('Logits/', 'AuxLogits/', 'Mixed_7c/'))]
  assert moved
  for k in with_cache:
    np.testing.assert_allclose(with_cache[k], without[k], rtol=1e-4, atol=1e-5, err_msg=k)
  for metric, value in uncached['final'].items():
    assert cached['final'][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), metric


@pytest.mark.long  # Two runs of two phases.
def test_validation_after_a_phase_that_trained_below_the_cut_scores_the_ema(tiny_config, tmp_path):
  """A block trained, then only the heads, with an EMA: the EMA of the block differs from the
  weights that made the head phase's cache, so its validation runs the whole network and scores
  what the uncached run scores (not the EMA heads on the raw block's features)."""
  finals = []
  for cache in (True, False):
    c = _config(tiny_config, cache)
    c.ema_decay = 0.5
    c.phase_order = 'top,head'  # The block, then the heads alone.
    c.phases.top = dict(
      num_steps=2, trainable_scopes='Mixed_7c,' + HEADS, schedule=dict(learning_rate=0.1)
    )
    c.phases.head = dict(num_steps=2, trainable_scopes=HEADS)
    finals.append(loop.train_and_evaluate(c, str(tmp_path / f'cache_{cache}'))['final'])
  for metric, value in finals[1].items():
    assert finals[0][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), metric


def test_plan(tiny_config):
  def plan(*trainable, **overrides):
    cfg = tiny_config(**{'input.random_crop': False, 'input.color_distortion': False, **overrides})
    decision = feature_cache.plan(cfg, BACKBONE, [f'{s}/w' for s in trainable or ('Logits',)])
    cut = decision.cut
    return (sorted(cut.taps), cut.frozen[-1]) if decision.cached else decision.reason

  taps = BACKBONE.feature_taps
  assert plan() == (['Logits'], 'Mixed_7c')
  assert plan('Logits', 'AuxLogits') == (['AuxLogits', 'Logits'], 'Mixed_7c')
  # A block trains: the block below it, and the aux head's input while Mixed_6e stays frozen.
  assert plan('Mixed_7c', 'Logits', 'AuxLogits') == (['AuxLogits', 'Mixed_7b'], 'Mixed_7b')
  assert plan('Mixed_7c', 'Logits') == (['Mixed_7b'], 'Mixed_7b')
  assert plan('Mixed_6e', 'Mixed_7a', 'Logits', 'AuxLogits') == (['Mixed_6d'], 'Mixed_6d')
  cfg = tiny_config(**{'input.random_crop': False, 'input.color_distortion': False})
  cut = feature_cache.plan(cfg, BACKBONE, ['Mixed_7c/w', 'AuxLogits/w']).cut
  assert cut.taps == {'AuxLogits': taps['AuxLogits'], 'Mixed_7b': 'Mixed_7b'}
  assert 'no frozen layer' in plan('Conv2d_1a_3x3', 'Logits')
  assert 'random_crop' in plan(**{'input.random_crop': True})
  assert 'color_distortion' in plan(**{'input.color_distortion': True})
  assert 'batch statistics' in plan(batch_norm='all')
  assert 'feature_cache is off' in plan(feature_cache=False)


def test_a_cache_that_would_not_fit_is_not_built(tiny_config, tmp_path):
  cfg = _config(tiny_config, True)
  builder = dataset_for(cfg, str(tmp_path))
  model = build_model(cfg, 4)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))
  cut = feature_cache.plan(cfg, BACKBONE, ['Mixed_7c/w', 'Logits/w']).cut
  assert feature_cache.disk_shortfall(str(tmp_path), builder, cfg, cut, model, variables) is None
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(shutil, 'disk_usage', lambda _: shutil._ntuple_diskusage(1, 0, 2**29))
    why = feature_cache.disk_shortfall(str(tmp_path), builder, cfg, cut, model, variables)
  assert why.startswith('its 0.0 GiB (and 1 GiB to spare) would not fit in the 0.5 GiB free')


def test_key_changes_with_what_the_features_depend_on(tiny_config, tmp_path):
  cfg = _config(tiny_config, True)
  builder = dataset_for(cfg, str(tmp_path))
  variables = {
    'params': {'Mixed_7c': {'w': jnp.ones(3)}, 'Logits': {'w': jnp.ones(2)}},
    'batch_stats': {'Mixed_7c': {'mean': jnp.zeros(3)}},
  }

  def key(variables=variables, **overrides):
    c = cfg.copy_and_resolve_references()
    c.update_from_flattened_dict(overrides)
    cut = feature_cache.plan(c, BACKBONE, ['Logits/w', 'AuxLogits/w']).cut
    return feature_cache._key(builder, c, BACKBONE, cut, True, variables)

  base = key()
  assert key() == base
  head_moved = {**variables, 'params': {**variables['params'], 'Logits': {'w': jnp.zeros(2)}}}
  assert key(head_moved) == base  # The trained layers' own weights do not shape the features.
  frozen_moved = {**variables, 'batch_stats': {'Mixed_7c': {'mean': jnp.ones(3)}}}
  assert key(frozen_moved) != base  # Another checkpoint.
  assert key(**{'input.image_size': 80}) != base
  assert key(**{'model.dtype': 'bfloat16'}) != base


def test_a_signal_during_the_build_stops_it_and_the_same_command_finishes(tiny_config, tmp_path):
  """Ctrl-C while the cache is being built stops at once (no step to finish first), leaving an
  unfinished folder that the next run's build removes."""
  config, workdir = _config(tiny_config, True), str(tmp_path)
  compute = feature_cache._compute

  def signalled(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # Recorded by the loop's handler, acted on per batch.
    return compute(*args)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(feature_cache, '_compute', signalled)
    with pytest.raises(interrupt.Stopped) as stopped:
      loop.train_and_evaluate(config, workdir)
  assert (stopped.value.step, stopped.value.signum) == (0, signal.SIGTERM)
  features = os.path.join(workdir, feature_cache.CACHE_DIR)
  assert [n for n in os.listdir(features) if '.incomplete-' in n]
  assert loop.train_and_evaluate(config, workdir)['status'] == 'done'
  (built,) = os.listdir(features)
  assert '.incomplete-' not in built
