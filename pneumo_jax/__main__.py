"""The command line: `python -m pneumo_jax --config configs/demo.py --workdir runs/demo`.

Checks the config, then dispatches on --mode to `pneumo_jax.modes`; the config file is the only
place knobs live, flags only say what to run on what. A mistake
the user can fix (a flag, a field, a path, a busy workdir) ends with its message and exit status
2, not a traceback (`--verbose` shows it); Ctrl-C or SIGTERM during training saves a checkpoint
and exits with 128 + the signal number.
"""

import logging as logging_lib
import os
import re
import sys
import tempfile

import jax
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from pneumo_jax import distributed, validate
from pneumo_jax.data import preprocess
from pneumo_jax.errors import ConfigError, UserError
from pneumo_jax.modes import evaluate, explain, export, imagenet, predict, sweep, train
from pneumo_jax.training import interrupt

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Config file (ml_collections get_config()).', lock_config=True
)
flags.DEFINE_string(
  'workdir',
  None,
  'Where checkpoints, logs and reports go (all modes but '
  'imagenet, where it only caches converted weights).',
)
flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'eval', 'predict', 'explain', 'export', 'imagenet'],
  'train (or sweep, for a config with get_sweep()), eval, predict, explain, export (a '
  'jax.export artefact and a TensorFlow SavedModel, see docs/serving.md), or '
  'imagenet (top-5 ImageNet classes with config.init_checkpoint).',
)
flags.DEFINE_string('split', 'validation', 'eval: split to evaluate (train|validation|test).')
flags.DEFINE_string('checkpoint', 'latest', 'eval/predict/explain/export: latest, best or a step.')
flags.DEFINE_multi_string(
  'inputs',
  [],
  'predict/explain/imagenet: files, folders or globs; '
  'several may follow one --inputs (as a shell glob expands them).',
)
flags.DEFINE_bool('tta', False, 'predict: average with the left-right flipped image.')
flags.DEFINE_string(
  'layer',
  None,
  'explain: the layer Grad-CAM looks at (default: the '
  "backbone's last Grad-CAM layer, e.g. InceptionV3's Mixed_7c).",
)
flags.DEFINE_integer('target_class', None, 'explain: class to explain (default: predicted).')
flags.DEFINE_string(
  'export_dir', None, 'export: where the export goes (default: WORKDIR/export), replaced whole.'
)
flags.DEFINE_bool('sweep', True, 'Run the sweep when the config file defines get_sweep().')
flags.DEFINE_integer('sweep_parallel', 1, 'Sweep trials run at once, as separate processes.')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'Multi-process runs (docs/multihost.md): host:port of process 0, the same on every process.',
)
flags.DEFINE_integer('num_processes', None, 'Multi-process runs: how many processes take part.')
flags.DEFINE_integer('process_id', None, "Multi-process runs: this process's id, 0 … N-1.")
flags.DEFINE_bool('verbose', False, "Show tracebacks for user errors, and libraries' info logs.")
flags.mark_flags_as_required(['config'])

# The flags that only some modes read (the others refuse them rather than ignore them silently;
# --nosweep is accepted everywhere, as a sweep's trial programs pass it).
_MODE_FLAGS = {
  'split': ('eval',),
  'checkpoint': ('eval', 'predict', 'explain', 'export'),
  'inputs': ('predict', 'explain', 'imagenet'),
  'tta': ('predict',),
  'layer': ('explain',),
  'target_class': ('explain',),
  'export_dir': ('export',),
  'sweep_parallel': ('train',),
}

# Compiled XLA programs are kept here across runs (JAX_COMPILATION_CACHE_DIR overrides it): a
# second run on the same machine skips the ~20 s compiles of initialisation and the train step.
_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'pneumo_jax', 'xla')
_CACHE_MAX_BYTES = 2 << 30  # Least recently used programs are evicted past this size.


