"""pneumo_jax entry point: `python main.py --config configs/demo.py --workdir runs/demo`.

Dispatches on --mode and nothing else; the config file is the only place knobs live. A mistake
the user can fix (a flag, a field, a path, a busy workdir) ends with its message and exit status
2, not a traceback (`--verbose` shows it); Ctrl-C or SIGTERM during training saves a checkpoint
and exits with 128 + the signal number.
"""

import logging as logging_lib
import os
import re
import sys

import jax
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from pneumo_jax import imagenet, sweep
from pneumo_jax.errors import ConfigError, UserError
from pneumo_jax.evaluation import modes
from pneumo_jax.training import interrupt, loop

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
flags.DEFINE_bool('verbose', False, 'Show tracebacks for user errors, and libraries\' info logs.')
flags.mark_flags_as_required(['config', 'workdir'])

# Compiled XLA programs are kept here across runs (JAX_COMPILATION_CACHE_DIR overrides it): a
# second run on the same machine skips the ~20 s compiles of initialisation and the train step.
_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'pneumo_jax', 'xla')
_CACHE_MAX_BYTES = 2 << 30  # Least recently used programs are evicted past this size.


class _QuietLibraries(logging_lib.Filter):
  """Drops the INFO chatter of JAX, orbax, grain and TFDS (every save logs a dozen lines)."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('jax', 'orbax', 'grain', 'tensorflow_datasets'))


def _flag_error(argv: list[str], e: Exception) -> str:
  """One readable line for a command line that does not parse (config_flags raises from deep
  inside, with chained tracebacks, for a field the config does not have)."""
  text = str(e).replace('\\n', ' ').replace("\\'", "'")
  if isinstance(e, KeyError | AttributeError):
    text = text[1:-1] if text[:1] in '"\'' else text
    key = re.match(r"'?(\w+)", text)
    overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    arg = next((a for a in overrides if key and re.search(rf'\.{key[1]}(\.|$)', a)),
               overrides[-1] if overrides else '--config')
    parts = arg.removeprefix('--config.').split('.')
    if key and key[1] in parts:
      parts = parts[:parts.index(key[1]) + 1]  # The path down to the field that is missing.
    guess = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    hint = f'; did you mean {".".join([*parts[:-1], guess[1]])!r}?' if guess else ''
    return (f'{arg}: the config has no field {".".join(parts)!r}{hint} (configs/default.py '
            'documents every field; config.phases has only the phases the config defines)')
  return text


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except Exception as e:  # Any failure here is the command line's, not a bug.
    if '--verbose' in argv:
      raise
    print(f'error: {_flag_error(argv, e)}', file=sys.stderr)
    print('Pass --helpshort to see the flags.', file=sys.stderr)
    sys.exit(2)


def _closing_line(summary: dict, workdir: str) -> str:
  """Where a finished run's results are, and what to run next."""
  metric, best = summary['metric'], summary['best'].get(summary['metric'])
  best = (f'best {metric} {best:.4g} at step {summary["best_step"]} ({workdir}/best)'
          if best is not None else 'no validation result')
  return (f'Done: {summary["step"]} steps, {best}; curves in {workdir}/curves.png, metrics in '
          f'{workdir}/metrics.jsonl. Next: the same command with --mode eval --checkpoint best.')


def _run(workdir: str) -> None:
  path = config_flags.get_config_filename(FLAGS['config'])
  if not os.path.isfile(path):
    raise ConfigError(f'--config {path}: no such file; give a config file such as '
                      'configs/demo.py or configs/two_phase.py')
  config = FLAGS.config
  if FLAGS.mode == 'train' and FLAGS.sweep and sweep.is_sweep(path):
    # Trials run as separate processes; this one never touches the accelerator.
    sweep.run(config_file=path, workdir=workdir,
              overrides=config_flags.get_override_values(FLAGS['config']),
              parallel=FLAGS.sweep_parallel)
    return
  logging.info('JAX: %d process(es), local devices %s', jax.process_count(), jax.local_devices())
  if FLAGS.mode == 'train':
    print(_closing_line(loop.train_and_evaluate(config, workdir), workdir))
  elif FLAGS.mode == 'imagenet':
    imagenet.print_top_k(config, FLAGS.inputs)
  elif FLAGS.mode == 'eval':
    modes.run_eval(config, workdir, split=FLAGS.split, checkpoint=FLAGS.checkpoint)
  elif FLAGS.mode == 'predict':
    modes.run_predict(config, workdir, FLAGS.inputs, checkpoint=FLAGS.checkpoint, tta=FLAGS.tta)
  else:
    modes.run_explain(config, workdir, FLAGS.inputs, checkpoint=FLAGS.checkpoint,
                      layer=FLAGS.layer, target_class=FLAGS.target_class)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; settings go in --config.<field>=…')
  if not FLAGS.verbose:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  tfds.disable_progress_bar()
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR)
  jax.config.update('jax_compilation_cache_max_size', _CACHE_MAX_BYTES)
  try:
    _run(FLAGS.workdir)
  except interrupt.Stopped as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  except UserError as e:
    if FLAGS.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('Interrupted; run the same command to resume.', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
