"""The class-folder builder: splits, formats, reuse vs rebuild, atomicity and bad input."""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from configs import default
from pneumo_jax.data import dataset_for, folder_builder, images
from pneumo_jax.data.folder_builder import DatasetError

SIZE = 12  # Stored size of most builds here: small, and not the files' own.


def make_folder(root, counts: dict[str, int], size=(8, 10)) -> None:
  """Writes counts[cls] small distinct PNGs into root/cls."""
  rng = np.random.default_rng(len(counts))
  for cls, n in counts.items():
    os.makedirs(root / cls, exist_ok=True)
    for i in range(n):
      pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / cls / f'{i:03d}.png')


def cfg(source_dir, **overrides):
  c = default.get_config().dataset
  c.source_dir = str(source_dir)
  c.update(overrides)
  return c


def build(config, data_dir, stored_size: int | None = SIZE):
  return folder_builder.build(config, str(data_dir), stored_size)


def records_of(builder) -> dict[str, np.ndarray]:
  """Every record's image by file name."""
  out = {}
  for split in builder.info.splits:
    ds = builder.as_data_source(split)
    out.update({ds[i]['filename'].decode(): ds[i]['image'] for i in range(len(ds))})
  return out


def splits_of(builder) -> dict[str, set[str]]:
  return {s: set(folder_builder.split_filenames(builder, s)) for s in builder.info.splits}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp('src')
  make_folder(root, {'zebra': 20, 'apple': 10, 'mango': 7})
  return root


@pytest.fixture(scope='module')
def built(source, tmp_path_factory):
  return build(cfg(source, test_fraction=0.2, num_shards=2), str(tmp_path_factory.mktemp('data')))


def test_labels_are_sorted_folder_names(built):
  assert folder_builder.label_names(built) == ['apple', 'mango', 'zebra']
  labels_txt = (built.data_path / 'labels.txt').read_text()
  assert labels_txt == '0:apple\n1:mango\n2:zebra\n'


def test_records_match_metadata(built, source):
  for split in ('train', 'validation', 'test'):
    ds = built.as_data_source(split)
    labels = folder_builder.split_labels(built, split)
    names = folder_builder.split_filenames(built, split)
    assert len(ds) == len(labels) == len(names)
    for i in range(len(ds)):
      record = ds[i]
      assert record['label'] == labels[i]
      assert record['filename'].decode() == names[i]
      assert names[i].split('/')[0] == folder_builder.label_names(built)[labels[i]]
      # The builder stores what load_stored reads (random colour files: C = 3).
      expected = images.load_stored(source / names[i], SIZE)
      assert record['image'].dtype == np.uint8 and record['image'].shape == (SIZE, SIZE, 3)
      np.testing.assert_array_equal(record['image'], expected)
  assert folder_builder.stored_shape(built) == (SIZE, SIZE, 3)
  assert built.info.splits['train'].num_shards == 2


def test_stratified_proportions(built):
  # Per class, round-half-up of 20% for test and for validation; train gets the rest.
  expected = {'train': [6, 5, 12], 'validation': [2, 1, 4], 'test': [2, 1, 4]}
  for split, counts in expected.items():
    assert np.bincount(folder_builder.split_labels(built, split)).tolist() == counts
  parts = splits_of(built)
  assert not parts['train'] & parts['validation'] and not parts['train'] & parts['test']
  assert not parts['validation'] & parts['test']
  assert len(set().union(*parts.values())) == 37


def test_split_depends_only_on_seed(source, tmp_path):
  one = splits_of(build(cfg(source, split_seed=3), str(tmp_path / 'a')))
  two = splits_of(build(cfg(source, split_seed=3), str(tmp_path / 'b')))
  other = splits_of(build(cfg(source, split_seed=4), str(tmp_path / 'a')))
  assert one == two
  assert one['validation'] != other['validation']


def test_k_fold_partitions_the_non_test_images(source, tmp_path):
  folds = [
    splits_of(build(cfg(source, num_folds=3, fold=k, test_fraction=0.2), str(tmp_path)))
    for k in range(3)
  ]
  test = folds[0]['test']
  assert all(f['test'] == test for f in folds)  # Held out before folding.
  validations = [f['validation'] for f in folds]
  everything = set().union(*folds[0].values())
  assert sum(map(len, validations)) == len(set().union(*validations)) == len(everything - test)
  for f in folds:
    assert f['train'] == everything - test - f['validation']
  # Stratified: each fold has about a third of each class's non-test images (16, 8, 5).
  for f in folds:
    counts = np.bincount(
      [sorted(['apple', 'mango', 'zebra']).index(p.split('/')[0]) for p in f['validation']],
      minlength=3,
    )
    assert np.all(np.abs(counts - np.array([8, 5, 16]) / 3) <= 1)


