"""Real collections: split folders, label files, patients and duplicates, odd files (no model).

The data mimic the most used public chest X-ray set: chest_xray/{train,val,test}/{NORMAL,
PNEUMONIA}/ with several films per patient (person12_bacteria_1.jpeg, IM-0115-0001.jpeg) and a
few exact copies filed under other patients.
"""

import collections
import csv
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import default
from pneumo_jax.data import dataset_for, folder_builder
from pneumo_jax.errors import ConfigError, DatasetError

SIZE = 12
PATTERN = r'(person\d+)_|(IM-\d+)-'  # The public set's patients, pneumonia and normal.
# Split → (normal patients, pneumonia patients); 2–3 films each.
LAYOUT = {
  'train': (range(100, 112), range(1, 13)),
  'val': ((200,), (60,)),
  'test': (range(300, 304), range(70, 74)),
}


def film(path, seed: int) -> None:
  """A small distinct grey JPEG at `path`."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path, quality=90)


def names(patients_normal, patients_pneumonia):
  """(class, file name, patient) of each film of the given patients."""
  out = []
  for p in patients_normal:
    out += [('NORMAL', f'IM-{p:04d}-{k:04d}.jpeg', f'IM-{p:04d}') for k in range(1, 2 + p % 2 + 1)]
  for p in patients_pneumonia:
    kind = 'bacteria' if p % 2 else 'virus'
    out += [
      ('PNEUMONIA', f'person{p}_{kind}_{k}.jpeg', f'person{p}') for k in range(1, 2 + p % 2 + 1)
    ]
  return out


def public_layout(root, duplicates: bool = True) -> dict[str, list[tuple[str, str, str]]]:
  """Writes chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/ under `root`; returns per split
  folder its (relative path, class, patient). With `duplicates`, three films are copied
  byte for byte under another patient's name (two within train, one from train into test)."""
  files, seed = {}, 0
  for split, (normal, pneumonia) in LAYOUT.items():
    files[split] = []
    for cls, name, patient in names(normal, pneumonia):
      rel = os.path.join(split, cls, name)
      film(os.path.join(root, rel), seed)
      seed += 1
      files[split].append((rel, cls, patient))
  if duplicates:
    copies = [
      ('train/PNEUMONIA/person1_bacteria_1.jpeg', 'train/PNEUMONIA/person90_bacteria_1.jpeg'),
      ('train/NORMAL/IM-0100-0001.jpeg', 'train/NORMAL/IM-0190-0001.jpeg'),
      ('train/PNEUMONIA/person2_virus_1.jpeg', 'test/PNEUMONIA/person91_virus_1.jpeg'),
    ]
    for src, dst in copies:
      shutil.copyfile(os.path.join(root, src), os.path.join(root, dst))
      split, cls, name = dst.split('/')
      files[split].append((dst, cls, name.split('_')[0]))
  return files


def flatten(src, dst) -> None:
  """The same films as class folders (NORMAL/, PNEUMONIA/), split folders merged."""
  for split in os.listdir(src):
    for cls in os.listdir(os.path.join(src, split)):
      os.makedirs(os.path.join(dst, cls), exist_ok=True)
      for name in os.listdir(os.path.join(src, split, cls)):
        shutil.copyfile(os.path.join(src, split, cls, name), os.path.join(dst, cls, name))


def cfg(**fields):
  c = default.get_config().dataset
  c.update(fields)
  return c


def build(config, data_dir, whole=False):
  return folder_builder.build(config, str(data_dir), SIZE, whole=whole)


def splits_of(builder) -> dict[str, list[str]]:
  return {s: folder_builder.split_filenames(builder, s) for s in builder.info.splits}


def patients_of(builder, split: str) -> list[str]:
  return folder_builder.split_column(builder, split, 'patient_ids')


def assert_apart(builder, source) -> None:
  """No patient and no exact copy in two splits."""
  where = collections.defaultdict(set)
  content = collections.defaultdict(set)
  for split, files in splits_of(builder).items():
    for name, patient in zip(files, patients_of(builder, split), strict=True):
      assert patient
      where[patient].add(split)
      content[(source / name).read_bytes()].add(split)
  assert all(len(s) == 1 for s in where.values()), {p: s for p, s in where.items() if len(s) > 1}
  assert all(len(s) == 1 for s in content.values())


@pytest.fixture(scope='module')
def public(tmp_path_factory):
  root = tmp_path_factory.mktemp('public') / 'chest_xray'
  return root, public_layout(root)


