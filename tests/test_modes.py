"""The eval, predict and explain modes end to end, on a saved random-weight checkpoint, on one
device and (in a subprocess, as the flag must precede JAX's import) on four."""

import csv
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from pneumo_jax import checkpoints
from pneumo_jax.data import dataset_for, folder_builder, stored_side
from pneumo_jax.evaluation import (
  calibration,
  inference,
  metrics,
  model_card,
  operating_points,
  reports,
)
from pneumo_jax.evaluation import explain as explain_lib
from pneumo_jax.export import jax_export
from pneumo_jax.models import build_model
from pneumo_jax.modes import common, evaluate, explain, export, predict
from tests import reference
from tests.test_dicom import write as write_dicom

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
  for suffix in (
    '.json',
    '.html',
    '_confusion_matrix.png',
    '_roc.png',
    '_reliability.png',
    '_predictions.csv',
  ):
    assert os.path.exists(stem + suffix), suffix
  rows = _rows(stem + '_predictions.csv')
  assert len(rows) == sum(result['per_class'][n]['support'] for n in names)
  labels = np.array([names.index(r['label']) for r in rows])
  probs = np.array([[float(r[n]) for n in names] for r in rows])
  again = metrics.compute(labels, probs, names)
  assert again['accuracy'] == pytest.approx(result['accuracy'])
  assert again['auc_macro'] == pytest.approx(result['auc_macro'], abs=1e-4)  # Uncalibrated.
  with open(stem + '.json') as f:
    record = json.load(f)
  assert record['step'] == STEP
  # The temperature is fitted on these predictions and kept with the run for this step.
  kept = calibration.load(workdir, STEP)
  assert kept['fitted_on'] == 'validation' and kept['n'] == len(rows)
  t = calibration.fit_temperature(calibration.logits_of(probs), labels)
  assert kept['temperature'] == pytest.approx(t, rel=1e-3)
  c = record['calibration']
  assert c == result['calibration'] and c['temperature'] == kept['temperature']
  assert c['after']['nll'] <= c['before']['nll'] + 1e-9  # T = 1 was a candidate.
  assert c['before']['nll'] == pytest.approx(result['loss'], abs=1e-6)
  assert c['after']['ece'] == pytest.approx(
    calibration.ece(labels, calibration.scaled(probs, t)), abs=1e-3
  )
  # Operating points chosen on this split, for each "≥ stage k" cut, measured here.
  ops = record['operating_points']
  assert ops['chosen_on'] == 'validation' and ops['step'] == STEP
  assert {r['cut'] for r in ops['rows']} <= {f'ge_{n}' for n in names[1:]}
  for r in ops['rows']:
    assert r['threshold'] == kept['operating_points'][r['cut']][r['point']]
    assert r['positives'] == (labels >= names.index(r['cut'].removeprefix('ge_'))).sum()
    if r['point'] != 'youden':  # The 90/95% thresholds reach that sensitivity on their split.
      assert r['sensitivity']['estimate'] >= 0.9
    # The four measures come from one 2×2 table.
    tp = r['sensitivity']['estimate'] * r['positives']
    fp = (1 - r['specificity']['estimate']) * r['negatives']
    assert tp == pytest.approx(round(tp)) and fp == pytest.approx(round(fp))
    if tp + fp:
      assert r['ppv']['estimate'] == pytest.approx(tp / (tp + fp))
  page = pathlib.Path(stem + '.html').read_text()
  wrong = int((probs.argmax(1) != labels).sum())
  assert page.count('<img src="data:image/png;base64,') == 3 + min(wrong, 16)
  assert 'http' not in page.replace('http-equiv', '')  # Nothing fetched.
  for text in ('Operating points', 'Most confident errors', f'{result["accuracy"]:.3f}'):
    assert text in page, text


