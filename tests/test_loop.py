"""The training loop: phases, resume, EMA, best checkpoint, NaN stop, pretrained initialisation,
what checkpoints hold."""

import json
import os
import shutil
import signal

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pneumo_jax import checkpoints, scopes
from pneumo_jax.training import interrupt, loop
from pneumo_jax.training.monitor import Monitor

HEAD = 'Logits,AuxLogits'
TMP = ocp.utils.TMP_DIR_SUFFIX  # A save in progress: `<step>.orbax-checkpoint-tmp`.


def _two_phase(make):
  c = make(ema_decay=0.5)
  c.phase_order = 'head,top'
  c.phases.head = dict(num_steps=2, trainable_scopes=HEAD)
  c.phases.top = dict(
    num_steps=2, trainable_scopes='Mixed_7c,' + HEAD, schedule=dict(learning_rate=0.001)
  )
  return c


def _state(workdir, step):
  """Checkpoint `step` as the run holds it in memory (its frozen leaves from base/)."""
  return checkpoints.read(workdir, str(step))[0]


def _assert_same(a, b):
  """Every leaf bitwise equal, by path (optax's named tuples read back as dicts)."""
  flat = lambda t: {
    jax.tree_util.keystr(p, simple=True, separator='/'): x for p, x in jax.tree.leaves_with_path(t)
  }
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for path in fa:
    np.testing.assert_array_equal(fa[path], fb[path], err_msg=path)


def _trained(config, workdir, last_step):
  """Runs `config`; returns the state of the run's last checkpoint as it was in memory."""
  save, trained = checkpoints.save, {}

  def keep_last(mngr, step, state, *args, **kwargs):
    if step == last_step and mngr.directory.name == checkpoints.LATEST_DIR:
      trained.update(jax.device_get(state))
    save(mngr, step, state, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpoints, 'save', keep_last)
    summary = loop.train_and_evaluate(config, workdir)
  return summary, trained


def _moved(a, b):
  fa, fb = scopes.flatten(a), scopes.flatten(b)
  return {k for k in fa if not np.array_equal(fa[k], fb[k])}


@pytest.fixture(scope='module')
def runs(tmp_path_factory, tiny_config):
  """An uninterrupted two-phase run (with its final state as trained), and the same run killed
  after step 3's checkpoint, given the directories of killed saves, resumed."""
  config = _two_phase(tiny_config)
  straight = str(tmp_path_factory.mktemp('straight'))
  summary, trained = _trained(config, straight, 4)

  resumed = str(tmp_path_factory.mktemp('resumed'))
  _killed_after_step_3(config, resumed)
  for subdir in (checkpoints.LATEST_DIR, checkpoints.BEST_DIR):
    os.makedirs(os.path.join(resumed, subdir, f'5{TMP}', 'state'))
  loop.train_and_evaluate(config, resumed)
  return straight, resumed, summary, trained


def _killed_after_step_3(config, workdir):
  """Runs `config` in `workdir` until just after step 3's checkpoint is written, then dies."""
  save = checkpoints.save

  def save_then_die(mngr, step, state, *args, **kwargs):
    save(mngr, step, state, *args, **kwargs)
    if step == 3 and mngr.directory.name == checkpoints.LATEST_DIR:
      mngr.wait_until_finished()
      raise KeyboardInterrupt('simulated kill after step 3')

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpoints, 'save', save_then_die)
    with pytest.raises(KeyboardInterrupt):
      loop.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, loop.SUMMARY_FILE))


def test_resume_equals_uninterrupted_run(runs):
  """Every leaf of the state (optimizer included), the logged records and the best checkpoint."""
  straight, resumed, _, _ = runs
  summaries = []
  for workdir in (straight, resumed):
    with open(os.path.join(workdir, loop.SUMMARY_FILE)) as f:
      summaries.append(json.load(f))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      summaries[-1]['records'] = [(r['step'], r['split']) for r in map(json.loads, f)]
  s, r = summaries
  assert (s['best_step'], s['best'], s['final'], s['records']) == (
    r['best_step'],
    r['best'],
    r['final'],
    r['records'],
  )
  a = _state(straight, 4)
  assert any('opt_state' in jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(a))
  _assert_same(a, _state(resumed, 4))


