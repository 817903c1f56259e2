"""pneumo_jax entry point: `python main.py --config configs/demo.py --workdir runs/demo`.

Dispatches on --mode and nothing else; the config file is the only place knobs live.
"""

import importlib.util

import jax
from absl import app, flags, logging
from ml_collections import config_flags

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


def _config_module():
  path = config_flags.get_config_filename(FLAGS['config'])
  spec = importlib.util.spec_from_file_location('_pneumo_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; settings go in --config.<field>=…')
  config, workdir = FLAGS.config, FLAGS.workdir
  logging.info('JAX: %d process(es), local devices %s', jax.process_count(), jax.local_devices())
  if FLAGS.mode == 'train':
    path, module = _config_module()
    if FLAGS.sweep and hasattr(module, 'get_sweep'):
      from pneumo_jax import sweep
      sweep.run(config_file=path, workdir=workdir,
                overrides=config_flags.get_override_values(FLAGS['config']),
                parallel=FLAGS.sweep_parallel)
    else:
      from pneumo_jax.training import loop
      loop.train_and_evaluate(config, workdir)
  elif FLAGS.mode == 'imagenet':
    from pneumo_jax import imagenet
    imagenet.print_top_k(config, FLAGS.inputs)
  else:
    from pneumo_jax.evaluation import modes
    if FLAGS.mode == 'eval':
      modes.run_eval(config, workdir, split=FLAGS.split, checkpoint=FLAGS.checkpoint)
    elif FLAGS.mode == 'predict':
      modes.run_predict(config, workdir, FLAGS.inputs, checkpoint=FLAGS.checkpoint, tta=FLAGS.tta)
    else:
      modes.run_explain(config, workdir, FLAGS.inputs, checkpoint=FLAGS.checkpoint,
                        layer=FLAGS.layer, target_class=FLAGS.target_class)


if __name__ == '__main__':
  app.run(main)
