"""Which split each example goes to: stratified by class, seeded, and by patient when known.

Pure functions over per-example arrays (no files, no TFDS); the dataset build calls them. By image
(no patient ids, no duplicates), each class cuts a permutation seeded by the split seed and its
name, so adding a class leaves the others' splits unchanged. By group (patients, or sets of
identical images from `duplicate_groups`), scikit-learn's `StratifiedGroupKFold` deals whole
groups into folds of like class mix, so a group never straddles two splits. Predefined splits
(`fixed`) are kept; the fractions apply to the free examples. docs/datasets.md gives the rules:
how fractions become folds, k folds, groups of several classes, fixed splits.

Multilabel examples (labels [N, F] of 1 present, 0 absent, -1 ignored) are dealt by group (a
patient, a set of copies, else the image alone) with iterative stratification (Sechidis,
Tsoumakas and Vlahavas 2011), so that each split holds about its share of every finding's
positive images; each split must end up with a positive and a negative image of every finding.
"""

import collections
import dataclasses
import math
import warnings
import zlib
from collections.abc import Sequence

import ml_collections
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from sklearn.model_selection import StratifiedGroupKFold

from pneumo_jax.errors import DatasetError

__all__ = ['SPLITS', 'Settings', 'Splits', 'assign', 'counts', 'duplicate_groups', 'summary']

SPLITS = ('train', 'validation', 'test')
_MAX_FOLDS = 20  # Finest grain of a by-group split: fractions are multiples of 1/n, n ≤ this.


@dataclasses.dataclass(frozen=True)
class Settings:
  """The split settings of `dataset` in the config (checked by `folder_builder.check_settings`)."""

  validation_fraction: float = 0.2  # Of all free examples; ignored with num_folds > 1.
  test_fraction: float = 0.0  # Of all free examples; 0: no test split.
  num_folds: int = 0  # k > 1: validation is fold `fold` of k over the non-test examples.
  fold: int = 0
  split_seed: int = 0

  @classmethod
  def from_config(cls, dataset_cfg: ml_collections.ConfigDict) -> 'Settings':
    return cls(
      validation_fraction=float(dataset_cfg.validation_fraction),
      test_fraction=float(dataset_cfg.test_fraction),
      num_folds=int(dataset_cfg.num_folds),
      fold=int(dataset_cfg.fold),
      split_seed=int(dataset_cfg.split_seed),
    )

  @property
  def folded(self) -> bool:
    return self.num_folds > 1

  def describe(self) -> str:
    """The fields that decide the split sizes, as a message names them."""
    how = (
      f'dataset.num_folds={self.num_folds}'
      if self.folded
      else f'dataset.validation_fraction={self.validation_fraction}'
    )
    return f'{how} and dataset.test_fraction={self.test_fraction}'


@dataclasses.dataclass(frozen=True)
class Splits:
  """Where `assign` put each example."""

  split: np.ndarray  # Per example: 'train', 'validation' or 'test'.
  # Per split, in SPLITS order: the example indices in record order (seeded mix). Holds train and
  # validation, and test when test_fraction > 0 or an example is fixed to test.
  order: dict[str, np.ndarray]
  # Groups (ids as given) with examples fixed into more than one split, kept so; sorted.
  crossing: tuple[str, ...] = ()


