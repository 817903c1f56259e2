"""The evaluation as one page a reviewer can open without a terminal: WORKDIR/eval/<stem>.html.

One self-contained file: CSS inline, every figure inline as a PNG data URI, no script and nothing
fetched, so it opens offline on a hospital PC and can be mailed as it is. It holds the model
card's summary (recipe and known limits), the metrics with their bootstrap intervals, the
confusion matrix, ROC and reliability diagram, the calibration and operating-point tables, and
the most confident errors as thumbnails with their Grad-CAM overlays. A multi-label run's page
(findings) has a per-finding table (the model card's, with intervals and the operating point),
per-finding temperatures, and no confusion matrix; its errors are (film, finding) calls.

The page is `string.Template` text (report.html, beside this module) filled with pieces escaped
by `html.escape`; nothing in it is interpreted from the data.
"""

import base64
import html
import importlib.resources
import io
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from matplotlib import colormaps
from PIL import Image

from pneumo_jax import atomic
from pneumo_jax.evaluation import metrics, model_card, operating_points, reports

MAX_ERRORS = 16  # The most confident errors shown.
_THUMB_PX = 192  # Thumbnails are enlarged (nearest pixel) to at least this side.
_CAM_ALPHA = 0.45  # Grad-CAM's weight in the overlay.

# The page's markup and CSS, with $placeholders: a file beside this module (package data).
PAGE = string.Template(
  importlib.resources.files(__package__).joinpath('report.html').read_text(encoding='utf-8')
)


class Error(NamedTuple):
  """One misclassified image for the report: its file, classes (for a finding: 'effusion
  absent' / 'effusion present'), confidence and overlay PNG."""

  file: str
  true: str
  predicted: str
  confidence: float
  png: bytes  # The model's view with Grad-CAM over it (`overlay_png`).