def test_checkpoints_hold_only_what_the_run_changes(runs):
  """Leaves no phase trains (all but Mixed_7c and the heads: params, their EMA, batch-norm
  statistics) are written once, to base/; a checkpoint read back is the state as trained."""
  straight, _, _, trained = runs
  changing = ('Mixed_7c/', 'Logits/', 'AuxLogits/')
  for subdir, step in ((checkpoints.LATEST_DIR, 4), (checkpoints.BEST_DIR, None)):
    with checkpoints.manager(straight, subdir) as mngr:
      stored = mngr.restore(
        step or mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
      )['state']
    for entry in ('params', 'ema_params', 'batch_stats'):
      paths = set(scopes.flatten(stored[entry]))
      assert paths and all(p.startswith(changing) for p in paths), (subdir, entry)
  base = ocp.StandardCheckpointer().restore(os.path.join(straight, checkpoints.BASE_DIR))
  frozen = {k for k in scopes.flatten(trained['params']) if not k.startswith(changing)}
  assert set(scopes.flatten(base['params'])) == frozen
  assert 'Mixed_6e/Branch_0/Conv2d_0a_1x1/BatchNorm/moving_mean' in scopes.flatten(
    base['batch_stats']
  )
  _assert_same(_state(straight, 4), trained)


def test_a_killed_saves_leftovers_are_removed_by_the_next_run(runs):
  resumed = runs[1]
  for subdir in (checkpoints.LATEST_DIR, checkpoints.BEST_DIR):
    assert not [n for n in os.listdir(os.path.join(resumed, subdir)) if TMP in n], subdir


def _save_previous_format(mngr, step, state, data_iterator=None, base=None):
  """checkpoints.save as it was before base/: the whole state, no base_ref."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  mngr.save(step, args=ocp.args.Composite(**items))


def test_resume_from_checkpoints_of_the_previous_format(runs, tiny_config, tmp_path):
  """Killed after step 3 with checkpoints written the old way (and no base/), the run resumes
  and ends in the uninterrupted run's state."""
  workdir = str(tmp_path)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpoints, 'save', _save_previous_format)
    _killed_after_step_3(_two_phase(tiny_config), workdir)
  shutil.rmtree(os.path.join(workdir, checkpoints.BASE_DIR))
  loop.train_and_evaluate(_two_phase(tiny_config), workdir)
  _assert_same(_state(workdir, 4), _state(runs[0], 4))


def test_head_only_checkpoint_is_small_and_infers_as_trained(tiny_config, tmp_path):
  """Head only: a checkpoint is a few percent of the state; inference gets the trained EMA."""
  workdir = str(tmp_path)
  _, trained = _trained(tiny_config(ema_decay=0.5, num_steps=2), workdir, 2)
  on_disk = sum(
    f.stat().st_size for f in (tmp_path / checkpoints.LATEST_DIR / '2').rglob('*') if f.is_file()
  )
  state_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(trained))
  print(f'checkpoint {on_disk / 1e6:.1f} MB, state {state_bytes / 1e6:.1f} MB')
  assert on_disk < state_bytes / 20
  variables, step = checkpoints.load_for_inference(workdir)
  assert step == 2
  _assert_same(variables, {'params': trained['ema_params'], 'batch_stats': trained['batch_stats']})