def assign(
  labels: Sequence[int] | np.ndarray,
  classes: Sequence[str],
  settings: Settings,
  *,
  groups: Sequence[str | None] | None = None,
  fixed: Sequence[str | None] | None = None,
  source: str = 'the dataset',
) -> Splits:
  """Splits examples into train / validation / test, stratified by class, or by finding for
  multilabel examples (see the module doc).

  Args:
    labels: per example, its class index into `classes`; or, [N, F], its value per finding
      (1 present, 0 absent, -1 ignored).
    classes: class names, in label order (they seed the by-image split and name classes in
      messages); or the F finding names.
    settings: checked split settings.
    groups: per example, its patient (or duplicate set) id; '' or None: unknown, the example is
      its own group. None: every example is its own group. Every group a singleton: the split is
      by image, else by group.
    fixed: per example, a predefined split name ('train', 'validation', 'test') or ''/None
      (free). None: all free.
    source: the folder or file the examples come from, for messages.

  Raises:
    DatasetError: some split would hold no example of a class, or no positive or no negative
      image of a finding (naming them and their counts per split), or there are too few groups
      to split by group.
  """
  labels = np.asarray(labels, dtype=np.int64)
  group_index, group_names = _group_index(groups, len(labels))
  split = _fixed(fixed, len(labels))
  has_test = settings.test_fraction > 0 or bool(np.any(split == 'test'))
  names = [s for s in SPLITS if s != 'test' or has_test]
  if labels.ndim == 1 and len(np.unique(group_index)) == len(labels):
    pre = _by_image(labels, classes, settings, split, names, source)
    crossing = ()
  else:
    crossing = _follow_fixed(group_index, group_names, split)
    deal = _by_findings if labels.ndim == 2 else _by_group
    deal(labels, classes, settings, group_index, split, names, source)
    pre = {name: np.flatnonzero(split == name) for name in names}
  rng = np.random.default_rng(settings.split_seed)  # One generator, drawn split by split.
  order = {}
  for name in names:
    idx = np.asarray(pre[name], np.int64)
    order[name] = idx[rng.permutation(len(idx))]
  return Splits(split=split, order=order, crossing=crossing)


def duplicate_groups(
  groups: Sequence[str | None] | None, hashes: Sequence[str | bytes | None]
) -> tuple[list[str], int]:
  """Merges the groups of examples with equal content hashes, so a copy shares its original's
  split.

  Examples are linked when they share a group id or a hash (None or empty: unknown, linked by
  nothing); each connected set of examples becomes one group. A merged group keeps its one known
  id, or joins its ids as 'a + b'; one with no known id is named 'duplicate set N'.

  Returns:
    Per example its group id ('' for an example that is still its own group), and the number of
    duplicate sets (distinct hashes shared by two or more examples).
  """
  n = len(hashes)
  group_index, group_names = _group_index(groups, n)
  hashed = [i for i, h in enumerate(hashes) if h]
  hash_ids: dict[str | bytes, int] = {}
  hash_index = np.array([hash_ids.setdefault(hashes[i], len(hash_ids)) for i in hashed], np.int64)
  num_sets = int(np.sum(np.bincount(hash_index, minlength=len(hash_ids)) > 1))
  # A graph of examples, group nodes and hash nodes: its components are the merged groups.
  num_groups = int(group_index.max()) + 1 if n else 0
  rows = np.concatenate([np.arange(n), np.asarray(hashed, np.int64)])
  cols = np.concatenate([n + group_index, n + num_groups + hash_index])
  size = n + num_groups + len(hash_ids)
  graph = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size))
  _, component = csgraph.connected_components(graph, directed=False)
  members = collections.defaultdict(set)  # Component → original groups in it.
  for i in range(n):
    members[component[i]].add(int(group_index[i]))
  taken = set(group_names) - {''}
  merged_names = {}
  anonymous = 0
  for comp, originals in members.items():
    if len(originals) > 1:
      known = sorted({group_names[g] for g in originals} - {''})
      if known:
        merged_names[comp] = ' + '.join(known)
      else:
        anonymous += 1
        name = f'duplicate set {anonymous}'
        while name in taken:  # Never one of the patient ids.
          name += "'"
        merged_names[comp] = name
  out = [merged_names.get(component[i], group_names[group_index[i]]) for i in range(n)]
  return out, num_sets


def counts(splits: Splits, groups: Sequence[str | None] | None = None) -> dict[str, dict[str, int]]:
  """Per split: 'images', and with `groups` 'patients' (distinct groups; unknown ids count one
  each)."""
  group_index, _ = _group_index(groups, len(splits.split))
  out = {}
  for name, idx in splits.order.items():
    out[name] = {'images': len(idx)}
    if groups is not None:
      out[name]['patients'] = len(np.unique(group_index[idx]))
  return out