def overlay_png(view: np.ndarray, cam: np.ndarray) -> bytes:
  """PNG bytes of the model's view ([H, W, 3] in [-1, 1]) with Grad-CAM ([H, W] in [0, 1])
  blended over it in the jet colour map, enlarged by a whole factor to at least _THUMB_PX."""
  image = (np.asarray(view, np.float32) + 1.0) / 2.0
  heat = colormaps['jet'](np.asarray(cam, np.float32))[..., :3]
  blend = (1 - _CAM_ALPHA) * image + _CAM_ALPHA * heat
  pixels = np.clip(np.rint(blend * 255), 0, 255).astype(np.uint8)
  scale = max(1, -(-_THUMB_PX // max(pixels.shape[:2])))
  pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='PNG')
  return out.getvalue()


def data_uri(png: bytes) -> str:
  return 'data:image/png;base64,' + base64.b64encode(png).decode('ascii')


def _file_uri(path: str) -> str:
  with open(path, 'rb') as f:
    return data_uri(f.read())


def _text(markdown: str) -> str:
  """Escaped text with the card's Markdown code spans (`x`) and bold (**x**) kept."""
  out = html.escape(markdown, quote=False)
  out = re.sub(r'`([^`]*)`', r'<code>\1</code>', out)
  return re.sub(r'\*\*([^*]*)\*\*', r'<strong>\1</strong>', out)


def _num(x: float | None, digits: int = 3) -> str:
  return 'n/a' if x is None else f'{x:.{digits}f}'


def _span(ci: Mapping[str, Any]) -> str:
  return 'undefined' if ci['low'] is None else f'{ci["low"]:.3f} – {ci["high"]:.3f}'


def _row(*cells: str, numeric: Sequence[bool] = ()) -> str:
  """A table row of already escaped cells; `numeric` right-aligns cells by position."""
  tds = (
    f'<td class="num">{c}</td>' if i < len(numeric) and numeric[i] else f'<td>{c}</td>'
    for i, c in enumerate(cells)
  )
  return '<tr>' + ''.join(tds) + '</tr>'


def _finding_temperatures(record: Mapping[str, Any]) -> list[str]:
  """A table of each finding's temperature and ECE before and after it."""
  rows = [
    _row(
      html.escape(name),
      _num(f['temperature']),
      *(_num(f[when] and f[when]['ece'], 4) for when in ('before', 'after')),
      numeric=(False, True, True, True),
    )
    for name, f in record['per_finding'].items()
  ]
  return [
    '<table><tr><th>finding</th><th>temperature</th><th>ECE before</th><th>ECE after</th></tr>',
    *rows,
    '</table>',
  ]


def _calibration(record: Mapping[str, Any] | None, reliability_png: str | None, split: str) -> str:
  if not record:
    return '<p>No temperature: the run has no validation split to fit it on.</p>'
  findings = 'per_finding' in record
  if findings:
    what = 'A temperature per finding (its logit divided by it; 1: not fitted)'
    unchanged = 'The AUCs do not change with it. Below: every used finding label pooled.'
  else:
    what = f'Temperature <strong>{record["temperature"]:.3f}</strong>'
    unchanged = 'Accuracy, kappa and the confusion matrix do not change with it.'
  rows = [
    _row(
      html.escape(title),
      _num(record['before'][key], 4),
      _num(record['after'][key], 4),
      numeric=(False, True, True),
    )
    for key, title in (
      ('ece', f'ECE ({record["ece_bins"]} bins)'),
      ('brier', 'Brier score'),
      ('nll', 'NLL'),
    )
  ]
  return '\n'.join(
    [
      *(_finding_temperatures(record) if findings else []),
      f'<p>{what}, fitted on the '
      f'{html.escape(record["fitted_on"])} split ({record["fitted_n"]} images) by minimising '
      'the negative log-likelihood'
      + (' (this split: "after" is in-sample)' if record['fitted_on'] == split else '')
      + f'; predict applies it. {unchanged}</p>',
      '<table><tr><th>measure</th><th>before</th><th>after</th></tr>',
      *rows,
      '</table>',
      (
        f'<div class="figures"><img src="{_file_uri(reliability_png)}" '
        'alt="reliability diagram"></div>'
        if reliability_png
        else ''
      ),
    ]
  )


def _operating_points(record: Mapping[str, Any] | None, split: str, findings: bool) -> str:
  if not record or not record['rows']:
    return (
      '<p>None: no finding has both positives and negatives on validation.</p>'
      if findings
      else '<p>None: no cut of the classes has both positives and negatives on validation.</p>'
    )
  chosen = record['chosen_on']
  same = ' (this split: the figures are optimistic)' if chosen == split else ''
  rule = (
    "an image is positive for a finding when the finding's probability is at least the "
    'threshold (its ignored labels count nowhere)'
    if findings
    else "an image is positive when its summed probability of the cut's classes is at least "
    'the threshold'
  )
  rows = []
  for r in record['rows']:
    cells = [
      html.escape(r['cut'] if findings else operating_points.cut_title(r['cut'])),
      html.escape(operating_points.POINTS[r['point']]),
      _num(r['threshold'], 4),
    ]
    for name in operating_points.MEASURES:
      cells.append(f'{_num(r[name]["estimate"])} ({_span(r[name])})')
    rows.append(_row(*cells, numeric=(False, False, True, True, True, True, True)))
  return '\n'.join(
    [
      f'<p>Thresholds chosen on the <strong>{html.escape(chosen)}</strong> split{same} at '
      f'checkpoint step {record["step"]} and applied unchanged here; {rule}. Predict decides at '
      f'{html.escape(operating_points.POINTS[record["predict_decides_at"]])} '
      '(<code>operating_point</code>). Intervals: 95% percentile bootstrap.</p>',
      f'<table><tr><th>{"finding" if findings else "question"}</th><th>operating point</th>'
      '<th>threshold</th>'
      '<th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th></tr>',
      *rows,
      '</table>',
    ]
  )


def _errors(errors: Sequence[Error], layer: str, findings: bool) -> str:
  if not errors:
    return '<p>No misclassified image.</p>'
  what = (
    f'The {len(errors)} wrong finding calls (at probability {metrics.PRESENT_AT:g}) the model was '
    f'surest of, as the model saw the films, with Grad-CAM at {html.escape(layer)} for the '
    'finding over them'
    if findings
    else f'The {len(errors)} misclassified images the model was surest of, as the model saw '
    f'them, with Grad-CAM at {html.escape(layer)} for the predicted class over them'
  )
  figures = [
    f'<figure><img src="{data_uri(e.png)}" alt="{html.escape(reports.printable(e.file))}">'
    f'<figcaption>{html.escape(reports.printable(e.file))}<br>true {html.escape(e.true)}, '
    f'predicted <strong>{html.escape(e.predicted)}</strong> ({e.confidence:.1%})'
    '</figcaption></figure>'
    for e in errors
  ]
  return '\n'.join(
    [
      f'<p>{what} (red: where it looked most).</p>',
      '<div class="errors">',
      *figures,
      '</div>',
    ]
  )


def _class_table(report: Mapping[str, Any]) -> str:
  rows = [
    _row(
      html.escape(name),
      str(m['support']),
      _num(m['precision']),
      _num(m['recall']),
      _num(m['f1']),
      _num(m['auc']),
      numeric=(False, True, True, True, True, True),
    )
    for name, m in report['per_class'].items()
  ]
  return '\n'.join(
    [
      '<table>',
      '<tr><th>class</th><th>images</th><th>precision</th><th>recall</th><th>F1</th>'
      '<th>AUC</th></tr>',
      *rows,
      '</table>',
    ]
  )


def _finding_table(report: Mapping[str, Any]) -> str:
  """model_card.finding_rows as a table: figures with their intervals in parentheses."""
  header = ''.join(f'<th>{html.escape(c)}</th>' for c in model_card.FINDING_COLUMNS)
  rows = [
    _row(*map(html.escape, row), numeric=(False, *[True] * (len(row) - 1)))
    for row in model_card.finding_rows(report)
  ]
  return '\n'.join(
    [
      '<p class="note">Per finding, over its used labels (an ignored label counts nowhere); '
      'sensitivity and specificity at the threshold of the operating points below.</p>',
      '<table>',
      f'<tr>{header}</tr>',
      *rows,
      '</table>',
    ]
  )


def render(
  report: Mapping[str, Any],
  *,
  recipe: Sequence[tuple[str, str]],
  limits: Sequence[str],
  figures: Mapping[str, str],
  errors: Sequence[Error],
  gradcam_layer: str,
  title: str,
  json_path: str,
  version: str,
) -> str:
  """The page, from an eval report's record (as reports.write_eval writes it, with
  'calibration' and 'operating_points' when the run has them), the card's recipe rows and
  limits (model_card.recipe_rows, limit_facts), the PNG files `figures` names
  ('confusion_matrix', 'roc', 'reliability'), and the errors to show with the layer their
  Grad-CAM weighed."""
  intervals = report[model_card.INTERVALS]
  method = intervals['method']
  findings = 'per_finding' in report
  titles = model_card.FINDING_TITLES if findings else model_card.TITLES
  headline = [
    _row(
      html.escape(titles[key]),
      _num(intervals[key]['estimate']),
      _span(intervals[key]),
      numeric=(False, True, True),
    )
    for key in (metrics.BOOTSTRAPPED_FINDINGS if findings else metrics.BOOTSTRAPPED)
  ]
  unbootstrapped = (
    f'Balanced accuracy {_num(report["balanced_accuracy"])} (labels called at '
    f'{metrics.PRESENT_AT:g}), log loss {_num(report["loss"])}'
    if findings
    else f'Balanced accuracy {_num(report["balanced_accuracy"])}, log loss {_num(report["loss"])}'
  )
  shown = {'confusion_matrix': 'confusion matrix', 'roc': 'ROC curves'}
  return PAGE.substitute(
    title=html.escape(title),
    thumb=_THUMB_PX,
    summary=html.escape(
      f'{report["split"]} split, checkpoint step {report["step"]}, {method["n"]} images; '
      f'{"findings" if findings else "classes"} {", ".join(report["label_names"])}.'
    ),
    recipe='\n'.join(_row(html.escape(k), _text(v)) for k, v in recipe),
    limits='\n'.join(f'<li>{_text(fact)}</li>' for fact in limits),
    level=f'{method["level"]:.0%}',
    headline='\n'.join(headline),
    resamples=method['resamples'],
    n=method['n'],
    seed=method['seed'],
    unbootstrapped=unbootstrapped,
    per_class=_finding_table(report) if findings else _class_table(report),
    figures_title='ROC per finding' if findings else 'Confusion matrix and ROC',
    figures='\n'.join(
      f'<img src="{_file_uri(figures[kind])}" alt="{alt}">'
      for kind, alt in shown.items()
      if kind in figures
    ),
    calibration=_calibration(
      report.get('calibration'), figures.get('reliability'), report['split']
    ),
    operating_points=_operating_points(report.get('operating_points'), report['split'], findings),
    errors=_errors(errors, gradcam_layer, findings),
    version=html.escape(version),
    json=html.escape(json_path),
  )


def write(path: str, page: str) -> str:
  """Writes the page atomically (a reader never opens half of it); returns `path`."""
  with atomic.atomic_file(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    f.write(page)
  return path
