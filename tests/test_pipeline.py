"""grain loaders: determinism, epochs, checkpoint resume, sharding, balancing, eval padding."""

import itertools
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from PIL import Image

from configs import default
from pneumo_jax.data import augment, folder_builder, pipeline, preprocess

COUNTS = {'a': 12, 'b': 6, 'c': 3}  # → train 8 / 4 / 2, validation 4 / 2 / 1 at fraction 0.3.
SIDE = preprocess.stored_size(75)  # 86: records are stored at this side.


def build(root, data_dir, solid: bool):
  """Solid images carry their id as grey level (10, 20, …); textured ones are noise."""
  rng = np.random.default_rng(0)
  ids = itertools.count(1)
  for cls, n in COUNTS.items():
    os.makedirs(root / cls)
    for i in range(n):
      pixels = (
        np.full((8, 8, 3), 10 * next(ids), np.uint8)
        if solid
        else rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
      )
      Image.fromarray(pixels).save(root / cls / f'{i}.png')
  c = default.get_config().dataset
  c.source_dir, c.validation_fraction = str(root), 0.3
  return folder_builder.build(c, str(data_dir), SIDE)


@pytest.fixture(scope='module')
def solid(tmp_path_factory):
  return build(tmp_path_factory.mktemp('solid'), tmp_path_factory.mktemp('data'), solid=True)


@pytest.fixture(scope='module')
def textured(tmp_path_factory):
  return build(tmp_path_factory.mktemp('noise'), tmp_path_factory.mktemp('data'), solid=False)


def input_cfg(**overrides):
  c = default.get_config().input
  c.update(image_size=75, batch_size=4, eval_batch_size=3, color_distortion=False)
  c.update(overrides)
  return c


