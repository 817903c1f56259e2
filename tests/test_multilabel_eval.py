"""Findings (dataset.task='multilabel'): metrics, intervals, operating points and calibration
against hand-checked cases and scikit-learn; eval, predict, explain and export end to end on a
random-weight run over synthetic.make_multilabel's set."""

import csv
import glob
import importlib.util
import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from configs import default
from pneumo_jax import checkpoints, validate
from pneumo_jax.data import dataset_for, folder_builder, synthetic
from pneumo_jax.errors import ConfigError
from pneumo_jax.evaluation import calibration, inference, metrics, model_card, operating_points
from pneumo_jax.models import build_model
from pneumo_jax.modes import common, evaluate, explain, export, predict
from tests import reference

FINDINGS = ['effusion', 'nodule', 'fibrosis']


def _findings(n=120, seed=0, skill=0.8, ignored=0.15):
  """Labels [n, 3] in {1, 0, -1} and sigmoid probabilities better than chance."""
  rng = np.random.default_rng(seed)
  present = rng.random((n, len(FINDINGS))) < [0.3, 0.5, 0.2]
  logits = rng.normal(size=present.shape) + skill * (2 * present - 1)
  labels = np.where(rng.random(present.shape) < ignored, -1, present.astype(int))
  return labels, 1 / (1 + np.exp(-logits))


def test_hand_checked_case():
  # effusion: films 0-3 used (film 4 ignored); nodule: every film; fibrosis: no positive.
  labels = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [-1, 0, -1]])
  probs = np.array(
    [[0.9, 0.6, 0.1], [0.4, 0.7, 0.2], [0.3, 0.2, 0.6], [0.6, 0.8, 0.1], [0.99, 0.1, 0.9]]
  )
  m = metrics.compute(labels, probs, FINDINGS)
  effusion, nodule, fibrosis = (m['per_finding'][f] for f in FINDINGS)
  # Effusion's positives score 0.9, 0.4; negatives 0.3, 0.6: 3 of 4 pairs ordered.
  assert effusion['auc'] == pytest.approx(0.75)
  # Ranked 0.9 (+), 0.6 (-), 0.4 (+), 0.3 (-): precision 1 at recall 1/2, 2/3 at recall 1.
  assert effusion['average_precision'] == pytest.approx((1 + 2 / 3) / 2)
  assert (effusion['positives'], effusion['negatives'], effusion['ignored']) == (2, 2, 1)
  # Nodule's positives 0.6, 0.8 against negatives 0.7, 0.2, 0.1: 5 of 6 pairs.
  assert nodule['auc'] == pytest.approx(5 / 6)
  assert fibrosis == {
    'auc': None,
    'average_precision': None,
    'positives': 0,
    'negatives': 4,
    'ignored': 1,
  }
  assert m['auc_macro'] == pytest.approx((0.75 + 5 / 6) / 2)
  # At 0.5: effusion right on films 0, 2 (2 of 4), nodule on all but 1 (4 of 5), fibrosis on
  # all but 2 (3 of 4): 9 of 13 used entries.
  assert m['accuracy'] == pytest.approx(9 / 13)
  # Balanced accuracy averages effusion's (1/2 + 1/2) / 2 and nodule's (1 + 2/3) / 2 only.
  assert m['balanced_accuracy'] == pytest.approx((0.5 + 5 / 6) / 2)
  assert m['kappa'] is None
  assert m['num_examples'] == 5


def test_matches_sklearn_on_the_used_labels():
  labels, probs = _findings()
  m = metrics.compute(labels, probs, FINDINGS)
  used = labels >= 0
  for f, name in enumerate(FINDINGS):
    y, p = labels[used[:, f], f], probs[used[:, f], f]
    assert m['per_finding'][name]['auc'] == pytest.approx(skm.roc_auc_score(y, p))
    assert m['per_finding'][name]['average_precision'] == pytest.approx(
      skm.average_precision_score(y, p)
    )
  assert m['auc_micro'] == pytest.approx(skm.roc_auc_score(labels[used], probs[used]))
  assert m['loss'] == pytest.approx(skm.log_loss(labels[used], probs[used]))
  # Without ignored labels, scikit-learn's own multi-label averages agree.
  full, probs = _findings(ignored=0)
  m = metrics.compute(full, probs, FINDINGS)
  assert m['auc_macro'] == pytest.approx(skm.roc_auc_score(full, probs, average='macro'))
  assert m['auc_micro'] == pytest.approx(skm.roc_auc_score(full, probs, average='micro'))
  assert set(metrics.HIGHER_IS_BETTER) <= set(m)
  assert 0.7 < m['auc_macro'] < 1  # Neither chance nor perfect.


