"""--mode export: both artefacts, loaded in a fresh process that cannot import pneumo_jax, give the
probabilities --mode predict gives, on a saved random-weight checkpoint; each reads 16-bit grey
files by the run's grey window: serve.py with pneumo_jax's grey_window.py copied beside it, the
SavedModel in TF ops."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumo_jax import checkpoints
from pneumo_jax.data import grey_window, images
from pneumo_jax.data.dicom import GreyWindow
from pneumo_jax.errors import ConfigError, NotFoundError
from pneumo_jax.evaluation import inference, model_card
from pneumo_jax.export import saved_model, tf_images
from pneumo_jax.models import build_model
from pneumo_jax.modes import common, export
from tests import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 3
SIDE = 86  # stored_side at image_size 75.
TINY = ['--config', 'configs/sweeps/tiny.py', '--nosweep', '--mode', 'export']
_SOURCES = {'serve': 'pneumo_jax/export/serve.py', 'grey_window': 'pneumo_jax/data/grey_window.py'}
WINDOWS = (
  GreyWindow('file'),
  GreyWindow('full_range'),
  GreyWindow('fixed', (1.0, 511.0)),  # 255 / 510 = 0.5: ties to round half to even; both clips.
  GreyWindow('percentile'),
)


@pytest.fixture(scope='module')
def run(tiny_config, tmp_path_factory):
  """(config, workdir): checkpoint STEP of a random 4-class model whose EMA weights are other
  random weights, so an export of the plain weights would not match predict (which takes the EMA
  ones). WORKDIR/labels.txt names the classes, so no dataset is built."""
  config = tiny_config(**{'model.depth_multiplier': 0.25})
  workdir = str(tmp_path_factory.mktemp('run'))
  model = build_model(config, 4)
  variables = reference.random_variables(model, 75)
  ema = reference.random_variables(model, 75, seed=1)['params']
  mngr = checkpoints.manager(workdir)
  checkpoints.save(mngr, STEP, {'step': STEP, **variables, 'ema_params': ema})
  mngr.wait_until_finished()
  checkpoints.save_label_names(workdir, [f'stage_{i}' for i in range(4)])
  return config, workdir


@pytest.fixture(scope='module')
def files(stage_folder, tmp_path_factory):
  """(files at the stored size, files of another size): grey, RGB, 16-bit and 12-bit (in 16)
  grey PNGs and grey and colour JPEGs at SIDE px; the synthetic folder's 80 px files (one of each
  awkward format) and a 12-bit PNG of 100 px. The run's window is 'file', for which 12-bit data's
  4095 is white; the old 65535 rule made it grey level 16."""
  folder = tmp_path_factory.mktemp('files')
  rng = np.random.default_rng(0)
  smooth12 = np.add.outer(np.arange(100), np.arange(100)) * 4095 // 198  # A film, not noise.
  Image.fromarray(smooth12.astype(np.uint16)).save(folder / 'big12.png')
  ramp = np.add.outer(np.arange(SIDE), np.arange(SIDE)).astype(np.uint8)
  arrays = {
    'grey.png': rng.integers(0, 256, (SIDE, SIDE), np.uint8),
    'rgb.png': rng.integers(0, 256, (SIDE, SIDE, 3), np.uint8),
    'grey16.png': rng.integers(0, 65536, (SIDE, SIDE)).astype(np.uint16),
    'grey12.png': rng.integers(0, 4096, (SIDE, SIDE)).astype(np.uint16),
    'grey.jpg': ramp,
    'rgb.jpg': np.stack([ramp, ramp.T, 255 - ramp], axis=-1),
  }
  for name, array in arrays.items():
    Image.fromarray(array).save(folder / name)
  other = [
    os.path.join(stage_folder, f'stage_{c}', name)
    for c, name in ((0, 'grey16.png'), (1, 'palette.png'), (2, 'rgba.png'), (3, 'upper_case.JPG'))
  ]
  other.append(sorted(glob.glob(os.path.join(stage_folder, 'stage_0', '*.png')))[0])
  return [str(folder / n) for n in arrays], [*other, str(folder / 'big12.png')]


@pytest.fixture(scope='module')
def grey16(tmp_path_factory):
  """16-bit grey PNGs that tell the windows apart: 12-bit, under 8 bits (the 'file' rule's floor),
  the whole 16-bit range, flat (equal percentiles), and 8 pixels whose 99.5th percentile differs
  in the last bit if numpy's interpolation is not followed (its formula for weights >= 0.5)."""
  folder = tmp_path_factory.mktemp('grey16')
  rng = np.random.default_rng(1)
  arrays = {
    'twelve_bit.png': rng.integers(0, 4096, (37, 29)),
    'dim.png': rng.integers(0, 200, (23, 31)),
    'full.png': rng.integers(0, 65536, (16, 16)),
    'flat.png': np.full((5, 7), 1000),
    'last_bit.png': np.array([[0, 0, 0, 0], [0, 0, 0, 1001]]),
  }
  for name, array in arrays.items():
    Image.fromarray(array.astype(np.uint16)).save(folder / name)
  return [folder / n for n in arrays]


@pytest.fixture(scope='module')
def exported(run):
  config, workdir = run
  return export.run(config, workdir)


# Run in a fresh interpreter, outside the repository: importing pneumo_jax fails there, and the
# script checks at the end that nothing imported it.
_FRESH = """
import json, os, sys


class Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'pneumo_jax':
      raise ImportError('the export must not need pneumo_jax')


sys.meta_path.insert(0, Refuse())
export_dir, files, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
sys.path.insert(0, export_dir)
import numpy as np
import serve
import tensorflow as tf

saved = tf.saved_model.load(os.path.join(export_dir, serve.METADATA['saved_model']['dir']))
data = tf.constant([open(f, 'rb').read() for f in files])
np.savez(
  out,
  jax=serve.predict(files),
  jax_pixels=np.stack([serve.load(f) for f in files]),
  tf=saved.signatures['serving_default'](image_bytes=data)['probabilities'].numpy(),
  tf_pixels=saved.signatures['decode'](image_bytes=data)['images'].numpy(),
)
assert not [m for m in sys.modules if m.split('.')[0] == 'pneumo_jax']
"""


def test_artefacts_give_predicts_probabilities_without_pneumo_jax(run, files, exported, tmp_path):
  """serve.py reads every file as predict does (the same Pillow calls), so its probabilities
  match to float32 noise; so do the SavedModel's for files at the stored size, which TF decodes
  to the same pixels. Other files it resizes with TF's Lanczos, not Pillow's (see below)."""
  config, workdir = run
  exact, resized = files
  paths = exact + resized
  restored = common.restore(config, workdir, 'latest')
  readable: list[str] = []
  batches = common.padded_batches(
    common.examples(paths, config, {}, readable), common.global_batch(config)
  )
  want = inference.predict(
    restored.model, restored.variables, batches, image_size=config.input.image_size
  )['probs']
  pixels = np.stack([common.example(p, config)['image'] for p in paths]).astype(np.int32)
  assert readable == paths
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  proc = subprocess.run(
    [sys.executable, '-c', _FRESH, exported, json.dumps(paths), str(tmp_path / 'out.npz')],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=exported,  # Not the repository: nothing of it on sys.path.
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / 'out.npz')
  n = len(exact)
  np.testing.assert_array_equal(got['jax_pixels'], pixels)
  np.testing.assert_allclose(got['jax'], want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got['tf_pixels'][:n], pixels[:n])
  np.testing.assert_allclose(got['tf'][:n], want[:n], atol=1e-5, rtol=0)
  # TF's lanczos3 and Pillow's LANCZOS (fixed-point weights, 8-bit rounding between its two
  # passes) differ by one grey level at some pixels (measured: 1); a wrong filter, crop or
  # channel order differs by many. One level at every pixel moves this model's probabilities
  # by 4e-5 at most (measured), the resize's by 1.4e-5: 1e-4 bounds them with margin.
  assert np.abs(got['tf_pixels'][n:] - pixels[n:]).max() <= 2
  np.testing.assert_allclose(got['tf'][n:], want[n:], atol=1e-4, rtol=0)
  with open(os.path.join(exported, export.METADATA_FILE)) as f:
    metadata = json.load(f)
  assert metadata['step'] == STEP and metadata['stored_size'] == SIDE
  assert metadata['grey_window']['rule'] == 'file' and metadata['model_card'] is None
  assert checkpoints.load_label_names(exported) == restored.names == metadata['labels']


def test_the_saved_models_grey_window_is_predicts_for_every_rule(grey16):
  """The SavedModel's TF decoding of a 16-bit grey PNG gives images.load_stored's pixels exactly
  under each dataset.grey_window rule: numpy's percentiles, float64 arithmetic and rounding."""
  import tensorflow as tf

  for path in grey16:
    with Image.open(path) as image:
      grey = np.asarray(image)
    percentiles = tf_images.percentiles(tf.constant(grey), grey_window.PERCENTILES)
    assert [float(p) for p in percentiles] == list(np.percentile(grey, grey_window.PERCENTILES))
    data = tf.constant(path.read_bytes())
    for window in WINDOWS:
      want = images.load_stored(path, None, channels=3, window=window)
      got = tf_images.decoder(window)(data).numpy()
      np.testing.assert_array_equal(got, want, err_msg=f'{path}, {window}')


def test_serve_pys_copy_of_the_grey_window_is_pneumo_jaxs_and_it_refuses_dicom(
  run, exported, grey16, tmp_path
):
  """serve.py applies the window rule of the grey_window.py copied beside it (it cannot import
  pneumo_jax), set from metadata.json: it gives load_stored's pixels under each rule, reads 16-bit
  TIFF as predict does, and refuses DICOM, by extension or header, saying what to do instead."""
  spec = importlib.util.spec_from_file_location('exported_serve', f'{exported}/{export.SERVE_FILE}')
  serve = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(serve)
  for name, module in ((export.SERVE_FILE, 'serve'), (export.WINDOW_FILE, 'grey_window')):
    with open(os.path.join(exported, name)) as f, open(f'{REPO}/{_SOURCES[module]}') as g:
      assert f.read() == g.read(), name  # Copied, not generated.
  for path in grey16:
    with Image.open(path) as image:
      grey = np.asarray(image)
    for window in WINDOWS:
      settings = json.loads(json.dumps(export.window_metadata(window)))  # As serve.py reads it.
      want = images.load_stored(path, None, window=window)[..., 0]
      np.testing.assert_array_equal(serve.grey8(grey, settings), want, err_msg=f'{path}, {window}')
  tiff = str(tmp_path / 'film.tif')
  Image.fromarray(np.random.default_rng(2).integers(0, 4096, (90, 90)).astype(np.uint16)).save(tiff)
  np.testing.assert_array_equal(serve.load(tiff), common.example(tiff, run[0])['image'])
  (tmp_path / 'film.DCM').write_bytes(b'')
  (tmp_path / '1.2.840.10008').write_bytes(bytes(128) + b'DICM')
  for name in ('film.DCM', '1.2.840.10008'):
    with pytest.raises(serve.DicomError, match=r'is DICOM.*--mode predict.*convert it to PNG'):
      serve.load(str(tmp_path / name))


def test_a_failed_export_keeps_the_previous_one_and_a_new_one_replaces_it(
  run, exported, monkeypatch, tmp_path, capsys
):
  """A new export also takes the workdir's model card, which --mode eval wrote."""
  config, workdir = run
  target = str(tmp_path / 'export')
  shutil.copytree(exported, target)
  (tmp_path / 'export' / 'labels.txt').write_text('the previous export\n')

  def fail(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(saved_model, 'save', fail)
  with pytest.raises(RuntimeError, match='disk full'):
    export.run(config, workdir, export_dir=target)
  assert os.listdir(tmp_path) == ['export']  # Nothing left beside it.
  assert (tmp_path / 'export' / 'labels.txt').read_text() == 'the previous export\n'
  monkeypatch.undo()
  card = os.path.join(workdir, model_card.CARD_FILE)
  with open(card, 'w') as f:
    f.write('# Model card\n')
  try:
    assert export.run(config, workdir, checkpoint=str(STEP), export_dir=target) == target
  finally:
    os.remove(card)
  assert os.listdir(tmp_path) == ['export']
  assert sorted(os.listdir(target)) == sorted([*os.listdir(exported), model_card.CARD_FILE])
  assert (tmp_path / 'export' / model_card.CARD_FILE).read_text() == '# Model card\n'
  assert (tmp_path / 'export' / 'labels.txt').read_text().startswith('stage_0\n')
  with open(os.path.join(target, export.METADATA_FILE)) as f:
    metadata = json.load(f)
  assert metadata['model_card'] == model_card.CARD_FILE
  assert metadata['format'] == export.EXPORT_FORMAT
  assert metadata['run'] == {'workdir': os.path.abspath(workdir), 'step': STEP}
  assert f'to {target} (with {model_card.CARD_FILE})' in capsys.readouterr().out


def test_only_a_new_or_empty_folder_or_an_earlier_export_may_be_replaced(tmp_path):
  """An export is known by its metadata.json's format, not by the file's name; one holding files
  an export does not write is not replaced either. Nothing refused is touched."""
  marker = json.dumps({'format': export.EXPORT_FORMAT, 'run': {'workdir': '/w', 'step': 3}})
  folders = {
    'absent': {},
    'empty': {},
    'earlier': {'metadata.json': marker, 'labels.txt': 'a\n', 'serve.py': '', '__pycache__': None},
    'thesis': {'thesis.txt': 'four years', 'metadata.json': '{"title": "thesis"}'},
    'not_json': {'metadata.json': '\xff\xfe'},
    'notes_in_export': {'metadata.json': marker, 'notes.txt': 'mine'},
  }
  for name, files in folders.items():
    if name != 'absent':
      (tmp_path / name).mkdir()
    for file, text in files.items():
      if text is None:
        (tmp_path / name / file).mkdir()
      else:
        (tmp_path / name / file).write_text(text)
  (tmp_path / 'a_file').write_text('not a folder')
  for name in ('absent', 'empty', 'earlier'):
    export._check_target(str(tmp_path / name))
  for name in ('thesis', 'not_json', 'a_file'):
    with pytest.raises(ConfigError, match=rf'{tmp_path / name} exists and is not an export of pn'):
      export._check_target(str(tmp_path / name))
  with pytest.raises(ConfigError, match=r'holds an earlier export and also notes\.txt, which'):
    export._check_target(str(tmp_path / 'notes_in_export'))
  assert (tmp_path / 'thesis' / 'thesis.txt').read_text() == 'four years'


def test_a_bad_checkpoint_destination_or_no_tensorflow_writes_nothing(run, tmp_path, monkeypatch):
  config, workdir = run
  target = tmp_path / 'export'
  with pytest.raises(ConfigError, match='use latest, best or a step number'):
    export.run(config, workdir, checkpoint='newest', export_dir=str(target))
  with pytest.raises(NotFoundError, match=r"no checkpoint '9' .*checkpoints/: 3"):
    export.run(config, workdir, checkpoint='9', export_dir=str(target))
  with pytest.raises(ConfigError, match='is not an export'):
    export.run(config, workdir, export_dir=workdir)  # It would replace the run.
  monkeypatch.setitem(sys.modules, 'tensorflow', None)
  with pytest.raises(export.MissingExtraError, match=r"pip install -e '\.\[export\]'"):
    export.run(config, workdir, export_dir=str(target))
  assert not target.exists()


def test_the_command_line_reaches_export_and_refuses_an_empty_workdir(tmp_path):
  """--mode export takes --export_dir; a workdir without a run is one line and exit status 2."""
  out = tmp_path / 'out'
  proc = subprocess.run(
    [sys.executable, 'main.py', *TINY, '--workdir', str(tmp_path / 'empty'), '--export_dir', out],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'train first' in proc.stderr and 'Traceback' not in proc.stderr
  assert not out.exists()