def test_split_folders_are_the_splits(public, tmp_path, caplog):
  root, files = public
  with caplog.at_level(logging.INFO, logger='absl'):
    builder = build(cfg(source_dir=str(root)), tmp_path)
  assert folder_builder.label_names(builder) == ['NORMAL', 'PNEUMONIA']
  got = splits_of(builder)
  for folder, split in (('train', 'train'), ('val', 'validation'), ('test', 'test')):
    assert sorted(got[split]) == sorted(rel for rel, _, _ in files[folder])
    labels = folder_builder.split_labels(builder, split)
    assert [folder_builder.label_names(builder)[i] for i in labels] == [
      p.split('/')[1] for p in got[split]
    ]
  sizes = {s: len(f) for s, f in got.items()}
  line = f'splits from folders: train {sizes["train"]}, validation {sizes["validation"]}, '
  assert line + f'test {sizes["test"]}' in caplog.text
  assert 'split by image: films of one patient may be in both splits' in caplog.text
  assert builder.info.metadata['split_by'] == 'image'
  assert builder.info.metadata['duplicate_groups'] == 3


def test_split_folders_with_patients_report_the_given_crossing(public, tmp_path, caplog):
  root, _ = public
  with caplog.at_level(logging.INFO, logger='absl'):
    builder = build(cfg(source_dir=str(root), patient_pattern=PATTERN), tmp_path)
  assert builder.info.metadata['split_by'] == 'patient'
  assert set(patients_of(builder, 'validation')) == {'IM-0200', 'person60'}
  assert builder.info.metadata['patients']['validation'] == 2
  # The test folder's copy of a train film is kept where its folder puts it, and named.
  assert builder.info.metadata['crossing_patients']
  assert 'kept as given' in caplog.text


def test_split_folders_without_val_and_with_folds(public, tmp_path):
  root, files = public
  no_val = tmp_path / 'no_val'
  shutil.copytree(root, no_val)
  shutil.rmtree(no_val / 'val')
  builder = build(cfg(source_dir=str(no_val), patient_pattern=PATTERN), tmp_path / 'a')
  got = splits_of(builder)
  assert sorted(got['test']) == sorted(rel for rel, _, _ in files['test'])  # Kept.
  train_folder = {rel for rel, _, _ in files['train']}
  assert set(got['train']) | set(got['validation']) == train_folder  # Drawn from train/.
  assert 0.1 < len(got['validation']) / len(train_folder) < 0.35
  with pytest.raises(DatasetError, match=r'test_fraction=0.1.*gives the test split itself'):
    build(cfg(source_dir=str(no_val), test_fraction=0.1), tmp_path / 'b')

  # k folds pool the train and val folders; the test folder stays the test split.
  pooled = {rel for rel, _, _ in files['train'] + files['val']}
  folds = [
    splits_of(build(cfg(source_dir=str(root), num_folds=3, fold=k), tmp_path / 'c'))
    for k in range(3)
  ]
  validations = [set(f['validation']) for f in folds]
  assert set().union(*validations) == pooled and sum(map(len, validations)) == len(pooled)
  for f in folds:
    assert sorted(f['test']) == sorted(rel for rel, _, _ in files['test'])
    assert set(f['train']) == pooled - set(f['validation'])


def test_patient_pattern_keeps_patients_and_copies_apart(public, tmp_path):
  root, files = public
  flat = tmp_path / 'flat'
  flatten(root, flat)
  config = cfg(source_dir=str(flat), patient_pattern=PATTERN, test_fraction=0.2)
  builder = build(config, tmp_path / 'data')
  assert folder_builder.label_names(builder) == ['NORMAL', 'PNEUMONIA']
  assert sum(map(len, splits_of(builder).values())) == sum(map(len, files.values()))
  assert_apart(builder, flat)
  assert builder.info.metadata['split_by'] == 'patient'
  assert builder.info.metadata['duplicate_groups'] == 3
  # Without ids, only the copies are kept together.
  plain = build(cfg(source_dir=str(flat), test_fraction=0.2), tmp_path / 'data')
  assert plain.info.metadata['split_by'] == 'image'
  content = collections.defaultdict(set)
  for split, names_ in splits_of(plain).items():
    for name in names_:
      content[(flat / name).read_bytes()].add(split)
  assert all(len(s) == 1 for s in content.values())


def test_pattern_that_misses_a_file_is_named(public, tmp_path):
  root, _ = public
  with pytest.raises(DatasetError, match=r"patient_pattern='\(person\\\\d\+\)_' does not match"):
    build(cfg(source_dir=str(root), patient_pattern=r'(person\d+)_'), tmp_path / 'data')
  assert not (tmp_path / 'data').exists()


