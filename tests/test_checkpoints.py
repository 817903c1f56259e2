"""Checkpoints: pretrained initialisation (orbax, raw slim), exclusion, the frozen-weights base,
the previous format, and restore errors."""

import gc
import glob
import os
import shutil
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pneumo_jax import checkpoints, errors, scopes
from pneumo_jax.models.inception_v3 import BACKBONE, InceptionV3
from tests import reference

HEAD = 'Logits,AuxLogits'


def test_init_checkpoint_with_exclude_scopes(tiny_config, tmp_path):
  pretrained = reference.random_variables(InceptionV3(num_classes=7), 75, seed=42)
  path = str(tmp_path / 'pretrained')
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, {'params': pretrained['params'], 'batch_stats': pretrained['batch_stats']})
  ckptr.wait_until_finished()
  variables = reference.random_variables(InceptionV3(num_classes=4), 75, seed=0)
  with pytest.raises(ValueError) as e:
    checkpoints.load_init(path, variables, '', False, str(tmp_path), BACKBONE)
  msg = str(e.value)
  for offender in (
    'params/Logits/Conv2d_1c_1x1/weights',
    'params/Logits/Conv2d_1c_1x1/biases',
    'params/AuxLogits/Conv2d_2b_1x1/weights',
  ):
    assert offender in msg
  loaded = checkpoints.load_init(path, variables, HEAD, False, str(tmp_path), BACKBONE)
  lp, pp, mp = (scopes.flatten(x['params']) for x in (loaded, pretrained, variables))
  for k in lp:
    np.testing.assert_array_equal(lp[k], mp[k] if k.startswith(('Logits', 'AuxLogits')) else pp[k])


def test_raw_slim_checkpoint_is_converted_once_and_cached(tmp_path):
  """init_checkpoint may name a TF-Slim checkpoint prefix; the orbax copy lands in WORKDIR."""
  slim = reference.random_variables(InceptionV3(num_classes=1001), 75, seed=3)
  arrays = {
    f'InceptionV3/{k}': v
    for c in ('params', 'batch_stats')
    for k, v in scopes.flatten(slim[c]).items()
  }
  prefix = reference.write_tf_checkpoint(arrays, str(tmp_path / 'model.ckpt'), 'V2')
  workdir = str(tmp_path / 'run')
  variables = reference.random_variables(InceptionV3(num_classes=4), 75, seed=0)
  loaded = checkpoints.load_init(prefix, variables, HEAD, False, workdir, BACKBONE)
  got, want = scopes.flatten(loaded['batch_stats']), scopes.flatten(slim['batch_stats'])
  np.testing.assert_array_equal(
    got['Mixed_7c/Branch_3/Conv2d_0b_1x1/BatchNorm/moving_mean'],
    want['Mixed_7c/Branch_3/Conv2d_0b_1x1/BatchNorm/moving_mean'],
  )
  np.testing.assert_array_equal(
    loaded['params']['Conv2d_1a_3x3']['weights'], slim['params']['Conv2d_1a_3x3']['weights']
  )
  assert os.path.isdir(os.path.join(workdir, 'converted', 'model.ckpt_orbax'))


def test_missing_init_checkpoint_and_bad_restore_requests(tmp_path):
  with pytest.raises(FileNotFoundError, match='init_checkpoint'):
    checkpoints.load_init(str(tmp_path / 'nope'), {}, '', False, str(tmp_path), BACKBONE)
  with pytest.raises(FileNotFoundError, match='train first'):
    checkpoints.load_for_inference(str(tmp_path))
  assert not os.listdir(tmp_path)  # Not even an empty checkpoints/.
  with pytest.raises(ValueError, match='latest, best or a step'):
    checkpoints.load_for_inference(str(tmp_path), 'newest')


def _tree(rng, *paths):
  return scopes.unflatten({p: rng.normal(size=(3, 2)).astype(np.float32) for p in paths})


def _state(seed=0):
  """A run's state in miniature: a frozen body, a head that trains, EMA and optimizer state."""
  rng = np.random.default_rng(seed)
  params = _tree(rng, 'body/w', 'body/BatchNorm/beta', 'head/w')
  return {
    'step': np.int32(5),
    'params': params,
    'batch_stats': _tree(rng, 'body/BatchNorm/moving_mean', 'head/BatchNorm/moving_mean'),
    'ema_params': {'body': params['body'], 'head': _tree(rng, 'w')},
    'opt_state': {'trace': {'head': _tree(rng, 'w')}},
  }


FROZEN = {
  'params': {'body/w', 'body/BatchNorm/beta'},
  'batch_stats': {'body/BatchNorm/moving_mean'},
}


def _saved_with_base(workdir, state, step=5, subdir=checkpoints.LATEST_DIR):
  base = checkpoints.write_base(workdir, state, FROZEN)
  mngr = checkpoints.manager(workdir, subdir)
  checkpoints.save(mngr, step, state, base=base)
  mngr.wait_until_finished()
  return base


def _raw(workdir, step, subdir=checkpoints.LATEST_DIR):
  """The `state` item exactly as orbax stored it."""
  with checkpoints.manager(workdir, subdir) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']