def summary(splits: Splits, groups: Sequence[str | None] | None = None) -> str:
  """One line for the build's log, e.g. 'train 70 images (70%, 35 patients), validation …'."""
  total = max(len(splits.split), 1)
  parts = []
  for name, c in counts(splits, groups).items():
    details = [f'{100 * c["images"] / total:.3g}%']
    if 'patients' in c:
      details.append(f'{c["patients"]} patients')
    parts.append(f'{name} {c["images"]} images ({", ".join(details)})')
  return ', '.join(parts)


def _group_index(groups: Sequence[str | None] | None, n: int) -> tuple[np.ndarray, list[str]]:
  """Per example a group number, and each number's id ('' for an unknown one's own group)."""
  if groups is None:
    return np.arange(n), [''] * n
  if len(groups) != n:
    raise ValueError(f'{len(groups)} group ids for {n} examples')
  numbers: dict[str, int] = {}
  names: list[str] = []
  index = np.empty(n, np.int64)
  for i, g in enumerate(groups):
    if g is None or g == '':
      index[i] = len(names)
      names.append('')
    else:
      if g not in numbers:
        numbers[g] = len(names)
        names.append(str(g))
      index[i] = numbers[g]
  return index, names


def _fixed(fixed: Sequence[str | None] | None, n: int) -> np.ndarray:
  """Per example its predefined split, '' where free, as a writable array."""
  split = np.full(n, '', dtype=f'<U{max(map(len, SPLITS))}')
  if fixed is None:
    return split
  if len(fixed) != n:
    raise ValueError(f'{len(fixed)} predefined splits for {n} examples')
  bad = {s for s in fixed if s and s not in SPLITS}
  if bad:
    raise ValueError(f'predefined splits {sorted(bad)}: use one of {list(SPLITS)} or empty')
  split[:] = [s or '' for s in fixed]
  return split


