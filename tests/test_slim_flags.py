"""docs/slim_flags.md accounts for every flag of slim's train_image_classifier.py, truthfully."""

import os
import re

from configs import default

# The flags of tensorflow/models research/slim/train_image_classifier.py, in its order.
_FLAG_WORDS = """
master train_dir num_clones clone_on_cpu worker_replicas num_ps_tasks num_readers
num_preprocessing_threads log_every_n_steps save_summaries_secs save_interval_secs task
weight_decay optimizer adadelta_rho adagrad_initial_accumulator_value adam_beta1 adam_beta2
opt_epsilon ftrl_learning_rate_power ftrl_initial_accumulator_value ftrl_l1 ftrl_l2 momentum
rmsprop_momentum rmsprop_decay quantize_delay learning_rate_decay_type learning_rate
end_learning_rate label_smoothing learning_rate_decay_factor num_epochs_per_decay sync_replicas
replicas_to_aggregate moving_average_decay dataset_name dataset_split_name dataset_dir
labels_offset model_name preprocessing_name batch_size train_image_size max_number_of_steps
use_grayscale checkpoint_path checkpoint_exclude_scopes trainable_scopes ignore_missing_vars
"""
SLIM_FLAGS = _FLAG_WORDS.split()

DOC = os.path.join(os.path.dirname(__file__), os.pardir, 'docs', 'slim_flags.md')


def _rows() -> dict[str, str]:
  with open(DOC) as f:
    rows = [line.split('|') for line in f if re.match(r'\| `', line)]
  return {r[1].strip().strip('`'): r[2].strip() for r in rows}


def test_every_slim_flag_is_listed_once():
  rows = _rows()
  assert sorted(rows) == sorted(SLIM_FLAGS)


def test_every_named_field_exists_with_slims_default():
  config = default.get_config()
  for flag, target in _rows().items():
    if not target.startswith('`') or target.startswith('`--'):
      continue
    node = config
    for part in target.strip('`').split('.'):
      assert part in node, f'{flag} → {target}: no such config field'
      node = node[part]


def test_optimizer_defaults_are_slims():
  o = default.get_config().optimizer
  assert (
    o.name,
    o.weight_decay,
    o.epsilon,
    o.momentum,
    o.rmsprop_momentum,
    o.rmsprop_decay,
    o.adadelta_rho,
    o.adagrad_initial_accumulator_value,
    o.adam_beta1,
    o.adam_beta2,
    o.ftrl_learning_rate_power,
    o.ftrl_initial_accumulator_value,
    o.ftrl_l1,
    o.ftrl_l2,
  ) == ('rmsprop', 4e-5, 1.0, 0.9, 0.9, 0.9, 0.95, 0.1, 0.9, 0.999, -0.5, 0.1, 0.0, 0.0)
