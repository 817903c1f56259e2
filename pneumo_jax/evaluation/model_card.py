"""A model card: what a trained grader was trained on, how, how well, and where it stops.

A kappa of 0.8 means little without the data it came from, the recipe, how wide its interval is
and whether the split it was measured on also chose the checkpoint. `--mode eval` writes the card
from its report (`render` reads only the report's record, the config and the build's metadata),
so anything that has those, such as an export, can write the same card.

Every sentence under "Known limits" is generated from those facts, so the card never claims more
than the run shows. A multi-label run's card (findings) gives each finding's figures: ROC AUC and
average precision with their intervals, and sensitivity and specificity at the threshold chosen
on validation (config.operating_point's) with theirs.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

import pneumo_jax
from pneumo_jax import atomic, heads, models
from pneumo_jax.data import folder_builder
from pneumo_jax.evaluation import metrics, operating_points
from pneumo_jax.training.phases import resolve_phases

CARD_FILE = 'model_card.md'  # In WORKDIR: the card of the latest evaluation.
INTERVALS = 'confidence_intervals'  # The eval report's key for metrics.bootstrap_ci's result.
# The builder's split names, in the card's order ('all': a source scored whole, --split all).
_SPLITS = ('train', 'validation', 'test', 'all')
TITLES = {
  'accuracy': 'accuracy',
  'kappa': 'quadratic weighted kappa',
  'auc_macro': 'macro AUC (one-vs-rest)',
  'auc_micro': 'micro AUC (every finding label pooled)',
}
FINDING_TITLES = {**TITLES, 'auc_macro': 'macro AUC (mean over findings)'}
_IMBALANCED = 1.5  # Largest / smallest class count from which the card calls classes imbalanced.
_WIDE = 0.1  # Interval width above which the card warns that small differences are noise.


class Data(NamedTuple):
  """The data facts of a card, read from a build's metadata without decoding any image."""

  source_dir: str  # The source folder, or the label file.
  build_dir: str
  label_names: list[str]  # The classes, or the findings.
  # Split → images per class, in label order; findings: per finding [positive, negative,
  # ignored] images.
  counts: dict[str, list]
  channels: int  # 1: every image grey; 3: RGB.
  skipped: int  # Unreadable files left out (dataset.skip_corrupt).
  multilabel: bool = False  # Findings (dataset.task='multilabel').


def data_of(builder: tfds.core.DatasetBuilder) -> Data:
  """The card's data facts of a prepared `folder_builder` build."""
  metadata = builder.info.metadata
  counts = folder_builder.label_counts(builder)
  return Data(
    source_dir=metadata.get('labels_csv') or metadata['source_dir'],
    build_dir=str(builder.data_dir),
    label_names=folder_builder.label_names(builder),
    counts={split: counts[split].tolist() for split in _SPLITS if split in counts},
    channels=folder_builder.stored_shape(builder)[2],
    skipped=len(metadata['skipped_corrupt']),
    multilabel=folder_builder.task(builder) == 'multilabel',
  )


def render(
  config: ml_collections.ConfigDict,
  data: Data,
  report: Mapping[str, Any],
  *,
  checkpoint: str = 'latest',
  report_path: str = '',
) -> str:
  """The card, in Markdown.

  Args:
    config: the run's config (recipe and split settings).
    data: `data_of` the run's build.
    report: an eval report's record as `reports.write_eval` writes it (split, step, provenance,
      metrics.compute's keys) with metrics.bootstrap_ci's result under INTERVALS. A provenance
      with a `source` is an external evaluation: `data` is then that source's build.
    checkpoint: the checkpoint asked for ('latest', 'best' or a step); 'best' was chosen on the
      validation split, which the card then says.
    report_path: the report's JSON, named in the card so a reader finds the full figures.
  """
  sections = [
    _header(config, report, report_path),
    _data(config, data, report),
    _recipe(config, report, checkpoint),
    _metrics(report),
    _limits(config, data, report, checkpoint),
  ]
  return '\n\n'.join(sections) + '\n'


