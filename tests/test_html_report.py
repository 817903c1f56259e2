"""The HTML evaluation report: self-contained, escaped, and rendered by a real browser (headless
Chromium, which .ci/run installs), whose DOM must hold the figures and every image decoded."""

import json
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from pneumo_jax.evaluation import (
  calibration,
  html_report,
  metrics,
  model_card,
  operating_points,
  reports,
)

NAMES = ['stage_0', 'stage_1', 'stage_2', 'stage_3']
_BROWSER = shutil.which('chromium') or shutil.which('chromium-browser')
# Appended to a copy of the page: once everything loaded, writes how many images decoded.
_PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const ok = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.insertAdjacentHTML('beforeend',
    `<p id="probe">decoded ${ok} of ${images.length}</p>`);
});
</script>
</body>"""


def _page(tmp_path, errors=3):
  """A report of fixed predictions (4 graded classes, 60 images), as --mode eval writes it."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 15)
  logits = 2.5 * rng.normal(size=(60, 4)) + 3 * np.eye(4)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  entry = calibration.fit(labels, probs)
  entry['operating_points'] = operating_points.choose(
    labels, calibration.scaled(probs, entry['temperature']), NAMES
  )
  result = {
    **metrics.compute(labels, probs, NAMES),
    model_card.INTERVALS: metrics.bootstrap_ci(labels, probs, NAMES, resamples=100),
    'calibration': calibration.report(labels, probs, entry),
    'operating_points': {
      'chosen_on': 'validation',
      'step': 9,
      'predict_decides_at': 'youden',
      'rows': operating_points.evaluate(
        labels, calibration.scaled(probs, entry['temperature']), NAMES, entry['operating_points']
      ),
    },
  }
  stem = str(tmp_path / 'eval' / 'test_9')

  def extra(stem):
    reports.plot_reliability(
      f'{stem}_reliability.png',
      {'before': (calibration.reliability(labels, probs), calibration.ece(labels, probs))},
      calibration.ECE_BINS,
      'test',
    )

  path = reports.write_eval(
    str(tmp_path), 'test', 9, result, NAMES, labels, probs, {'split': 'test'}, extra
  )
  with open(path) as f:
    record = json.load(f)
  view = np.linspace(-1, 1, 75 * 75 * 3).reshape(75, 75, 3)
  cam = np.outer(np.hanning(75), np.hanning(75))
  shown = [
    html_report.Error(f'stage_0/<film {i}>.png', 'stage_0', 'stage_3', 0.9 - i / 10, b'')
    for i in range(errors)
  ]
  shown = [e._replace(png=html_report.overlay_png(view, cam)) for e in shown]
  page = html_report.render(
    record,
    recipe=[('Backbone', '`inception_v3`, aux head on'), ('Batch', '32 <global>')],
    limits=['Single source: every image comes from `/data/x`.', 'Not a medical device.'],
    figures={k: f'{stem}_{k}.png' for k in ('confusion_matrix', 'roc', 'reliability')},
    errors=shown,
    gradcam_layer='Mixed_6e',
    title='Evaluation of inception_v3 at step 9: test split',
    json_path=path,
    version='0.0.test',
  )
  return html_report.write(f'{stem}.html', page), result


def test_the_page_is_self_contained_and_escaped(tmp_path):
  path, result = _page(tmp_path)
  page = pathlib.Path(path).read_text(encoding='utf-8')
  sources = re.findall(r'<img src="([^"]*)"', page)
  assert len(sources) == 3 + 3 and all(s.startswith('data:image/png;base64,') for s in sources)
  assert not re.search(r'(src|href)="(?!data:)', page)  # Nothing fetched, no link out.
  assert '<script' not in page and '<link' not in page
  assert '32 &lt;global&gt;' in page and '&lt;film 0&gt;.png' in page  # Data is escaped.
  assert '<code>inception_v3</code>' in page
  assert f'{result["kappa"]:.3f}' in page
  assert f'Temperature <strong>{result["calibration"]["temperature"]:.3f}</strong>' in page
  assert list(tmp_path.glob('eval/.*')) == []  # Atomic: no temporary file left.


def _rendered_dom(path: str, tmp_path: pathlib.Path) -> str:
  """The DOM headless Chromium builds from the page at `path`, with the image-decoding probe."""
  probed = tmp_path / 'probed.html'
  page = pathlib.Path(path).read_text(encoding='utf-8')
  probed.write_text(page.replace('</body>', _PROBE), encoding='utf-8')
  return subprocess.run(
    [
      _BROWSER,
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--virtual-time-budget=5000',
      '--dump-dom',
      probed.as_uri(),
    ],
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  ).stdout