class _QuietLibraries(logging_lib.Filter):
  """Drops the INFO chatter of JAX, orbax, grain, TFDS (every save logs a dozen lines) and
  TensorFlow (an export's SavedModel writer)."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or not any(
      f'/{lib}/' in record.pathname
      for lib in ('jax', 'orbax', 'grain', 'tensorflow_datasets', 'tensorflow')
    )


def _flag_error(argv: list[str], e: Exception) -> str:
  """One readable line for a command line that does not parse (config_flags raises from deep
  inside, with chained tracebacks, for a field the config does not have)."""
  text = str(e).replace('\\n', ' ').replace("\\'", "'")
  if isinstance(e, KeyError | AttributeError):
    text = text[1:-1] if text[:1] in '"\'' else text
    key = re.match(r"'?(\w+)", text)
    overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    arg = next(
      (a for a in overrides if key and re.search(rf'\.{key[1]}(\.|$)', a)),
      overrides[-1] if overrides else '--config',
    )
    parts = arg.removeprefix('--config.').split('.')
    if key and key[1] in parts:
      parts = parts[: parts.index(key[1]) + 1]  # The path down to the field that is missing.
    guess = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    hint = f'; did you mean {".".join([*parts[:-1], guess[1]])!r}?' if guess else ''
    return (
      f'{arg}: the config has no field {".".join(parts)!r}{hint} (configs/default.py '
      'documents every field; config.phases has only the phases the config defines)'
    )
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


def _check_flags(positional: list[str]) -> list[str]:
  """The mode's inputs (--inputs, plus the paths a shell glob after it expanded into); refuses
  flags the mode does not read, and a missing --workdir where the mode needs one."""
  mode = FLAGS.mode
  for name, modes in _MODE_FLAGS.items():
    if FLAGS[name].present and mode not in modes:
      raise ConfigError(f'--{name} is for --mode {" or ".join(modes)}, not --mode {mode}')
  if positional and mode not in _MODE_FLAGS['inputs']:
    raise ConfigError(f'unexpected arguments {positional}; settings go in --config.<field>=…')
  if not FLAGS.workdir and mode != 'imagenet':
    raise ConfigError(f'--mode {mode} needs --workdir (where the run keeps its checkpoints)')
  return [*FLAGS.inputs, *positional]


def _run(workdir: str, inputs: list[str], joined: bool) -> None:
  path = config_flags.get_config_filename(FLAGS['config'])
  if not os.path.isfile(path):
    raise ConfigError(
      f'--config {path}: no such file; give a config file such as '
      'configs/demo.py or configs/two_phase.py'
    )
  config = FLAGS.config
  validate.check(config)  # Devices are checked below, once JAX may claim them.
  if mismatch := preprocess.view_mismatch(config.input):
    logging.warning(mismatch)
  if FLAGS.mode == 'train' and FLAGS.sweep and sweep.is_sweep(path):
    # Trials run as separate processes, and this one never touches the accelerator; but the
    # processes of a multi-process run go through the trials together, inside themselves.
    sweep.run(
      config_file=path,
      workdir=workdir,
      overrides=config_flags.get_override_values(FLAGS['config']),
      parallel=FLAGS.sweep_parallel,
      in_process=joined,
    )
    return
  logging.info('JAX: %d process(es), local devices %s', jax.process_count(), jax.local_devices())
  validate.check_devices(config, jax.device_count())
  if FLAGS.mode == 'train':
    train.run(config, workdir)
  elif FLAGS.mode == 'imagenet':
    with tempfile.TemporaryDirectory() as scratch:  # Converted weights, when no workdir keeps them.
      imagenet.print_top_k(config, inputs, workdir or scratch)
  elif FLAGS.mode == 'eval':
    evaluate.run(config, workdir, split=FLAGS.split, checkpoint=FLAGS.checkpoint)
  elif FLAGS.mode == 'predict':
    predict.run(config, workdir, inputs, checkpoint=FLAGS.checkpoint, tta=FLAGS.tta)
  elif FLAGS.mode == 'export':
    if jax.process_index() == 0:  # One writer; the export runs on one device.
      export.run(config, workdir, checkpoint=FLAGS.checkpoint, export_dir=FLAGS.export_dir)
  else:
    explain.run(
      config,
      workdir,
      inputs,
      checkpoint=FLAGS.checkpoint,
      layer=FLAGS.layer,
      target_class=FLAGS.target_class,
    )


def main(argv: list[str]) -> None:
  if not FLAGS.verbose:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  tfds.disable_progress_bar()
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR)
  jax.config.update('jax_compilation_cache_max_size', _CACHE_MAX_BYTES)
  try:
    joined = distributed.initialize(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    _run(FLAGS.workdir, _check_flags(argv[1:]), joined)
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


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