def test_ignored_labels_change_nothing_whatever_their_probabilities():
  labels, probs = _findings()
  other = np.where(labels < 0, 1 - probs, probs)
  assert metrics.compute(labels, probs, FINDINGS) == metrics.compute(labels, other, FINDINGS)


def test_bad_inputs_name_the_problem():
  labels, probs = _findings(n=4)
  with pytest.raises(ValueError, match=r'labels and probs \[N, 3\]'):
    metrics.compute(labels, probs[:, :2], FINDINGS)
  with pytest.raises(ValueError, match=r'1 \(present\), 0 \(absent\) or -1 \(ignored\); got \[2\]'):
    metrics.compute(np.where(labels == 1, 2, labels), probs, FINDINGS)
  with pytest.raises(ValueError, match=r'lie in \[0, 1\]'):
    metrics.compute(labels, probs * 3, FINDINGS)


def test_every_label_ignored_is_undefined_not_a_crash():
  m = metrics.compute(np.full((3, 3), -1), np.full((3, 3), 0.5), FINDINGS)
  assert all(m[k] is None for k in metrics.HIGHER_IS_BETTER)
  assert m['auc_micro'] is None


def test_bootstrap_matches_compute_on_each_resample():
  labels, probs = _findings(n=60)
  counts = next(metrics.resample_counts(len(labels), 5, seed=3))
  scores = metrics._resample_finding_scores(counts, labels, probs, [0, 1, 2])
  for r, c in enumerate(counts):
    drawn = np.repeat(np.arange(len(labels)), c)
    m = metrics.compute(labels[drawn], probs[drawn], FINDINGS)
    for key in metrics.BOOTSTRAPPED_FINDINGS:
      assert scores[key][r] == pytest.approx(m[key]), key
    for f, name in enumerate(FINDINGS):
      for key in metrics.FINDING_BOOTSTRAPPED:
        assert scores[f'{key}/{f}'][r] == pytest.approx(m['per_finding'][name][key]), (key, name)


def test_bootstrap_intervals_bracket_the_estimates():
  labels, probs = _findings()
  ci = metrics.bootstrap_ci(labels, probs, FINDINGS, resamples=200)
  m = metrics.compute(labels, probs, FINDINGS)
  assert ci['method'] == {'resamples': 200, 'seed': 0, 'level': 0.95, 'n': len(labels)}
  for key in metrics.BOOTSTRAPPED_FINDINGS:
    assert ci[key]['low'] <= m[key] <= ci[key]['high'], key
  for name in FINDINGS:
    for key in metrics.FINDING_BOOTSTRAPPED:
      one = ci['per_finding'][name][key]
      assert one['estimate'] == m['per_finding'][name][key]
      assert one['low'] < one['estimate'] < one['high'], (name, key)
  assert ci == metrics.bootstrap_ci(labels, probs, FINDINGS, resamples=200)  # Seeded.


def test_format_table_lists_findings():
  labels, probs = _findings()
  labels[:, 2] = np.minimum(labels[:, 2], 0)
  table = metrics.format_table(metrics.compute(labels, probs, FINDINGS), FINDINGS)
  for word in ['auc_macro', 'auc_micro', 'avg prec', *FINDINGS]:
    assert word in table
  assert 'kappa' not in table
  assert 'n/a' in table  # Fibrosis' AUC.


def test_default_best_metric_follows_the_task():
  import ml_collections

  c = ml_collections.ConfigDict({'task': 'single'})
  c.best_metric = metrics.default_best_metric(c.get_ref('task'))
  assert c.best_metric == 'kappa'
  c.task = 'multilabel'
  assert c.best_metric == 'auc_macro'
  c.best_metric = 'loss'
  c.task = 'single'
  assert c.best_metric == 'loss'


# --- Operating points and calibration of findings. ---