def _assert_same(a, b):
  fa, fb = (dict(jax.tree_util.tree_flatten_with_path(x)[0]) for x in (a, b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=jax.tree_util.keystr(k))


def test_checkpoint_keeps_frozen_leaves_once_in_base(tmp_path):
  """The checkpoint stores what changes; base/ the rest with its hash; reading merges them back."""
  workdir = str(tmp_path)
  state = _state()
  base = _saved_with_base(workdir, state)
  stored = _raw(workdir, 5)
  assert set(scopes.flatten(stored['params'])) == {'head/w'}
  assert set(scopes.flatten(stored['ema_params'])) == {'head/w'}
  assert set(scopes.flatten(stored['batch_stats'])) == {'head/BatchNorm/moving_mean'}
  on_disk = ocp.StandardCheckpointer().restore(os.path.join(workdir, checkpoints.BASE_DIR))
  assert {c: set(scopes.flatten(t)) for c, t in on_disk.items()} == FROZEN
  assert checkpoints.content_hash(on_disk) == base.sha256
  got, step = checkpoints.read(workdir)
  assert step == 5
  _assert_same(got, state)
  variables, _ = checkpoints.load_for_inference(workdir)
  _assert_same(variables, {'params': state['ema_params'], 'batch_stats': state['batch_stats']})
  # Copied elsewhere, the workdir still loads: nothing refers outside it.
  moved = str(tmp_path.parent / 'moved')
  shutil.copytree(workdir, moved)
  _assert_same(checkpoints.read(moved)[0], state)


def test_missing_or_altered_base_is_a_clear_error(tmp_path):
  workdir = str(tmp_path / 'run')
  state = _state()
  base = _saved_with_base(workdir, state)
  base_dir = os.path.join(workdir, checkpoints.BASE_DIR)
  kept = str(tmp_path / 'kept_base')
  shutil.copytree(base_dir, kept)

  shutil.rmtree(base_dir)
  with pytest.raises(errors.NotFoundError, match=rf'frozen arrays in {base_dir}, which is missing'):
    checkpoints.load_for_inference(workdir)

  checkpoints.write_base(workdir, _state(seed=1), FROZEN)  # Another run's base.
  with pytest.raises(checkpoints.BaseMismatchError, match=r'holds other frozen weights') as e:
    checkpoints.load_for_inference(workdir)
  assert workdir in str(e.value) and base.sha256[:12] in str(e.value)

  shutil.rmtree(base_dir)  # This run's base with one array edited, its recorded hash kept.
  arrays = ocp.StandardCheckpointer().restore(kept)
  arrays['params']['body']['w'][0, 0] += 1
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(base_dir, arrays, custom_metadata={'sha256': base.sha256})
  with pytest.raises(checkpoints.BaseMismatchError, match=r'modified after its run wrote it'):
    checkpoints.read(workdir)

  shutil.rmtree(base_dir)
  shutil.copytree(kept, base_dir)
  _assert_same(checkpoints.read(workdir)[0], state)


def _truncate_largest(folder):
  """Cuts the largest array file of the orbax checkpoint in `folder` to half its size."""
  path = max(glob.glob(os.path.join(folder, '**', 'd', '*'), recursive=True), key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)


def test_a_damaged_step_is_one_line_naming_the_step_that_restores(tmp_path, capfd, caplog):
  """Without the tracebacks of the restore's other reads (asyncio's log, sys.unraisablehook)."""
  workdir = str(tmp_path)
  state = _state()
  _saved_with_base(workdir, state, step=3)
  _saved_with_base(workdir, state, step=5)
  latest = os.path.join(workdir, checkpoints.LATEST_DIR)
  _truncate_largest(os.path.join(latest, '5'))
  with pytest.raises(checkpoints.DamagedCheckpointError) as e:
    checkpoints.read(workdir)
  message = str(e.value)
  assert message.startswith(
    f'checkpoint 5 ({latest}/5) cannot be restored: a file in it is truncated (OUT_OF_RANGE: '
  )
  assert message.endswith('; the newest that restores is checkpoints/3: pass --checkpoint 3')
  assert '\n' not in message
  _assert_same(checkpoints.read(workdir, '3')[0], state)

  _truncate_largest(os.path.join(latest, '3'))  # Nothing else restores.
  with pytest.raises(checkpoints.DamagedCheckpointError, match=r'no other checkpoint restores'):
    checkpoints.read(workdir, '5')
  gc.collect()
  assert 'Event loop is closed' not in ''.join(capfd.readouterr())
  assert not [r for r in caplog.records if 'never retrieved' in r.getMessage()]


def test_a_read_freed_unfinished_after_a_failed_restore_reports_nothing(tmp_path, monkeypatch):
  """Orbax wraps whatever ends a read, GeneratorExit too, in a new Exception: a read coroutine the
  failed restore leaves suspended reports that when freed. Any other unraisable still reports."""
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: reported.append(str(u.exc_value)))
  workdir = str(tmp_path)
  _saved_with_base(workdir, _state(), step=3)
  _truncate_largest(os.path.join(workdir, checkpoints.LATEST_DIR, '3'))
  with pytest.raises(checkpoints.DamagedCheckpointError):
    checkpoints.read(workdir)

  @types.coroutine
  def pending():
    yield

  async def read():  # The shape of orbax's _read_array_index_and_device_put.
    try:
      await pending()
    except BaseException as e:
      raise Exception('Encountered error while reading array index') from e

  coroutine = read()
  coroutine.send(None)  # Suspended in its read.

  class Leaky:
    def __del__(self):
      raise ValueError('a real fault')

  del coroutine
  Leaky()
  gc.collect()
  assert reported == ['a real fault']