def ids(batch) -> list[int]:
  """The grey level (÷10) of each solid image in a batch: which file it came from."""
  return (batch['image'][:, 0, 0, 0] // 10).astype(int).tolist()


def train_ids(builder) -> set[int]:
  names = {
    f'{cls}/{i}.png': k + 1
    for k, (cls, i) in enumerate((c, i) for c, n in COUNTS.items() for i in range(n))
  }
  return {names[f] for f in folder_builder.split_filenames(builder, 'train')}


def take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_and_epochs(solid):
  it = pipeline.train_iterator(solid, input_cfg(), seed=0)
  batches = take(it, 7)  # 28 elements: exactly two epochs of the 14 training images.
  assert batches[0]['image'].shape == (4, SIDE, SIDE, 1)  # Grey records: one channel.
  assert batches[0]['image'].dtype == np.uint8 and batches[0]['label'].dtype == np.int32
  assert batches[0]['box'].shape == (4, 4) and batches[0]['colour'].shape == (4, 4)
  stream = [i for b in batches for i in ids(b)]
  first, second = stream[:14], stream[14:]
  assert set(first) == set(second) == train_ids(solid)
  assert len(set(first)) == 14 and first != second  # Each epoch a new permutation.
  labels = np.concatenate([b['label'] for b in batches])
  assert np.bincount(labels[:14]).tolist() == [8, 4, 2]


def test_same_seed_same_batches(textured):
  cfg = input_cfg(color_distortion=True)
  one = take(pipeline.train_iterator(textured, cfg, seed=5), 4)
  two = take(pipeline.train_iterator(textured, cfg, seed=5), 4)
  other = take(pipeline.train_iterator(textured, cfg, seed=6), 4)
  for a, b in zip(one, two, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not all(np.array_equal(a['colour'], b['colour']) for a, b in zip(one, other, strict=True))


def test_checkpoint_resumes_at_the_next_batch(textured, tmp_path):
  cfg = input_cfg(color_distortion=True)
  it = pipeline.train_iterator(textured, cfg, seed=1)
  take(it, 5)  # Past the first epoch (14 images in batches of 4).
  manager = ocp.CheckpointManager(tmp_path / 'ckpt')
  manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = take(it, 3)
  fresh = pipeline.train_iterator(textured, cfg, seed=1)
  manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for a, b in zip(expected, take(fresh, 3), strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  manager.close()


def test_reading_without_images_continues_the_same_stream(textured):
  """A feature-cache phase reads indices instead of images: same records, same views, and the
  position carries over between the two kinds of iterator (as the loop switches phases)."""
  cfg = input_cfg(color_distortion=True)
  with_images = take(pipeline.train_iterator(textured, cfg, seed=3), 6)
  it = pipeline.train_iterator(textured, cfg, seed=3)
  first = take(it, 2)
  bare = pipeline.train_iterator(
    textured, cfg, seed=3, read_images=False, put=lambda b: b | {'put': 1}
  )
  bare.set_state(it.get_state())
  it.close()
  rest = take(bare, 4)
  source = textured.as_data_source('train')
  for a, b in zip(with_images, first + rest, strict=True):
    for k in ('box', 'flip', 'colour', 'label'):
      np.testing.assert_array_equal(a[k], b[k])
    if 'index' in b:
      assert b['put'] == 1 and 'image' not in b
      np.testing.assert_array_equal(a['image'], [source[int(i)]['image'] for i in b['index']])


def test_processes_read_slices_of_the_one_process_stream(solid):
  """Two processes' batches, side by side, are one process's batches: a run on two hosts trains
  on the same global batches (and views) as on one."""
  cfg = input_cfg()  # Global batch 4 → 2 per process.
  whole = take(pipeline.train_iterator(solid, cfg, seed=0), 4)
  halves = [
    take(pipeline.train_iterator(solid, cfg, seed=0, process_index=p, process_count=2), 4)
    for p in range(2)
  ]
  for one, (first, second) in zip(whole, zip(*halves, strict=True), strict=True):
    assert first['image'].shape[0] == 2
    for k in one:
      np.testing.assert_array_equal(one[k], np.concatenate([first[k], second[k]]), err_msg=k)
  assert not set(ids(halves[0][0])) & set(ids(halves[1][0]))


def test_class_balanced(solid):
  it = pipeline.train_iterator(solid, input_cfg(batch_size=6, class_balanced=True), seed=0)
  batches = take(it, 10)
  labels = np.concatenate([b['label'] for b in batches])
  assert np.bincount(labels).tolist() == [20, 20, 20]  # Despite 8 / 4 / 2 training images.
  by_class = {}
  for b in batches:
    for label, i in zip(b['label'], ids(b), strict=True):
      by_class.setdefault(int(label), set()).add(i)
  assert [len(v) for _, v in sorted(by_class.items())] == [8, 4, 2]  # Every image gets its turn.


def test_worker_processes_read_the_same_stream(textured):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (main.py parses them).
  in_process = take(pipeline.train_iterator(textured, input_cfg(), seed=2), 2)
  it = pipeline.train_iterator(textured, input_cfg(num_workers=2), seed=2)
  try:
    in_workers = take(it, 2)
  finally:
    it.close()

  def images(batches):  # Each worker batches its slice of the stream: compare as multisets.
    return sorted(
      np.concatenate([b['image'].reshape(4, -1) for b in batches]).tolist()
      + np.concatenate([b['colour'] for b in batches]).tolist()
    )

  assert images(in_process) == images(in_workers)


def test_eval_batches_pad_and_mask(solid):
  batches = list(pipeline.eval_batches(solid, 'validation', input_cfg()))
  assert len(batches) == 3  # 7 records in batches of 3.
  index = np.concatenate([b['index'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, -1, -1]
  assert mask.tolist() == [True] * 7 + [False] * 2
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels[:7], folder_builder.split_labels(solid, 'validation'))
  assert not batches[-1]['image'][1:].any()
  names = folder_builder.split_filenames(solid, 'validation')
  by_name = {
    f'{c}/{i}.png': k + 1
    for k, (c, i) in enumerate((c, i) for c, n in COUNTS.items() for i in range(n))
  }
  assert [i for b in batches for i in ids(b)][:7] == [by_name[n] for n in names]


def test_eval_batches_split_over_processes(solid):
  per_process = [
    list(
      pipeline.eval_batches(
        solid, 'validation', input_cfg(eval_batch_size=4), process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]
  assert [len(b) for b in per_process] == [2, 2]  # Same count everywhere, for collectives.
  # Each global batch is the processes' blocks in process order: gathered, the records in order.
  gathered = np.concatenate([b['index'] for pair in zip(*per_process, strict=True) for b in pair])
  assert gathered.tolist() == [*range(7), -1]
  masks = np.concatenate([b['mask'] for pair in zip(*per_process, strict=True) for b in pair])
  assert masks.tolist() == [True] * 7 + [False]


def test_batch_must_divide_over_processes(solid):
  with pytest.raises(ValueError, match=r'input\.batch_size=4'):
    pipeline.train_iterator(solid, input_cfg(), seed=0, process_count=3)
  with pytest.raises(ValueError, match=r'input\.eval_batch_size=3'):
    pipeline.eval_batches(solid, 'validation', input_cfg(), process_count=2)


@pytest.mark.parametrize('random_crop', [False, True])
def test_eval_view_follows_the_training_view(textured, random_crop):
  """Without random crops training resizes the whole image, so evaluation must too (no 0.875
  zoom the model never saw); with slim's distorted crops, slim's central crop."""
  cfg = input_cfg(random_crop=random_crop, random_flip=False, eval_batch_size=7)
  (batch,) = pipeline.eval_batches(textured, 'validation', cfg)
  seen = np.asarray(augment.from_batch(batch, 75))
  source = textured.as_data_source('validation')
  for row, index in enumerate(batch['index']):
    image = source[int(index)]['image']
    want = (
      preprocess.eval(image, 75, central_fraction=0.875)
      if random_crop
      else preprocess.train(
        image,
        np.random.default_rng(0),
        75,
        random_crop=False,
        random_flip=False,
        color_distortion=False,
      )
    )
    np.testing.assert_allclose(seen[row], want, atol=1e-5)  # See augment: float32 rounding.


def test_an_explicit_eval_crop_is_kept_and_a_mismatch_named():
  assert preprocess.eval_central_fraction(input_cfg(random_crop=False)) == 1.0
  assert preprocess.eval_central_fraction(input_cfg(random_crop=True)) == 0.875
  explicit = input_cfg(random_crop=False, central_crop_fraction=0.9)
  assert preprocess.eval_central_fraction(explicit) == 0.9
  assert 'input.central_crop_fraction=0.9' in preprocess.view_mismatch(explicit)
  assert preprocess.view_mismatch(input_cfg(random_crop=False)) is None
  assert preprocess.view_mismatch(input_cfg(random_crop=True, central_crop_fraction=0.8)) is None
