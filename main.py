"""pneumo_jax entry point: `python main.py --config configs/demo.py --workdir runs/demo`.

Dispatches on --mode and nothing else; the config file is the only place knobs live.
"""

import logging as logging_lib

import jax
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from pneumo_jax import imagenet, sweep
from pneumo_jax.evaluation import modes
from pneumo_jax.training import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections get_config()).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and reports go.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'explain', 'imagenet'],
                  'train (or sweep, for a config with get_sweep()), eval, predict, explain, or '
                  'imagenet (top-5 ImageNet classes with config.init_checkpoint).')
flags.DEFINE_string('split', 'validation', 'eval: split to evaluate (train|validation|test).')
flags.DEFINE_string('checkpoint', 'latest', 'eval/predict/explain: latest, best or a step.')
flags.DEFINE_multi_string('inputs', [], 'predict/explain/imagenet: files, folders or globs.')
flags.DEFINE_bool('tta', False, 'predict: average with the left-right flipped image.')
flags.DEFINE_string('layer', 'Mixed_7c', 'explain: the layer Grad-CAM looks at.')
flags.DEFINE_integer('target_class', None, 'explain: class to explain (default: predicted).')
flags.DEFINE_bool('sweep', True, 'Run the sweep when the config file defines get_sweep().')
flags.DEFINE_integer('sweep_parallel', 1, 'Sweep trials run at once, as separate processes.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging_lib.Filter):
  """Drops the INFO chatter of orbax, grain and TFDS (every save logs a dozen lines)."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'tensorflow_datasets'))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; settings go in --config.<field>=…')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  tfds.disable_progress_bar()
  config, workdir = FLAGS.config, FLAGS.workdir
  path = config_flags.get_config_filename(FLAGS['config'])
  if FLAGS.mode == 'train' and FLAGS.sweep and sweep.is_sweep(path):
    # Trials run as separate processes; this one never touches the accelerator.
    sweep.run(config_file=path, workdir=workdir,
              overrides=config_flags.get_override_values(FLAGS['config']),
              parallel=FLAGS.sweep_parallel)
    return
  logging.info('JAX: %d process(es), local devices %s', jax.process_count(), jax.local_devices())
  if FLAGS.mode == 'train':
    loop.train_and_evaluate(config, workdir)
  elif FLAGS.mode == 'imagenet':
    imagenet.print_top_k(config, FLAGS.inputs)
  elif FLAGS.mode == 'eval':
    modes.run_eval(config, workdir, split=FLAGS.split, checkpoint=FLAGS.checkpoint)
  elif FLAGS.mode == 'predict':
    modes.run_predict(config, workdir, FLAGS.inputs, checkpoint=FLAGS.checkpoint, tta=FLAGS.tta)
  else:
    modes.run_explain(config, workdir, FLAGS.inputs, checkpoint=FLAGS.checkpoint,
                      layer=FLAGS.layer, target_class=FLAGS.target_class)


if __name__ == '__main__':
  app.run(main)
