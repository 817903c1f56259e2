"""Training throughput of InceptionV3 fine-tuning, stage by stage, measured in one run.

  python -m benchmarks.throughput [--image_size 299] [--batch 16] [--steps 20] [--images 64]
      [--cached_steps 1000] [--source_size 512 | --source_dir DIR] [--num_workers auto]
      [--modes head-only,full] [--dtype float32] [--reference keras]

For head-only and full fine-tuning prints images/s of: the grain input pipeline alone (no
model; the same for both modes), the jitted train step alone on a fixed device-resident batch
(uint8 records, augmented on the device as in training), `train_and_evaluate` end to end without
the feature cache, and, head-only and top (two_phase.py's second phase, `--modes top`), end to
end from the feature cache (`--cached_steps` steps logged every 10, as the default config does;
its one pass of the frozen layers per image and view timed apart);
with --reference keras, Keras 3 (TensorFlow backend) on the same image files and recipe, and the
seed's whole recipe (6,000 head-only steps of 16 over ~2,000 images: 1,600 training images in 2
views and 400 validation images) projected from the measured rates for both. Every rate leaves
out compilation and warm-up: the pipeline's first batches (worker start), the step's first call,
the loop's first logged interval (which also holds the cache's build), Keras's first batch.
Ratios use references measured in the same run, so the machine's speed cancels. Data follow the
seed's recipe: flips only, no random crop, no colour distortion.
"""

import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from configs import default
from pneumo_jax import scopes, validate
from pneumo_jax.data import dataset_for, folder_builder, images, pipeline
from pneumo_jax.models import backbone_of, build_model
from pneumo_jax.training import feature_cache, loop, optim, phases
from pneumo_jax.training.monitor import read_records
from pneumo_jax.training.step import TrainState

FLAGS = flags.FLAGS
flags.DEFINE_integer('image_size', 299, 'Side fed to the net.', lower_bound=75, upper_bound=299)
flags.DEFINE_integer('batch', 16, 'Training batch.', lower_bound=1)
flags.DEFINE_integer('steps', 20, 'Timed steps (batches) per measurement.', lower_bound=2)
flags.DEFINE_integer('images', 64, 'Generated images (two classes).', lower_bound=8)
flags.DEFINE_integer(
  'cached_steps', 1000, 'Steps of a run from the feature cache (fast: many).', lower_bound=20
)
flags.DEFINE_integer('source_size', 512, 'Side of the generated images.', lower_bound=75)
flags.DEFINE_string('source_dir', None, 'A folder of class subfolders to use instead.')
flags.DEFINE_string('num_workers', 'auto', "input.num_workers: 'auto', 0 or >= 2 processes.")
flags.DEFINE_list('modes', ['head-only', 'full'], 'Which of head-only, top, full to time.')
flags.DEFINE_list('workers_sweep', [], 'Also time the pipeline alone with these num_workers.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'model.dtype.')
flags.DEFINE_enum('reference', None, ['keras'], 'Also time Keras 3 (TensorFlow backend).')

# trainable_scopes; 'top' is configs/two_phase.py's second phase (cached at Mixed_6d).
MODES = {'head-only': 'Logits,AuxLogits', 'top': 'Mixed_6e,Mixed_7,Logits,AuxLogits', 'full': '.*'}


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    source = FLAGS.source_dir or write_images(os.path.join(tmp, 'images'))
    config = make_config(source, os.path.join(tmp, 'data'))
    builder = dataset_for(config, tmp)
    num_classes = len(folder_builder.label_names(builder))
    rows = Table()
    rows.append(('both', 'input pipeline', pipeline_rate(builder, config.input), ''))
    for workers in FLAGS.workers_sweep:
      input_cfg = ml_collections.ConfigDict({**config.input.to_dict(), 'num_workers': int(workers)})
      rows.append(('both', f'pipeline, {workers} w', pipeline_rate(builder, input_cfg), ''))
    for mode in FLAGS.modes:
      trainable = MODES[mode]
      config.trainable_scopes = trainable
      model = step_rate(config, builder, num_classes)
      ours, _ = end_to_end_rate(config, os.path.join(tmp, mode), cache=False)
      rows += [
        (mode, 'model step', model, ''),
        (mode, 'end to end', ours, f'{ours / model:.2f} of model step'),
      ]
      if mode != 'full':
        cached, per_view = end_to_end_rate(config, os.path.join(tmp, f'{mode}-cached'), cache=True)
        rows += [
          (mode, 'cache build', 1 / per_view, 'image views/s, once per image and view'),
          (mode, 'from cache', cached, f'{cached / model:.1f}× model step'),
        ]
      if FLAGS.reference == 'keras' and mode != 'top':
        ref = keras_rate(config, source, num_classes, head_only=mode == 'head-only')
        rows.append((mode, 'keras (TF)', ref, f'end to end = {ours / ref:.2f}× keras'))
        if mode == 'head-only':
          seed = 6000 * 16
          theirs = seed / ref
          build, steps = (1600 * 2 + 400) * per_view, seed / cached
          mine = build + steps
          rows.append(
            (
              mode,
              'seed recipe',
              seed / mine,
              f'{theirs / mine:.1f}× keras: {mine / 60:.1f} min (cache build {build / 60:.1f} + '
              f'steps {steps / 60:.1f}) vs keras {theirs / 60:.1f} min',
            )
          )


def make_config(source_dir: str, data_dir: str) -> ml_collections.ConfigDict:
  """The default config on these flags, with the seed's augmentation and nothing but training
  steps in the timed part (evaluation and the checkpoint come after the last logged interval)."""
  c = default.get_config()
  c.dataset.source_dir, c.dataset.data_dir = source_dir, data_dir
  c.input.image_size, c.input.batch_size = FLAGS.image_size, FLAGS.batch
  c.input.num_workers = FLAGS.num_workers if FLAGS.num_workers == 'auto' else int(FLAGS.num_workers)
  c.model.dtype = FLAGS.dtype
  c.input.random_crop, c.input.color_distortion, c.input.random_flip = False, False, True
  c.num_steps = FLAGS.steps
  c.log_every_steps = max(1, FLAGS.steps // 5)  # At least 4 intervals after the compile one.
  c.eval_every_steps = c.checkpoint_every_steps = 0
  validate.check(c, jax.device_count())
  return c


def write_images(folder: str) -> str:
  """Smooth random grey JPEGs (X-ray-like compressibility) in two class subfolders."""
  rng = np.random.default_rng(0)
  size = FLAGS.source_size
  for i in range(FLAGS.images):
    os.makedirs(os.path.join(folder, f'class_{i % 2}'), exist_ok=True)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8), 'L')
    fine = np.asarray(coarse.resize((size, size), Image.BICUBIC), np.float32)
    grey = np.clip(fine + rng.normal(0, 8, fine.shape), 0, 255).astype(np.uint8)
    Image.fromarray(grey, 'L').save(os.path.join(folder, f'class_{i % 2}', f'{i}.jpg'), quality=90)
  return folder


