"""The eval, predict and explain modes end to end, on a saved random-weight checkpoint, on one
device and (in a subprocess, as the flag must precede JAX's import) on four."""

import csv
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pneumo_jax import checkpoints
from pneumo_jax.data import dataset_for, folder_builder
from pneumo_jax.evaluation import metrics, model_card
from pneumo_jax.models import build_model
from pneumo_jax.modes import evaluate, explain, predict
from tests import reference

STEP = 7


@pytest.fixture(scope='module')
def run(tiny_config, tmp_path_factory):
  """(config, workdir, label names): a checkpoint at step STEP of a random 4-class model."""
  config = tiny_config(**{'model.depth_multiplier': 0.25, 'input.eval_batch_size': 6})
  workdir = str(tmp_path_factory.mktemp('run'))
  names = folder_builder.label_names(dataset_for(config, workdir))
  model = build_model(config, len(names))
  variables = reference.random_variables(model, 75)
  mngr = checkpoints.manager(workdir)
  checkpoints.save(mngr, STEP, {'step': STEP, **variables})
  mngr.wait_until_finished()
  return config, workdir, names


@pytest.fixture(scope='module')
def inputs(stage_folder, tmp_path_factory):
  """A folder of good images, plus a corrupt PNG and a text file among the inputs."""
  extra = tmp_path_factory.mktemp('inputs')
  rng = np.random.default_rng(0)
  # 85 px: stored at 85 (test_flip_tta…), the 0.875 central crop is exactly 75 px, so no
  # resize, and a mirrored file's preprocessed image is exactly the mirrored preprocessed image
  # (TF1's bilinear resize, which slim uses, is not mirror-symmetric).
  image = rng.integers(0, 256, (85, 85, 3), np.uint8)
  Image.fromarray(image).save(extra / 'pair_a.png')
  Image.fromarray(image[:, ::-1]).save(extra / 'pair_b.png')
  (extra / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
  (extra / 'notes.txt').write_text('not an image')
  return [
    os.path.join(stage_folder, 'stage_1'),
    str(extra / 'pair_*.png'),
    str(extra / 'corrupt.png'),
    str(extra / 'notes.txt'),
  ]


def _rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_eval_writes_reports(run):
  config, workdir, names = run
  result = evaluate.run(config, workdir)
  stem = os.path.join(workdir, 'eval', f'validation_{STEP}')
  for suffix in ('.json', '_confusion_matrix.png', '_roc.png', '_predictions.csv'):
    assert os.path.exists(stem + suffix), suffix
  rows = _rows(stem + '_predictions.csv')
  assert len(rows) == sum(result['per_class'][n]['support'] for n in names)
  labels = [names.index(r['label']) for r in rows]
  probs = np.array([[float(r[n]) for n in names] for r in rows])
  again = metrics.compute(np.array(labels), probs, names)
  assert again['accuracy'] == pytest.approx(result['accuracy'])
  with open(stem + '.json') as f:
    assert json.load(f)['step'] == STEP


def test_eval_refuses_a_checkpoint_with_other_classes(run, tiny_config, tmp_path):
  _, workdir, _ = run
  for name in ('cat', 'dog'):
    (tmp_path / 'src' / name).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(np.full((80, 80, 3), 40 * i, np.uint8)).save(
        tmp_path / 'src' / name / f'{i}.png'
      )
  other = tiny_config(
    **{'dataset.source_dir': str(tmp_path / 'src'), 'dataset.data_dir': str(tmp_path / 'data')}
  )
  with pytest.raises(ValueError, match=r'predicts 4 classes, but the dataset .* has 2'):
    evaluate.run(other, workdir)


def test_predict_lists_unreadable_files_and_predicts_the_rest(run, inputs):
  config, workdir, names = run
  path = predict.run(config, workdir, inputs)
  assert path == os.path.join(workdir, 'predictions', f'step{STEP}.csv')
  rows = _rows(path)
  assert list(rows[0]) == ['path', 'prediction', *names, 'error']
  errors = {os.path.basename(r['path']): r['error'] for r in rows if r['error']}
  assert set(errors) == {'corrupt.png', 'notes.txt'}
  good = [r for r in rows if not r['error']]
  assert len(good) >= 8  # stage_1's images (nested ones included) and the pair.
  for r in good:
    assert sum(float(r[n]) for n in names) == pytest.approx(1.0, abs=1e-5)
    assert r['prediction'] == max(names, key=lambda n: float(r[n]))


def test_flip_tta_averages_an_image_with_its_mirror(run, inputs):
  config, workdir, names = run
  pair = inputs[1]
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset.stored_size = 85  # No resize anywhere: see `inputs`.

  def probs(tta):
    rows = _rows(predict.run(config, workdir, [pair], tta=tta))
    return np.array([[float(r[n]) for n in names] for r in rows])

  plain, tta = probs(False), probs(True)
  assert not np.allclose(plain[0], plain[1], atol=1e-6)  # The model is not mirror-symmetric...
  np.testing.assert_allclose(tta[0], tta[1], atol=1e-6)  # ...but an image and its mirror
  np.testing.assert_allclose(tta[0], plain.mean(0), atol=1e-6)  # average to the same.


def test_explain_writes_one_panel_per_image(run, inputs, capsys):
  config, workdir, _ = run
  out = explain.run(config, workdir, inputs[1:], layer='Mixed_5d', target_class=2)
  assert out == os.path.join(workdir, 'explain', f'step{STEP}_Mixed_5d_class2')
  assert sorted(os.listdir(out)) == ['pair_a.png', 'pair_b.png']
  with pytest.raises(ValueError, match='--target_class=4 is not a class id'):
    explain.run(config, workdir, inputs[1:], target_class=4)
  capsys.readouterr()
  explain.run(config, workdir, inputs[1:2], layer='Mixed_7c')  # 1×1 cell at 75 px.
  assert 'Warning' in capsys.readouterr().out


def test_true_label_comes_from_a_class_folder():
  names = ['stage_0', 'stage_1']
  assert explain._true_label('/data/xrays/stage_1/sub/a.png', names) == 1
  assert explain._true_label('/data/new_films/a.png', names) is None


def test_predict_refuses_missing_inputs_and_keeps_earlier_predictions(run, inputs, tmp_path):
  config, workdir, _ = run
  path = predict.run(config, workdir, inputs)
  before = pathlib.Path(path).read_text()
  with pytest.raises(FileNotFoundError, match=r'typo\.png'):
    predict.run(config, workdir, [str(tmp_path / 'typo.png')])
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match='none of the 1 input'):
    predict.run(config, workdir, [str(tmp_path / 'bad.png')])
  assert pathlib.Path(path).read_text() == before
  other = predict.run(config, workdir, inputs[1:2])  # Other inputs: a new file.
  assert other != path and pathlib.Path(path).read_text() == before
  with open(os.path.splitext(other)[0] + '.json') as f:
    assert json.load(f)['provenance']['num_inputs'] == 2