def test_operating_points_are_chosen_per_finding_on_its_used_labels():
  labels, probs = _findings(n=200)
  chosen = operating_points.choose(labels, probs, FINDINGS)
  assert list(chosen) == FINDINGS
  rows = operating_points.evaluate(labels, probs, FINDINGS, chosen, resamples=100)
  assert {(r['cut'], r['point']) for r in rows} == {
    (f, p) for f in FINDINGS for p in operating_points.POINTS
  }
  for r in rows:
    f = FINDINGS.index(r['cut'])
    used = labels[:, f] >= 0
    truth, called = labels[used, f] == 1, probs[used, f] >= r['threshold']
    assert (r['positives'], r['negatives']) == (truth.sum(), (~truth).sum())
    assert r['sensitivity']['estimate'] == pytest.approx((truth & called).sum() / truth.sum())
    assert r['specificity']['estimate'] == pytest.approx((~truth & ~called).sum() / (~truth).sum())
    assert r['sensitivity']['low'] <= r['sensitivity']['estimate'] <= r['sensitivity']['high']
    if r['point'] != 'youden':
      assert r['sensitivity']['estimate'] >= float(r['point'][-2:]) / 100
  # Youden's J is the ROC point of largest sensitivity + specificity.
  f = 1
  used = labels[:, f] >= 0
  fpr, tpr, _ = skm.roc_curve(labels[used, f], probs[used, f])
  youden = next(r for r in rows if r['cut'] == FINDINGS[f] and r['point'] == 'youden')
  assert youden['sensitivity']['estimate'] - (1 - youden['specificity']['estimate']) == (
    pytest.approx((tpr - fpr).max())
  )


def test_a_finding_without_positives_gets_no_threshold_and_no_crash():
  labels, probs = _findings()
  labels[:, 2] = np.minimum(labels[:, 2], 0)
  chosen = operating_points.choose(labels, probs, FINDINGS)
  assert chosen['fibrosis'] == dict.fromkeys(operating_points.POINTS)
  rows = operating_points.evaluate(labels, probs, FINDINGS, chosen, resamples=10)
  assert 'fibrosis' not in {r['cut'] for r in rows}


def test_a_temperature_per_finding_undoes_over_confidence():
  """Each finding's logits made k times too sharp: its fitted temperature is k times that of
  the plain logits, and scaling by it gives the plain fit's probabilities back."""
  labels, probs = _findings(n=400)
  logits = calibration.finding_logits(probs)
  sharp = 1 / (1 + np.exp(-logits * [1.0, 2.0, 4.0]))
  plain, entry = calibration.fit(labels, probs, FINDINGS), calibration.fit(labels, sharp, FINDINGS)
  assert entry['n'] == 400 and entry['fitted_on'] == 'validation'
  np.testing.assert_allclose(
    entry['temperature'], np.multiply(plain['temperature'], [1, 2, 4]), rtol=1e-4
  )
  np.testing.assert_allclose(
    calibration.scaled(sharp, entry['temperature']),
    calibration.scaled(probs, plain['temperature']),
    atol=1e-6,
  )
  # One finding's temperature is the binary fit of its used labels alone.
  used = labels[:, 1] >= 0
  two = np.stack([np.zeros(used.sum()), logits[used, 1] * 2], axis=-1)
  assert entry['temperature'][1] == pytest.approx(
    calibration.fit_temperature(two, labels[used, 1]), rel=1e-6
  )
  report = calibration.report(labels, sharp, entry, FINDINGS)
  assert report['after']['nll'] < report['before']['nll']
  assert list(report['per_finding']) == FINDINGS
  assert report['per_finding']['fibrosis']['after']['ece'] < 0.1


def test_a_finding_that_cannot_be_fitted_keeps_temperature_one():
  labels, probs = _findings()
  labels[:, 0] = -1  # Every effusion label ignored.
  labels[:, 2] = np.minimum(labels[:, 2], 0)  # No fibrosis.
  entry = calibration.fit(labels, probs, FINDINGS)
  assert entry['temperature'][0] == 1.0 and entry['temperature'][2] == 1.0
  report = calibration.report(labels, probs, entry, FINDINGS)
  assert report['per_finding']['effusion']['before'] is None
  assert calibration.temperature_text(entry['temperature']).startswith('temperatures 1.000, ')


def test_calibration_scores_pool_the_used_labels_as_binary_predictions():
  labels = np.array([[1, -1], [0, 1]])
  probs = np.array([[0.8, 0.3], [0.4, 0.9]])
  scores = calibration.scores(labels, probs)
  # Entries: (1, 0.8), (0, 0.4), (1, 0.9); NLL and the two-column Brier (twice the binary one).
  assert scores['nll'] == pytest.approx(-(np.log(0.8) + np.log(0.6) + np.log(0.9)) / 3)
  assert scores['brier'] == pytest.approx(2 * (0.2**2 + 0.4**2 + 0.1**2) / 3)


# --- End to end: eval, predict, explain and export of a random-weight multi-label run. ---

