"""Splits by image (today's stratified split, unchanged) and by patient (none in two splits)."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from pneumo_jax.data import splits
from pneumo_jax.data.splits import DatasetError, Settings

SMALL = {'a': 7, 'b': 5, 'c': 4}
BIG = {'NORMAL': 41, 'PNEUMONIA': 97, 'x': 13}


def by_class(counts: dict[str, int]) -> tuple[list[int], list[str]]:
  """Labels of examples listed class by class (as a class folder's files are), and the classes."""
  classes = sorted(counts)
  return [label for label, c in enumerate(classes) for _ in range(counts[c])], classes


def patients(num: int, num_classes: int, seed: int = 0, mixed: float = 0.1):
  """Patient-coded labels: 1–4 films per patient, one class each, a `mixed` share of patients
  with films of two classes. Returns labels, patient ids and class names."""
  rng = np.random.default_rng(seed)
  labels, groups = [], []
  for p in range(num):
    cls = int(rng.integers(num_classes))
    for _ in range(int(rng.integers(1, 5))):
      other = rng.random() < mixed
      labels.append(int(rng.integers(num_classes)) if other else cls)
      groups.append(f'person{p}')
  return labels, groups, [f'class{i}' for i in range(num_classes)]


def orders(result: splits.Splits) -> dict[str, list[int]]:
  return {name: idx.tolist() for name, idx in result.order.items()}


def group_splits(result: splits.Splits, groups) -> dict[str, set[str]]:
  """Per group id, the splits its examples are in."""
  out = {}
  for g, s in zip(groups, result.split, strict=True):
    out.setdefault(g, set()).add(str(s))
  return out


# Recorded from folder_builder._assign_splits (the split before patients were known) on SMALL:
# the by-image split must stay exactly that, record order included, so that builds keep theirs.
@pytest.mark.parametrize(
  'settings, expected',
  [
    (
      Settings(validation_fraction=0.2, test_fraction=0.2, split_seed=0),
      {
        'train': [4, 9, 5, 7, 2, 8, 12, 0, 14, 3],
        'validation': [1, 15, 10],
        'test': [6, 13, 11],
      },
    ),
    (
      Settings(validation_fraction=0.3, split_seed=3),
      {'train': [15, 7, 2, 5, 4, 6, 8, 12, 11, 0, 14], 'validation': [3, 1, 13, 9, 10]},
    ),
    (
      Settings(num_folds=3, fold=1, test_fraction=0.25, split_seed=5),
      {'train': [3, 10, 4, 7, 13, 9, 15, 1], 'validation': [2, 12, 11, 5], 'test': [14, 8, 6, 0]},
    ),
  ],
)
def test_by_image_is_todays_split(settings, expected):
  labels, classes = by_class(SMALL)
  assert orders(splits.assign(labels, classes, settings)) == expected
  # Ids known but all distinct: still by image, the same split.
  ids = [f'p{i}' for i in range(len(labels))]
  assert orders(splits.assign(labels, classes, settings, groups=ids)) == expected


@pytest.mark.parametrize(
  'settings, sizes, digest',
  [
    (Settings(0.15, 0.15, split_seed=7), (105, 23, 23), 'f6bd77ff232bb23b'),
    (
      Settings(test_fraction=0.1, num_folds=4, fold=2, split_seed=1),
      (102, 34, 15),
      'cb0938dfedf8fef6',
    ),
    (Settings(num_folds=5, fold=0, split_seed=2), (119, 32), '477efa073d188d12'),
  ],
)
def test_by_image_is_todays_split_recorded_digest(settings, sizes, digest):
  """As above on BIG (a digest of the record orders recorded from the old split)."""
  labels, classes = by_class(BIG)
  got = orders(splits.assign(labels, classes, settings))
  assert tuple(map(len, got.values())) == sizes
  assert hashlib.sha256(json.dumps(got).encode()).hexdigest()[:16] == digest


@pytest.mark.parametrize(
  'settings, needle',
  [
    (Settings(validation_fraction=0.05), "class 'small' (3 images): train 3, validation 0"),
    (Settings(num_folds=4), "class 'small' (3 images): train 2, validation 0 (smallest fold)"),
    (Settings(0.2, 0.1), "class 'small' (3 images): train 2, validation 1, test 0"),
  ],
)
def test_by_image_names_the_short_class(settings, needle):
  labels, classes = by_class({'big': 30, 'small': 3})
  with pytest.raises(DatasetError) as e:
    splits.assign(labels, classes, settings, source='/data/src')
  message = str(e.value)
  assert needle in message and message.startswith('in /data/src, ') and '\n' not in message
  assert 'change the fractions' in message and "'big'" not in message


@pytest.mark.parametrize('num_classes', [2, 3, 4])
@pytest.mark.parametrize(
  'settings',
  [Settings(0.2, 0.1, split_seed=1), Settings(0.15, 0.15, split_seed=2), Settings(0.25)],
)
def test_no_patient_in_two_splits(num_classes, settings):
  labels, groups, classes = patients(240, num_classes, seed=num_classes)
  result = splits.assign(labels, classes, settings, groups=groups)
  assert all(len(s) == 1 for s in group_splits(result, groups).values())
  # Every example once, in the split `split` names, and the shares near the fractions.
  assert sorted(np.concatenate(list(result.order.values())).tolist()) == list(range(len(labels)))
  labels = np.asarray(labels)
  wanted = {'validation': settings.validation_fraction, 'test': settings.test_fraction}
  for name, idx in result.order.items():
    assert (result.split[idx] == name).all()
    if name != 'train':  # Stratified: each class's share of each split is near the fraction.
      share = np.bincount(labels[idx], minlength=num_classes) / np.bincount(labels)
      assert np.abs(share - wanted[name]).max() < 0.06, (name, share)


def test_by_patient_is_seeded():
  labels, groups, classes = patients(120, 2)
  first = splits.assign(labels, classes, Settings(0.2, 0.1, split_seed=4), groups=groups)
  again = splits.assign(labels, classes, Settings(0.2, 0.1, split_seed=4), groups=groups)
  other = splits.assign(labels, classes, Settings(0.2, 0.1, split_seed=5), groups=groups)
  assert orders(first) == orders(again)
  assert set(first.order['test'].tolist()) != set(other.order['test'].tolist())


@pytest.mark.parametrize('test_fraction', [0.0, 0.2])
def test_k_folds_partition_the_non_test_patients(test_fraction):
  labels, groups, classes = patients(150, 3)
  k = 4
  results = [
    splits.assign(
      labels, classes, Settings(test_fraction=test_fraction, num_folds=k, fold=f), groups=groups
    )
    for f in range(k)
  ]
  tests = {
    frozenset(r.order['test'].tolist()) if 'test' in r.order else frozenset() for r in results
  }
  assert len(tests) == 1  # The same test split for every fold.
  (test,) = tests
  assert bool(test) == (test_fraction > 0)
  validations = [set(r.order['validation'].tolist()) for r in results]
  assert sum(map(len, validations)) == len(labels) - len(test)
  assert set().union(*validations) == set(range(len(labels))) - test
  for r in results:
    assert all(len(s) == 1 for s in group_splits(r, groups).values())
  fold_patients = [{groups[i] for i in v} for v in validations]
  assert sum(map(len, fold_patients)) == len(set().union(*fold_patients))


def test_fractions_map_to_folds():
  labels, groups, classes = patients(400, 2, mixed=0.0)
  result = splits.assign(labels, classes, Settings(0.15, 0.15), groups=groups)
  counts = splits.counts(result, groups)
  assert sum(c['patients'] for c in counts.values()) == 400
  for name in ('validation', 'test'):  # 3 folds of 20 each.
    assert abs(counts[name]['images'] / len(labels) - 0.15) < 0.02, counts
  line = splits.summary(result, groups)
  assert line.startswith('train ') and ' patients), validation ' in line and ', test ' in line


def test_duplicates_merge_patients():
  groups = ['p1', 'p1', 'p2', 'p2', '', '', '', 'p3']
  hashes = ['h0', 'h1', 'h1', 'h2', 'h3', 'h3', 'h4', None]
  merged, num_sets = splits.duplicate_groups(groups, hashes)
  assert num_sets == 2
  assert merged[:4] == ['p1 + p2'] * 4  # A copy across patients joins both.
  assert merged[4] == merged[5] == 'duplicate set 1'  # Copies of unknown patients: a group.
  assert merged[6:] == ['', 'p3']  # The rest untouched.
  # A copy of a known patient's film joins that patient.
  assert splits.duplicate_groups(['', 'p3', None], ['h', 'h', None]) == (['p3', 'p3', ''], 1)
  # Without ids, copies alone group examples.
  merged, num_sets = splits.duplicate_groups(None, ['x', 'y', 'x'])
  assert num_sets == 1 and merged[0] == merged[2] != '' and merged[1] == ''


def test_duplicates_never_cross_splits():
  labels, groups, classes = patients(100, 2)
  rng = np.random.default_rng(0)
  hashes = [f'h{i}' for i in range(len(labels))]
  copies = rng.choice(len(labels), size=(15, 2), replace=False)
  for a, b in copies:  # Exact copies, mostly across patients.
    hashes[b] = hashes[a]
  merged, num_sets = splits.duplicate_groups(groups, hashes)
  assert num_sets == 15
  result = splits.assign(labels, classes, Settings(0.2, 0.2), groups=merged)
  for a, b in copies:
    assert result.split[a] == result.split[b]
  assert all(len(s) == 1 for s in group_splits(result, groups).values())


def test_predefined_splits_kept():
  labels, groups, classes = patients(120, 2)
  n = len(labels)
  fixed = [''] * n
  first = {g: i for i, g in reversed(list(enumerate(groups)))}
  fixed[first['person0']] = 'test'  # One film fixed: the patient's others follow.
  for i, g in enumerate(groups):
    if g in ('person1', 'person2'):
      fixed[i] = 'validation'
  films = {g: [i for i, h in enumerate(groups) if h == g] for g in groups}
  split_patient = next(g for g in groups[first['person3'] :] if len(films[g]) >= 2)
  a, b = films[split_patient][:2]
  fixed[a], fixed[b] = 'train', 'test'  # One patient in two predefined splits: kept.
  result = splits.assign(labels, classes, Settings(0.2), groups=groups, fixed=fixed)
  assert result.crossing == (split_patient,)
  for i in range(n):
    if fixed[i]:
      assert result.split[i] == fixed[i]
  assert {str(result.split[i]) for i, g in enumerate(groups) if g == 'person0'} == {'test'}
  where = group_splits(result, groups)
  assert all(len(s) == 1 for g, s in where.items() if g != split_patient)
  assert where[split_patient] == {'train', 'test'}


def test_predefined_splits_by_image():
  labels, classes = by_class({'a': 20, 'b': 20})
  fixed = ['test' if i % 10 == 0 else '' for i in range(len(labels))]
  result = splits.assign(labels, classes, Settings(0.25), fixed=fixed)
  assert result.crossing == ()
  assert set(result.order['test'].tolist()) == {i for i, f in enumerate(fixed) if f}
  # A fraction of the free ones: 0.25 × 18 per class, halves up.
  assert len(result.order['validation']) == 2 * 5
  everything = splits.assign(labels, classes, Settings(0.25), fixed=['train', 'validation'] * 20)
  assert [len(v) for v in everything.order.values()] == [20, 20]


def test_too_few_patients():
  labels, groups, classes = [0, 1, 0, 1], ['a', 'a', 'b', 'b'], ['x', 'y']
  with pytest.raises(DatasetError) as e:
    splits.assign(labels, classes, Settings(0.2, 0.2), groups=groups, source='labels.csv')
  assert str(e.value).startswith('in labels.csv, ') and 'too few to split by patient' in str(
    e.value
  )
  labels, groups, classes = patients(4, 2)
  with pytest.raises(DatasetError, match=r'dataset\.num_folds=5.*too few for 5 folds'):
    splits.assign(labels, classes, Settings(num_folds=5), groups=groups)


def test_by_patient_names_the_short_class():
  labels, groups, classes = patients(60, 2, mixed=0.0)
  labels += [2, 2, 2]  # One patient holds every image of the rare class.
  groups += ['rare'] * 3
  with pytest.raises(DatasetError) as e:
    splits.assign(labels, [*classes, 'rare'], Settings(0.2), groups=groups, source='/src')
  message = str(e.value)
  assert "class 'rare' (3 images, 1 patients): " in message and '\n' not in message
  assert "'class0'" not in message


def findings(num: int, prevalence=(0.3, 0.1, 0.04), seed: int = 0):
  """Multilabel patients: 1–4 films each, each finding present in a patient with its
  prevalence and shown on all their films, 5% of the cells ignored (-1). Returns labels [N, F],
  patient ids and finding names."""
  rng = np.random.default_rng(seed)
  films = rng.integers(1, 5, num)
  present = (rng.random((num, len(prevalence))) < prevalence).astype(np.int64)
  labels = present[np.repeat(np.arange(num), films)]
  labels[rng.random(labels.shape) < 0.05] = -1
  groups = [f'person{p}' for p in np.repeat(np.arange(num), films)]
  return labels, groups, [f'finding{i}' for i in range(len(prevalence))]


@pytest.mark.parametrize(
  'settings', [Settings(0.2), Settings(0.2, 0.1), Settings(0.15, 0.15, split_seed=7)]
)
def test_multilabel_by_patient_keeps_every_finding(settings):
  labels, groups, names = findings(300)
  result = splits.assign(labels, names, settings, groups=groups)
  assert all(len(s) == 1 for s in group_splits(result, groups).values())
  assert sorted(np.concatenate(list(result.order.values())).tolist()) == list(range(len(labels)))
  wanted = {'validation': settings.validation_fraction, 'test': settings.test_fraction}
  positives = (labels == 1).sum(0)
  for name, idx in result.order.items():
    assert (result.split[idx] == name).all()
    assert ((labels[idx] == 1).sum(0) > 0).all() and ((labels[idx] == 0).sum(0) > 0).all()
    if name != 'train':  # Iterative stratification: each finding's positive images within
      # one patient's films (at most 4) of the split's share of them.
      off = (labels[idx] == 1).sum(0) - wanted[name] * positives
      assert np.abs(off).max() <= 4, (name, off)
      assert abs(len(idx) / len(labels) - wanted[name]) < 0.02
  # Seeded: the same settings deal the same split, another seed another.
  assert orders(splits.assign(labels, names, settings, groups=groups)) == orders(result)
  moved = dataclasses.replace(settings, split_seed=settings.split_seed + 1)
  other = splits.assign(labels, names, moved, groups=groups)
  assert set(other.order['validation'].tolist()) != set(result.order['validation'].tolist())
  # Without patients, by image: the same rule with each film its own group.
  by_image = splits.assign(labels, names, settings)
  assert all(((labels[i] == 1).sum(0) > 0).all() for i in by_image.order.values())


def test_multilabel_k_folds_partition_and_keep_every_finding():
  labels, groups, names = findings(200)
  k = 5
  results = [
    splits.assign(labels, names, Settings(test_fraction=0.1, num_folds=k, fold=f), groups=groups)
    for f in range(k)
  ]
  assert len({frozenset(r.order['test'].tolist()) for r in results}) == 1
  test = set(results[0].order['test'].tolist())
  validations = [set(r.order['validation'].tolist()) for r in results]
  assert sum(map(len, validations)) == len(labels) - len(test)
  assert set().union(*validations) == set(range(len(labels))) - test
  for r in results:
    assert all(len(s) == 1 for s in group_splits(r, groups).values())
    for idx in r.order.values():
      assert ((labels[idx] == 1).sum(0) > 0).all()


def test_multilabel_rare_finding_is_named():
  labels, groups, names = findings(100, prevalence=(0.3, 0.0))
  labels[:3, 1] = 1  # Three films with the rare finding, from at most three patients.
  rare_patients = len(set(groups[:3]))
  with pytest.raises(DatasetError) as e:
    splits.assign(labels, names, Settings(num_folds=5), groups=groups, source='labels.csv')
  message = str(e.value)
  assert message.startswith('in labels.csv, dataset.num_folds=5 and dataset.test_fraction=0.0 ')
  assert f"finding 'finding1' (3 positive images, {rare_patients} patients): train " in message
  assert '(smallest fold)' in message and "'finding0'" not in message and '\n' not in message
  splits.assign(labels, names, Settings(0.2), groups=list(range(len(labels))))  # By image: 3 do.


def test_multilabel_predefined_splits_kept():
  labels, groups, names = findings(200)
  fixed = ['test' if int(g[len('person') :]) < 40 else '' for g in groups]
  fixed[-1] = 'validation'
  result = splits.assign(labels, names, Settings(0.2), groups=groups, fixed=fixed)
  for i, f in enumerate(fixed):
    if f:
      assert result.split[i] == f
  assert {str(result.split[i]) for i, g in enumerate(groups) if g == groups[-1]} == {'validation'}
  assert set(result.order['test'].tolist()) == {i for i, f in enumerate(fixed) if f == 'test'}
