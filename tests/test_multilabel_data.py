"""Multi-label findings from a label file (dataset.task='multilabel'): the cells and their
policies, the checks, the build's labels and metadata, the batches, the config rules and the
generated set."""

import csv
import itertools
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from configs import default
from pneumo_jax import validate
from pneumo_jax.data import folder_builder, pipeline, sources, synthetic
from pneumo_jax.errors import ConfigError, DatasetError

FINDINGS = ('effusion', 'nodule', 'fibrosis')


def cfg(**fields):
  c = default.get_config().dataset
  c.task = 'multilabel'
  c.update(fields)
  return c


def label_file(folder, rows, header=('path', 'patient_id', *FINDINGS)) -> str:
  """A label file in `folder` with `rows`; an empty file is made for each row's path not there
  yet (the scan reads no image)."""
  for row in rows:
    if row and row[0] and not os.path.exists(os.path.join(folder, row[0])):
      open(os.path.join(folder, row[0]), 'w').close()
  path = os.path.join(folder, 'labels.csv')
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows([header, *rows])
  return path


ROWS = [
  ['a.png', 'P1', '1', '0', '-1'],
  ['b.png', 'P1', '1.0', '', '0.0'],
  ['c.png', 'P2', '-1.0', '1', ''],
]


@pytest.mark.parametrize(
  'uncertain, blank, expected',
  [
    ('ignore', 'zeros', [(1, 0, -1), (1, 0, 0), (-1, 1, 0)]),
    ('zeros', 'ignore', [(1, 0, 0), (1, -1, 0), (0, 1, -1)]),
    ('ones', 'ones', [(1, 0, 1), (1, 1, 0), (1, 1, 1)]),
  ],
)
def test_cells_and_policies(tmp_path, uncertain, blank, expected):
  scan = sources.scan(
    cfg(labels_csv=label_file(tmp_path, ROWS), uncertain=uncertain, blank=blank), str(tmp_path)
  )
  assert scan.task == 'multilabel' and scan.classes == FINDINGS
  assert [e.label for e in scan.examples] == expected
  assert [(e.path, e.patient) for e in scan.examples] == [
    ('a.png', 'P1'),
    ('b.png', 'P1'),
    ('c.png', 'P2'),
  ]
  assert scan.label_policy == (('uncertain', uncertain), ('blank', blank))


def test_label_columns_choose_and_order_the_findings(tmp_path):
  header = ('path', 'Sex', 'nodule', 'split', 'effusion', 'label')
  rows = [['a.png', 'F', '1', 'test', '0', '1'], ['b.png', 'M', '0', '', '1', '']]
  path = label_file(tmp_path, rows, header)
  # Unset: every column but path, patient_id and split, here with a column that is no finding.
  with pytest.raises(DatasetError, match=r"labels\.csv:2: column 'Sex' holds 'F'"):
    sources.scan(cfg(labels_csv=path), str(tmp_path))
  scan = sources.scan(cfg(labels_csv=path, label_columns='effusion, nodule'), str(tmp_path))
  assert scan.classes == ('effusion', 'nodule')
  assert [(e.label, e.split) for e in scan.examples] == [((0, 1), 'test'), ((1, 0), '')]
  # 'label' is a finding like any other.
  listed = sources.scan(cfg(labels_csv=path, label_columns=['label', 'nodule']), str(tmp_path))
  assert [e.label for e in listed.examples] == [(1, 1), (0, 0)]


def test_bad_cells_name_the_line_and_column(tmp_path):
  rows = [
    *ROWS,
    ['d.png', 'P3', '2', 'maybe', '1'],  # Line 5.
    ['e.png', 'P3', '1', '0'],  # Line 6: a cell short.
    ['f.png', 'P4', '0', '0', 'nan'],  # Line 7.
  ]
  path = label_file(tmp_path, rows)
  with pytest.raises(DatasetError) as e:
    sources.scan(cfg(labels_csv=path), str(tmp_path))
  message = str(e.value)
  assert message.startswith(f'3 bad row(s) in {path}: ')
  assert "labels.csv:5: column 'effusion' holds '2', column 'nodule' holds 'maybe' " in message
  assert (
    "labels.csv:6: column 'fibrosis' is missing (the row is shorter than the header)" in message
  )
  assert "labels.csv:7: column 'fibrosis' holds 'nan'" in message
  assert 'a finding is 1, 0, -1 for uncertain, or blank' in message
  assert 'skip_corrupt=True' in message and '\n' not in message
  skipped = sources.scan(cfg(labels_csv=path, skip_corrupt=True), str(tmp_path))
  assert [e.path for e in skipped.examples] == ['a.png', 'b.png', 'c.png']


