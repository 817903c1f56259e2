"""Feature cache: heads learn what the uncached path teaches them; no stale cache is reused."""

import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from pneumo_jax import checkpoints, scopes
from pneumo_jax.data import dataset_for
from pneumo_jax.models.inception_v3 import BACKBONE
from pneumo_jax.training import feature_cache, interrupt, loop

HEADS = 'Logits,AuxLogits'


def _config(tiny_config, cache: bool):
  """Two phases: heads only (cacheable: flips only), then a top block too (uncached)."""
  c = tiny_config(
    **{
      'input.random_crop': False,
      'input.color_distortion': False,
      'eval_every_steps': 0,
      'checkpoint_every_steps': 0,
      'feature_cache': cache,
    }
  )
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


def test_cached_heads_learn_the_uncached_numbers(runs):
  """Same batches, flips and dropout: only float rounding differs (the backbone's features are
  computed in other batches), so parameters agree to ~1e-5 relative after 3 + 1 steps."""
  (cached_dir, cached, with_cache), (_, uncached, without) = runs[True], runs[False]
  assert os.listdir(os.path.join(cached_dir, feature_cache.CACHE_DIR))  # It was used.
  moved = [k for k in with_cache if k.startswith(('Logits/', 'AuxLogits/', 'Mixed_7c/'))]
  assert moved
  for k in with_cache:
    np.testing.assert_allclose(with_cache[k], without[k], rtol=1e-4, atol=1e-5, err_msg=k)
  for metric, value in uncached['final'].items():
    assert cached['final'][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), metric


def test_why_not(tiny_config):
  def reason(trainable=('Logits/Conv2d_1c_1x1/weights',), **overrides):
    cfg = tiny_config(**{'input.random_crop': False, 'input.color_distortion': False, **overrides})
    return feature_cache.why_not(cfg, BACKBONE, trainable)

  assert reason() is None
  assert reason(('Logits/b', 'AuxLogits/Conv2d_1b_1x1/weights')) is None
  assert 'random_crop' in reason(**{'input.random_crop': True})
  assert 'color_distortion' in reason(**{'input.color_distortion': True})
  assert 'batch statistics' in reason(batch_norm='all')
  assert 'feature_cache is off' in reason(feature_cache=False)
  assert reason(('Mixed_7c/Branch_0/Conv2d_0a_1x1/weights',)).startswith('Mixed_7c/')


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
    return feature_cache._key(builder, c, BACKBONE, ('AuxLogits', 'Logits'), True, variables)

  base = key()
  assert key() == base
  head_moved = {**variables, 'params': {**variables['params'], 'Logits': {'w': jnp.zeros(2)}}}
  assert key(head_moved) == base  # The heads' own weights do not shape the features.
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