def write(path: str, card: str) -> str:
  """Writes `card` to `path` atomically, so a reader never sees half a card; returns `path`."""
  with atomic.atomic_file(path) as tmp, open(tmp, 'w') as f:
    f.write(card)
  return path


def _header(config: ml_collections.ConfigDict, report: Mapping[str, Any], report_path: str) -> str:
  lines = [
    f'# Model card: {config.model.name} {_kind(report)} of {", ".join(report["label_names"])} '
    f'(step {report["step"]})',
    '',
    'Research use only. Not a medical device: not validated for diagnosis or screening.',
    '',
    f'Made by pneumo_jax {pneumo_jax.__version__}.',
  ]
  if report_path:
    lines += ['', f'Figures from the evaluation report `{report_path}`.']
  return '\n'.join(lines)


def _findings(report: Mapping[str, Any]) -> bool:
  """Whether the report is a multi-label run's (metrics per finding)."""
  return 'per_finding' in report


def _kind(report: Mapping[str, Any]) -> str:
  return 'reader' if _findings(report) else 'grader'


def _external(report: Mapping[str, Any]) -> bool:
  """Whether the report scored another source than the run's own (modes/evaluate)."""
  return 'source' in report['provenance']


def _data(config: ml_collections.ConfigDict, data: Data, report: Mapping[str, Any]) -> str:
  ds = config.dataset
  if ds.num_folds > 1:
    validation = f'validation = fold {ds.fold} of {ds.num_folds} of the rest'
  else:
    validation = f'validation {ds.validation_fraction:.0%} of the rest'
  test = (
    f'test {ds.test_fraction:.0%} held out first, ' if ds.test_fraction > 0 else 'no test split, '
  )
  source = f'`{data.source_dir}`'
  if _external(report):
    source += ' (external: not the source the run was trained on)'
  elif ds.synthetic:
    source += " (the demo's synthetic images)"
  kept = (
    "iterative stratification (every finding's positives in each split)"
    if data.multilabel
    else 'stratified per class'
  )
  if 'all' in data.counts:
    split_line = '- Split: none: every readable image of the source was scored (`--split all`).'
  else:
    split_line = (
      f'- Split: {kept} with seed {ds.split_seed}: {test}{validation}, train the remainder.'
    )
  if data.multilabel:
    return '\n'.join(
      [
        '## Data',
        '',
        f'- Source: {source}; findings in column order, {_policies(config)}.',
        f'- Build: `{data.build_dir}`: {_colour(data.channels)} images; '
        f'{data.skipped} unreadable file(s) skipped.',
        split_line,
        '',
        *_finding_counts(data),
      ]
    )
  splits = list(data.counts)
  rows = [
    f'| {name} | ' + ' | '.join(str(data.counts[s][c]) for s in splits) + f' | {total} |'
    for c, (name, total) in enumerate(zip(data.label_names, _class_totals(data), strict=True))
  ]
  sums = [sum(data.counts[s]) for s in splits]
  return '\n'.join(
    [
      '## Data',
      '',
      f'- Source: {source}; classes in label order.',
      f'- Build: `{data.build_dir}`: {_colour(data.channels)} images; '
      f'{data.skipped} unreadable file(s) skipped.',
      split_line,
      '',
      '| class | ' + ' | '.join(splits) + ' | all |',
      '|---' * (len(splits) + 2) + '|',
      *rows,
      '| **total** | ' + ' | '.join(map(str, sums)) + f' | {sum(sums)} |',
    ]
  )


def _policies(config: ml_collections.ConfigDict) -> str:
  """How the label file's uncertain (-1) and blank cells were read."""
  ds = config.dataset
  return f'uncertain (-1) labels read as {ds.uncertain}, blank ones as {ds.blank}'


