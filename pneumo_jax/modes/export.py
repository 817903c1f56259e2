"""--mode export: a trained grader as files a clinic can serve without this repository.

WORKDIR/export/ (or --export_dir) receives, from one checkpoint (its EMA weights when the run kept
them, as predict uses): model.jax_export (pneumo_jax/export/jax_export.py: predict's device half,
weights inside); serve.py and the grey_window.py it loads (the host half with Pillow, copied from
pneumo_jax/export/ and pneumo_jax/data/: no pneumo_jax needed); saved_model/<step>/
(pneumo_jax/export/saved_model.py: a TensorFlow SavedModel of both halves, for TF Serving);
labels.txt; metadata.json (sizes, labels, grey window, how to call each artefact, and the marker
of an export: `format` and `run`); WORKDIR's model_card.md when --mode eval wrote one.
docs/serving.md says how to serve them. The folder is written through `atomic.atomic_folder`, so
a failed export leaves the previous one as it was; only an earlier export (that marker, and no
file an export does not write) is replaced, any other non-empty folder refused untouched.
Neither artefact reads DICOM, whose decoders a deployment of PNG/JPEG files should not carry.
"""

import importlib.resources
import json
import os
import shutil
from types import ModuleType
from typing import Any

import jax
import ml_collections

import pneumo_jax
from pneumo_jax import atomic, checkpoints, heads
from pneumo_jax.data import grey_window, stored_side
from pneumo_jax.data.dicom import GreyWindow
from pneumo_jax.errors import ConfigError, UserError
from pneumo_jax.evaluation import calibration, model_card, reports
from pneumo_jax.export import jax_export
from pneumo_jax.modes import common

NAME = 'export'
HELP = 'a jax.export artefact and a TensorFlow SavedModel (docs/serving.md)'
FLAGS = ('checkpoint', 'export_dir')
NEEDS_WORKDIR = True

EXPORT_DIR = 'export'
JAX_FILE = 'model.jax_export'
SAVED_MODEL_DIR = 'saved_model'
SERVE_FILE = 'serve.py'
WINDOW_FILE = 'grey_window.py'
METADATA_FILE = 'metadata.json'
# metadata.json's `format`: the folder is an export of this project, which the next may replace.
EXPORT_FORMAT = 'pneumo_jax-export'
# What an export holds (serve.py's __pycache__ once it was imported): an earlier export holding
# anything else is not replaced, as that would delete it.
_EXPORT_FILES = frozenset(
  {JAX_FILE, SAVED_MODEL_DIR, SERVE_FILE, WINDOW_FILE, METADATA_FILE, checkpoints.LABELS_FILE}
  | {model_card.CARD_FILE, '__pycache__'}
)
# The scripts an export ships: (package, file), copied as they are.
_SCRIPTS = (('pneumo_jax.export', SERVE_FILE), ('pneumo_jax.data', WINDOW_FILE))
# metadata.json's words for each grey window (linear between black and white, rounded, clipped).
_WINDOW_MEANS = {
  'file': 'black 0, white the largest value of the smallest depth from 8 to 16 bits that holds '
  "the image's brightest pixel (12-bit data: 4095)",
  'full_range': 'black 0, white 65535',
  'fixed': 'black range[0], white range[1]',
  'percentile': "black and white the image's percentiles (numpy's linear interpolation)",
}