def test_eval_of_another_split_uses_the_validation_temperature(run):
  """Kept: used as it is; absent: fitted first from the validation split, to the same value."""
  config, workdir, _ = run
  evaluate.run(config, workdir)
  kept = calibration.load(workdir, STEP)
  result = evaluate.run(config, workdir, split='train')
  assert result['calibration']['temperature'] == kept['temperature']
  assert result['calibration']['fitted_on'] == 'validation'
  assert result['operating_points']['chosen_on'] == 'validation'
  os.remove(os.path.join(workdir, calibration.CALIBRATION_FILE))
  again = evaluate.run(config, workdir, split='train')
  assert calibration.load(workdir, STEP) == kept  # The same predictions: the same fit.
  assert again['calibration'] == result['calibration']
  assert again['operating_points'] == result['operating_points']
  assert again['accuracy'] == result['accuracy']


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


def test_a_checkpoint_read_with_another_head_names_the_runs_setting(run, tiny_config, tmp_path):
  config, workdir, names = run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())  # As training records it: model.head 'softmax'.
  variables, step = checkpoints.load_for_inference(copy, 'latest')
  ordinal = tiny_config(**{'model.depth_multiplier': 0.25, 'model.head': 'ordinal'})
  with pytest.raises(ValueError, match=r"model.head='softmax' \(not 'ordinal'\)"):
    common.for_classes(ordinal, copy, variables, step, names)


def _decisions(workdir):
  """The decision columns predict adds when the step has a calibration entry."""
  entry = calibration.load(workdir, STEP)
  return [f'decision_{cut}' for cut in entry['operating_points']] if entry else []


def test_predict_lists_unreadable_files_and_predicts_the_rest(run, inputs):
  config, workdir, names = run
  path = predict.run(config, workdir, inputs)
  assert path.startswith(os.path.join(workdir, 'predictions', f'step{STEP}'))
  rows = _rows(path)
  assert list(rows[0]) == ['path', 'prediction', *names, *_decisions(workdir), 'error']
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
  # average to the same; the temperature (when eval kept one) applies to the average.
  t = (calibration.load(workdir, STEP) or {'temperature': 1.0})['temperature']
  model = calibration.scaled(plain, 1 / t)  # Scaling by 1 / T undoes T.
  np.testing.assert_allclose(tta[0], calibration.scaled(model.mean(0)[None], t)[0], atol=1e-5)


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
  # That evaluation fitted this view's temperature, which predict applies to the same numbers.
  temperature = calibration.load(workdir, STEP)['temperature']
  raw = np.array([[float(e[n]) for n in names] for e in evaluated])
  np.testing.assert_allclose(
    [[float(p[n]) for n in names] for p in predicted],
    calibration.scaled(raw, temperature),
    atol=1e-5,
  )


def test_predict_applies_the_temperature_and_decides_at_youden(run, inputs):
  config, workdir, names = run
  evaluate.run(config, workdir)  # Fits and keeps this step's temperature and thresholds.
  entry = calibration.load(workdir, STEP)
  os.rename(*(os.path.join(workdir, n) for n in (calibration.CALIBRATION_FILE, 'kept.json')))
  plain = predict.run(config, workdir, inputs[1:2])
  os.rename(*(os.path.join(workdir, n) for n in ('kept.json', calibration.CALIBRATION_FILE)))
  scaled = predict.run(config, workdir, inputs[1:2])
  assert scaled != plain  # Other settings: a new file beside the uncalibrated one.
  before = np.array([[float(r[n]) for n in names] for r in _rows(plain)])
  rows = _rows(scaled)
  after = np.array([[float(r[n]) for n in names] for r in rows])
  np.testing.assert_allclose(after, calibration.scaled(before, entry['temperature']), atol=1e-5)
  with open(os.path.splitext(scaled)[0] + '.json') as f:
    record = json.load(f)
  assert record['provenance']['calibrated'] is True
  applied = record['calibration']
  assert applied['temperature'] == entry['temperature'] and applied['operating_point'] == 'youden'
  for cut, first in operating_points.cuts(names).items():
    threshold = entry['operating_points'][cut]['youden']
    assert applied['thresholds'][cut] == threshold
    for r, p in zip(rows, after, strict=True):
      score = p[first:].sum()
      if abs(score - threshold) > 1e-4:  # Not decided by the CSV's rounding.
        assert r[f'decision_{cut}'] == str(int(score >= threshold)), (cut, score, threshold)


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