def _by_image(
  labels: np.ndarray,
  classes: Sequence[str],
  settings: Settings,
  split: np.ndarray,
  names: Sequence[str],
  source: str,
) -> dict[str, list[int]]:
  """Assigns the free examples per class (see the module doc) into `split`; returns each split's
  examples, class by class in permutation order, then the fixed ones."""
  pre = {name: [] for name in names}
  fixed = split.copy()
  short = []
  for label, cls in enumerate(classes):
    of_class = labels == label
    members = np.flatnonzero(of_class & (fixed == ''))
    n = len(members)
    rng = np.random.default_rng([settings.split_seed, zlib.crc32(cls.encode())])
    order = members[rng.permutation(n)]
    n_test = _round(settings.test_fraction * n)
    test, rest = order[:n_test], order[n_test:]
    parts = {'test': test}
    if settings.folded:
      k = settings.num_folds
      in_fold = np.arange(len(rest)) % k == settings.fold
      parts.update(validation=rest[in_fold], train=rest[~in_fold])
      # Judge the worst fold, so that a sweep fails at once rather than at its last fold.
      sizes = {'train': len(rest) - math.ceil(len(rest) / k), 'validation': len(rest) // k}
    else:
      n_val = _round(settings.validation_fraction * n)
      parts.update(validation=rest[:n_val], train=rest[n_val:])
      sizes = {'train': len(rest) - n_val, 'validation': n_val}
    sizes['test'] = n_test
    for name in names:
      split[parts[name]] = name
      pre[name].extend(parts[name].tolist())
    found = {name: sizes[name] + int(np.sum(of_class & (fixed == name))) for name in names}
    if not all(found.values()):
      where = ', '.join(f'{name} {c}' for name, c in found.items())
      short.append(f'class {cls!r} ({int(of_class.sum())} images): {where}' + _worst(settings))
  _raise_short(short, settings, source)
  for name in names:
    pre[name].extend(np.flatnonzero(fixed == name).tolist())
  return pre


def _follow_fixed(
  group_index: np.ndarray, group_names: list[str], split: np.ndarray
) -> tuple[str, ...]:
  """Sends the free examples of groups with fixed ones to the group's most common fixed split
  (earliest in SPLITS on ties); returns the groups fixed into several splits."""
  fixed = collections.defaultdict(collections.Counter)
  for i in np.flatnonzero(split != ''):
    fixed[int(group_index[i])][split[i]] += 1
  home = {g: max(SPLITS, key=c.__getitem__) for g, c in fixed.items()}
  for i in np.flatnonzero(split == ''):
    g = int(group_index[i])
    if g in home:
      split[i] = home[g]
  return tuple(sorted(group_names[g] for g, c in fixed.items() if len(c) > 1))


def _by_group(
  labels: np.ndarray,
  classes: Sequence[str],
  settings: Settings,
  group_index: np.ndarray,
  split: np.ndarray,
  names: Sequence[str],
  source: str,
) -> None:
  """Deals the free groups into `split` with StratifiedGroupKFold (see the module doc)."""
  fixed = split.copy()
  free = np.flatnonzero(fixed == '')
  t, v = settings.test_fraction, settings.validation_fraction
  if len(free) and settings.folded:
    rest = free
    if t > 0:
      n, m_t, _ = _fold_choices(t, 0.0, free, labels, group_index, settings, source)[0]
      folds = _deal(free, n, labels, group_index, settings.split_seed)
      split[np.concatenate(folds[:m_t])] = 'test'
      rest = np.concatenate(folds[m_t:])
    k = settings.num_folds
    groups_left = len(np.unique(group_index[rest]))
    if groups_left < k or np.bincount(labels[rest]).max() < k:
      raise DatasetError(
        f'in {source}, {settings.describe()}: the images outside the test split come from '
        f'{groups_left} patient(s), too few for {k} folds by patient; lower dataset.num_folds '
        'or add images of more patients'
      )
    folds = _deal(rest, k, labels, group_index, settings.split_seed)
    split[folds[settings.fold]] = 'validation'
    kept = {name: np.flatnonzero(fixed == name) for name in ('train', 'validation')}
    # Every fold is checked, so that a sweep fails at once rather than at its last fold.
    checked = {
      'train': [np.concatenate([np.setdiff1d(rest, f), kept['train']]) for f in folds],
      'validation': [np.concatenate([f, kept['validation']]) for f in folds],
    }
    for name in names:
      checked.setdefault(name, [np.flatnonzero(split == name)])
    _raise_short(_short(labels, classes, settings, group_index, checked), settings, source)
    split[split == ''] = 'train'
    return
  if not len(free):
    split[split == ''] = 'train'
    return
  # The fold counts nearest the fractions first; with few groups a deal can leave a split without
  # a class that other folds, or another count, would give it: take the first of those deals
  # (the folds taken in turn) that covers every class.
  first = None
  for n, m_t, m_v in _fold_choices(t, v, free, labels, group_index, settings, source):
    folds = _deal(free, n, labels, group_index, settings.split_seed)
    for turn in range(n):
      split[:] = fixed
      for i, fold in enumerate((folds[turn:] + folds[:turn])[: m_t + m_v]):
        split[fold] = 'test' if i < m_t else 'validation'
      split[split == ''] = 'train'
      by_split = {name: [np.flatnonzero(split == name)] for name in names}
      short = _short(labels, classes, settings, group_index, by_split)
      if not short:
        return
      first = first or short
  _raise_short(first, settings, source)


def _by_findings(
  labels: np.ndarray,
  findings: Sequence[str],
  settings: Settings,
  group_index: np.ndarray,
  split: np.ndarray,
  names: Sequence[str],
  source: str,
) -> None:
  """Deals the free groups of multilabel examples into `split` by `_stratify` (module doc): the
  fractions as shares, or the test share then k equal folds."""
  fixed = split.copy()
  free = np.flatnonzero(fixed == '')
  positive = labels == 1
  rng = np.random.default_rng(settings.split_seed)
  t, v = settings.test_fraction, settings.validation_fraction
  if settings.folded:
    k = settings.num_folds
    rest = free
    if t > 0:
      test, rest = _stratify(free, (t, 1 - t), positive, group_index, rng)
      split[test] = 'test'
    _need_groups(rest, k, f'{k} folds', group_index, settings, source)
    folds = _stratify(rest, (1 / k,) * k, positive, group_index, rng)
    split[folds[settings.fold]] = 'validation'
    kept = {name: np.flatnonzero(fixed == name) for name in ('train', 'validation')}
    # Every fold is checked, so that a sweep fails at once rather than at its last fold.
    checked = {
      'train': [np.concatenate([np.setdiff1d(rest, f), kept['train']]) for f in folds],
      'validation': [np.concatenate([f, kept['validation']]) for f in folds],
    }
  else:
    shares = {**({'test': t} if t > 0 else {}), 'validation': v, 'train': 1 - t - v}
    wanted = ', '.join(shares)
    _need_groups(free, len(shares), wanted, group_index, settings, source)
    parts = _stratify(free, tuple(shares.values()), positive, group_index, rng)
    for name, part in zip(shares, parts, strict=True):
      split[part] = name
    checked = {}
  split[split == ''] = 'train'
  for name in names:
    checked.setdefault(name, [np.flatnonzero(split == name)])
  short = _short_findings(labels, findings, settings, group_index, checked)
  _raise_short(
    short,
    settings,
    source,
    'a positive or a negative image of a finding',
    'images with and without those findings',
  )


def _need_groups(
  examples: np.ndarray,
  parts: int,
  wanted: str,
  group_index: np.ndarray,
  settings: Settings,
  source: str,
) -> None:
  """Raises DatasetError when `examples` come from fewer groups than the `parts` they must
  fill."""
  num_groups = len(np.unique(group_index[examples]))
  if len(examples) and num_groups < parts:
    raise DatasetError(
      f'in {source}, {settings.describe()}: {len(examples)} images of {num_groups} patient(s) '
      f'are too few to split by patient into {wanted}; add images of more patients or lower '
      'the fractions / number of folds'
    )


def _stratify(
  examples: np.ndarray,
  shares: Sequence[float],
  positive: np.ndarray,
  group_index: np.ndarray,
  rng: np.random.Generator,
) -> list[np.ndarray]:
  """Iterative stratification (Sechidis, Tsoumakas and Vlahavas 2011, "On the stratification of
  multi-label data", Algorithm 1) of the groups of `examples` into parts of the given `shares`:
  each part's wish for a finding is its share of the finding's positive images (and for the
  total, of all images). The finding with the fewest groups left goes first; each of its groups
  (in seeded order) goes to the part that has none of it yet, then the part wishing for most
  of it, then for most images overall, then a seeded draw; last, the groups without any
  positive go to the part wishing for most images. A group is dealt whole.

  Returns:
    Per part, its example indices (sorted).
  """
  groups, inverse = np.unique(group_index[examples], return_inverse=True)
  shares = np.asarray(shares, np.float64)
  size = np.bincount(inverse, minlength=len(groups)).astype(np.float64)
  found = np.zeros((len(groups), positive.shape[1]), np.float64)
  np.add.at(found, inverse, positive[examples])
  wish = shares[:, None] * found.sum(0)  # [parts, findings]: positive images still wished for.
  wish_total = shares * size.sum()
  has = np.zeros(wish.shape, bool)  # Whether a part holds a positive of the finding yet.
  part = np.full(len(groups), -1)

  def deal(group: int, finding: int | None) -> None:
    keys = [rng.random(len(shares)), wish_total]  # np.lexsort: the last key decides first.
    if finding is not None:
      keys += [wish[:, finding], (shares > 0) & ~has[:, finding]]
    best = int(np.lexsort(keys)[-1])
    part[group] = best
    wish[best] -= found[group]
    wish_total[best] -= size[group]
    has[best] |= found[group] > 0

  while True:
    left = ((found > 0) & (part < 0)[:, None]).sum(0)
    if not left.any():
      break
    fewest = np.flatnonzero(left == left[left > 0].min())
    finding = int(rng.choice(fewest))
    for group in rng.permutation(np.flatnonzero((found[:, finding] > 0) & (part < 0))):
      deal(int(group), finding)
  for group in rng.permutation(np.flatnonzero(part < 0)):
    deal(int(group), None)
  of_example = part[inverse]
  return [np.sort(examples[of_example == j]) for j in range(len(shares))]


def _short_findings(
  labels: np.ndarray,
  findings: Sequence[str],
  settings: Settings,
  group_index: np.ndarray,
  checked: dict[str, list[np.ndarray]],
) -> list[str]:
  """One entry per finding and kind (positive, negative) missing from some split (each split
  given as the example sets to check: with k folds, one per fold)."""
  short = []
  for f, finding in enumerate(findings):
    for kind, value in (('positive', 1), ('negative', 0)):
      found = {
        name: min(int(np.sum(labels[idx, f] == value)) for idx in sets)
        for name, sets in checked.items()
      }
      if not all(found.values()):
        of_kind = labels[:, f] == value
        patients = len(np.unique(group_index[of_kind]))
        where = ', '.join(f'{name} {c}' for name, c in found.items())
        short.append(
          f'finding {finding!r} ({int(of_kind.sum())} {kind} images, {patients} patients): '
          f'{where}{_worst(settings)}'
        )
  return short


def _short(
  labels: np.ndarray,
  classes: Sequence[str],
  settings: Settings,
  group_index: np.ndarray,
  checked: dict[str, list[np.ndarray]],
) -> list[str]:
  """One entry per class missing from some split (each split given as the example sets to check:
  with k folds, one per fold)."""
  short = []
  for label, cls in enumerate(classes):
    found = {
      name: min(int(np.sum(labels[idx] == label)) for idx in sets) for name, sets in checked.items()
    }
    if not all(found.values()):
      of_class = labels == label
      patients = len(np.unique(group_index[of_class]))
      where = ', '.join(f'{name} {c}' for name, c in found.items())
      short.append(
        f'class {cls!r} ({int(of_class.sum())} images, {patients} patients): {where}'
        + _worst(settings)
      )
  return short


def _fold_choices(
  t: float,
  v: float,
  examples: np.ndarray,
  labels: np.ndarray,
  group_index: np.ndarray,
  settings: Settings,
  source: str,
) -> list[tuple[int, int, int]]:
  """Every (n, m_t, m_v) that can split `examples`: n folds to deal them into, m_t and m_v of
  them for the test and validation splits (0 where its fraction is 0); nearest the fractions
  first, the fewest folds on ties (module doc)."""
  num_groups = len(np.unique(group_index[examples]))
  most = min(_MAX_FOLDS, num_groups, int(np.bincount(labels[examples]).max()))
  choices = []
  for n in range(2, most + 1):
    m_t = max(1, _round(t * n)) if t > 0 else 0
    m_v = max(1, _round(v * n)) if v > 0 else 0
    if m_t + m_v < n:
      choices.append((round(abs(m_t / n - t) + abs(m_v / n - v), 3), n, m_t, m_v))
  if not choices:
    wanted = ', '.join(s for s, f in (('test', t), ('validation', v), ('train', 1)) if f > 0)
    raise DatasetError(
      f'in {source}, {settings.describe()}: {len(examples)} images of {num_groups} patient(s) '
      f'are too few to split by patient into {wanted}; add images of more patients or lower '
      'the fractions'
    )
  return [c[1:] for c in sorted(choices)]


def _deal(
  examples: np.ndarray, n: int, labels: np.ndarray, group_index: np.ndarray, seed: int
) -> list[np.ndarray]:
  """StratifiedGroupKFold's n test folds of `examples` (example indices, each fold sorted)."""
  sgkf = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
  with warnings.catch_warnings():  # A class smaller than n: checked afterwards, per split.
    warnings.simplefilter('ignore', UserWarning)
    folds = sgkf.split(examples, labels[examples], group_index[examples])
    return [examples[np.sort(test)] for _, test in folds]


def _worst(settings: Settings) -> str:
  return ' (smallest fold)' if settings.folded else ''


def _raise_short(
  short: list[str],
  settings: Settings,
  source: str,
  what: str = 'an example of a class',
  add: str = 'images to those classes',
) -> None:
  if short:
    raise DatasetError(
      f'in {source}, {settings.describe()} leave some split without {what}: '
      + '; '.join(short)
      + f'; add {add} or change the fractions / number of folds'
    )


def _round(x: float) -> int:
  """Rounds half up (Python's round() goes to even, which surprises for 2.5 → 2)."""
  return int(np.floor(x + 0.5))