def _finding_counts(data: Data) -> list[str]:
  """A table of each finding's positive / negative / ignored images per split."""
  splits = list(data.counts)
  rows = [
    f'| {name} | ' + ' | '.join('{} / {} / {}'.format(*data.counts[s][f]) for s in splits) + ' |'
    for f, name in enumerate(data.label_names)
  ]
  return [
    '| finding | ' + ' | '.join(f'{s}: positive / negative / ignored' for s in splits) + ' |',
    '|---' * (len(splits) + 1) + '|',
    *rows,
  ]


def recipe_rows(
  config: ml_collections.ConfigDict, report: Mapping[str, Any], checkpoint: str
) -> list[tuple[str, str]]:
  """The recipe's (setting, value) rows (Markdown code spans in the values)."""
  model, view = config.model, report['provenance']
  backbone = (
    f'`{model.name}`, {model.head} head, dropout keep {model.dropout_keep_prob:g}, '
    f'{model.dtype} compute'
  )
  backbone += ''.join(f', {phrase}' for phrase in models.backbone_of(config).describe(config))
  if config.init_checkpoint:
    weights = f'`{config.init_checkpoint}`, re-initialising `{config.exclude_scopes}`'
  else:
    weights = 'random init (no init_checkpoint)'
  augment = ', '.join(
    name
    for name, on in [
      ('random crop', config.input.random_crop),
      ('left-right flip', config.input.random_flip),
      ('colour distortion', config.input.color_distortion),
      ('class-balanced sampling', config.input.class_balanced),
    ]
    if on
  )
  ema = (
    f'EMA of the weights (decay {config.ema_decay:g})'
    if config.ema_decay
    else 'raw weights (no EMA)'
  )
  return [
    ('Backbone', backbone),
    ('Initial weights', weights),
    (
      'Input',
      f'{view["image_size"]} px square, from records stored at {view["stored_size"]} px; '
      f'evaluation crops the central {view["central_crop_fraction"]:g}',
    ),
    ('Training augmentation', augment or 'none'),
    ('Batch', f'{config.input.batch_size} (global), seed {config.seed}'),
    (
      'Loss',
      f'{_loss(config)}, label smoothing {config.label_smoothing:g}, class weighting '
      f'{config.class_weighting or "none"}',
    ),
    ('Evaluated', f'step {report["step"]} (`--checkpoint={checkpoint}`), {ema}'),
  ]


def _loss(config: ml_collections.ConfigDict) -> str:
  if heads.get(config.model.head).multilabel:
    return 'binary cross-entropy per finding (ignored labels left out)'
  return 'cross-entropy'


def _recipe(config: ml_collections.ConfigDict, report: Mapping[str, Any], checkpoint: str) -> str:
  table = recipe_rows(config, report, checkpoint)
  phases = [
    f'| {p.name} | {p.start + 1}–{p.end} | `{p.cfg.trainable_scopes}` | {p.cfg.batch_norm} | '
    f'{_optimizer(p.cfg.optimizer)} | {_schedule(p.cfg.schedule)} | '
    f'{p.cfg.schedule.learning_rate:g} |'
    for p in resolve_phases(config)
  ]
  return '\n'.join(
    [
      '## Recipe',
      '',
      '| setting | value |',
      '|---|---|',
      *(f'| {k} | {v} |' for k, v in table),
      '',
      '| phase | steps | trainable scopes | batch norm | optimizer | schedule | learning rate |',
      '|---' * 7 + '|',
      *phases,
    ]
  )


def _optimizer(opt: ml_collections.ConfigDict) -> str:
  clip = f', clip {opt.grad_clip_norm:g}' if opt.grad_clip_norm > 0 else ''
  return f'{opt.name}, weight decay {opt.weight_decay:g}{clip}'