@pytest.mark.long
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
  assert list(rows[0]) == ['path', 'prediction', *names, *_decisions(workdir), 'error']
  assert len(rows) == 2


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


def _external(tmp_path, stage_folder, classes=('stage_1', 'stage_3')):
  """A labelled folder training never saw, holding only some of the run's classes."""
  ext = tmp_path / 'ext_site'
  for name in classes:
    (ext / name).mkdir(parents=True)
    for file in sorted(os.listdir(os.path.join(stage_folder, 'stage_1')))[:3]:
      if file.endswith('.png'):
        shutil.copy(os.path.join(stage_folder, 'stage_1', file), ext / name / file)
  return ext


def test_eval_scores_an_external_folder_whole_and_keeps_the_runs_card(
  run, stage_folder, tmp_path, capsys
):
  config, workdir, names = run
  checkpoints.save_label_names(workdir, names)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:  # As training records it.
    f.write(config.to_json_best_effort())
  evaluate.run(config, workdir)  # The run's own validation split, with this view: kept.
  kept = calibration.load(workdir, STEP)
  card = pathlib.Path(workdir, model_card.CARD_FILE)
  card.write_text('the card of the run\n')
  ext = _external(tmp_path, stage_folder)
  other = ml_collections.ConfigDict(config.to_dict())
  other.dataset.source_dir = str(ext)
  other.dataset.data_dir = str(tmp_path / 'data')
  other.dataset.patient_pattern = r'_(\d+)\.png'  # Recorded by the build, carried by the CSV.
  evaluate.run(other, workdir, split='validation')  # Split-based: it says what it scores.
  out = capsys.readouterr().out
  assert re.search(r'scoring the validation split of .*ext_site \(\d of 6 images', out), out
  assert '--split all scores every image' in out
  assert os.path.exists(os.path.join(workdir, 'eval', f'ext_site_validation_{STEP}.json'))
  assert card.read_text() == 'the card of the run\n'  # Another source never rewrites it.
  os.remove(os.path.join(workdir, calibration.CALIBRATION_FILE))
  result = evaluate.run(other, workdir, split='all')
  # Fitted first on the run's own validation split (config.json's source), as eval of it does.
  assert calibration.load(workdir, STEP) == kept
  assert result['calibration']['temperature'] == kept['temperature']
  stem = os.path.join(workdir, 'eval', f'ext_site_all_{STEP}')
  rows = _rows(f'{stem}_predictions.csv')
  assert sorted(r['label'] for r in rows) == ['stage_1'] * 3 + ['stage_3'] * 3  # Every image.
  assert list(rows[0]) == ['path', 'patient_id', 'label', 'prediction', *names, 'error']
  assert {r['patient_id'] for r in rows} == {'0001', '0002', '0003'}
  assert [result['per_class'][n]['support'] for n in names] == [0, 3, 0, 3]
  with open(f'{stem}.json') as f:
    provenance = json.load(f)['provenance']
  assert provenance['source'] == str(ext)
  assert provenance['absent_classes'] == ['stage_0', 'stage_2']
  assert card.read_text() == 'the card of the run\n'
  own_card = pathlib.Path(f'{stem}_model_card.md').read_text()
  for text in ('External source', f'`{ext}` (external', 'No all image of stage_0, stage_2'):
    assert text in own_card, text
  assert 'No image of class(es) stage_0, stage_2' in capsys.readouterr().out
  (ext / 'stage_9').mkdir()
  shutil.copy(next((ext / 'stage_1').iterdir()), ext / 'stage_9' / 'x_9.png')
  with pytest.raises(ValueError, match=r"class\(es\) \['stage_9'\] that the run does not know"):
    evaluate.run(other, workdir, split='all')


