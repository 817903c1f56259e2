"""The fault matrix: the command line as a user runs it, against the faults a real disk and a real
archive produce. Each case asserts the exit status, one clear line (`error: …` naming the thing at
fault), no traceback in stdout or stderr, and that nothing was lost (files compared before and
after).

Cases share one trained workdir (InceptionV3 at 75 px, heads only so that it has a base/, four
steps with a checkpoint each) and damage their own copy of it. Ctrl-C and a second Ctrl-C during
training are tests/test_main.py's, a kill -9 during a save tests/test_loop.py's.

To add a case: `run_cli` runs the command line, `assert_one_clear_line` checks its output, and
`snapshot` takes a folder's files to compare before and after.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import NamedTuple

import pytest

pytestmark = pytest.mark.long  # A dozen command lines of 10–30 s each.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def run_cli(args: list[str], cwd: str = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python -m pneumo_jax ARGS` as a user runs it, its output captured as text."""
  return subprocess.run(
    [sys.executable, '-m', 'pneumo_jax', *map(str, args)],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
  output = result.stdout + result.stderr
  assert 'Traceback' not in output, output[-5000:]


def assert_one_clear_line(
  result: subprocess.CompletedProcess, *needles: str, status: int = 2
) -> str:
  """The command failed with `status` and one `error: …` line holding every needle, no traceback
  anywhere; returns that line."""
  assert_no_traceback(result)
  assert result.returncode == status, result.stderr[-5000:]
  lines = [x for x in (result.stdout + result.stderr).splitlines() if x.startswith('error: ')]
  assert len(lines) == 1, result.stderr[-5000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def snapshot(folder: str) -> dict[str, str]:
  """Every file and folder under `folder` (relative path → sha256 of a file's bytes, 'folder'
  for a folder): what 'nothing lost, nothing touched' compares."""
  found = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs:
      found[os.path.relpath(os.path.join(root, name), folder)] = 'folder'
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return found


def truncate_largest(folder: str) -> str:
  """Cuts the largest array file of the orbax checkpoint in `folder` to half its size, as a full
  disk or an interrupted copy leaves it; returns its path."""
  path = max(glob.glob(os.path.join(folder, '**', 'd', '*'), recursive=True), key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)
  return path


class Run(NamedTuple):
  workdir: str  # Trained: checkpoints/2-4, best/4, base/.
  args: list[str]  # --config and its overrides, as the run was trained.
  data_dir: str  # config.dataset.data_dir: the demo's images and their TFDS build.
  images: str  # A folder of the run's images, for --inputs.


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Run:
  root = tmp_path_factory.mktemp('faults')
  data_dir = str(root / 'data')
  args = [
    '--config',
    'configs/sweeps/tiny.py',
    '--nosweep',
    f'--config.dataset.data_dir={data_dir}',
    '--config.trainable_scopes=Logits,AuxLogits',
    '--config.feature_cache=False',
    f'--config.num_steps={STEPS}',
    '--config.checkpoint_every_steps=1',
  ]
  workdir = str(root / 'run')
  result = run_cli([*args, '--workdir', workdir])
  assert result.returncode == 0, result.stderr[-5000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '3', '4']
  assert os.listdir(os.path.join(workdir, 'best')) == [str(STEPS)]
  return Run(workdir, args, data_dir, os.path.join(data_dir, 'synthetic_stages', 'stage_0'))


@pytest.fixture
def copy(run, tmp_path) -> str:
  """A copy of the trained workdir that a case may damage."""
  return shutil.copytree(run.workdir, str(tmp_path / 'run'))


def _mode(run: Run, workdir: str, mode: str, *args: str) -> list[str]:
  """The run's command line for `mode`, with what that mode needs."""
  inputs = {'predict': ['--inputs', run.images], 'explain': ['--inputs', run.images]}
  return [*run.args, '--workdir', workdir, '--mode', mode, *inputs.get(mode, []), *args]


# --- Export: only an earlier export is replaced.


def test_export_refuses_a_folder_with_a_metadata_json_of_its_own(run, tmp_path):
  folder = tmp_path / 'thesis'
  folder.mkdir()
  (folder / 'thesis.txt').write_text('four years of work')
  (folder / 'metadata.json').write_text(json.dumps({'title': 'My thesis', 'step': 4}))
  before = snapshot(str(folder))
  result = run_cli(_mode(run, run.workdir, 'export', '--export_dir', folder))
  assert_one_clear_line(result, f'--export_dir {folder}', 'is not an export of pneumo_jax')
  assert snapshot(str(folder)) == before


def test_export_refuses_a_copy_of_a_tfds_build_folder(run, tmp_path):
  """A TFDS build folder has a metadata.json too, beside its array_record shards."""
  (built,) = glob.glob(os.path.join(run.data_dir, 'class_folder', '*', '*'))
  folder = shutil.copytree(built, str(tmp_path / 'dataset'))
  assert os.path.isfile(os.path.join(folder, 'metadata.json'))
  before = snapshot(folder)
  result = run_cli(_mode(run, run.workdir, 'export', '--export_dir', folder))
  assert_one_clear_line(result, f'--export_dir {folder}', 'is not an export of pneumo_jax')
  assert snapshot(folder) == before


@pytest.mark.parametrize('what', ['a file', 'an unrelated folder'])
def test_export_refuses_a_file_or_an_unrelated_folder(run, tmp_path, what):
  target = tmp_path / 'target'
  if what == 'a file':
    target.write_text('not a folder')
  else:
    target.mkdir()
    (target / 'notes.txt').write_text('mine')
  before = snapshot(str(tmp_path))
  result = run_cli(_mode(run, run.workdir, 'export', '--export_dir', target))
  assert_one_clear_line(result, f'--export_dir {target}', 'give a new or empty folder')
  assert snapshot(str(tmp_path)) == before


def test_export_replaces_an_earlier_export_and_nothing_else(run, tmp_path):
  """An earlier export (its metadata.json's marker, the files an export writes) is replaced; one
  that also holds a file of the user's is refused untouched."""
  target = tmp_path / 'export'
  target.mkdir()
  marker = {'format': 'pneumo_jax-export', 'run': {'workdir': run.workdir, 'step': 3}}
  (target / 'metadata.json').write_text(json.dumps(marker))
  (target / 'labels.txt').write_text('an earlier export\n')
  (target / 'notes.txt').write_text('written into the export folder')
  before = snapshot(str(target))
  result = run_cli(_mode(run, run.workdir, 'export', '--export_dir', target))
  assert_one_clear_line(result, f'--export_dir {target} holds an earlier export and also notes.txt')
  assert snapshot(str(target)) == before

  (target / 'notes.txt').unlink()
  result = run_cli(_mode(run, run.workdir, 'export', '--export_dir', target))
  assert_no_traceback(result)
  assert result.returncode == 0, result.stderr[-5000:]
  with open(target / 'metadata.json') as f:
    metadata = json.load(f)
  assert metadata['format'] == 'pneumo_jax-export'
  assert metadata['run'] == {'workdir': run.workdir, 'step': STEPS}
  assert (target / 'labels.txt').read_text().startswith('stage_0\n')
  assert os.listdir(target / 'saved_model') == [str(STEPS)]
  assert os.listdir(tmp_path) == ['export']  # Nothing left beside it.


# --- Damaged checkpoints and base/.


def test_training_resumes_from_the_newest_checkpoint_that_restores(run, copy):
  """Step 4 truncated: the run says so, sets it aside, resumes from 3 and saves 4 anew (its best
  checkpoint 4 included: evaluated again, it replaces the one from before)."""
  truncate_largest(os.path.join(copy, 'checkpoints', str(STEPS), 'state'))
  damaged = snapshot(os.path.join(copy, 'checkpoints', str(STEPS)))
  more = ['--config.num_steps=6', '--config.eval_every_steps=2']
  result = run_cli([*run.args, *more, '--workdir', copy])
  assert_no_traceback(result)
  assert result.returncode == 0, result.stderr[-5000:]
  warning = next(x for x in result.stderr.splitlines() if 'cannot be restored' in x)
  aside = os.path.join(copy, 'damaged', 'checkpoints', str(STEPS))
  assert f'checkpoint {STEPS} ({copy}/checkpoints/{STEPS}) cannot be restored' in warning
  assert 'a file in it is truncated' in warning
  assert f'Moved it to {aside} for inspection; resuming from step 3' in warning
  assert snapshot(aside) == damaged  # Kept as it was, for inspection.
  assert 'Resumed from' in result.stderr and 'at step 3' in result.stderr
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['4', '5', '6']
  with open(os.path.join(copy, 'summary.json')) as f:
    assert json.load(f)['step'] == 6


@pytest.mark.parametrize(
  'mode, checkpoint, damaged, works',
  [
    ('predict', 'latest', 'checkpoints', '--checkpoint best'),
    ('eval', '4', 'checkpoints', '--checkpoint best'),
    ('explain', 'latest', 'checkpoints', '--checkpoint best'),
    ('export', 'best', 'best', '--checkpoint 4'),
  ],
)
def test_inference_modes_name_the_damaged_step_and_the_one_that_works(
  run, copy, tmp_path, mode, checkpoint, damaged, works
):
  """checkpoints/4 and best/4 hold the same step: either works when the other is damaged."""
  truncate_largest(os.path.join(copy, damaged, str(STEPS)))
  before = snapshot(copy)
  args = ['--export_dir', tmp_path / 'export'] if mode == 'export' else []
  result = run_cli(_mode(run, copy, mode, '--checkpoint', checkpoint, *args))
  assert_one_clear_line(
    result,
    f'checkpoint {STEPS} ({copy}/{damaged}/{STEPS}) cannot be restored: a file in it is truncated',
    f'pass {works}',
  )
  assert snapshot(copy) == before and not (tmp_path / 'export').exists()
  if mode == 'predict':  # The way out it names works.
    again = run_cli(_mode(run, copy, mode, *works.split()))
    assert again.returncode == 0, again.stderr[-5000:]


@pytest.mark.parametrize('damage', ['truncated', 'byte-flipped'])
def test_a_damaged_base_is_one_line(run, copy, damage):
  path = max(
    glob.glob(os.path.join(copy, 'base', '**', 'd', '*'), recursive=True), key=os.path.getsize
  )
  if damage == 'truncated':
    os.truncate(path, os.path.getsize(path) // 2)
    needle = 'cannot be restored: a file in it is truncated'
  else:
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))
    needle = 'was modified after its run wrote it'
  before = snapshot(copy)
  result = run_cli(_mode(run, copy, 'predict'))
  assert_one_clear_line(result, f'{copy}/base', needle)
  assert snapshot(copy) == before


# --- Outputs that cannot be written: refused before anything is computed.


def test_train_and_export_refuse_folders_they_cannot_write(run, copy, tmp_path):
  """A file where a folder should be fails for any user; read-only folders below, as non-root."""
  shutil.rmtree(os.path.join(copy, 'tensorboard'))
  with open(os.path.join(copy, 'tensorboard'), 'w') as f:
    f.write('in the way')
  before = snapshot(copy)
  result = run_cli([*run.args, '--config.num_steps=6', '--workdir', copy])
  assert_one_clear_line(result, f"the run's tensorboard/ folder '{copy}/tensorboard' cannot be")
  assert snapshot(copy) == before
  blocked = tmp_path / 'blocked'
  blocked.write_text('a file')
  result = run_cli(_mode(run, run.workdir, 'export', '--export_dir', blocked / 'export'))
  assert_one_clear_line(result, f"the folder the export goes in '{blocked}' cannot be written")
  assert blocked.read_text() == 'a file'


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_workdir_is_refused_before_training(run, copy):
  checkpoints = os.path.join(copy, 'checkpoints')
  os.chmod(checkpoints, 0o555)
  try:
    before = snapshot(copy)
    result = run_cli([*run.args, '--config.num_steps=6', '--workdir', copy])
    assert_one_clear_line(result, f"the run's checkpoints/ folder '{checkpoints}' cannot be")
    assert snapshot(copy) == before
  finally:
    os.chmod(checkpoints, 0o755)


# --- Collections the build refuses: one line naming the folder or the label file's line, and
# nothing built (no build folder, no workdir files beyond what a run writes first).


def _refused_build(tmp_path, *overrides: str, needles: tuple[str, ...]) -> None:
  data_dir = tmp_path / 'data'
  args = [
    '--config',
    'configs/sweeps/tiny.py',
    '--nosweep',
    f'--config.dataset.data_dir={data_dir}',
  ]
  result = run_cli([*args, *overrides, '--workdir', tmp_path / 'run'])
  assert_one_clear_line(result, *needles)
  assert not (data_dir / 'class_folder').exists()


def test_split_folders_mixed_with_another_folder(tmp_path):
  from test_collections import public_layout

  root = tmp_path / 'chest_xray'
  public_layout(root, duplicates=False)
  (root / 'extra').mkdir()
  before = snapshot(str(root))
  _refused_build(
    tmp_path,
    f'--config.dataset.source_dir={root}',
    '--config.dataset.synthetic=False',
    needles=(
      str(root),
      "mixes split folders ['test', 'train', 'val'] with other folders ['extra']",
    ),
  )
  assert snapshot(str(root)) == before


def test_label_file_with_a_missing_file(tmp_path):
  from test_collections import public_layout

  root = tmp_path / 'chest_xray'
  files = public_layout(root, duplicates=False)
  rows = [f'{rel},{cls}' for split in files.values() for rel, cls, _ in split]
  rows[1] = 'train/NORMAL/gone.jpeg,NORMAL'
  (root / 'labels.csv').write_text('path,label\n' + '\n'.join(rows) + '\n')
  _refused_build(
    tmp_path,
    f'--config.dataset.labels_csv={root / "labels.csv"}',
    needles=('1 bad row(s) in', "labels.csv:3: no such file '", 'skip_corrupt=True'),
  )


# --- Evaluation and files (external sets, unwritable outputs, hostile files).


def _external(run, tmp_path, classes=('stage_0', 'stage_2'), per_class=3, extra=()):
  """A labelled folder training never saw, holding some of the run's classes (copies of the run's
  images) and, in its first class, `extra`: (name, callable(path) that makes it)."""
  films = sorted(glob.glob(os.path.join(run.images, '*.png')))
  folder = str(tmp_path / 'ext_site')
  for c, name in enumerate(classes):
    os.makedirs(os.path.join(folder, name))
    for i in range(per_class):
      shutil.copy(films[c * per_class + i], os.path.join(folder, name, f'{i}.png'))
  for name, make in extra:
    make(os.path.join(folder, classes[0], name))
  return folder


def _ext_args(folder: str, *more: str) -> list[str]:
  return [
    f'--config.dataset.source_dir={folder}',
    '--config.dataset.synthetic=False',
    '--mode',
    'eval',
    *more,
  ]


def test_an_external_set_is_scored_whole_and_the_runs_card_is_kept(run, copy, tmp_path):
  card = os.path.join(copy, 'model_card.md')
  with open(card, 'w') as f:
    f.write('the card of the run')  # Whatever an earlier evaluation of the run's source wrote.
  folder = _external(run, tmp_path)
  before = snapshot(copy)
  result = run_cli([*run.args, '--workdir', copy, *_ext_args(folder, '--split', 'all')])
  assert_no_traceback(result)
  assert result.returncode == 0, result.stderr[-5000:]
  assert 'No image of class(es) stage_1, stage_3' in result.stdout
  after = snapshot(copy)
  assert {k: after[k] for k in before} == before  # Nothing replaced, the run's card included.
  with open(os.path.join(copy, 'eval', f'ext_site_all_{STEPS}.json')) as f:
    report = json.load(f)
  assert report['provenance']['absent_classes'] == ['stage_1', 'stage_3']
  assert sum(m['support'] for m in report['per_class'].values()) == 6  # Every image.
  assert os.path.exists(os.path.join(copy, 'eval', f'ext_site_all_{STEPS}_model_card.md'))
  os.makedirs(os.path.join(folder, 'stage_9'))
  shutil.copy(os.path.join(folder, 'stage_0', '0.png'), os.path.join(folder, 'stage_9'))
  before = snapshot(copy)
  result = run_cli([*run.args, '--workdir', copy, *_ext_args(folder, '--split', 'all')])
  assert_one_clear_line(result, f'{folder} has class(es)', "['stage_9']", 'does not know')
  assert snapshot(copy) == before


@pytest.mark.parametrize('skip', [False, True])
def test_link_loops_and_dangling_links_are_listed_like_unreadable_images(run, copy, tmp_path, skip):
  def loop(path):
    os.symlink(path, path)

  def dangling(path):
    os.symlink(path + '.gone', path)

  folder = _external(run, tmp_path, extra=[('loop.png', loop), ('dangling.png', dangling)])
  before = snapshot(copy)
  more = ['--split', 'all', f'--config.dataset.skip_corrupt={skip}']
  result = run_cli([*run.args, '--workdir', copy, *_ext_args(folder, *more)])
  output = result.stdout + result.stderr
  if skip:  # Listed as skipped, the rest scored.
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr[-5000:]
    with open(os.path.join(copy, 'eval', f'ext_site_all_{STEPS}.json')) as f:
      assert sum(m['support'] for m in json.load(f)['per_class'].values()) == 6
    assert "['stage_0/dangling.png', 'stage_0/loop.png']" in output, output[-3000:]
  else:  # Listed with their causes, nothing written.
    assert_one_clear_line(result, 'unreadable image(s)', folder)
    assert snapshot(copy) == before
    assert 'symbolic link loop' in output and 'dangling symbolic link' in output, output[-3000:]


def test_predict_refuses_an_unwritable_predictions_folder_before_computing(run, copy):
  shutil.rmtree(os.path.join(copy, 'predictions'), ignore_errors=True)
  with open(os.path.join(copy, 'predictions'), 'w') as f:
    f.write('in the way')
  before = snapshot(copy)
  result = run_cli(_mode(run, copy, 'predict'))
  line = assert_one_clear_line(result, f"the predictions folder '{copy}/predictions' cannot be")
  assert 'Predicted' not in result.stdout, line
  assert snapshot(copy) == before


def test_predict_keeps_a_non_utf8_name_and_lists_a_1x1_image(run, copy, tmp_path):
  from PIL import Image

  films = tmp_path / 'films'
  films.mkdir()
  odd = os.fsdecode(b'caf\xe9.png')  # As Python gives a Latin-1 name from an old share.
  shutil.copy(sorted(glob.glob(os.path.join(run.images, '*.png')))[1], films / odd)
  Image.new('L', (1, 1), 128).save(films / 'dot.png')
  predict = [*run.args, '--workdir', copy, '--mode', 'predict', '--inputs', films]
  result = run_cli(predict)
  assert_no_traceback(result)
  assert result.returncode == 0, result.stderr[-5000:]
  (csv_path,) = glob.glob(os.path.join(copy, 'predictions', '*.csv'))
  with open(csv_path, 'rb') as f:
    content = f.read()
  assert os.fsencode(str(films / odd)) + b',' in content  # The name's exact bytes.
  assert b'dot.png' in content and b'1x1 px' in content and b'min_image_side' in content
  assert 'dot.png' in result.stdout  # Listed as skipped.
  Image.new('L', (4000, 40), 128).save(films / 'strip.png')  # A strip: 100 to 1.
  os.remove(films / odd)
  os.remove(films / 'dot.png')
  result = run_cli(predict)
  assert_one_clear_line(result, 'none of the 1 input(s) could be read')
  assert 'max_aspect_ratio' in result.stdout + result.stderr
