"""Shared test setup: one persistent XLA compilation cache for the session and its subprocesses.

InceptionV3's train step takes tens of seconds to compile on 2 CPU cores; tests that build the same
computation again (and subprocess runs of main.py) then load it from the cache instead.
"""

import os

import jax

_CACHE = os.path.join(os.path.dirname(__file__), os.pardir, '.pytest_cache', 'jax_compilation')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.abspath(_CACHE))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
