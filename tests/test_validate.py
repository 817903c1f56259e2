"""The whole config checked before any build or compile: one rule, one test, one named field."""

import pytest

from configs import default
from pneumo_jax import validate
from pneumo_jax.errors import ConfigError, DatasetError
from pneumo_jax.training import phases


def _config(**overrides):
  c = default.get_config()
  c.dataset.source_dir = '/data/anything'  # Not read: validation touches no file.
  c.update_from_flattened_dict(overrides)
  return c


def test_the_shipped_defaults_pass():
  validate.check(_config(), devices=1)


@pytest.mark.parametrize(
  'overrides, devices, message',
  [
    (
      {'model.name': 'resnet50'},
      None,
      r"model\.name='resnet50' is not a backbone; use one of "
      r"\['densenet121', 'inception_v3'\]",
    ),
    ({'input.image_size': 74}, None, r"input\.image_size=74 is below inception_v3's minimum 75"),
    (
      {'dataset.stored_size': 256},
      None,
      r'dataset\.stored_size=256 is below input\.image_size=299.*stored_size >= input\.image_size',
    ),
    ({'input.batch_size': 0}, None, r'input\.batch_size=0 must be at least 1'),
    ({'input.eval_batch_size': -2}, None, r'input\.eval_batch_size=-2 must be at least 1'),
    ({'input.batch_size': 6}, 4, r'input\.batch_size=6 must be a multiple of the 4 devices'),
    ({'input.central_crop_fraction': 1.5}, None, r'input\.central_crop_fraction=1\.5 must be'),
    ({'input.num_workers': -1}, None, r'input\.num_workers=-1'),
    ({'input.num_workers': 'many'}, None, r"input\.num_workers='many' must be 'auto'"),
    (
      {'dataset.full_resolution': True, 'dataset.stored_size': 400},
      None,
      r'dataset\.stored_size=400 has no effect with dataset\.full_resolution=True',
    ),
    ({'model.dtype': 'float64'}, None, r"model\.dtype='float64': use one of"),
    ({'best_metric': 'kapa'}, None, r"best_metric='kapa': use one of \['accuracy', 'auc_macro'"),
    ({'exclude_scopes': 'Logits,('}, None, r"invalid scope pattern '\('"),
    ({'class_weighting': 'inverse'}, None, r"class_weighting='inverse': use '' or 'balanced'"),
    (
      {'trainable_scopes': ''},
      None,
      r'trainable_scopes is empty: nothing would train; give '
      r"regexes such as 'Logits,AuxLogits'",
    ),
    ({'batch_norm': 'fixed'}, None, r"batch_norm='fixed' is unknown; use 'trainable'"),
    ({'schedule.name': 'cosine'}, None, r"schedule\.name='cosine' is unknown"),
    ({'optimizer.name': 'lamb'}, None, r"optimizer\.name='lamb' is unknown"),
    (
      {'dataset.labels_csv': '/data/labels.csv'},
      None,
      r"dataset\.source_dir='/data/anything' and dataset\.labels_csv='/data/labels\.csv' are "
      r'both set',
    ),
    ({'dataset.class_names': 'none'}, None, r"dataset\.class_names='none': give two or more"),
    ({'dataset.class_names': 'a,,b'}, None, r"dataset\.class_names='a,,b': give two or more"),
    ({'dataset.patient_pattern': '(p'}, None, r"dataset\.patient_pattern='\(p' is not a regular"),
  ],
)
def test_each_bad_field_is_named_with_what_it_accepts(overrides, devices, message):
  with pytest.raises(ConfigError, match=message):
    validate.check(_config(**overrides), devices=devices)


def test_phases_run_in_phase_order_not_in_the_sorted_order_of_their_names():
  c = _config()
  c.phases.warmup = dict(num_steps=10, trainable_scopes='Logits')
  c.phases.finetune = dict(num_steps=5, trainable_scopes='Mixed_7c,Logits')
  c.phase_order = 'warmup,finetune'
  resolved = phases.resolve_phases(c)
  assert [(p.name, p.start, p.end) for p in resolved] == [('warmup', 0, 10), ('finetune', 10, 15)]
  assert resolved[1].cfg.trainable_scopes == 'Mixed_7c,Logits'
  c.phases = {}
  with pytest.raises(ConfigError, match=r"phase_order='warmup,finetune' names phases, but"):
    phases.resolve_phases(c)


def test_phase_fields_are_checked_per_phase():
  c = _config()
  c.phases.head = dict(num_steps=10, trainable_scopes='Logits')
  c.phases.top = dict(num_steps=0, trainable_scopes='Mixed_7c')
  with pytest.raises(
    ConfigError, match=r'2 phases \(head, top\): set phase_order .* --config\.phase_order=head,top'
  ):
    validate.check(c)
  c.phase_order = 'head,tpo'
  with pytest.raises(
    ConfigError, match=r"phase_order='head,tpo' must name each of config\.phases \(head, top\)"
  ):
    validate.check(c)
  c.phase_order = 'head,top'
  with pytest.raises(ConfigError, match=r'phases\.top\.num_steps must be a positive'):
    validate.check(c)
  c.phases.top = dict(num_steps=5, learning_rate=0.1)
  with pytest.raises(ConfigError, match=r'phases\.top\.learning_rate is not a per-phase field'):
    validate.check(c)
  c.phases.top = dict(num_steps=5, batch_norm='sometimes')
  with pytest.raises(ConfigError, match=r"batch_norm='sometimes' is unknown"):
    validate.check(c)
  c.phases.top = dict(num_steps=5, schedule=dict(name='linear'))
  with pytest.raises(ConfigError, match=r"schedule\.name='linear' is unknown"):
    validate.check(c)


def test_split_settings_are_checked_before_any_build():
  with pytest.raises(DatasetError, match=r'dataset\.validation_fraction=1\.2'):
    validate.check(_config(**{'dataset.validation_fraction': 1.2}))


def test_default_scopes_are_the_backbones_head():
  """exclude_scopes and trainable_scopes follow model.name until set (phases inherit them)."""
  c = _config()
  assert (c.exclude_scopes, c.trainable_scopes) == ('Logits,AuxLogits',) * 2
  c.model.name = 'densenet121'
  assert (c.exclude_scopes, c.trainable_scopes) == ('classifier',) * 2
  assert phases.resolve_phases(c)[0].cfg.trainable_scopes == 'classifier'
  validate.check(c, devices=1)
  c.trainable_scopes = '.*'
  c.model.name = 'inception_v3'
  assert (c.exclude_scopes, c.trainable_scopes) == ('Logits,AuxLogits', '.*')