def write_csv(path, rows, header=('path', 'label', 'patient_id')) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_label_file_with_patients(public, tmp_path, caplog):
  root, files = public
  rows = [(rel, cls, patient) for split in files.values() for rel, cls, patient in split]
  labels = root / 'labels.csv'
  write_csv(labels, rows)
  config = cfg(labels_csv=str(labels), class_names='PNEUMONIA,NORMAL')
  builder = build(config, tmp_path / 'data')
  assert folder_builder.label_names(builder) == ['PNEUMONIA', 'NORMAL']  # As given.
  assert_apart(builder, root)
  assert builder.info.metadata['split_by'] == 'patient'
  for split, names_ in splits_of(builder).items():
    labels_ = folder_builder.split_labels(builder, split)
    assert [['PNEUMONIA', 'NORMAL'][i] for i in labels_] == [n.split('/')[1] for n in names_]
  # The file's content is part of the fingerprint: the same build, or a new one.
  assert build(config, tmp_path / 'data').data_path == builder.data_path
  write_csv(labels, rows[:-1])
  assert build(config, tmp_path / 'data').data_path != builder.data_path

  # A split column is kept; a patient it puts in two splits is named.
  given = [(rel, cls, patient, rel.split('/')[0]) for rel, cls, patient in rows]
  given[0] = (*given[0][:3], 'validation')  # IM-0100's first film, the rest in train.
  write_csv(labels, given, header=('path', 'label', 'patient_id', 'split'))
  with caplog.at_level(logging.INFO, logger='absl'):
    builder = build(cfg(labels_csv=str(labels)), tmp_path / 'data')
  assert builder.info.metadata['crossing_patients'][0].startswith('IM-0100')
  assert 'have films in two of the splits' in caplog.text
  assert given[0][0] in folder_builder.split_filenames(builder, 'validation')
  assert folder_builder.label_names(builder) == ['NORMAL', 'PNEUMONIA']  # Sorted.


def test_label_file_bad_rows_are_listed_or_skipped(public, tmp_path):
  root, files = public
  rows = [[rel, cls, '', ''] for split in files.values() for rel, cls, _ in split]
  good = len(rows)
  rows[3][0] = 'train/NORMAL/missing.jpeg'  # Line 5 (the header is line 1).
  rows.append([rows[10][0], 'NORMAL', '', ''])  # A repeated path.
  rows.append([rows[11][0], '', '', ''])  # An empty label.
  rows[12][3] = 'holdout'
  labels = root / 'bad.csv'
  write_csv(labels, rows, header=('path', 'label', 'patient_id', 'split'))
  with pytest.raises(DatasetError) as e:
    build(cfg(labels_csv=str(labels)), tmp_path / 'data')
  message = str(e.value)
  assert '\n' not in message and 'skip_corrupt' in message
  assert message.startswith(f'4 bad row(s) in {labels}: bad.csv:5: no such file')
  assert f'bad.csv:{good + 2}: path {rows[10][0]!r} repeats line 12' in message
  assert f'bad.csv:{good + 3}: empty label' in message
  assert "bad.csv:14: split 'holdout' is not train, validation or test" in message
  assert not (tmp_path / 'data').exists()
  builder = build(cfg(labels_csv=str(labels), skip_corrupt=True), tmp_path / 'data')
  assert sum(map(len, splits_of(builder).values())) == good - 2


@pytest.mark.parametrize(
  'fields, error, needle',
  [
    ({'source_dir': 'x', 'labels_csv': 'y.csv'}, ConfigError, 'are both set'),
    ({'class_names': 'a'}, ConfigError, 'two or more distinct'),
    ({'class_names': ['a', 'a']}, ConfigError, 'two or more distinct'),
    ({'patient_pattern': '(person'}, ConfigError, 'not a regular expression'),
  ],
)
def test_bad_settings(fields, error, needle):
  with pytest.raises(error, match=needle):
    folder_builder.check_settings(cfg(**fields))


def test_bad_folders(public, tmp_path):
  root, _ = public
  mixed = tmp_path / 'mixed'
  shutil.copytree(root, mixed)
  os.makedirs(mixed / 'extra')
  with pytest.raises(DatasetError, match=r"mixes split folders .* with other folders \['extra'\]"):
    build(cfg(source_dir=str(mixed)), tmp_path / 'data')
  shutil.rmtree(mixed / 'extra')
  shutil.rmtree(mixed / 'val' / 'PNEUMONIA')
  with pytest.raises(DatasetError, match=r"'.*val' lacks class folder\(s\) \['PNEUMONIA'\]"):
    build(cfg(source_dir=str(mixed)), tmp_path / 'data')
  with pytest.raises(DatasetError, match=r"class_names=\['NORMAL', 'COVID'\] differs.*'COVID'"):
    build(cfg(source_dir=str(root), class_names='NORMAL,COVID'), tmp_path / 'data')
  assert not (tmp_path / 'data').exists()


