"""The demo's generated stage folder: layout, awkward files, idempotence and a learnable signal."""

import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.model_selection import cross_val_score
from sklearn.tree import DecisionTreeClassifier

from configs import default
from pneumo_jax.data import folder_builder, synthetic
from pneumo_jax.data.images import DatasetError, load_image


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('demo') / 'stages')
  synthetic.make_stage_folder(path, images_per_class=20, image_size=96, seed=1)
  return path


def test_layout_and_awkward_files(folder):
  assert sorted(os.listdir(folder)) == [
      '.synthetic_complete.json', 'README.txt', 'stage_0', 'stage_1', 'stage_2', 'stage_3']
  for stage in range(4):
    files = [f for f in os.listdir(os.path.join(folder, f'stage_{stage}'))
             if not f.startswith('.')]
    assert len(files) == 20
  assert os.path.exists(os.path.join(folder, 'stage_0', '.DS_Store'))
  modes = {name: Image.open(os.path.join(folder, name)) for name in (
      'stage_0/grey16.png', 'stage_1/palette.png', 'stage_2/rgba.png', 'stage_3/upper_case.JPG')}
  assert modes['stage_0/grey16.png'].mode.startswith('I;16')
  assert modes['stage_1/palette.png'].mode == 'P'
  assert modes['stage_2/rgba.png'].mode == 'RGBA'
  assert modes['stage_3/upper_case.JPG'].format == 'JPEG'
  assert Image.open(os.path.join(folder, 'stage_1', '1_0001.png')).mode == 'L'


def test_builder_reads_every_image(folder, tmp_path):
  c = default.get_config().dataset
  c.source_dir = folder
  builder = folder_builder.build(c, str(tmp_path))
  assert folder_builder.label_names(builder) == ['stage_0', 'stage_1', 'stage_2', 'stage_3']
  names = set()
  for split in builder.info.splits:
    names |= set(folder_builder.split_filenames(builder, split))
  assert len(names) == 80 and 'stage_3/upper_case.JPG' in names


def test_second_call_leaves_it_alone(folder):
  marker = os.path.join(folder, '.synthetic_complete.json')
  before = os.stat(marker).st_mtime_ns
  synthetic.make_stage_folder(folder, images_per_class=20, image_size=96, seed=1)
  assert os.stat(marker).st_mtime_ns == before
  with pytest.raises(DatasetError, match='images_per_class'):
    synthetic.make_stage_folder(folder, images_per_class=21, image_size=96, seed=1)


def test_refuses_a_foreign_folder(tmp_path):
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'photo.png').write_bytes(b'x')
  with pytest.raises(DatasetError, match='not a complete synthetic folder'):
    synthetic.make_stage_folder(str(tmp_path / 'mine'), images_per_class=5, image_size=32)
  (tmp_path / 'empty').mkdir()
  synthetic.make_stage_folder(str(tmp_path / 'empty'), images_per_class=5, image_size=32)
  assert len(os.listdir(tmp_path / 'empty' / 'stage_3')) == 5


def test_profusion_rises_with_stage(folder):
  """Small bright spots (a band-pass of the image) grow with the stage and tell stages apart.

  A one-number, hand-made feature is a weak classifier (ribs and edges respond too), so the bar
  is well above chance (0.25), not the ≥ 0.8 a CNN reaches on the full demo set.
  """
  spots, stages = [], []
  for stage in range(4):
    directory = os.path.join(folder, f'stage_{stage}')
    for name in sorted(os.listdir(directory)):
      if name.startswith('.'):
        continue
      grey = load_image(os.path.join(directory, name))[..., 0].astype(float)
      band = ndimage.gaussian_filter(grey, 0.7) - ndimage.gaussian_filter(grey, 3)
      spots.append(np.sum(band > 12))
      stages.append(stage)
  spots, stages = np.array(spots), np.array(stages)
  means = [spots[stages == s].mean() for s in range(4)]
  assert np.all(np.diff(means) > 0.2 * means[-1]), means
  accuracy = cross_val_score(DecisionTreeClassifier(max_depth=2), spots[:, None], stages, cv=4)
  assert accuracy.mean() >= 0.6, accuracy