def _schedule(s: ml_collections.ConfigDict) -> str:
  if s.name == 'exponential':
    return f'exponential, ×{s.decay_rate:g} per {s.decay_steps} steps'
  if s.name == 'polynomial':
    return f'polynomial (power {s.power:g}) to {s.end_learning_rate:g}'
  if s.name == 'warmup_cosine':
    return f'{s.warmup_steps} warm-up steps, cosine to {s.end_learning_rate:g}'
  return s.name


def _metrics(report: Mapping[str, Any]) -> str:
  if _findings(report):
    return _finding_metrics(report)
  intervals = report[INTERVALS]
  method = intervals['method']
  level = f'{method["level"]:.0%}'
  rows = []
  for key in metrics.BOOTSTRAPPED:
    ci = intervals[key]
    span = 'undefined' if ci['low'] is None else f'{ci["low"]:.3f} – {ci["high"]:.3f}'
    rows.append(f'| {TITLES[key]} | {_num(ci["estimate"])} | {span} | {ci["used"]} |')
  per_class = [
    f'| {name} | {m["support"]} | {_num(m["precision"])} | {_num(m["recall"])} | {_num(m["auc"])} |'
    for name, m in report['per_class'].items()
  ]
  return '\n'.join(
    [
      f'## Metrics: {report["split"]} split, {method["n"]} images',
      '',
      f'| metric | estimate | {level} interval | resamples used |',
      '|---|---|---|---|',
      *rows,
      '',
      f'Balanced accuracy {_num(report["balanced_accuracy"])}, log loss {_num(report["loss"])} '
      '(no interval).',
      '',
      '| class | images | precision | recall | AUC |',
      '|---|---|---|---|---|',
      *per_class,
      '',
      f'Intervals: percentile bootstrap. {method["resamples"]} resamples of the '
      f'{method["n"]} images, each drawn with replacement (numpy default_rng, seed '
      f'{method["seed"]}, so the card is reproducible); an interval spans the central {level} of '
      'a metric over the resamples where it is defined. Resamples where it is not (kappa with '
      'one class in labels and predictions; macro AUC with a class missing or alone) are '
      'dropped: the "resamples used" column counts the rest. The intervals cover the sampling '
      'of these images only, not other sites, scanners or readers.',
    ]
  )


def _interval(ci: Mapping[str, Any]) -> str:
  """An estimate with its interval: '0.912 (0.871 – 0.950)'."""
  span = 'undefined' if ci['low'] is None else f'{ci["low"]:.3f} – {ci["high"]:.3f}'
  return f'{_num(ci["estimate"])} ({span})'


def finding_rows(report: Mapping[str, Any]) -> list[list[str]]:
  """Per finding: name, positives, negatives, ignored, AUC and average precision with their
  intervals, and, where the report has operating points, the threshold chosen on validation at
  the point predict decides at and the sensitivity and specificity there with theirs."""
  intervals = report[INTERVALS]['per_finding']
  points = report.get('operating_points') or {}
  at = {r['cut']: r for r in points.get('rows', []) if r['point'] == points['predict_decides_at']}
  rows = []
  for name, m in report['per_finding'].items():
    row = [
      name,
      str(m['positives']),
      str(m['negatives']),
      str(m['ignored']),
      _interval(intervals[name]['auc']),
      _interval(intervals[name]['average_precision']),
    ]
    if name in at:
      row += [f'{at[name]["threshold"]:.3f}', *(_interval(at[name][k]) for k in _SENS_SPEC)]
    else:
      row += ['n/a'] * (1 + len(_SENS_SPEC))
    rows.append(row)
  return rows


_SENS_SPEC = ('sensitivity', 'specificity')
FINDING_COLUMNS = (
  'finding',
  'positives',
  'negatives',
  'ignored',
  'AUC',
  'average precision',
  'threshold',
  'sensitivity',
  'specificity',
)


