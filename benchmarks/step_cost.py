"""Head-only vs full fine-tuning step, as ratios to the forward pass, measured in one run.

  python -m benchmarks.step_cost [--image_size 299] [--batch 16] [--iters 5]

Prints XLA's FLOP count and the wall time of each compiled program, both relative to the
training-mode forward pass. The head-only step should cost about one forward pass (no backbone
backward); the full step about three.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import default
from pneumo_jax import scopes
from pneumo_jax.data import augment, preprocess
from pneumo_jax.models.inception_v3 import BACKBONE, InceptionV3
from pneumo_jax.training import loop, optim
from pneumo_jax.training.step import TrainState


def _time(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / iters


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=299)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--iters', type=int, default=5)
  args = parser.parse_args()
  size, n = args.image_size, args.batch
  config = default.get_config()
  config.input.image_size = size
  # Stored records of the input size, whole and unflipped: the step's augmentation is the
  # identity on them, and the forward pass below sees the same images.
  view = preprocess.central_view(size, size, 1.0)
  batch = {
    'image': jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), np.uint8)),
    **{k: jnp.asarray(np.stack([v] * n)) for k, v in view.items()},
    'label': jnp.zeros(n, jnp.int32),
  }
  images = augment.from_batch(batch, size)
  key = jax.random.key(0)
  rows = {}
  for name, trainable in (('head-only step', 'Logits,AuxLogits'), ('full step', '.*')):
    model = InceptionV3(num_classes=4, batch_norm_train=scopes.parse(trainable))
    variables = jax.jit(model.init)(key, images[:1])
    mask = scopes.mask(variables['params'], trainable)
    tx = optim.make_optimizer(
      config.optimizer, optax.constant_schedule(0.01), mask, BACKBONE.weight_decay
    )
    state = TrainState(
      step=jnp.zeros([], jnp.int32),
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']),
    )
    step = jax.jit(loop.train_step_for(config, model, tx, mask))
    if not rows:
      fwd = jax.jit(
        lambda v, x, m=model: m.apply(
          v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats']
        )
      )
      rows['forward (train mode)'] = (
        fwd.lower(variables, images).compile().cost_analysis()['flops'],
        _time(fwd, variables, images, iters=args.iters),
      )
    rows[name] = (
      step.lower(state, batch, key).compile().cost_analysis()['flops'],
      _time(step, state, batch, key, iters=args.iters),
    )
  base_flops, base_time = rows['forward (train mode)']
  print(f'{jax.devices()[0].device_kind}, batch {n} at {size}×{size}')
  print(f'{"program":<22}{"GFLOP":>10}{"× fwd":>8}{"ms":>10}{"× fwd":>8}')
  for name, (flops, secs) in rows.items():
    print(
      f'{name:<22}{flops / 1e9:>10.1f}{flops / base_flops:>8.2f}'
      f'{secs * 1e3:>10.1f}{secs / base_time:>8.2f}'
    )


if __name__ == '__main__':
  main()
