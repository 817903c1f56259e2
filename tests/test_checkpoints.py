"""Checkpoints: pretrained initialisation (orbax, raw slim), exclusion, and restore errors."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from pneumo_jax import checkpoints, scopes
from pneumo_jax.models.inception_v3 import InceptionV3
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
    checkpoints.load_init(path, variables, '', False, str(tmp_path))
  msg = str(e.value)
  for offender in ('params/Logits/Conv2d_1c_1x1/weights', 'params/Logits/Conv2d_1c_1x1/biases',
                   'params/AuxLogits/Conv2d_2b_1x1/weights'):
    assert offender in msg
  loaded = checkpoints.load_init(path, variables, HEAD, False, str(tmp_path))
  lp, pp, mp = (scopes.flatten(x['params']) for x in (loaded, pretrained, variables))
  for k in lp:
    np.testing.assert_array_equal(lp[k], mp[k] if k.startswith(('Logits', 'AuxLogits')) else pp[k])


def test_raw_slim_checkpoint_is_converted_once_and_cached(tmp_path):
  """init_checkpoint may name a TF-Slim checkpoint prefix; the orbax copy lands in WORKDIR."""
  slim = reference.random_variables(InceptionV3(num_classes=1001), 75, seed=3)
  arrays = {f'InceptionV3/{k}': v for c in ('params', 'batch_stats')
            for k, v in scopes.flatten(slim[c]).items()}
  prefix = reference.write_tf_checkpoint(arrays, str(tmp_path / 'model.ckpt'), 'V2')
  workdir = str(tmp_path / 'run')
  variables = reference.random_variables(InceptionV3(num_classes=4), 75, seed=0)
  loaded = checkpoints.load_init(prefix, variables, HEAD, False, workdir)
  got, want = scopes.flatten(loaded['batch_stats']), scopes.flatten(slim['batch_stats'])
  np.testing.assert_array_equal(got['Mixed_7c/Branch_3/Conv2d_0b_1x1/BatchNorm/moving_mean'],
                                want['Mixed_7c/Branch_3/Conv2d_0b_1x1/BatchNorm/moving_mean'])
  np.testing.assert_array_equal(loaded['params']['Conv2d_1a_3x3']['weights'],
                                slim['params']['Conv2d_1a_3x3']['weights'])
  assert os.path.isdir(os.path.join(workdir, 'converted', 'model.ckpt_orbax'))


def test_missing_init_checkpoint_and_bad_restore_requests(tmp_path):
  with pytest.raises(FileNotFoundError, match='init_checkpoint'):
    checkpoints.load_init(str(tmp_path / 'nope'), {}, '', False, str(tmp_path))
  with pytest.raises(FileNotFoundError, match='train first'):
    checkpoints.load_for_inference(str(tmp_path))
  with pytest.raises(ValueError, match='latest, best or a step'):
    checkpoints.load_for_inference(str(tmp_path), 'newest')