def test_eval_and_predict_see_a_file_the_same_way(run, tiny_config):
  """A validation file predicted on its own gets the probabilities eval gave it: one view."""
  config, workdir, names = run
  whole = ml_collections.ConfigDict(config.to_dict())
  whole.input.random_crop = False  # → eval and predict both use the whole image.
  evaluate.run(whole, workdir)
  # test_eval_writes_reports evaluated with slim's crop (random_crop on): that report is kept.
  stems = {}
  for path in glob.glob(os.path.join(workdir, 'eval', f'validation_{STEP}*.json')):
    with open(path) as f:
      stems[json.load(f)['provenance']['central_crop_fraction']] = path[: -len('.json')]
  assert set(stems) == {0.875, 1.0}
  evaluated = _rows(stems[1.0] + '_predictions.csv')
  files = [os.path.join(config.dataset.source_dir, r['path']) for r in evaluated]
  predicted = _rows(predict.run(whole, workdir, files))
  for e, p in zip(evaluated, predicted, strict=True):
    for n in names:
      assert float(p[n]) == pytest.approx(float(e[n]), abs=1e-5)


def test_eval_without_a_run_or_a_test_split_says_what_to_do(run, tiny_config, tmp_path):
  config, workdir, _ = run
  empty = tmp_path / 'no_run'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='train first'):
    evaluate.run(config, str(empty))
  assert os.listdir(empty) == []  # Nothing built, nothing created.
  with pytest.raises(ValueError, match=r'dataset\.test_fraction'):
    evaluate.run(config, workdir, split='test')