@pytest.mark.parametrize(
  'header, fields, needle',
  [
    (('file', 'nodule'), {}, r"no column 'path' in its header \['file', 'nodule'\]"),
    (('path', 'patient_id', 'split'), {}, 'has no finding column'),
    (
      ('path', 'nodule'),
      {'label_columns': 'nodule,effusion'},
      r"names \['effusion'\], not in its header",
    ),
    (('path', 'nodule', 'nodule'), {}, r"column\(s\) \['nodule'\] repeat in its header"),
    (('', 'path', 'nodule'), {}, r"column 1 of its header \['', 'path', 'nodule'\] has no name"),
  ],
)
def test_bad_headers(tmp_path, header, fields, needle):
  path = label_file(tmp_path, [['a.png', *['1'] * (len(header) - 1)]], header)
  with pytest.raises(DatasetError, match=needle):
    sources.scan(cfg(labels_csv=path, **fields), str(tmp_path))


@pytest.mark.parametrize(
  'fields, needle',
  [
    ({'task': 'multi'}, r"dataset\.task='multi': use 'single'"),
    ({'labels_csv': ''}, r"dataset\.task='multilabel' needs dataset\.labels_csv"),
    ({'class_names': 'a,b'}, r'dataset\.class_names=.*choose and order the findings'),
    ({'uncertain': 'u-ones'}, r"dataset\.uncertain='u-ones': use ignore"),
    ({'blank': 'zero'}, r"dataset\.blank='zero': use ignore"),
    ({'label_columns': 'a,,b'}, r"dataset\.label_columns='a,,b': give distinct"),
    ({'label_columns': ['path', 'b']}, r'dataset\.label_columns=.*not path, patient_id, split'),
    ({'task': 'single', 'label_columns': 'a'}, r'is for findings: set --config\.dataset\.task'),
  ],
)
def test_bad_settings(fields, needle):
  with pytest.raises(ConfigError, match=needle):
    folder_builder.check_settings(cfg(**{'labels_csv': 'x.csv', **fields}))


@pytest.fixture(scope='module')
def made(tmp_path_factory):
  """A generated set (4 findings, 24 patients of 3 films) with one film copied byte for byte
  under another patient, and its build."""
  root = tmp_path_factory.mktemp('multilabel')
  findings = (*FINDINGS, 'cardiomegaly')
  csv_path = synthetic.make_multilabel(
    str(root / 'src'), findings=findings, patients=24, films_per_patient=3, size=40, seed=3
  )
  copy = 'images/copy of patient 000.png'
  shutil.copyfile(root / 'src/images/patient 000/film 1 (PA).png', root / 'src' / copy)
  with open(csv_path, newline='') as f:
    rows = list(csv.reader(f))
  with open(csv_path, 'a', newline='') as f:
    csv.writer(f).writerow([copy, 'P999', *rows[1][2:]])
  config = cfg(labels_csv=csv_path, test_fraction=0.2, validation_fraction=0.2)
  return config, folder_builder.build(config, str(root / 'data'), 48), rows