class MissingExtraError(UserError, ImportError):
  """An optional dependency group that this mode needs is not installed."""


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  checkpoint: str = 'latest',
  export_dir: str | None = None,
) -> str | None:
  """Exports `checkpoint` of the run in WORKDIR; returns the export directory. In a
  multi-process run only process 0 exports (one writer, one device); the others return None.

  Refuses, having written nothing, when TensorFlow (the SavedModel's writer) is missing: an export
  is one consistent set, so a deployment never finds the artefact it was told about absent.
  """
  if jax.process_index() != 0:
    return None
  target = os.path.abspath(export_dir or os.path.join(workdir, EXPORT_DIR))
  _check_target(target)
  window = GreyWindow.from_config(config.dataset)
  restored = common.restore(config, workdir, checkpoint)
  reports.check_writable(os.path.dirname(target), 'the folder the export goes in')
  tf_version, saved_model = _tensorflow()  # After the quick checks: TensorFlow is slow to load.
  card = os.path.join(workdir, model_card.CARD_FILE)
  has_card = os.path.isfile(card)
  side = stored_side(config)
  calibrated = calibration.load(workdir, restored.step)  # --mode eval fits it, as predict uses.
  temperature = calibrated['temperature'] if calibrated else 1.0
  serve = jax_export.serving_fn(config, restored.model, restored.variables, temperature)
  exported = jax_export.serialize(serve, side)
  with atomic.atomic_folder(target) as out:
    with open(os.path.join(out, JAX_FILE), 'wb') as f:
      f.write(exported)
    saved_model.save(serve, side, window, os.path.join(out, SAVED_MODEL_DIR, str(restored.step)))
    checkpoints.save_label_names(out, restored.names)
    for package, name in _SCRIPTS:
      with open(os.path.join(out, name), 'wb') as f:
        f.write(importlib.resources.files(package).joinpath(name).read_bytes())
    if has_card:
      shutil.copyfile(card, os.path.join(out, model_card.CARD_FILE))
    with open(os.path.join(out, METADATA_FILE), 'w') as f:
      json.dump(
        _metadata(config, workdir, restored, window, has_card, tf_version, calibrated), f, indent=2
      )
  about = f'with {model_card.CARD_FILE}' if has_card else 'no model card: --mode eval writes one'
  kind = 'findings' if heads.get(config.model.head).multilabel else 'classes'
  print(
    f'Exported checkpoint step {restored.step} ({len(restored.names)} {kind}) to {target} ({about})'
  )
  if calibrated:
    print(f'Its probabilities are scaled by the {calibration.describe(calibrated)}')
  return target


def _tensorflow() -> tuple[str, ModuleType]:
  """(TensorFlow's version, the SavedModel writer), or the fix when TensorFlow is missing."""
  try:
    import tensorflow as tf

    from pneumo_jax.export import saved_model
  except ImportError as e:
    raise MissingExtraError(
      f'--mode export writes a TensorFlow SavedModel and needs TensorFlow ({e}); '
      "install it with: pip install -e '.[export]'"
    ) from e
  return tf.__version__, saved_model


def _check_target(target: str) -> None:
  """Refuses, touching nothing, a destination that is neither new, nor empty, nor an earlier
  export: an export replaces its whole folder, and whatever else is there would be lost (a
  mistyped --export_dir=., the workdir, a folder with a metadata.json of its own)."""
  if not os.path.exists(target) or (os.path.isdir(target) and not os.listdir(target)):
    return
  if not _is_export(target):
    raise ConfigError(
      f'--export_dir {target} exists and is not an export of pneumo_jax (no {METADATA_FILE} '
      f'with "format": "{EXPORT_FORMAT}"), and an export replaces its whole folder; give a new '
      'or empty folder'
    )
  if foreign := sorted(set(os.listdir(target)) - _EXPORT_FILES):
    raise ConfigError(
      f'--export_dir {target} holds an earlier export and also {", ".join(foreign[:3])}'
      f'{", …" if len(foreign) > 3 else ""}, which an export does not write and replacing the '
      'folder would delete; move them out, or give a new or empty folder'
    )


def _is_export(folder: str) -> bool:
  """Whether `folder` holds an export's marker: its metadata.json names EXPORT_FORMAT."""
  try:
    with open(os.path.join(folder, METADATA_FILE), 'rb') as f:
      metadata = json.load(f)
  except (OSError, ValueError):  # Absent, unreadable, not JSON (UnicodeDecodeError included).
    return False
  return isinstance(metadata, dict) and metadata.get('format') == EXPORT_FORMAT