def test_predict_lists_hostile_files_and_keeps_names_and_identifiers(run, tmp_path):
  """Via a CSV of paths: a non-UTF-8 name, a 1x1 image, a link loop, a dangling link, DICOM."""
  config, workdir, names = run
  films = tmp_path / 'films'
  films.mkdir()
  odd = os.fsdecode(b'caf\xe9.png')
  film = np.random.default_rng(3).integers(0, 256, (90, 90), np.uint8)
  Image.fromarray(film).save(films / odd)
  Image.fromarray(film[:1, :1]).save(films / 'tiny.png')
  os.symlink(films / 'loop.png', films / 'loop.png')
  os.symlink(films / 'gone.png', films / 'dangling.png')
  write_dicom(films / 'IM0001', film.astype(np.uint16), bits=8, PatientID='P-7')
  listed = [odd, 'tiny.png', 'loop.png', 'dangling.png', 'IM0001']
  (films / 'inputs.csv').write_bytes(
    b'path,note\n' + b''.join(os.fsencode(n) + b',x\n' for n in listed)
  )
  path = predict.run(config, workdir, [str(films / 'inputs.csv')])
  with open(path, newline='', **reports.CSV_ENCODING) as f:
    rows = {os.path.basename(r['path']): r for r in csv.DictReader(f)}
  assert list(rows) == listed
  assert os.path.exists(rows[odd]['path'])  # The exact name, bytes and all.
  assert rows[odd]['prediction'] in names and rows['IM0001']['prediction'] in names
  assert rows['IM0001']['patient_id'] == 'P-7' and rows[odd]['patient_id'] == ''
  assert rows['IM0001']['sop_uid']
  assert 'dataset.min_image_side' in rows['tiny.png']['error']
  assert 'symbolic link loop' in rows['loop.png']['error']
  assert 'dangling symbolic link' in rows['dangling.png']['error']
  (films / 'plain.csv').write_text('file\na.png\n')
  with pytest.raises(ValueError, match=r"plain\.csv' has no path column"):
    predict.run(config, workdir, [str(films / 'plain.csv')])


def test_modes_refuse_an_unwritable_output_before_computing(run, inputs, tmp_path, monkeypatch):
  config, workdir, _ = run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval', 'predictions', 'explain'))
  for name in ('eval', 'predictions', 'explain'):
    (copy / name).write_text('a file where the folder should be')

  def computed(*args, **kwargs):
    raise AssertionError('computed before checking the output folder')

  monkeypatch.setattr(inference, 'predict', computed)
  monkeypatch.setattr(explain_lib, 'explain', computed)
  with pytest.raises(PermissionError, match=r"predictions folder '.*predictions' cannot be"):
    predict.run(config, str(copy), inputs[1:2])
  with pytest.raises(PermissionError, match=r"explanations folder '.*explain/step7_Mixed_5d'"):
    explain.run(config, str(copy), inputs[1:2], layer='Mixed_5d')
  with pytest.raises(PermissionError, match=r"evaluation reports folder '.*eval' cannot be"):
    evaluate.run(config, str(copy))
  for name in ('eval', 'predictions', 'explain'):
    assert (copy / name).read_text() == 'a file where the folder should be'


@pytest.mark.long
def test_export_applies_the_runs_temperature(run, tmp_path):
  """Both artefacts compute predict's calibrated probabilities; metadata.json says so."""
  config, workdir, _ = run
  evaluate.run(config, workdir)  # Fits and keeps this step's temperature.
  entry = calibration.load(workdir, STEP)
  restored = common.restore(config, workdir, 'latest')
  side = stored_side(config)
  images = np.random.default_rng(0).integers(0, 256, (6, side, side, 3), np.uint8)
  plain = np.asarray(jax_export.serving_fn(config, restored.model, restored.variables)(images))
  out = export.run(config, workdir, export_dir=str(tmp_path / 'export'))
  with open(os.path.join(out, export.METADATA_FILE)) as f:
    applied = json.load(f)['calibration']
  assert applied['temperature'] == entry['temperature'] and applied['fitted_on'] == 'validation'
  assert applied['operating_points'] == entry['operating_points']
  with open(os.path.join(out, export.JAX_FILE), 'rb') as f:
    served = np.asarray(jax.export.deserialize(bytearray(f.read())).call(images))
  np.testing.assert_allclose(served, calibration.scaled(plain, entry['temperature']), atol=1e-6)
  assert not np.allclose(served, plain, atol=1e-4)  # The temperature changed them.