def _finding_metrics(report: Mapping[str, Any]) -> str:
  intervals = report[INTERVALS]
  method = intervals['method']
  level = f'{method["level"]:.0%}'
  rows = [
    f'| {FINDING_TITLES[key]} | {_interval(intervals[key])} | {intervals[key]["used"]} |'
    for key in metrics.BOOTSTRAPPED_FINDINGS
  ]
  points = report.get('operating_points')
  where = (
    f'the threshold chosen on the {points["chosen_on"]} split at '
    f'{operating_points.POINTS[points["predict_decides_at"]]} (`operating_point`)'
    if points
    else 'no threshold (the run has no validation split to choose one on)'
  )
  return '\n'.join(
    [
      f'## Metrics: {report["split"]} split, {method["n"]} images',
      '',
      f'| metric | estimate ({level} interval) | resamples used |',
      '|---|---|---|',
      *rows,
      '',
      f'Accuracy {_num(report["accuracy"])} and balanced accuracy '
      f'{_num(report["balanced_accuracy"])} (each label called at probability '
      f'{metrics.PRESENT_AT:g}), log loss {_num(report["loss"])} (no interval).',
      '',
      f'Per finding, over its used labels (an ignored label counts nowhere); sensitivity and '
      f'specificity at {where}. Estimates with their {level} intervals:',
      '',
      '| ' + ' | '.join(FINDING_COLUMNS) + ' |',
      '|---' * len(FINDING_COLUMNS) + '|',
      *('| ' + ' | '.join(row) + ' |' for row in finding_rows(report)),
      '',
      f'Intervals: percentile bootstrap. {method["resamples"]} resamples of the '
      f'{method["n"]} images, each drawn with replacement with all its findings (numpy '
      f'default_rng, seed {method["seed"]}, so the card is reproducible); an interval spans the '
      f"central {level} of a figure over the resamples where it is defined (a finding's AUC "
      'needs a positive and a negative drawn; macro AUC every finding the split defines). The '
      'intervals cover the sampling of these images only, not other sites, scanners or readers.',
    ]
  )


def _limits(
  config: ml_collections.ConfigDict, data: Data, report: Mapping[str, Any], checkpoint: str
) -> str:
  facts = limit_facts(config, data, report, checkpoint)
  return '\n'.join(['## Known limits', '', *(f'- {fact}' for fact in facts)])


def limit_facts(
  config: ml_collections.ConfigDict, data: Data, report: Mapping[str, Any], checkpoint: str
) -> list[str]:
  """The card's "Known limits", one sentence (or two) each, generated from the facts."""
  split, intervals, view = report['split'], report[INTERVALS], report['provenance']
  findings = _findings(report)
  widths = {
    key: intervals[key]['high'] - intervals[key]['low']
    for key in (metrics.BOOTSTRAPPED_FINDINGS if findings else metrics.BOOTSTRAPPED)
    if intervals[key]['low'] is not None
  }
  facts = [
    f'{intervals["method"]["n"]} images in the {split} split. Interval widths: '
    + ', '.join(f'{(FINDING_TITLES if findings else TITLES)[k]} {w:.2f}' for k, w in widths.items())
    + (
      '; models whose estimates differ by less than that are not shown to differ.'
      if max(widths.values(), default=1.0) > _WIDE
      else '.'
    ),
    _split_role(config, split, checkpoint, _external(report)),
    (
      f'External source: these images come from `{data.source_dir}`, not from the training '
      'source; it is one site, scanner and population among many.'
      if _external(report)
      else f'Single source: every image comes from `{data.source_dir}`; no other site, scanner '
      'or population was evaluated (no external validation).'
    ),
    *(_prevalence(report) if findings else _balance(config, data, report)),
    f'Input: {_colour(data.channels)} images squashed to {view["stored_size"]} px squares '
    '(aspect ratio not kept), centrally cropped and resized to '
    f'{view["image_size"]} px. Other projections, processing or populations are untested.',
    (
      f"Labels are the label file's finding columns as given, {_policies(config)}; their "
      'reliability (agreement between readers, or the report parser that wrote them) is not '
      'measured here.'
      if findings
      else 'Labels are the class folders as given; their reliability (agreement between '
      'readers) is not measured here.'
    ),
    'Not a medical device; research use only.',
  ]
  if config.dataset.synthetic:
    facts.insert(
      0, "The data are the demo's synthetic images: these numbers say nothing about real X-rays."
    )
  return facts


