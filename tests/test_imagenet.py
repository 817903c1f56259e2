"""--mode imagenet: class names, top-k on random weights, the printout."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import default
from pneumo_jax.models.inception_v3 import InceptionV3
from pneumo_jax.modes import imagenet
from tests import reference

SIZE = 75  # The smallest input: one cheap compile.


def test_class_names():
  keras_style = imagenet.class_names(1000)
  slim_style = imagenet.class_names(1001)
  assert len(keras_style) == 1000 and len(set(keras_style)) == 1000
  assert keras_style[0] == 'n01440764' and keras_style == sorted(keras_style)
  assert slim_style == [imagenet.BACKGROUND, *keras_style]
  with pytest.raises(ValueError, match='4 outputs is not an ImageNet classifier'):
    imagenet.class_names(4)


def _config():
  c = default.get_config()
  c.input.image_size = SIZE
  return c


@pytest.fixture(scope='module')
def variables():
  """Random slim-style variables (1001 classes, with the aux head top_k must ignore).

  Drawn in numpy over the model's abstract shapes: initialising through XLA compiles for long.
  """
  model = InceptionV3(num_classes=1001, create_aux_logits=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: reference.nontrivial_value(path[-1].key, x.shape, rng), shapes
  )


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  """Three images of different sizes and modes (RGB, grey, RGBA) in one folder."""
  folder = tmp_path_factory.mktemp('photos')
  rng = np.random.default_rng(0)
  shapes = {'a.png': (90, 120, 3), 'b.jpg': (80, 80), 'c.png': (100, 77, 4)}  # RGB, grey, RGBA.
  for name, shape in shapes.items():
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
  return folder, [str(folder / n) for n in sorted(shapes)]


def test_top_k_on_random_weights(variables, image_files):
  _, paths = image_files
  result = imagenet.top_k(_config(), variables, paths, k=5)
  names = set(imagenet.class_names(1001))
  assert len(result) == len(paths)
  for top in result:
    assert len(top) == 5 and all(name in names for name, _ in top)
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True) and sum(values) <= 1 + 1e-6
  assert result[0] != result[1]  # Different images, different predictions.
  assert imagenet.top_k(_config(), variables, []) == []


def test_top_k_names_the_right_classes(variables, image_files):
  """With a zero logits kernel the probabilities are softmax(biases) whatever the image."""
  _, paths = image_files
  biases = np.zeros(1001, np.float32)
  biases[[7, 1000, 3, 0, 500]] = [9.0, 8.0, 7.0, 6.0, 5.0]
  logits = {'weights': np.zeros((1, 1, 2048, 1001), np.float32), 'biases': biases}
  params = {**variables['params'], 'Logits': {'Conv2d_1c_1x1': logits}}
  result = imagenet.top_k(_config(), {**variables, 'params': params}, paths[:1], k=5)
  names = imagenet.class_names(1001)
  expected = np.exp(biases) / np.exp(biases).sum()
  assert [n for n, _ in result[0]] == [names[i] for i in (7, 1000, 3, 0, 500)]
  assert names[0] == imagenet.BACKGROUND
  np.testing.assert_allclose([p for _, p in result[0]], expected[[7, 1000, 3, 0, 500]], rtol=1e-5)


def test_run_prints_top_k(variables, image_files, tmp_path, capsys):
  folder, paths = image_files
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'weights', variables)
  config = default.get_config()
  config.init_checkpoint = str(tmp_path / 'weights')
  config.input.image_size = SIZE
  imagenet.run(config, str(tmp_path), [str(folder)], k=3)
  lines = capsys.readouterr().out.splitlines()
  assert [line for line in lines if not line.startswith(' ')] == paths
  assert len(lines) == 4 * len(paths) and all('%' in line for line in lines[1:4])
  imagenet.run(config, None, [str(folder)], k=3)  # No workdir: --mode imagenet needs none.
  assert capsys.readouterr().out.splitlines() == lines


def test_run_errors(tmp_path):
  config = default.get_config()
  with pytest.raises(FileNotFoundError, match='matches nothing'):
    imagenet.run(config, str(tmp_path), [str(tmp_path / '*.jpg')])
  (tmp_path / 'x.png').write_bytes(b'')
  for init in (tmp_path / 'model.h5', tmp_path):  # Not a directory; not an orbax checkpoint.
    config.init_checkpoint = str(init)
    with pytest.raises(
      (ValueError, FileNotFoundError), match=r'init_checkpoint=.*(does not exist|not an orbax)'
    ):
      imagenet.run(config, str(tmp_path), [str(tmp_path / 'x.png')])
