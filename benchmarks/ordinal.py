"""The ordinal (CORN) head against softmax cross-entropy on graded images, same steps and seeds.

  python -m benchmarks.ordinal [--seeds 3] [--steps 200] [--images_per_class 100]
      [--image_size 75] [--noise 0.2] [--depth_multiplier 0.25]

Two sets, both the demo's generated 4-stage opacity films (`pneumo_jax.data.synthetic`) split
once (75% train, 25% validation, stratified, seed 0): 'demo', labels as generated, and 'noisy',
where a `--noise` fraction of the training images is relabelled to a neighbouring grade (0 → 1,
3 → 2, others ±1 at random); validation labels stay true. For each head and seed, an InceptionV3
(depth scaled by `--depth_multiplier`, every layer trained from random weights as the demo does:
Adam, warmup-cosine 2e-3, batch 32, random flips) takes the same steps on the same batches
through the train step and inference the runs use (`training.step`, `evaluation.inference`),
then is scored on validation: quadratic weighted kappa and mean absolute grade error of the most
probable class. Prints one table, mean ± std over seeds.
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image
from sklearn import metrics as skm
from sklearn.model_selection import train_test_split

from configs import demo
from pneumo_jax import scopes
from pneumo_jax.data import preprocess, synthetic
from pneumo_jax.evaluation import inference
from pneumo_jax.models import backbone_of, build_inference_model, build_model
from pneumo_jax.training import optim
from pneumo_jax.training.step import TrainState, make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_integer('seeds', 3, 'Seeds per head and set (initialisation and batch order).')
flags.DEFINE_integer('steps', 200, 'Training steps of every run.', lower_bound=1)
flags.DEFINE_integer('images_per_class', 100, 'Generated films per grade.', lower_bound=8)
flags.DEFINE_integer('image_size', 75, 'Side of the films and of the net input.', lower_bound=75)
flags.DEFINE_float('noise', 0.2, 'Fraction of training labels moved to a neighbouring grade.')
flags.DEFINE_float('depth_multiplier', 0.25, 'model.depth_multiplier (1: the full network).')

BATCH = 32
HEADS = ('softmax', 'ordinal')


def load_films(folder: str) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [N, S, S, 3] films and their [N] grades from the generated stage folders."""
  images, labels = [], []
  for grade in range(4):
    sub = os.path.join(folder, f'stage_{grade}')
    for name in sorted(os.listdir(sub)):
      grey = np.asarray(Image.open(os.path.join(sub, name)).convert('L'))
      images.append(np.repeat(grey[..., None], 3, axis=-1))
      labels.append(grade)
  return np.stack(images), np.array(labels, np.int32)