def test_reuse_and_rebuild_on_change(tmp_path, monkeypatch):
  src, data = tmp_path / 'src', str(tmp_path / 'data')
  make_folder(src, {'a': 5, 'b': 5})
  first = build(cfg(src), data)
  stamp = os.stat(first.data_path / 'dataset_info.json').st_mtime_ns
  with monkeypatch.context() as m:  # Reuse reads no image: the channel count is recorded.
    m.setattr(folder_builder, 'load_stored', None)
    again = build(cfg(src), data)
  assert again.data_path == first.data_path
  assert os.stat(again.data_path / 'dataset_info.json').st_mtime_ns == stamp  # Not rewritten.
  assert folder_builder.stored_shape(again) == (SIZE, SIZE, 3)

  seen = {first.data_path}

  def rebuilt(config=None, size=SIZE) -> int:
    builder = build(config or cfg(src), data, size)
    assert builder.data_path not in seen
    seen.add(builder.data_path)
    assert folder_builder.stored_shape(builder)[:2] == (size, size)
    return sum(s.num_examples for s in builder.info.splits.values())

  assert rebuilt(size=SIZE + 4) == 10  # A new stored size (from input.image_size) rebuilds.
  assert rebuilt(size=None) == 10

  make_folder(src, {'a': 6})  # Adds a/005.png (and rewrites the others: same bytes).
  assert rebuilt() == 11
  os.remove(src / 'b' / '004.png')
  assert rebuilt() == 10
  edited = src / 'a' / '000.png'
  Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(edited)
  assert rebuilt() == 10
  assert rebuilt(cfg(src, validation_fraction=0.4)) == 10
  (src / 'a' / 'notes.txt').write_text('not an image: no rebuild')
  assert build(cfg(src, validation_fraction=0.4), data).data_path in seen


def test_failed_build_leaves_nothing_complete(tmp_path, monkeypatch):
  src, data = tmp_path / 'src', str(tmp_path / 'data')
  make_folder(src, {'a': 5, 'b': 5})
  calls = []

  def fail_late(path, config):
    calls.append(path)
    if len(calls) > 4:
      raise RuntimeError('killed mid-build')
    return real(path, config)

  real = folder_builder._record_image
  monkeypatch.setattr(folder_builder, '_record_image', fail_late)
  with pytest.raises(RuntimeError, match='killed'):
    build(cfg(src), data)
  assert os.listdir(data) == ['.build.lock']  # No class_folder/CONFIG/, no downloads/.
  monkeypatch.setattr(folder_builder, '_record_image', real)
  builder = build(cfg(src), data)
  assert sum(s.num_examples for s in builder.info.splits.values()) == 10


def test_corrupt_image_leaves_no_build_directory(tmp_path):
  src, data = tmp_path / 'src', tmp_path / 'data'
  make_folder(src, {'a': 5, 'b': 5})
  (src / 'b' / '002.png').write_bytes(b'not a png')
  config = default.get_config()
  config.dataset.source_dir, config.dataset.data_dir = str(src), str(data)
  with pytest.raises(DatasetError, match='skip_corrupt'):
    dataset_for(config, str(tmp_path / 'work'))
  assert os.listdir(data) == ['.build.lock']
  assert not (tmp_path / 'work').exists()


def test_next_run_removes_what_killed_runs_left(tmp_path):
  data = tmp_path / 'work' / 'data'
  stale_images = data / 'synthetic_stages.incomplete-999999' / 'stage_0'
  stale_images.mkdir(parents=True)
  (stale_images / '0_0000.png').write_bytes(b'half written')
  # What TFDS 4.9.10 leaves when a build is killed: its temporary directory, half filled.
  stale_build = data / 'class_folder' / 'synthetic_stages_0123456789abcdef'
  (stale_build / 'incomplete.K1LL3D_1.0.0').mkdir(parents=True)
  (stale_build / 'incomplete.K1LL3D_1.0.0' / 'labels.txt').write_text('0:stage_0\n')
  config = default.get_config()
  config.dataset.synthetic = True
  config.dataset.synthetic_images_per_class, config.dataset.synthetic_image_size = 5, 32
  builder = dataset_for(config, str(tmp_path / 'work'))
  assert sorted(os.listdir(data)) == ['.build.lock', 'class_folder', 'synthetic_stages']
  assert os.listdir(data / 'class_folder') == [builder.data_path.parent.name]
  assert os.listdir(builder.data_path.parent) == ['1.0.0']