def test_a_damaged_step_is_set_aside_and_its_step_saved_again(tmp_path):
  workdir = str(tmp_path)
  state = jax.device_put(_state())  # restore() places arrays as the target's are placed.
  base = _saved_with_base(workdir, state, step=3)
  _saved_with_base(workdir, state, step=5)
  mngr = checkpoints.manager(workdir)
  for n, aside in enumerate(['5', '5_2']):
    _truncate_largest(os.path.join(workdir, checkpoints.LATEST_DIR, '5'))
    with pytest.raises(checkpoints.DamagedCheckpointError, match=r'checkpoint 5 .* truncated'):
      checkpoints.restore(mngr, 5, state)
    moved = checkpoints.set_aside(mngr, 5)
    assert moved == os.path.join(workdir, checkpoints.DAMAGED_DIR, checkpoints.LATEST_DIR, aside)
    assert os.path.isdir(os.path.join(moved, 'state')) and mngr.all_steps() == [3]
    restored, _ = checkpoints.restore(mngr, 3, state)
    _assert_same(restored, state)
    checkpoints.save(mngr, 5, state, base=base)  # The resumed run saves the step again.
    mngr.wait_until_finished()
    assert mngr.all_steps() == [3, 5] and len(os.listdir(os.path.dirname(moved))) == n + 1
  _assert_same(checkpoints.restore(mngr, 5, state)[0], state)
  mngr.close()


def test_a_truncated_base_is_one_line(tmp_path):
  workdir = str(tmp_path)
  _saved_with_base(workdir, _state())
  base_dir = os.path.join(workdir, checkpoints.BASE_DIR)
  _truncate_largest(base_dir)
  with pytest.raises(checkpoints.BaseMismatchError) as e:
    checkpoints.read(workdir)
  assert str(e.value).startswith(f'{base_dir} cannot be restored: a file in it is truncated (')
  assert str(e.value).endswith(f'restore {workdir} from a copy, or train again in a new --workdir')


def test_checkpoint_of_the_previous_format_loads(tmp_path):
  """Written before base/ existed: the full state in `state`, no base_ref."""
  workdir = str(tmp_path)
  state = _state()
  with checkpoints.manager(workdir) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  got, step = checkpoints.read(workdir)
  assert step == 3
  _assert_same(got, state)
  variables, _ = checkpoints.load_for_inference(workdir, use_ema=False)
  _assert_same(variables, {'params': state['params'], 'batch_stats': state['batch_stats']})


def test_readers_write_nothing_in_a_workdir_without_a_run(tmp_path):
  """eval/predict/explain must say "train first" before creating anything."""
  empty = tmp_path / 'empty'
  empty.mkdir()
  for workdir in (str(empty), str(tmp_path / 'absent')):
    for which in ('latest', 'best', '3'):
      with pytest.raises(errors.NotFoundError, match=r'no checkpoint .* train first'):
        checkpoints.load_for_inference(workdir, which)
  assert os.listdir(empty) == [] and not os.path.exists(tmp_path / 'absent')


def test_checkpoint_lookup(tmp_path):
  """latest and best from their folders; a step number from checkpoints/, else best/."""
  workdir = str(tmp_path)
  state = _state()
  _saved_with_base(workdir, state, step=2, subdir=checkpoints.BEST_DIR)
  with pytest.raises(errors.NotFoundError, match=r"no checkpoint 'latest'"):
    checkpoints.read(workdir)
  assert checkpoints.read(workdir, 'best')[1] == 2 and checkpoints.read(workdir, '2')[1] == 2
  with pytest.raises(errors.NotFoundError, match=r'checkpoints/: none; best/: 2'):
    checkpoints.read(workdir, '4')
  with pytest.raises(errors.ConfigError, match='latest, best or a step'):
    checkpoints.read(workdir, 'newest')


def test_an_init_checkpoint_folder_that_is_no_checkpoint_names_the_setting(tmp_path):
  (tmp_path / 'weights').mkdir()
  (tmp_path / 'weights' / 'README').write_text('not a checkpoint')
  variables = reference.random_variables(InceptionV3(num_classes=4), 75, seed=0)
  with pytest.raises(
    ValueError,
    match=r"config\.init_checkpoint='.*weights' is a folder but not "
    'an orbax checkpoint',
  ):
    checkpoints.load_init(
      str(tmp_path / 'weights'), variables, HEAD, False, str(tmp_path), BACKBONE
    )