def _split_role(
  config: ml_collections.ConfigDict, split: str, checkpoint: str, external: bool
) -> str:
  if external:
    return (
      'Training never read this source, nor chose its checkpoint on it; the estimate holds for '
      'unseen images only if no image or patient of it is also in the training source.'
    )
  if split == 'all':
    return 'The all split holds the training images too: it says little about unseen images.'
  if split == 'test':
    return (
      'The test split was held out before training and the training loop never reads it; it '
      'stays an unbiased estimate only if it was not used to choose between runs or settings.'
    )
  if split != 'validation':
    return f'The {split} split is training data: it says nothing about unseen images.'
  when = f'every {config.eval_every_steps} steps' if config.eval_every_steps else 'at the end'
  stopping = (
    f' and stops after {config.early_stopping_patience} evaluations without a new best'
    if config.early_stopping_patience
    else ''
  )
  chosen = ', and this checkpoint is the one it chose' if checkpoint == 'best' else ''
  folds = config.dataset.num_folds
  fold = (
    f' It is fold {config.dataset.fold} of {folds}: the mean over all folds is steadier.'
    if folds > 1
    else ''
  )
  return (
    f'Optimistic: training evaluates the validation split {when} to keep the best checkpoint by '
    f'{config.best_metric}{stopping}{chosen}. Report a held-out test split '
    f'(dataset.test_fraction > 0) instead.{fold}'
  )


def _balance(config: ml_collections.ConfigDict, data: Data, report: Mapping[str, Any]) -> list[str]:
  totals = np.asarray(_class_totals(data), float)
  totals[totals == 0] = np.nan  # A class with no image is said below (from the report).
  largest, smallest = int(np.nanargmax(totals)), int(np.nanargmin(totals))
  ratio = totals[largest] / totals[smallest]
  facts = []
  if ratio >= _IMBALANCED:
    facts.append(
      f'Class imbalance: {data.label_names[largest]} has {ratio:.1f}× the images of '
      f'{data.label_names[smallest]} (class weighting {config.class_weighting or "none"}); '
      'accuracy favours the larger classes, so read balanced accuracy and per-class recall.'
    )
  else:
    facts.append(
      f'Classes are near balanced here (largest / smallest {ratio:.1f}); real stage '
      'distributions are usually skewed, which shifts accuracy and predictive values.'
    )
  absent = [name for name, m in report['per_class'].items() if not m['support']]
  if absent:
    facts.append(f'No {report["split"]} image of {", ".join(absent)}: untested on them.')
  return facts


def _prevalence(report: Mapping[str, Any]) -> list[str]:
  """The findings' prevalence on the split, and the findings it cannot test."""
  per = report['per_finding']
  rates = {
    name: m['positives'] / (m['positives'] + m['negatives'])
    for name, m in per.items()
    if m['positives'] + m['negatives']
  }
  facts = []
  if rates:
    rarest = min(rates, key=rates.get)
    facts.append(
      f'Prevalence differs by finding (here {rarest} is the rarest, {rates[rarest]:.0%} of its '
      'used labels): predictive values and average precision depend on it, so they will differ '
      'where the findings are rarer or commoner.'
    )
  untested = [name for name, m in per.items() if m['auc'] is None]
  if untested:
    facts.append(
      f'No {report["split"]} image with both a positive and a negative label for '
      f'{", ".join(untested)}: untested on them.'
    )
  return facts


def _class_totals(data: Data) -> list[int]:
  return np.sum(list(data.counts.values()), axis=0).tolist()


def _colour(channels: int) -> str:
  return 'grey (one channel, repeated to three for the network)' if channels == 1 else 'RGB'


def _num(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.3f}'