STEP = 5


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir): checkpoint STEP of a random-weight InceptionV3 (depth 0.25, 75 px) for
  synthetic.make_multilabel's three findings, their names in WORKDIR/labels.txt."""
  root = tmp_path_factory.mktemp('multilabel')
  config = default.get_config()
  config.dataset.task = 'multilabel'
  config.dataset.labels_csv = synthetic.make_multilabel(
    str(root / 'source'), patients=24, films_per_patient=2, size=75, seed=0
  )
  config.dataset.data_dir = str(root / 'data')
  config.dataset.validation_fraction = 0.4
  config.input.image_size = 75
  config.input.eval_batch_size = 8
  config.model.depth_multiplier = 0.25
  validate.check(config)
  workdir = str(root / 'run')
  names = folder_builder.label_names(dataset_for(config, workdir))
  assert names == FINDINGS and config.model.head == 'sigmoid'
  variables = reference.random_variables(build_model(config, len(names)), 75)
  mngr = checkpoints.manager(workdir)
  checkpoints.save(mngr, STEP, {'step': STEP, **variables})
  mngr.wait_until_finished()
  checkpoints.save_label_names(workdir, names)
  return config, workdir


def _rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _probs(config, workdir, files):
  """The model's own (uncalibrated) probabilities of `files`, [N, F]."""
  restored = common.restore(config, workdir, 'latest')
  batches = common.padded_batches(
    common.examples(files, config, {}, []), common.global_batch(config)
  )
  return inference.predict(
    restored.model, restored.variables, batches, image_size=config.input.image_size
  )['probs']


@pytest.mark.long
def test_eval_reports_every_finding(run):
  config, workdir = run
  result = evaluate.run(config, workdir)
  stem = os.path.join(workdir, 'eval', f'validation_{STEP}')
  for suffix in ('.json', '.html', '_roc.png', '_reliability.png', '_predictions.csv'):
    assert os.path.exists(stem + suffix), suffix
  assert not os.path.exists(f'{stem}_confusion_matrix.png')
  with open(f'{stem}.json') as f:
    record = json.load(f)
  assert list(record['per_finding']) == FINDINGS == record['label_names']
  assert list(record[model_card.INTERVALS]['per_finding']) == FINDINGS
  # The CSV: a label and a probability column per finding; its numbers give the report's.
  rows = _rows(f'{stem}_predictions.csv')
  assert list(rows[0]) == [
    'path',
    'patient_id',
    *(f'label_{f}' for f in FINDINGS),
    'prediction',
    *FINDINGS,
    'error',
  ]
  labels = np.array([[int(r[f'label_{f}']) for f in FINDINGS] for r in rows])
  probs = np.array([[float(r[f]) for f in FINDINGS] for r in rows])
  builder = dataset_for(config, workdir)
  np.testing.assert_array_equal(
    np.sort(labels, axis=0), np.sort(folder_builder.split_labels(builder, 'validation'), axis=0)
  )
  assert (labels == -1).any()  # The set's uncertain labels, ignored.
  again = metrics.compute(labels, probs, FINDINGS)
  for key in ('auc_macro', 'auc_micro', 'accuracy'):
    assert again[key] == pytest.approx(result[key], abs=1e-4), key
  assert np.abs(probs.sum(axis=1) - 1).max() > 0.05  # Independent: rows need not sum to one.
  for r, p in zip(rows, probs, strict=True):
    assert r['prediction'] == '|'.join(f for f, x in zip(FINDINGS, p, strict=True) if x >= 0.5)
  # A temperature and operating points per finding, chosen on this (validation) split.
  kept = calibration.load(workdir, STEP)
  assert len(kept['temperature']) == 3 and list(kept['operating_points']) == FINDINGS
  assert record['calibration']['temperature'] == kept['temperature']
  assert {r['cut'] for r in record['operating_points']['rows']} <= set(FINDINGS)
  # The card and the page give each finding's figures with intervals.
  card = pathlib.Path(f'{stem}_model_card.md').read_text()
  assert '| finding | positives | negatives | ignored | AUC | average precision |' in card
  for f in FINDINGS:
    m = result['per_finding'][f]
    assert f'| {f} | {m["positives"]} | {m["negatives"]} | {m["ignored"]} |' in card
  assert 'binary cross-entropy per finding' in card and 'uncertain (-1) labels read as' in card
  page = pathlib.Path(f'{stem}.html').read_text()
  assert 'ROC per finding' in page and 'temperature per finding' in page
  assert page.count('<img src="data:image/png;base64,') >= 2  # ROC and reliability, no matrix.
  # Another split: the kept temperatures and thresholds.
  train = evaluate.run(config, workdir, split='train')
  assert train['calibration']['temperature'] == kept['temperature']


