"""DenseNet-121 through every mode: two-phase training with frozen batch norm, resume-sized
checkpoints, eval, predict and explain, all chosen by config.model.name alone."""

import json
import os

import orbax.checkpoint as ocp
import pytest

import pneumo_jax
from pneumo_jax import checkpoints, scopes
from pneumo_jax.modes import evaluate, explain, predict
from pneumo_jax.training import loop

pytestmark = pytest.mark.long  # ~100 s; the DenseNet parity tests stay in the default suite.
SIZE = 64  # Small (DenseNet accepts 29 px and up) but with a 2×2 norm5 grid.


@pytest.fixture(scope='module')
def run(tiny_config, tmp_path_factory):
  config = tiny_config(
    **{
      'model.name': 'densenet121',
      'input.image_size': SIZE,
      'exclude_scopes': 'classifier',
      'trainable_scopes': 'classifier',
      'model.batch_norm_decay': 0.9,
      'eval_every_steps': 2,
    }
  )
  config.phase_order = 'head,top'
  config.phases.head = dict(num_steps=2, trainable_scopes='classifier')
  config.phases.top = dict(
    num_steps=2, trainable_scopes='denseblock4/denselayer16,norm5,classifier'
  )
  workdir = str(tmp_path_factory.mktemp('densenet'))
  summary = loop.train_and_evaluate(config, workdir)
  return config, workdir, summary


def test_two_phase_training_with_frozen_batch_norm(run):
  _, workdir, summary = run
  assert summary['status'] == 'done' and summary['step'] == 4
  with open(os.path.join(workdir, loop.SUMMARY_FILE)) as f:
    assert json.load(f)['pneumo_jax_version'] == pneumo_jax.__version__
  base = ocp.StandardCheckpointer().restore(os.path.join(workdir, checkpoints.BASE_DIR))
  frozen = scopes.flatten(base['batch_stats'])
  assert 'denseblock1/denselayer1/norm1/mean' in frozen  # Never trained: kept once, in base/.
  with checkpoints.manager(workdir) as mngr:
    stored = mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  moving = set(scopes.flatten(stored['batch_stats']))
  assert moving == {
    f'{layer}/{stat}'
    for layer in ('norm5', 'denseblock4/denselayer16/norm1', 'denseblock4/denselayer16/norm2')
    for stat in ('mean', 'var')
  }


def test_eval_predict_and_explain(run, stage_folder, capsys):
  config, workdir, _ = run
  result = evaluate.run(config, workdir)
  assert 0.0 <= result['accuracy'] <= 1.0
  with open(os.path.join(workdir, 'eval', 'validation_4.json')) as f:
    assert json.load(f)['provenance']['pneumo_jax_version'] == pneumo_jax.__version__
  files = [os.path.join(stage_folder, 'stage_2', name) for name in ('2_0001.png', '2_0002.png')]
  assert os.path.basename(predict.run(config, workdir, files)) == 'step4.csv'
  capsys.readouterr()
  out = explain.run(config, workdir, files[:1])  # norm5 by default: 2×2 cells at 64 px.
  assert out.endswith('step4_norm5') and os.listdir(out) == ['2_0001.png']
  assert 'choose an earlier layer such as denseblock3' in capsys.readouterr().out
