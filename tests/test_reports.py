"""Evaluation reports on disk and the predictions CSV, read back as a user would."""

import csv
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from pneumo_jax import atomic
from pneumo_jax.evaluation import calibration, metrics, reports

NAMES = ['stage0', 'stage1', 'stage2']


def _eval(seed=0, n=30):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)  # stage2 absent: its ROC curve must be skipped, not crash.
  probs = rng.dirichlet(np.ones(3), n)
  return labels, probs, metrics.compute(labels, probs, NAMES)


def test_write_eval_files_per_split_and_step(tmp_path):
  labels, probs, m = _eval()
  path = reports.write_eval(str(tmp_path), 'validation', 120, m, NAMES, labels, probs)
  assert path == str(tmp_path / 'eval' / 'validation_120.json')
  with open(path) as f:
    record = json.load(f)
  assert record['label_names'] == NAMES
  assert record['step'] == 120 and record['split'] == 'validation'
  assert record['kappa'] == pytest.approx(m['kappa'])
  assert record['per_class']['stage2']['auc'] is None
  for kind in ('confusion_matrix', 'roc'):
    with Image.open(tmp_path / 'eval' / f'validation_120_{kind}.png') as image:
      assert image.format == 'PNG' and min(image.size) > 100
  reports.write_eval(str(tmp_path), 'test', 120, m, NAMES, labels, probs)
  reports.write_eval(str(tmp_path), 'validation', 240, m, NAMES, labels, probs)
  assert len(os.listdir(tmp_path / 'eval')) == 9  # Nothing overwritten.


def _read(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_predictions_csv_round_trip(tmp_path):
  files = ['a.png', 'broken.png', 'b.jpg', 'notes.txt']
  errors = {'broken.png': 'cannot read image', 'notes.txt': 'not an image'}
  probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]], np.float32)
  path = reports.write_predictions(str(tmp_path / 'out' / 'p.csv'), files, probs, NAMES, errors)
  rows = _read(path)
  assert list(rows[0]) == ['path', 'prediction', *NAMES, 'error']
  assert [r['path'] for r in rows] == files
  good = [r for r in rows if not r['error']]
  assert [r['prediction'] for r in good] == ['stage1', 'stage0']
  for row, p in zip(good, probs, strict=True):
    got = [float(row[n]) for n in NAMES]
    assert got == pytest.approx(p, abs=1e-6)
    assert sum(got) == pytest.approx(1.0, abs=1e-5)
  for row in rows:
    if row['error']:
      assert row['error'] == errors[row['path']]
      assert row['prediction'] == '' and all(row[n] == '' for n in NAMES)


def test_predictions_with_decisions_beside_the_probabilities(tmp_path):
  files = ['a.png', 'broken.png', 'b.jpg']
  probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]])
  path = reports.write_predictions(
    str(tmp_path / 'p.csv'),
    files,
    probs,
    NAMES,
    {'broken.png': 'cannot read image'},
    decisions={'decision_ge_stage1': [True, False], 'decision_ge_stage2': [False, False]},
  )
  rows = _read(path)
  assert list(rows[0]) == [
    'path',
    'prediction',
    *NAMES,
    'decision_ge_stage1',
    'decision_ge_stage2',
    'error',
  ]
  assert [(r['decision_ge_stage1'], r['decision_ge_stage2']) for r in rows] == [
    ('1', '0'),
    ('', ''),
    ('0', '0'),
  ]


def test_reliability_diagram(tmp_path):
  labels, probs, _ = _eval()
  curves = {'before': (calibration.reliability(labels, probs), calibration.ece(labels, probs))}
  path = reports.plot_reliability(str(tmp_path / 'r.png'), curves, calibration.ECE_BINS, 'x')
  with Image.open(path) as image:
    assert image.format == 'PNG' and min(image.size) > 100


def test_predictions_with_true_labels(tmp_path):
  probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]])
  path = reports.write_predictions(
    str(tmp_path / 'p.csv'), ['x', 'y'], probs, NAMES, {}, true_labels=['stage1', 'stage2']
  )
  rows = _read(path)
  assert list(rows[0])[:3] == ['path', 'label', 'prediction']
  assert [(r['label'], r['prediction']) for r in rows] == [
    ('stage1', 'stage1'),
    ('stage2', 'stage0'),
  ]