def test_odd_formats(tmp_path, caplog):
  src = tmp_path / 'src'
  make_folder(src, {'a': 3, 'b': 3})
  grey = np.tile(np.arange(0, 250, 25, dtype=np.uint8), (8, 1))
  Image.fromarray(grey.astype(np.uint16) * 257).save(src / 'a' / 'grey16.png')
  Image.fromarray(grey).save(src / 'a' / 'grey8.png')
  Image.fromarray(np.dstack([grey] * 3)).quantize(16).save(src / 'a' / 'palette.png')
  Image.fromarray(np.dstack([grey] * 4)).save(src / 'b' / 'rgba.png')
  Image.fromarray(np.dstack([grey] * 3)).save(src / 'b' / 'upper.JPG', quality=95)
  Image.fromarray(np.dstack([grey] * 3)).save(src / 'b' / 'mixed.JpEg', quality=95)
  Image.fromarray(np.dstack([grey] * 3)).save(src / 'b' / 'bitmap.BMP')
  os.makedirs(src / 'b' / 'nested')
  Image.fromarray(grey).save(src / 'b' / 'nested' / 'deep.png')
  Image.fromarray(grey).save(src / 'b' / '.hidden.png')
  (src / 'a' / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
  (src / 'README.txt').write_text('about')
  (src / 'b' / 'labels.csv').write_text('x')
  # On absl's logger: code that parses absl flags in this process (TensorFlow's export, in
  # test_export) leaves it at absl's default WARNING verbosity.
  with caplog.at_level(logging.INFO, logger='absl'):  # Full resolution: the files' own shapes.
    builder = build(cfg(src, validation_fraction=0.3), tmp_path / 'data', None)
  assert 'skipped 2 non-image file(s)' in caplog.text and 'DS_Store' not in caplog.text
  assert folder_builder.stored_shape(builder) == (None, None, 3)  # make_folder's are colour.
  records = records_of(builder)
  assert len(records) == 14
  assert all(r.dtype == np.uint8 and r.ndim == 3 and r.shape[-1] == 3 for r in records.values())
  for name in (
    'a/grey16.png',
    'a/grey8.png',
    'a/palette.png',
    'b/rgba.png',
    'b/bitmap.BMP',
    'b/nested/deep.png',
  ):
    np.testing.assert_array_equal(records[name], np.dstack([grey] * 3), err_msg=name)
  for name in ('b/upper.JPG', 'b/mixed.JpEg'):
    assert np.abs(records[name].astype(int) - grey[..., None]).mean() < 3


def grey_folder(root) -> None:
  """Grey images in several forms (grey modes, 16 bits, colour files with equal channels)."""
  ramp = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))  # [20, 25]
  os.makedirs(root / 'a')
  os.makedirs(root / 'b')
  Image.fromarray(ramp).save(root / 'a' / 'grey8.png')
  Image.fromarray(ramp.astype(np.uint16) * 257).save(root / 'a' / 'grey16.png')
  Image.fromarray(ramp.T).save(root / 'a' / 'tall.png')
  Image.fromarray(np.dstack([ramp] * 3)).save(root / 'b' / 'equal.png')
  Image.fromarray(np.dstack([ramp[::-1]] * 3)).save(root / 'b' / 'equal.jpg', quality=90)
  Image.fromarray(np.dstack([ramp] * 3)).quantize(32).save(root / 'b' / 'palette.png')


def test_grey_folder_stores_one_channel(tmp_path):
  src = tmp_path / 'src'
  grey_folder(src)
  builder = build(cfg(src, validation_fraction=0.4), tmp_path / 'data')
  assert folder_builder.stored_shape(builder) == (SIZE, SIZE, 1)
  records = records_of(builder)
  assert len(records) == 6
  for name, image in records.items():
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 1), name
    np.testing.assert_array_equal(image, images.load_stored(src / name, SIZE), err_msg=name)
  full = build(cfg(src, validation_fraction=0.4), tmp_path / 'data', None)
  assert folder_builder.stored_shape(full) == (None, None, 1)
  for name, image in records_of(full).items():  # Native shapes ('tall' is 25 x 20).
    np.testing.assert_array_equal(image, images.load_stored(src / name, None), err_msg=name)


def test_one_colour_image_makes_the_build_rgb(tmp_path):
  src = tmp_path / 'src'
  grey_folder(src)
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 9, 3), np.uint8)).save(
    src / 'b' / 'colour.png'
  )
  builder = build(cfg(src, validation_fraction=0.4), tmp_path / 'data')
  assert folder_builder.stored_shape(builder) == (SIZE, SIZE, 3)
  for name, image in records_of(builder).items():
    expected = images.load_stored(src / name, SIZE, channels=3)
    np.testing.assert_array_equal(image, expected, err_msg=name)
  grey = images.load_stored(src / 'a' / 'grey8.png', SIZE)
  np.testing.assert_array_equal(records_of(builder)['a/grey8.png'], np.repeat(grey, 3, axis=-1))