def test_whole_source_is_one_split(public, tmp_path):
  root, files = public
  builder = build(cfg(source_dir=str(root)), tmp_path, whole=True)
  assert list(builder.info.metadata['splits']) == ['all']
  assert len(builder.as_data_source('all')) == sum(map(len, files.values()))
  everything = sorted(rel for split in files.values() for rel, _, _ in split)
  assert sorted(folder_builder.split_filenames(builder, 'all')) == everything
  assert len(folder_builder.split_labels(builder, 'all')) == len(everything)
  split_build = build(cfg(source_dir=str(root)), tmp_path)
  assert split_build.data_path != builder.data_path  # `whole` is in the fingerprint.


def test_odd_files_are_listed_or_skipped(tmp_path):
  src = tmp_path / 'src'
  for i in range(4):
    film(src / 'a' / f'{i}.png', i)
    film(src / 'b' / f'{i}.png', 10 + i)
  os.symlink('loop.png', src / 'a' / 'loop.png')  # A link to itself.
  os.symlink(src / 'a' / 'gone.png', src / 'b' / 'dangling.png')
  odd = os.fsdecode(b'caf\xe9.png')  # Not UTF-8: Python keeps the byte as a lone surrogate.
  film(os.path.join(src, 'b', odd), 99)
  with pytest.raises(DatasetError) as e:
    build(cfg(source_dir=str(src)), tmp_path / 'data')
  assert 'loop.png' in str(e.value) and 'dangling.png' in str(e.value)
  assert 'skip_corrupt' in str(e.value)
  assert not (tmp_path / 'data' / 'class_folder').exists()
  builder = build(cfg(source_dir=str(src), skip_corrupt=True), tmp_path / 'data')
  assert builder.info.metadata['skipped_corrupt'] == ['a/loop.png', 'b/dangling.png']
  # The odd name is kept exactly: in the metadata (JSON escapes the surrogate) and the records.
  names_ = [n for f in splits_of(builder).values() for n in f]
  assert f'b/{odd}' in names_ and len(names_) == 9
  with open(builder.data_path / 'metadata.json') as f:
    assert f'b/{odd}' in [n for s in json.load(f)['splits'].values() for n in s['filenames']]
  records = [
    builder.as_data_source(s)[i]['filename']
    for s in builder.info.splits
    for i in range(builder.info.splits[s].num_examples)
  ]
  assert b'b/caf\xe9.png' in records
  assert sorted(map(os.fsdecode, records)) == sorted(names_)


def test_dicom_patient_ids(tmp_path):
  from test_dicom import write  # The DICOM writer of the DICOM tests.

  src = tmp_path / 'src'
  rng = np.random.default_rng(0)
  for cls in ('a', 'b'):
    os.makedirs(src / cls)
    for p in range(5):
      for k in range(2):
        pixels = rng.integers(0, 4095, (16, 16), dtype=np.uint16)
        write(src / cls / f'{p}_{k}.dcm', pixels, PatientID=f'{cls}{p}')
  builder = build(cfg(source_dir=str(src), validation_fraction=0.4), tmp_path / 'data')
  assert builder.info.metadata['split_by'] == 'patient'
  for split in builder.info.splits:
    ids = patients_of(builder, split)
    assert all(ids)
    assert all(len(u) > 10 for u in folder_builder.split_column(builder, split, 'sop_uids'))
  seen = [set(patients_of(builder, s)) for s in builder.info.splits]
  assert not seen[0] & seen[1]


def test_dataset_for_whole(public, tmp_path):
  root, files = public
  config = default.get_config()
  config.dataset.source_dir = str(root)
  builder = dataset_for(config, str(tmp_path), whole=True)
  assert len(folder_builder.split_filenames(builder, 'all')) == sum(map(len, files.values()))


def test_label_file_header_and_class_names(public, tmp_path):
  root, files = public
  rows = [(rel, cls) for split in files.values() for rel, cls, _ in split]
  labels = tmp_path / 'labels.csv'
  write_csv(labels, rows, header=('file', 'label'))
  with pytest.raises(
    DatasetError, match=r"no column\(s\) \['path'\] in its header \['file', 'label'\]"
  ):
    build(cfg(labels_csv=str(labels)), tmp_path / 'data')
  rows = [(os.path.join(root, rel), cls) for rel, cls in rows]  # Absolute paths.
  write_csv(labels, rows, header=('path', 'label'))
  with pytest.raises(
    DatasetError,
    match=r"labels.csv:2: label 'NORMAL' is not one of dataset.class_names \['0', '1'\]",
  ):
    build(cfg(labels_csv=str(labels), class_names='0,1'), tmp_path / 'data')
  builder = build(cfg(labels_csv=str(labels)), tmp_path / 'data')
  assert set(folder_builder.split_filenames(builder, 'train')) <= {p for p, _ in rows}