def pipeline_rate(builder, input_cfg: ml_collections.ConfigDict) -> float:
  """Batches pulled as fast as possible, after one per worker (their start-up) is discarded."""
  it = pipeline.train_iterator(builder, input_cfg, seed=0)
  try:
    for _ in range(max(1, pipeline.num_workers(input_cfg))):
      next(it)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      next(it)
    return FLAGS.steps * input_cfg.batch_size / (time.perf_counter() - start)
  finally:
    it.close()  # Stops grain's worker processes.


def step_rate(config: ml_collections.ConfigDict, builder, num_classes: int) -> float:
  """The loop's jitted step (same model, optimizer, donation, augmentation) on one
  device-resident batch of stored records; the first call (compile) is not timed, later calls
  are dispatched back to back."""
  backbone = backbone_of(config)
  model = build_model(config, num_classes, batch_norm_train=phases.batch_norm_train(config))
  n, size = config.input.batch_size, config.input.image_size
  key = jax.random.key(0)
  batch = jax.device_put(next(pipeline.eval_batches(builder, 'train', _with_batch(config, n))))
  batch = {k: batch[k] for k in ('image', 'box', 'flip', 'colour', 'label')}
  images = jnp.zeros((1, size, size, 3))
  variables = jax.jit(lambda k: model.init(k, images, train=False))(key)
  trainable = scopes.mask(variables['params'], config.trainable_scopes)
  schedule = optim.make_schedule(config.schedule, config.num_steps)
  tx = optim.make_optimizer(config.optimizer, schedule, trainable, backbone.weight_decay)
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(variables['params']),
  )
  step = jax.jit(
    loop.train_step_for(config, model, tx, trainable),
    donate_argnums=0,
  )
  state, metrics = jax.block_until_ready(step(state, batch, key))
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = step(state, batch, key)
  jax.block_until_ready((state, metrics))
  return FLAGS.steps * n / (time.perf_counter() - start)


def _with_batch(config: ml_collections.ConfigDict, n: int) -> ml_collections.ConfigDict:
  input_cfg = ml_collections.ConfigDict(config.input.to_dict())
  input_cfg.eval_batch_size = n
  return input_cfg