def test_predictions_keep_non_utf8_names_and_identifiers(tmp_path):
  """A non-UTF-8 name is written as its own bytes; DICOM identifiers get their columns."""
  odd = os.fsdecode(b'/films/caf\xe9.png')
  probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]])
  ids = {'b.dcm': {'patient_id': 'P1', 'study_uid': '1.2', 'sop_uid': '1.2.3'}}
  path = reports.write_predictions(
    str(tmp_path / 'p.csv'), [odd, 'b.dcm', 'c.png'], probs, NAMES, {'c.png': 'x'}, None, ids
  )
  assert b'/films/caf\xe9.png,' in pathlib.Path(path).read_bytes()
  with open(path, newline='', **reports.CSV_ENCODING) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0])[:5] == ['path', 'patient_id', 'study_uid', 'sop_uid', 'prediction']
  assert [r['path'] for r in rows] == [odd, 'b.dcm', 'c.png']
  assert os.fsencode(rows[0]['path']) == b'/films/caf\xe9.png'
  assert [r['patient_id'] for r in rows] == ['', 'P1', '']
  assert reports.printable(odd) == '/films/caf\\xe9.png'
  with pytest.raises(ValueError, match='patient_id'):
    reports.write_predictions(
      str(tmp_path / 'p.csv'), ['b.dcm'], probs[:1], ['patient_id', 'a', 'b'], {}, None, ids
    )


def test_predictions_refuse_ambiguous_columns(tmp_path):
  with pytest.raises(ValueError, match='rename the class folders'):
    reports.write_predictions(
      str(tmp_path / 'p.csv'), ['x'], np.ones((1, 2)) / 2, ['error', 'ok'], {}
    )
  with pytest.raises(ValueError, match='rows of probabilities'):
    reports.write_predictions(str(tmp_path / 'p.csv'), ['x', 'y'], np.ones((1, 3)) / 3, NAMES, {})


def test_a_report_made_with_other_settings_is_kept_not_replaced(tmp_path):
  labels, probs, m = _eval()
  first = reports.write_eval(
    str(tmp_path),
    'validation',
    5,
    m,
    NAMES,
    labels,
    probs,
    {'image_size': 299, 'central_crop_fraction': 1.0},
  )
  again = reports.write_eval(
    str(tmp_path),
    'validation',
    5,
    m,
    NAMES,
    labels,
    probs,
    {'image_size': 299, 'central_crop_fraction': 1.0},
  )
  assert again == first  # The same evaluation, re-run: refreshed in place.
  other = reports.write_eval(
    str(tmp_path),
    'validation',
    5,
    m,
    NAMES,
    labels,
    probs,
    {'image_size': 299, 'central_crop_fraction': 0.875},
  )
  assert other == str(tmp_path / 'eval' / 'validation_5_2.json')
  with open(first) as f:
    assert json.load(f)['provenance']['central_crop_fraction'] == 1.0
  assert os.path.exists(tmp_path / 'eval' / 'validation_5_2_roc.png')


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
  path = tmp_path / 'p.csv'
  path.write_text('old')
  with pytest.raises(RuntimeError), atomic.atomic_file(str(path)) as tmp:
    with open(tmp, 'w') as f:
      f.write('half')
    raise RuntimeError('killed mid-write')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['p.csv']  # No temporary file left behind.
  with atomic.atomic_file(str(path)) as tmp, open(tmp, 'w') as f:
    f.write('new')
  assert path.read_text() == 'new' and os.listdir(tmp_path) == ['p.csv']


def test_check_writable_names_the_folder_and_can_leave_nothing_behind(tmp_path):
  reports.check_writable(str(tmp_path / 'a' / 'b'), 'the reports folder', create=False)
  assert os.listdir(tmp_path) == []  # Checked where it would be created; nothing created.
  reports.check_writable(str(tmp_path / 'made'), 'the reports folder')
  assert os.listdir(tmp_path) == ['made']
  (tmp_path / 'file').write_text('in the way')
  for create in (True, False):
    with pytest.raises(PermissionError, match=r"the reports folder '.*file/sub' cannot be written"):
      reports.check_writable(str(tmp_path / 'file' / 'sub'), 'the reports folder', create=create)
  assert sorted(os.listdir(tmp_path)) == ['file', 'made']