def test_build_holds_the_findings(made):
  _, builder, rows = made
  assert folder_builder.task(builder) == 'multilabel'
  names = folder_builder.label_names(builder)
  assert names == ['effusion', 'nodule', 'fibrosis', 'cardiomegaly']
  assert builder.info.metadata['label_policy'] == {'uncertain': 'ignore', 'blank': 'zeros'}
  with open(os.path.join(builder.data_dir, 'labels.txt')) as f:
    assert f.read() == ''.join(f'{i}:{n}\n' for i, n in enumerate(names))
  value = {'1.0': 1, '0.0': 0, '-1.0': -1, '': 0}
  truth = {r[0]: [value[c] for c in r[2:]] for r in rows[1:]}
  where = {}
  for split in ('train', 'validation', 'test'):
    labels = folder_builder.split_labels(builder, split)
    files = folder_builder.split_filenames(builder, split)
    assert labels.dtype == np.int32 and labels.shape == (len(files), 4)
    assert labels.tolist() == [
      truth.get(f, truth['images/patient 000/film 1 (PA).png']) for f in files
    ]
    counts = folder_builder.label_counts(builder)[split]
    assert counts.tolist() == [
      [int(np.sum(labels[:, f] == v)) for v in (1, 0, -1)] for f in range(4)
    ]
    assert (counts[:, 0] > 0).all() and (counts[:, 1] > 0).all()  # Every finding, both ways.
    for f, patient in zip(
      files, folder_builder.split_column(builder, split, 'patient_ids'), strict=True
    ):
      where.setdefault(patient, set()).add(split)
      if 'patient 000' in f or 'copy' in f:
        where.setdefault('copies', set()).add(split)
  assert all(len(s) == 1 for s in where.values()), where  # Patients and copies stay together.
  eval_labels = []
  config_input = default.get_config().input
  config_input.update(image_size=40, eval_batch_size=16, num_workers=0)
  for batch in pipeline.eval_batches(builder, 'validation', config_input):
    assert batch['label'].dtype == np.int32 and batch['label'].shape == (16, 4)
    assert (batch['label'][~batch['mask']] == 0).all()
    eval_labels += batch['label'][batch['mask']].tolist()
  assert eval_labels == folder_builder.split_labels(builder, 'validation').tolist()  # Records.


def test_train_batches_carry_every_finding(made):
  _, builder, _ = made
  input_cfg = default.get_config().input
  input_cfg.update(image_size=40, batch_size=8, num_workers=0)
  labels = folder_builder.split_labels(builder, 'train')
  with_images = pipeline.train_iterator(builder, input_cfg, seed=1)
  without = pipeline.train_iterator(builder, input_cfg, seed=1, read_images=False)
  for _ in range(3):
    a, b = next(with_images), next(without)
    assert a['label'].dtype == np.int32 and a['label'].shape == (8, 4)
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(b['label'], labels[b['index']])
  input_cfg.class_balanced = True
  with pytest.raises(ConfigError, match=r'input\.class_balanced=True does not apply'):
    pipeline.train_iterator(builder, input_cfg, seed=1)