def end_to_end_rate(
  config: ml_collections.ConfigDict, workdir: str, *, cache: bool
) -> tuple[float, float | None]:
  """train_and_evaluate from scratch (with or without the feature cache): images/s over its
  logged train intervals except the first, which holds the compile, the pipeline's start and
  the cache's build; and the build's seconds per image view (None uncached)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.feature_cache = cache
  if cache:  # The seed recipe's logging: a dispatch of cached steps ends at each logged step.
    config.num_steps, config.log_every_steps = FLAGS.cached_steps, 10
  loop.train_and_evaluate(config, workdir)
  train = [r for r in read_records(workdir) if r['split'] == 'train']
  images_seen = seconds = 0.0
  for prev, r in itertools.pairwise(train):
    n = (r['step'] - prev['step']) * config.input.batch_size
    images_seen, seconds = images_seen + n, seconds + n / r['images_per_s']
  per_view = None
  if cache:
    (key,) = os.listdir(os.path.join(workdir, feature_cache.CACHE_DIR))
    folder = os.path.join(workdir, feature_cache.CACHE_DIR, key)
    with open(os.path.join(folder, 'done.json')) as f:
      built = json.load(f)
    # Per backbone pass (padded batches included), which scales to a larger dataset.
    first = built['first_batch']
    per_view = (built['seconds'] - first['seconds']) / (built['passes'] - first['passes'])
  return images_seen / seconds, per_view


def keras_rate(
  config: ml_collections.ConfigDict, source_dir: str, num_classes: int, *, head_only: bool
) -> float:
  """Keras 3 on TensorFlow (graph mode, oneDNN kernels; no XLA) training the same recipe on the
  same files through tf.data; the first batch (tracing, pipeline start) is not timed."""
  os.environ['KERAS_BACKEND'] = 'tensorflow'  # Read when keras is first imported.
  import keras
  import tensorflow as tf

  size, n = config.input.image_size, config.input.batch_size
  root = Path(source_dir)
  paths = sorted(str(p) for p in root.rglob('*') if p.is_file() and images.is_candidate(p))
  classes = sorted({Path(p).relative_to(root).parts[0] for p in paths})
  labels = [classes.index(Path(p).relative_to(root).parts[0]) for p in paths]

  def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.random_flip_left_right(tf.image.resize(image, (size, size)))  # bilinear
    return image / 127.5 - 1.0, label

  ds = (
    tf.data.Dataset.from_tensor_slices((paths, labels))
    .shuffle(len(paths), seed=0)
    .repeat()
    .map(load, num_parallel_calls=tf.data.AUTOTUNE)
    .batch(n, drop_remainder=True)
    .prefetch(tf.data.AUTOTUNE)
  )
  base = keras.applications.InceptionV3(
    weights=None, include_top=False, pooling='avg', input_shape=(size, size, 3)
  )
  base.trainable = not head_only
  inputs = keras.Input((size, size, 3))
  features = base(inputs, training=False) if head_only else base(inputs)  # Frozen: inference BN.
  features = keras.layers.Dropout(1.0 - config.model.dropout_keep_prob)(features)
  model = keras.Model(inputs, keras.layers.Dense(num_classes)(features))
  opt = config.optimizer
  model.compile(
    optimizer=keras.optimizers.RMSprop(
      config.schedule.learning_rate,
      rho=opt.rmsprop_decay,
      momentum=opt.rmsprop_momentum,
      epsilon=opt.epsilon,
    ),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    jit_compile=False,
  )
  ends: list[float] = []
  clock = keras.callbacks.LambdaCallback(
    on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter())
  )
  model.fit(ds, epochs=1, steps_per_epoch=FLAGS.steps, callbacks=[clock], verbose=0)
  return (len(ends) - 1) * n / (ends[-1] - ends[0])


class Table(list):
  """Rows printed as they are measured, so a run cut short still reports what it measured."""

  def __init__(self):
    super().__init__()
    data = FLAGS.source_dir or f'{FLAGS.images} generated {FLAGS.source_size}² grey JPEGs'
    print(f'\n{os.cpu_count()} CPUs, jax.devices() = {jax.devices()}')
    print(
      f'InceptionV3 {FLAGS.image_size}², batch {FLAGS.batch}, {FLAGS.steps} steps a measurement, '
      f'num_workers {FLAGS.num_workers}, {FLAGS.dtype}, images: {data}'
    )
    print(f'{"mode":<11}{"measurement":<16}{"img/s":>9}  ratio', flush=True)

  def append(self, row: tuple[str, str, float, str]) -> None:
    super().append(row)
    mode, what, rate, ratio = row
    print(f'{mode:<11}{what:<16}{rate:>9.1f}  {ratio}', flush=True)

  def __iadd__(self, rows):
    for row in rows:
      self.append(row)
    return self


if __name__ == '__main__':
  app.run(main)