def test_dataset_for_derives_the_stored_size(tmp_path):
  src = tmp_path / 'src'
  make_folder(src, {'a': 3, 'b': 3})
  config = default.get_config()
  config.dataset.source_dir, config.dataset.validation_fraction = str(src), 0.4
  config.input.image_size = 75
  assert folder_builder.stored_shape(dataset_for(config, str(tmp_path))) == (86, 86, 3)
  config.dataset.stored_size = 80  # Given: kept.
  assert folder_builder.stored_shape(dataset_for(config, str(tmp_path))) == (80, 80, 3)
  config.dataset.full_resolution = True
  builder = dataset_for(config, str(tmp_path))
  assert folder_builder.stored_shape(builder) == (None, None, 3)
  assert {r.shape for r in records_of(builder).values()} == {(8, 10, 3)}


def test_corrupt_images_listed_or_skipped(tmp_path):
  src = tmp_path / 'src'
  make_folder(src, {'a': 6, 'b': 6}, size=(40, 40))
  for name in ('a/002.png', 'b/005.png'):
    data = (src / name).read_bytes()
    (src / name).write_bytes(data[: len(data) // 2])
  with pytest.raises(DatasetError) as e:
    build(cfg(src), str(tmp_path / 'data'))
  assert str(src / 'a' / '002.png') in str(e.value) and str(src / 'b' / '005.png') in str(e.value)
  assert 'skip_corrupt' in str(e.value)
  builder = build(cfg(src, skip_corrupt=True), str(tmp_path / 'data'))
  assert builder.info.metadata['skipped_corrupt'] == ['a/002.png', 'b/005.png']
  kept = set().union(*splits_of(builder).values())
  assert len(kept) == 10 and 'a/002.png' not in kept


@pytest.mark.parametrize(
  'layout, overrides, needle',
  [
    ('missing', {}, 'does not exist'),
    ('file', {}, 'is not a folder'),
    ('one_class', {}, 'at least two'),
    ('empty_class', {}, 'hold no images'),
    ('ok', {'validation_fraction': 0.5, 'test_fraction': 0.5}, 'validation_fraction=0.5'),
    ('ok', {'validation_fraction': 0.0}, 'validation_fraction=0.0'),
    ('ok', {'test_fraction': -0.1}, 'test_fraction=-0.1'),
    ('ok', {'num_folds': 3, 'fold': 3}, 'dataset.fold=3'),
    ('ok', {'num_folds': 1}, 'num_folds=1'),
    ('ok', {'num_shards': 0}, 'num_shards=0'),
    ('ok', {'validation_fraction': 0.05}, "class 'small' (3 images): train 3, validation 0"),
    ('ok', {'num_folds': 4}, "class 'small' (3 images): train 2, validation 0 (smallest fold)"),
  ],
)
def test_bad_input(tmp_path, layout, overrides, needle):
  src = tmp_path / 'src'
  if layout == 'file':
    src.write_text('not a folder')
  elif layout == 'one_class':
    make_folder(src, {'only': 3})
  elif layout == 'empty_class':
    make_folder(src, {'a': 3})
    os.makedirs(src / 'b')
    (src / 'b' / 'README.txt').write_text('x')
  elif layout == 'ok':
    make_folder(src, {'big': 30, 'small': 3})
  with pytest.raises(DatasetError) as e:
    build(cfg(src, **overrides), str(tmp_path / 'data'))
  assert needle in str(e.value)
  assert not (tmp_path / 'data').exists()  # Checked before writing anything.
  if layout != 'ok':
    assert str(src) in str(e.value)


def test_missing_split_is_named(built):
  with pytest.raises(DatasetError, match="no split 'holdout'"):
    folder_builder.split_labels(built, 'holdout')


def test_builds_and_reads_without_tensorflow(source, tmp_path):
  """The stack must not need TF: block its import in a fresh interpreter."""
  script = textwrap.dedent(f"""
      import importlib.machinery, sys
      find = importlib.machinery.PathFinder.find_spec
      def no_tf(name, path=None, target=None):
        return None if name.split('.')[0] == 'tensorflow' else find(name, path, target)
      importlib.machinery.PathFinder.find_spec = staticmethod(no_tf)
      import numpy as np
      from configs import default
      from pneumo_jax.data import folder_builder
      c = default.get_config().dataset
      c.source_dir = {str(source)!r}
      for size, shape in ((16, (16, 16, 3)), (None, (8, 10, 3))):  # Default encoding; full res.
        builder = folder_builder.build(c, {str(tmp_path)!r}, size)
        image = builder.as_data_source('validation')[0]['image']
        assert image.shape == shape and image.dtype == np.uint8, (image.shape, image.dtype)
      assert 'tensorflow' not in sys.modules
      print('OK')
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, '-c', script],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert out.stdout.strip().endswith('OK'), out.stderr[-3000:]