def test_the_policies_are_in_the_fingerprint(tmp_path):
  """Without -1 or blank cells the policies change no label, yet they name another build (its
  metadata records them)."""
  rng = np.random.default_rng(0)
  rows = []
  for i in range(20):
    Image.fromarray(rng.integers(0, 255, (16, 16), np.uint8)).save(tmp_path / f'{i}.png')
    rows.append([f'{i}.png', f'P{i // 2}', *(str(int(i // 2 % k == 0)) for k in (2, 3, 4))])
  path = label_file(tmp_path, rows)

  def build(**fields):
    return folder_builder.build(cfg(labels_csv=path, **fields), str(tmp_path / 'data'), 8)

  first = build()
  assert build().data_dir == first.data_dir  # Unchanged: reused.
  names = {str(first.data_dir)}
  for fields in ({'uncertain': 'zeros'}, {'blank': 'ignore'}):
    other = build(**fields)
    assert folder_builder.split_labels(other, 'train').tolist() == (
      folder_builder.split_labels(first, 'train').tolist()
    )
    assert other.info.metadata['label_policy'] == {
      'uncertain': 'ignore',
      'blank': 'zeros',
      **fields,
    }
    names.add(str(other.data_dir))
  assert len(names) == 3


def test_rare_finding_is_named(tmp_path):
  rows = [
    [f'{i}.png', f'P{i // 2}', str(int(i % 3 == 0)), '1' if i == 4 else '0', '0'] for i in range(40)
  ]
  rows[5][4] = '1'  # fibrosis: two films of one patient.
  with pytest.raises(DatasetError) as e:
    folder_builder.build(cfg(labels_csv=label_file(tmp_path, rows)), str(tmp_path / 'data'), 8)
  message = str(e.value)
  assert "finding 'nodule' (1 positive images, 1 patients)" in message
  assert "finding 'fibrosis'" in message and "'effusion'" not in message


def test_config_rules():
  c = default.get_config()
  assert (c.model.head, c.best_metric) == ('softmax', 'kappa')
  c.dataset.task = 'multilabel'  # The head and best metric follow the task...
  assert (c.model.head, c.best_metric) == ('sigmoid', 'auc_macro')
  c.dataset.labels_csv = '/data/labels.csv'
  validate.check(c)
  for field, value, needle in (
    ('model.head', 'softmax', r"model\.head='softmax' does not fit dataset\.task='multilabel'"),
    ('model.head', 'ordinal', r"model\.head='ordinal' does not fit"),
    ('best_metric', 'kappa', r"best_metric='kappa' is undefined with dataset\.task='multilabel'"),
    ('input.class_balanced', True, r'input\.class_balanced=True does not apply'),
  ):
    bad = default.get_config()
    bad.update_from_flattened_dict(
      {'dataset.task': 'multilabel', 'dataset.labels_csv': '/data/labels.csv', field: value}
    )
    with pytest.raises(ConfigError, match=needle):
      validate.check(bad)
  single = default.get_config()
  single.update_from_flattened_dict({'dataset.source_dir': '/data', 'model.head': 'sigmoid'})
  with pytest.raises(
    ConfigError, match=r"model\.head='sigmoid' does not fit dataset\.task='single'"
  ):
    validate.check(single)


def test_generated_set(tmp_path):
  path = synthetic.make_multilabel(str(tmp_path), patients=60, films_per_patient=2, size=48)
  assert path == str(tmp_path / 'labels.csv')
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 120 and len({r['patient_id'] for r in rows}) == 60
  assert rows[0]['path'] == 'images/patient 000/film 1 (PA).png'
  cells = np.array([[r[f] for f in FINDINGS] for r in rows])
  assert set(np.unique(cells)) == {'1.0', '0.0', '-1.0', ''}
  assert not (cells == '').all(0).any()
  # The same arguments write the same files.
  again = synthetic.make_multilabel(
    str(tmp_path / 'again'), patients=60, films_per_patient=2, size=48
  )
  with open(again, newline='') as f:
    assert list(csv.DictReader(f)) == rows
  # Each finding is a visible mark at a place of its own: on one half of the patients, the
  # place where 7×7 means differ most between films with and without it; on the other half,
  # the mean there alone ranks the films.
  films = np.stack([np.asarray(Image.open(tmp_path / r['path']), np.float64) for r in rows])
  local = ndimage.uniform_filter(films - films.mean((1, 2), keepdims=True), (1, 7, 7))
  values = np.where(cells == '1.0', 1, np.where(cells == '-1.0', -1, 0))
  halves = np.array([int(r['patient_id'][1:]) % 2 for r in rows])
  places = []
  for f, name in enumerate(FINDINGS):
    y, scores = values[:, f], np.zeros(len(rows))
    for half in (0, 1):
      seen, unseen = (halves != half) & (y >= 0), halves == half
      diff = local[seen & (y == 1)].mean(0) - local[seen & (y == 0)].mean(0)
      place = np.unravel_index(np.abs(diff).argmax(), diff.shape)
      scores[unseen] = np.sign(diff[place]) * local[unseen][:, place[0], place[1]]
      places.append(np.array(place))
    assert roc_auc_score(y[y >= 0], scores[y >= 0]) > 0.97, name
  assert min(np.abs(a - b).max() for a, b in itertools.combinations(places[::2], 2)) >= 8
  present = (values == 1).astype(float)
  corr = np.corrcoef(present.T)[np.triu_indices(3, 1)]
  assert np.abs(corr).max() < 0.3