def test_each_phase_moves_exactly_its_scopes(runs):
  straight = runs[0]
  s = {i: _state(straight, i) for i in (1, 2, 3, 4)}
  head = _moved(s[1]['params'], s[2]['params'])
  assert head and all(k.startswith(('Logits/', 'AuxLogits/')) for k in head)
  top = _moved(s[2]['params'], s[3]['params'])
  assert any(k.startswith('Mixed_7c/') for k in top)
  assert all(k.startswith(('Mixed_7c/', 'Logits/', 'AuxLogits/')) for k in top)
  stats_head = _moved(s[1]['batch_stats'], s[2]['batch_stats'])
  assert stats_head and all(k.startswith('AuxLogits/') for k in stats_head)
  stats_top = _moved(s[2]['batch_stats'], s[3]['batch_stats'])
  assert any(k.startswith('Mixed_7c/') for k in stats_top)
  assert all(k.startswith(('Mixed_7c/', 'AuxLogits/')) for k in stats_top)


def test_ema_is_saved_and_used_for_inference(runs):
  straight = runs[0]
  s = _state(straight, 4)
  p, e = scopes.flatten(s['params']), scopes.flatten(s['ema_params'])
  assert any(not np.array_equal(p[k], e[k]) for k in p)
  variables, step = checkpoints.load_for_inference(straight)
  assert step == 4
  np.testing.assert_array_equal(
    scopes.flatten(variables['params'])['Logits/Conv2d_1c_1x1/weights'],
    e['Logits/Conv2d_1c_1x1/weights'],
  )


