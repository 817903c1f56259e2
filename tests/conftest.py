"""Shared test setup: one persistent XLA compilation cache for the session and its subprocesses.

InceptionV3's train step takes tens of seconds to compile on 2 CPU cores; tests that build the same
computation again (and subprocess runs of main.py) then load it from the cache instead.
"""

import contextlib
import os

# torchvision (through triton) crashes a process that imported TensorFlow first: it goes first.
with contextlib.suppress(ImportError):
  import torchvision  # noqa: F401

import jax
import ml_collections
import pytest

from configs import default
from pneumo_jax.data import synthetic

_CACHE = os.path.join(os.path.dirname(__file__), os.pardir, '.pytest_cache', 'jax_compilation')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.abspath(_CACHE))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update(
  'jax_persistent_cache_min_compile_time_secs',
  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']),
)


@pytest.fixture(scope='session')
def stage_folder(tmp_path_factory) -> str:
  """A small 4-class folder of the demo's synthetic X-rays (6 per class, 80 px)."""
  path = str(tmp_path_factory.mktemp('stages') / 'images')
  synthetic.make_stage_folder(path, images_per_class=6, image_size=80, seed=0)
  return path


@pytest.fixture(scope='session')
def tiny_config(stage_folder, tmp_path_factory):
  """A config that trains InceptionV3 for a few steps at 75 px on `stage_folder`."""

  def make(**overrides) -> ml_collections.ConfigDict:
    c = default.get_config()
    c.dataset.source_dir = stage_folder
    c.dataset.data_dir = str(tmp_path_factory.mktemp('data'))
    c.dataset.validation_fraction = 0.34
    c.input.image_size = 75
    c.input.batch_size = 4
    c.input.eval_batch_size = 8
    c.num_steps = 4
    c.log_every_steps = 1
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 1
    c.keep_checkpoints = 10
    c.update_from_flattened_dict(overrides)  # Dotted paths, as sweeps and the CLI use.
    return c

  return make