@pytest.mark.skipif(_BROWSER is None, reason='chromium is not on PATH (CI installs it)')
def test_chromium_renders_the_text_and_decodes_every_image(tmp_path):
  path, result = _page(tmp_path)
  dom = _rendered_dom(path, tmp_path)
  assert 'decoded 6 of 6' in dom, dom[-500:]
  for heading in (
    'Model card summary',
    'Known limits',
    'Metrics',
    'Confusion matrix and ROC',
    'Calibration',
    'Operating points',
    'Most confident errors',
  ):
    assert f'<h2>{heading}</h2>' in dom or f'<h3>{heading}</h3>' in dom, heading
  ci = result[model_card.INTERVALS]['accuracy']
  assert f'{ci["low"]:.3f} – {ci["high"]:.3f}' in dom
  assert '≥ stage_1' in dom and "Youden's J" in dom and 'Grad-CAM at Mixed_6e' in dom
  assert 'Thresholds chosen on the <strong>validation</strong> split' in dom
  screenshot = tmp_path / 'page.png'
  subprocess.run(
    [
      _BROWSER,
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      f'--screenshot={screenshot}',
      '--window-size=1200,1600',
      (tmp_path / 'probed.html').as_uri(),
    ],
    capture_output=True,
    timeout=120,
    check=True,
  )
  assert screenshot.stat().st_size > 10_000


def _findings_page(tmp_path):
  """A multi-label report (3 findings, 80 films, some labels ignored), as --mode eval writes it."""
  findings = ['effusion', 'nodule', 'fibrosis']
  rng = np.random.default_rng(0)
  present = rng.random((80, 3)) < 0.4
  probs = 1 / (1 + np.exp(-(rng.normal(size=(80, 3)) + 2 * present - 1)))
  labels = np.where(rng.random((80, 3)) < 0.1, -1, present.astype(int))
  entry = calibration.fit(labels, probs, findings)
  scaled = calibration.scaled(probs, entry['temperature'])
  entry['operating_points'] = operating_points.choose(labels, scaled, findings)
  result = {
    **metrics.compute(labels, probs, findings),
    model_card.INTERVALS: metrics.bootstrap_ci(labels, probs, findings, resamples=100),
    'calibration': calibration.report(labels, probs, entry, findings),
    'operating_points': {
      'chosen_on': 'validation',
      'step': 9,
      'predict_decides_at': 'youden',
      'rows': operating_points.evaluate(labels, scaled, findings, entry['operating_points']),
    },
  }
  path = reports.write_eval(
    str(tmp_path), 'test', 9, result, findings, labels, probs, {'split': 'test'}
  )
  with open(path) as f:
    record = json.load(f)
  stem = path.removesuffix('.json')
  page = html_report.render(
    record,
    recipe=[('Backbone', '`densenet121`, sigmoid head')],
    limits=['Not a medical device.'],
    figures={'roc': f'{stem}_roc.png'},
    errors=[],
    gradcam_layer='denseblock4',
    title='Evaluation of densenet121 at step 9: test split',
    json_path=path,
    version='0.0.test',
  )
  return html_report.write(f'{stem}.html', page), result


def test_a_findings_page_gives_each_findings_figures(tmp_path):
  path, result = _findings_page(tmp_path)
  page = pathlib.Path(path).read_text(encoding='utf-8')
  assert not (tmp_path / 'eval' / 'test_9_confusion_matrix.png').exists()
  assert page.count('<img src="data:image/png;base64,') == 1  # ROC; no matrix, no diagram.
  ci = result[model_card.INTERVALS]['per_finding']
  for name in ('effusion', 'nodule', 'fibrosis'):
    auc = ci[name]['auc']
    assert f'<td>{name}</td>' in page
    assert f'{auc["estimate"]:.3f} ({auc["low"]:.3f} – {auc["high"]:.3f})' in page
  assert 'ROC per finding' in page and 'A temperature per finding' in page
  assert f'{result["auc_micro"]:.3f}' in page and 'kappa' not in page


@pytest.mark.skipif(_BROWSER is None, reason='chromium is not on PATH (CI installs it)')
def test_chromium_renders_a_findings_page(tmp_path):
  path, _ = _findings_page(tmp_path)
  dom = _rendered_dom(path, tmp_path)
  assert 'decoded 1 of 1' in dom, dom[-500:]
  assert '<h2>ROC per finding</h2>' in dom and 'No misclassified image' in dom
  assert '<th>finding</th><th>operating point</th>' in dom