def neighbour_noise(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """`labels` with `fraction` of them moved one grade up or down (inward at the ends)."""
  noisy = labels.copy()
  moved = rng.choice(len(labels), round(fraction * len(labels)), replace=False)
  step = rng.choice([-1, 1], len(moved))
  step[labels[moved] == 0], step[labels[moved] == 3] = 1, -1
  noisy[moved] += step
  return noisy


class Runner:
  """One model, optimizer and jitted step per head, reused by every seed and set."""

  def __init__(self, head: str):
    c = demo.get_config()
    c.model.head = head
    c.model.depth_multiplier = FLAGS.depth_multiplier
    c.input.image_size = FLAGS.image_size
    self.config, self.size = c, FLAGS.image_size
    self.model = build_model(c, 4, batch_norm_train=None)
    self.eval_model = build_inference_model(c, 4)
    images = jnp.zeros((1, self.size, self.size, 3))
    self.init = jax.jit(lambda key: self.model.init(key, images, train=False))
    trainable = scopes.mask(self.init(jax.random.key(0))['params'], '.*')
    schedule = optim.make_schedule(c.schedule, FLAGS.steps)
    self.tx = optim.make_optimizer(c.optimizer, schedule, trainable, backbone_of(c).weight_decay)
    self.step = jax.jit(
      make_train_step(
        self.model,
        self.tx,
        trainable,
        aux_loss_weight=c.aux_loss_weight,
        label_smoothing=c.label_smoothing,
        class_weights=None,
        ema_decay=0.0,
        aux_logits=backbone_of(c).aux_logits,
        image_size=self.size,
      ),
      donate_argnums=0,
    )

  def train_and_score(
    self, seed: int, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]
  ) -> tuple[float, float]:
    """(quadratic kappa, mean absolute grade error) on `val` after FLAGS.steps steps."""
    variables = self.init(jax.random.key(seed))
    state = TrainState(
      step=jnp.zeros([], jnp.int32),
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=self.tx.init(variables['params']),
    )
    rng = np.random.default_rng(seed)
    order = np.zeros(0, int)
    for i in range(FLAGS.steps):
      while len(order) < BATCH:
        order = np.concatenate([order, rng.permutation(len(train[1]))])
      rows, order = order[:BATCH], order[BATCH:]
      batch = {**self._views(BATCH, rng), 'image': train[0][rows], 'label': train[1][rows]}
      state, _ = self.step(state, batch, jax.random.key(seed * 100_003 + i))
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    probs = inference.predict(self.eval_model, variables, self._batches(val), image_size=self.size)
    graded = probs['probs'].argmax(-1)
    kappa = skm.cohen_kappa_score(probs['label'], graded, weights='quadratic')
    return float(kappa), float(np.abs(graded - probs['label']).mean())

  def _views(self, n: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Whole films (the demo's random_crop=False), flipped at random when `rng` is given."""
    view = preprocess.central_view(self.size, self.size, 1.0)
    views = {k: np.stack([v] * n) for k, v in view.items()}
    if rng is not None:
      views['flip'] = rng.random(n) < 0.5
    return views

  def _batches(self, val: tuple[np.ndarray, np.ndarray]):
    for start in range(0, len(val[1]), 64):
      image, label = val[0][start : start + 64], val[1][start : start + 64]
      pad = 64 - len(label)
      yield {
        **self._views(64),
        'image': np.pad(image, ((0, pad), (0, 0), (0, 0), (0, 0))),
        'label': np.pad(label, (0, pad)),
        'mask': np.arange(64) < len(label),
      }


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, 'stages')
    synthetic.make_stage_folder(
      folder, images_per_class=FLAGS.images_per_class, image_size=FLAGS.image_size
    )
    images, labels = load_films(folder)
  split = train_test_split(
    images, labels, test_size=0.25, stratify=labels, random_state=0, shuffle=True
  )
  train_x, val_x, train_y, val_y = split
  noisy_y = neighbour_noise(train_y, FLAGS.noise, np.random.default_rng(0))
  sets = {'demo': train_y, f'noisy {FLAGS.noise:.0%}': noisy_y}
  results: dict[tuple[str, str], list[tuple[float, float]]] = {}
  start = time.perf_counter()
  for head in HEADS:
    runner = Runner(head)
    for name, train_labels in sets.items():
      for seed in range(FLAGS.seeds):
        score = runner.train_and_score(seed, (train_x, train_labels), (val_x, val_y))
        results.setdefault((name, head), []).append(score)
        print(f'{name} {head} seed {seed}: kappa {score[0]:.4f} MAE {score[1]:.4f}', flush=True)
  print(
    f'\n{len(train_y)} training / {len(val_y)} validation films at {FLAGS.image_size} px, '
    f'{FLAGS.steps} steps of {BATCH}, depth multiplier {FLAGS.depth_multiplier}, '
    f'{FLAGS.seeds} seeds ({time.perf_counter() - start:.0f} s); mean ± std over seeds\n'
  )
  print(f'| {"set":<10} | {"head":<8} | {"quadratic kappa":<16} | {"mean abs. grade error":<21} |')
  print(f'|{"-" * 12}|{"-" * 10}|{"-" * 18}|{"-" * 23}|')
  for (name, head), scores in sorted(results.items()):
    kappa, mae = np.array(scores).T
    print(
      f'| {name:<10} | {head:<8} | {kappa.mean():.3f} ± {kappa.std():.3f}    | '
      f'{mae.mean():.3f} ± {mae.std():.3f}         |'
    )


if __name__ == '__main__':
  app.run(main)