_FOUR_DEVICES = """
import json, sys
import ml_collections
from pneumo_jax.modes import evaluate, explain, predict
import jax
assert jax.device_count() == 4, jax.devices()
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
result = evaluate.run(config, sys.argv[2])
predict.run(config, sys.argv[2], json.loads(sys.argv[3]))
explain.run(config, sys.argv[2], json.loads(sys.argv[3])[1:2], layer='Mixed_5d')
print('ACCURACY', result['accuracy'])
"""


def test_four_devices_give_the_same_results(run, inputs):
  """eval_batch_size 6 is not a multiple of 4: the modes round batches up and pad them."""
  shutil.rmtree(os.path.join(run[1], 'explain'), ignore_errors=True)
  config, workdir, names = run
  path = predict.run(config, workdir, inputs)
  one = {r['path']: r for r in _rows(path)}
  accuracy = evaluate.run(config, workdir)['accuracy']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-c', _FOUR_DEVICES, config.to_json(), workdir, json.dumps(inputs)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'ACCURACY {accuracy}' in proc.stdout
  four = {r['path']: r for r in _rows(path)}  # Same inputs and settings: refreshed in place.
  assert four.keys() == one.keys()
  for path, row in one.items():
    assert four[path]['error'] == row['error']
    for n in names:
      assert float(four[path][n] or 0) == pytest.approx(float(row[n] or 0), abs=1e-5)
  explained = os.path.join(workdir, 'explain', f'step{STEP}_Mixed_5d')
  assert sorted(os.listdir(explained)) == ['pair_a.png', 'pair_b.png']


def test_predict_needs_only_the_workdir(run, inputs, tmp_path):
  """With WORKDIR/labels.txt (the loop writes it), the training folder may be gone."""
  config, workdir, names = run
  checkpoints.save_label_names(workdir, names)
  moved = ml_collections.ConfigDict(config.to_dict())
  moved.dataset.source_dir = str(tmp_path / 'gone')
  rows = _rows(predict.run(moved, workdir, inputs[1:2]))
  assert list(rows[0]) == ['path', 'prediction', *names, 'error'] and len(rows) == 2


def test_eval_writes_a_model_card_from_its_report(run):
  """The card's facts match the build, the report and a bootstrap of the predictions CSV."""
  config, workdir, names = run
  result = evaluate.run(config, workdir)
  stem = os.path.join(workdir, 'eval', f'validation_{STEP}')
  card = pathlib.Path(workdir, model_card.CARD_FILE).read_text()
  assert pathlib.Path(f'{stem}_model_card.md').read_text() == card
  rows = _rows(f'{stem}_predictions.csv')
  labels = np.array([names.index(r['label']) for r in rows])
  probs = np.array([[float(r[n]) for n in names] for r in rows])
  with open(f'{stem}.json') as f:
    intervals = json.load(f)[model_card.INTERVALS]
  assert intervals == result[model_card.INTERVALS]
  again = metrics.bootstrap_ci(labels, probs, names)  # Seeded: the same intervals.
  for key in metrics.BOOTSTRAPPED:
    assert intervals[key] == pytest.approx(again[key]), key
  builder = dataset_for(config, workdir)
  for name, train, validation in zip(
    names,
    np.bincount(folder_builder.split_labels(builder, 'train')),
    np.bincount(folder_builder.split_labels(builder, 'validation')),
    strict=True,
  ):
    assert f'| {name} | {train} | {validation} | {train + validation} |' in card
  accuracy = intervals['accuracy']
  assert accuracy['low'] <= result['accuracy'] <= accuracy['high']
  assert f'| accuracy | {result["accuracy"]:.3f} | {accuracy["low"]:.3f} – ' in card
  for text in (
    f'## Metrics: validation split, {len(rows)} images',
    '| main | 1–4 | `Logits,AuxLogits` | trainable | rmsprop, weight decay 4e-05 | fixed | 0.01 |',
    'random init',
    f'step {STEP} (`--checkpoint=latest`)',
    'Optimistic: training evaluates the validation split',
    'Not a medical device',
  ):
    assert text in card, text