@pytest.mark.long
def test_predict_writes_a_column_and_a_decision_per_finding(run, tmp_path):
  config, workdir = run
  evaluate.run(config, workdir)  # Keeps the temperatures and thresholds predict applies.
  entry = calibration.load(workdir, STEP)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (85, 85), np.uint8)  # 85 px: see test_modes' `inputs`.
  Image.fromarray(image).save(tmp_path / 'a.png')
  Image.fromarray(image[:, ::-1]).save(tmp_path / 'b.png')
  files = [str(tmp_path / 'a.png'), str(tmp_path / 'b.png')]
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset.stored_size = 85
  rows = _rows(predict.run(config, workdir, files))
  decisions = [f'decision_{f}' for f in FINDINGS]
  assert list(rows[0]) == ['path', 'prediction', *FINDINGS, *decisions, 'error']
  probs = np.array([[float(r[f]) for f in FINDINGS] for r in rows])
  np.testing.assert_allclose(
    probs, calibration.scaled(_probs(config, workdir, files), entry['temperature']), atol=2e-6
  )
  for r, p in zip(rows, probs, strict=True):
    for f, x in zip(FINDINGS, p, strict=True):
      assert r[f'decision_{f}'] == str(int(x >= entry['operating_points'][f]['youden'])), f
  # Flip TTA averages each finding's probability of an image and its mirror image.
  tta = np.array(
    [[float(r[f]) for f in FINDINGS] for r in _rows(predict.run(config, workdir, files, tta=True))]
  )
  plain = _probs(config, workdir, files)
  want = calibration.scaled(plain.mean(axis=0, keepdims=True), entry['temperature'])[0]
  np.testing.assert_allclose(tta, [want, want], atol=1e-5)


@pytest.mark.long
def test_explain_draws_each_present_finding_or_the_one_named(run, capsys):
  config, workdir = run
  source = os.path.dirname(config.dataset.labels_csv)
  files = sorted(glob.glob(os.path.join(source, 'images', '*', '*.png')))[:4]
  present = _probs(config, workdir, files) >= 0.5
  out = explain.run(config, workdir, files, layer='Mixed_5d')
  stems = explain._output_names(files)
  assert sorted(os.listdir(out)) == sorted(
    f'{stems[path]}_{f}.png'
    for path, row in zip(files, present, strict=True)
    for f, on in zip(FINDINGS, row, strict=True)
    if on
  )
  printed = capsys.readouterr().out
  assert printed.count('no finding present') == (~present.any(axis=1)).sum()
  out = explain.run(config, workdir, files, layer='Mixed_5d', target_class='nodule')
  assert out.endswith(f'step{STEP}_Mixed_5d_class1')
  assert sorted(os.listdir(out)) == sorted(f'{stems[p]}_nodule.png' for p in files)
  with pytest.raises(ConfigError, match=r"--target_class='mass' is neither a class name"):
    explain.run(config, workdir, files, target_class='mass')


@pytest.mark.long
def test_export_returns_each_findings_probability(run, tmp_path):
  pytest.importorskip('tensorflow')
  config, workdir = run
  evaluate.run(config, workdir)  # A temperature per finding, which the export applies.
  entry = calibration.load(workdir, STEP)
  target = export.run(config, workdir, export_dir=str(tmp_path / 'export'))
  assert checkpoints.load_label_names(target) == FINDINGS
  with open(os.path.join(target, export.METADATA_FILE)) as f:
    metadata = json.load(f)
  assert metadata['labels'] == FINDINGS and metadata['multilabel'] is True
  assert metadata['calibration']['temperature'] == entry['temperature']
  assert 'sigmoid' in metadata['jax_export']['output']
  source = os.path.dirname(config.dataset.labels_csv)
  files = sorted(glob.glob(os.path.join(source, 'images', '*', '*.png')))[:5]
  # serve.py, loaded from the export as a deployment would, gives predict's probabilities.
  spec = importlib.util.spec_from_file_location('serve', os.path.join(target, export.SERVE_FILE))
  serve = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(serve)
  got = serve.predict(files)
  assert got.shape == (5, 3)
  want = calibration.scaled(_probs(config, workdir, files), entry['temperature'])
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert [serve.prediction(row) for row in got] == [
    '|'.join(f for f, p in zip(FINDINGS, row, strict=True) if p >= 0.5) for row in got
  ]


def test_target_class_is_a_name_or_an_id():
  """--target_class comes from the command line as text: a name, or digits for an id."""
  assert explain._target_id(None, FINDINGS) is None
  assert explain._target_id('fibrosis', FINDINGS) == 2
  assert explain._target_id('1', FINDINGS) == explain._target_id(1, FINDINGS) == 1
  assert explain._target_id('3', ['1', '2', '3']) == 2  # A name wins over an id.
  with pytest.raises(ConfigError, match=r'--target_class=3 is not a class id; use 0..2'):
    explain._target_id('3', FINDINGS)