def _metadata(
  config: ml_collections.ConfigDict,
  workdir: str,
  restored: common.Restored,
  window: GreyWindow,
  card: bool,
  tf_version: str,
  calibrated: dict[str, Any] | None,
) -> dict[str, Any]:
  """What a deployment needs to know without this repository: sizes, labels, calls, the grey
  window (serve.py reads its rule from here), the calibration both artefacts apply (and the
  operating points chosen with it), and the versions that wrote the artefacts (the runtimes that
  load them must not be older); and the marker of an export (its format and the run it came
  from), by which the next export knows it may replace the folder."""
  side, classes = stored_side(config), len(restored.names)
  multilabel = heads.get(config.model.head).multilabel
  if multilabel:
    outputs = f'float32 [N, {classes}] probabilities, a sigmoid per finding (independent: rows '
    outputs += 'need not sum to 1)'
    scaling = 'both artefacts: sigmoid(logit(p) / temperature[f]) per finding f'
    rule = 'per finding: positive when its probability is at least the threshold'
  else:
    outputs = f'float32 [N, {classes}] probabilities'
    scaling = 'both artefacts: softmax(log(p) / temperature)'
    rule = (
      'per cut ge_<class>: positive when the summed probability of that class and the later '
      'ones is at least the threshold'
    )
  return {
    'format': EXPORT_FORMAT,
    'run': {'workdir': os.path.abspath(workdir), 'step': restored.step},
    'model': config.model.name,
    'step': restored.step,
    'versions': {
      'pneumo_jax': pneumo_jax.__version__,
      'jax': jax.__version__,
      'tensorflow': tf_version,
    },
    'labels': restored.names,
    'multilabel': multilabel,  # labels are findings, each with its own probability.
    **common.view(config),
    'channels': 3,
    'grey_window': window_metadata(window),
    'model_card': model_card.CARD_FILE if card else None,
    # None: the probabilities are the model's own (no --mode eval had fitted a temperature).
    'calibration': calibrated
    and {
      'temperature': calibrated['temperature'],
      'fitted_on': calibrated['fitted_on'],
      'n': calibrated['n'],
      'applied_in': scaling,
      'operating_points': calibrated.get('operating_points', {}),
      'operating_points_rule': rule,
    },
    'platforms': list(jax_export.PLATFORMS),
    'jax_export': {
      'file': JAX_FILE,
      'input': f'uint8 [N, {side}, {side}, 3]: files decoded to 8-bit RGB (grey repeated) and '
      f'resized to {side}x{side} with Pillow LANCZOS, as serve.py does',
      'output': f'{outputs}, columns in labels.txt order',
      'call': f"jax.export.deserialize(bytearray(open('{JAX_FILE}', 'rb').read())).call(images)",
    },
    'serve_py': 'python serve.py FILE... (CSV on stdout), or serve.predict([paths]) -> [N, C]; '
    'DICOM is refused: convert it to PNG with pneumo_jax (docs/serving.md) or use --mode predict',
    'saved_model': {
      'dir': f'{SAVED_MODEL_DIR}/{restored.step}',
      'signature': 'serving_default',
      'input': 'image_bytes: tf.string [N], whole PNG/JPEG/BMP/GIF files (not DICOM)',
      'output': f'probabilities: {outputs}',
      'decode_signature': f'decode: image_bytes -> images, uint8 [N, {side}, {side}, 3], what the '
      'network is given (to check a deployment against serve.load)',
      'resize': f'files not {side}x{side} are resized with TF lanczos3 (antialiased), which '
      "differs from Pillow's LANCZOS by a grey level or so: slightly other probabilities",
    },
  }


def window_metadata(window: GreyWindow) -> dict[str, Any]:
  """metadata.json's grey_window: the run's rule with its numbers, which serve.py reads, and what
  it means for a deployment that decodes files itself."""
  settings = {
    'fixed': {'range': window.fixed_range},
    'percentile': {'percentiles': grey_window.PERCENTILES},
  }
  return {
    'rule': window.rule,
    **settings.get(window.rule, {}),
    'means': _WINDOW_MEANS[window.rule],
    'applies_to': '16-bit grey PNG (and TIFF in serve.py), mapped linearly from black -> 0 to '
    'white -> 255, rounded and clipped, as --mode predict reads them (dataset.grey_window); '
    '8-bit files are taken as they are',
  }