def test_outputs_and_best_checkpoint(runs):
  straight, _, summary, _ = runs
  for name in ('config.json', 'metrics.jsonl', 'summary.json', 'curves.png', 'train_images.png'):
    assert os.path.exists(os.path.join(straight, name)), name
  assert os.listdir(os.path.join(straight, 'tensorboard'))
  with open(os.path.join(straight, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == [1, 2, 3, 4]
  assert {'loss', 'aux_loss', 'accuracy', 'learning_rate', 'grad_norm', 'images_per_s'} <= set(
    train[0]
  )
  np.testing.assert_allclose(train[-1]['learning_rate'], 0.001)
  evals = [r for r in records if r['split'] == 'validation']
  assert [r['step'] for r in evals] == [2, 4]
  kappas = [r['kappa'] for r in evals]
  best_step = evals[int(np.argmax(kappas))]['step']  # first best wins ties
  assert summary['best_step'] == best_step
  assert checkpoints.manager(straight, checkpoints.BEST_DIR).all_steps() == [best_step]
  assert summary['final'] == {k: evals[-1][k] for k in summary['final']}
  assert summary['status'] == 'done' and summary['step'] == 4


def test_finished_run_is_not_repeated(runs):
  straight = runs[0]
  again = loop.train_and_evaluate(_two_phase_config_of(straight), straight)
  assert again['step'] == 4


def _two_phase_config_of(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  """A NaN batch at step 3 poisons the loss: the run stops, checkpoints 1–2 stay, none after."""
  shard_batch = loop.sharding.shard_batch
  train_batches = []

  def poisoned(batch, mesh):
    if 'label' in batch:  # A training batch (evaluation shards its model inputs only).
      train_batches.append(1)
      if len(train_batches) == 3:  # Brightness changed by NaN.
        colour = np.array(batch['colour'])
        colour[:, 0], colour[:, 2] = 1.0, np.nan
        batch = dict(batch, colour=colour)
    return shard_batch(batch, mesh)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.sharding, 'shard_batch', poisoned)
    with pytest.raises(FloatingPointError, match=r'at step 3.*last good checkpoint is step 2'):
      loop.train_and_evaluate(_two_phase(tiny_config), str(tmp_path))
  assert checkpoints.manager(str(tmp_path)).all_steps() == [1, 2]


def _scripted_accuracy(monkeypatch, values):
  """Makes validation report these accuracies, in turn (the rest of the metrics stay real)."""
  scripted = iter(values)
  compute = loop.metrics.compute

  def scripted_compute(labels, probs, names):
    return dict(compute(labels, probs, names), accuracy=next(scripted))

  monkeypatch.setattr(loop.metrics, 'compute', scripted_compute)


def test_resume_remembers_the_best_checkpoint(tiny_config, tmp_path, monkeypatch):
  """Best at step 2 (0.75); killed after 3; resumed, step 4 scores 0.5: step 2 stays the best."""
  c = _two_phase(tiny_config)
  c.best_metric = 'accuracy'
  _scripted_accuracy(monkeypatch, [0.75, 0.5])
  _killed_after_step_3(c, str(tmp_path))
  summary = loop.train_and_evaluate(c, str(tmp_path))
  assert summary['best_step'] == 2 and summary['best']['accuracy'] == 0.75
  assert summary['final']['accuracy'] == 0.5
  assert checkpoints.manager(str(tmp_path), checkpoints.BEST_DIR).all_steps() == [2]


def test_early_stopping_on_the_best_metric(tiny_config, tmp_path, monkeypatch):
  """Scripted validation accuracies 0.5, 0.75, 0.5, 0.25 with patience 2: the run stops after
  step 4 (two evals without a new best), keeps step 2 as best and checkpoints where it stopped."""
  c = _two_phase(tiny_config)
  c.eval_every_steps, c.early_stopping_patience, c.best_metric = 1, 2, 'accuracy'
  c.phases.top.num_steps = 4
  _scripted_accuracy(monkeypatch, [0.5, 0.75, 0.5, 0.25])
  summary = loop.train_and_evaluate(c, str(tmp_path))
  assert summary['stopped_early'] and summary['step'] == 4 and summary['best_step'] == 2
  assert summary['best']['accuracy'] == 0.75
  assert checkpoints.manager(str(tmp_path), checkpoints.BEST_DIR).all_steps() == [2]
  assert checkpoints.manager(str(tmp_path)).latest_step() == 4
  # Running it again finds it finished: no dataset build, no further training.
  monkeypatch.setattr(loop, '_Training', None)
  assert loop.train_and_evaluate(c, str(tmp_path)) == summary
  assert checkpoints.manager(str(tmp_path)).latest_step() == 4


def test_a_signal_saves_after_the_current_step_and_the_resume_matches(runs, tiny_config, tmp_path):
  """SIGINT (Ctrl-C) or SIGTERM mid-run: the step finishes, a checkpoint with the data iterator
  is saved (no periodic one is due), and resuming gives the uninterrupted run's state exactly."""
  straight = runs[0]
  config = _two_phase(tiny_config)
  config.checkpoint_every_steps = 0
  workdir = str(tmp_path / 'signalled')
  write = Monitor.write

  def write_then_signal(self, step, split, scalars):
    write(self, step, split, scalars)
    if (step, split) == (2, 'train'):
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Monitor, 'write', write_then_signal)
    with pytest.raises(interrupt.Stopped, match='stopped at step 2; run the same command') as e:
      loop.train_and_evaluate(config, workdir)
  assert e.value.signum == signal.SIGTERM
  assert checkpoints.manager(workdir).all_steps() == [2]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Handlers restored.
  loop.train_and_evaluate(config, workdir)
  _assert_same(_state(straight, 4), _state(workdir, 4))


def test_due_is_every_nth_step_and_never_for_zero():
  assert [s for s in range(1, 10) if loop.due(s, 3)] == [3, 6, 9]
  assert not any(loop.due(s, 0) for s in range(1, 10))


def test_best_so_far_counts_evaluations_since_the_best_and_recovers_them():
  """New bests reset the count early stopping reads; a resume recovers best, latest and count
  from the logged records."""
  scores = {2: 0.5, 4: 0.75, 6: 0.5, 8: 0.75}  # A tie is no improvement: the first best wins.
  best = loop._BestSoFar('accuracy')
  records = []
  for step, accuracy in scores.items():
    result = {k: 0.0 for k in loop.metrics.HIGHER_IS_BETTER} | {'accuracy': accuracy}
    assert best.add(step, result) == (step in (2, 4))
    records.append({'step': step, 'split': 'validation', **result})
  assert (best.step, best.value, best.evals_since, best.last['accuracy']) == (4, 0.75, 2, 0.75)
  again = loop._BestSoFar('accuracy')
  again.recover(4, [{'step': 1, 'split': 'train'}, *records])
  assert again == best
