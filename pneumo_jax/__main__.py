"""The command line: `pneumo-jax --config demo --workdir runs/demo` (the console command), or
`python -m pneumo_jax --config configs/demo.py --workdir runs/demo`.

`--config` takes a file, or the name of a bundled config (`demo`, `two_phase`, `sweeps/lr`; see
`configs.names()`), found wherever the package is installed. Checks the config, then dispatches
--mode through `pneumo_jax.modes.MODES` (each mode declares the flags it reads; the others are
refused); the config file is the only place knobs live, flags only say what to run on what. A
mistake the user can fix (a flag, a field, a path, a busy workdir) ends with its message and exit
status 2, not a traceback (`--verbose` shows it); Ctrl-C or SIGTERM during training saves a
checkpoint and exits with 128 + the signal number.
"""

import logging as logging_lib
import os
import re
import shutil
import sys
from types import ModuleType

import jax
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

import configs
import pneumo_jax
from pneumo_jax import distributed, validate
from pneumo_jax.data import preprocess
from pneumo_jax.errors import ConfigError, UserError
from pneumo_jax.modes import MODES, sweep, train
from pneumo_jax.training import interrupt

FLAGS = flags.FLAGS
# Read by the sweep path, which runs in place of --mode train for a config with get_sweep().
_SWEEP_FLAGS = ('sweep_parallel',)


def _readers(flag: str) -> list[str]:
  """The --mode values that read `flag`, as the modes declare it."""
  if flag in _SWEEP_FLAGS:
    return [train.NAME]
  return [name for name, mode in MODES.items() if flag in mode.FLAGS]


def _for_modes(flag: str, text: str) -> str:
  """`text` after the modes that read `flag`, so that --help stays true as modes come and go."""
  return f'{"/".join(_readers(flag))}: {text}'


config_flags.DEFINE_config_file(
  'config', None, 'Config file (ml_collections get_config()).', lock_config=True
)
flags.DEFINE_string(
  'workdir',
  None,
  'Where checkpoints, logs and reports go; --mode '
  f'{" and ".join(n for n, m in MODES.items() if not m.NEEDS_WORKDIR)} runs without one.',
)
flags.DEFINE_enum(
  'mode', train.NAME, list(MODES), '; '.join(f'{n}: {m.HELP}' for n, m in MODES.items()) + '.'
)
flags.DEFINE_string(
  'split',
  'validation',
  _for_modes(
    'split',
    'split to evaluate (train|validation|test), or all: every image of the source, for a '
    'labelled set training never saw (another dataset.source_dir or dataset.labels_csv).',
  ),
)
flags.DEFINE_string('checkpoint', 'latest', _for_modes('checkpoint', 'latest, best or a step.'))
flags.DEFINE_multi_string(
  'inputs',
  [],
  _for_modes(
    'inputs',
    'files, folders or globs; several may follow one --inputs (as a shell glob expands them).',
  ),
)
flags.DEFINE_bool('tta', False, _for_modes('tta', 'average with the left-right flipped image.'))
flags.DEFINE_string(
  'layer',
  None,
  _for_modes(
    'layer',
    "the layer Grad-CAM looks at (default: the backbone's last Grad-CAM layer, e.g. "
    "InceptionV3's Mixed_7c).",
  ),
)
flags.DEFINE_string(
  'target_class',
  None,
  _for_modes(
    'target_class',
    'class (or finding) to explain, by name or id (default: the predicted class; for findings, '
    'each one predicted present).',
  ),
)
flags.DEFINE_string(
  'export_dir',
  None,
  _for_modes('export_dir', 'where the export goes (default: WORKDIR/export), replaced whole.'),
)
flags.DEFINE_bool('sweep', True, 'Run the sweep when the config file defines get_sweep().')
flags.DEFINE_integer(
  'sweep_parallel', 1, _for_modes('sweep_parallel', 'sweep trials run at once, as processes.')
)
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
_MODE_FLAGS = (*dict.fromkeys(f for mode in MODES.values() for f in mode.FLAGS), *_SWEEP_FLAGS)

# Compiled XLA programs are kept here across runs (JAX_COMPILATION_CACHE_DIR overrides it): a
# second run on the same machine skips the compiles of initialisation and the train step.
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


def _bundled_config(argv: list[str]) -> list[str]:
  """`argv` with `--config NAME[:arg]` naming a bundled config replaced by that file's path
  (before ml_collections, which takes a path, parses it). A file that exists is taken as given,
  so `configs/demo.py` is the checkout's in the repository and the bundled one elsewhere."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == '--config' and i + 1 < len(out):
      i, prefix, value = i + 1, '', out[i + 1]
    elif arg.startswith('--config='):
      prefix, value = arg.partition('=')[::2]
      prefix += '='
    else:
      continue
    file, colon, rest = value.partition(':')
    if not os.path.isfile(file) and (bundled := configs.path(file)):
      out[i] = f'{prefix}{bundled}{colon}{rest}'
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  argv = _bundled_config(argv)
  try:
    return FLAGS(argv)
  except Exception as e:  # Any failure here is the command line's, not a bug.
    if '--verbose' in argv:
      raise
    print(f'error: {_flag_error(argv, e)}', file=sys.stderr)
    print('Pass --helpshort to see the flags.', file=sys.stderr)
    sys.exit(2)


def _check_flags(mode: ModuleType, positional: list[str]) -> list[str]:
  """The mode's inputs (--inputs, plus the paths a shell glob after it expanded into); refuses
  flags the mode does not read, and a missing --workdir where the mode needs one."""
  for name in _MODE_FLAGS:
    if FLAGS[name].present and mode.NAME not in (readers := _readers(name)):
      raise ConfigError(f'--{name} is for --mode {" or ".join(readers)}, not --mode {mode.NAME}')
  if positional and 'inputs' not in mode.FLAGS:
    raise ConfigError(f'unexpected arguments {positional}; settings go in --config.<field>=…')
  if not FLAGS.workdir and mode.NEEDS_WORKDIR:
    raise ConfigError(f'--mode {mode.NAME} needs --workdir (where the run keeps its checkpoints)')
  return [*FLAGS.inputs, *positional]


def _has_nvidia_gpu() -> bool:
  """Whether this machine has an NVIDIA driver loaded (its /proc entry, or nvidia-smi)."""
  return os.path.isdir('/proc/driver/nvidia') or shutil.which('nvidia-smi') is not None


def gpu_unused(backend: str, has_gpu: bool, platforms: str | None) -> str | None:
  """The warning for a machine with an NVIDIA GPU whose JAX runs on the CPU (PyPI's plain jax has
  no CUDA), unless JAX_PLATFORMS asked for the CPU; None otherwise."""
  if backend != 'cpu' or not has_gpu or (platforms or '').strip():
    return None
  return (
    'this machine has an NVIDIA GPU but JAX runs on the CPU (no CUDA support in this jax, or it '
    "failed to start: see JAX's warning above); install jax's CUDA build with "
    f"pip install 'pneumo_jax[cuda]' (jax[cuda12]=={jax.__version__}), or set JAX_PLATFORMS=cpu "
    'to mean it'
  )


def _run(mode: ModuleType, workdir: str | None, inputs: list[str], joined: bool) -> None:
  """Checks the config, then runs `mode` with the flags it reads (or, for --mode train with a
  sweep config, the sweep)."""
  path = config_flags.get_config_filename(FLAGS['config'])
  if not os.path.isfile(path):
    raise ConfigError(
      f'--config {path}: no such file, nor a bundled config; give a config file or one of '
      f'{", ".join(configs.names())}'
    )
  config = FLAGS.config
  validate.check(config)  # Devices are checked below, once JAX may claim them.
  if mismatch := preprocess.view_mismatch(config.input):
    logging.warning(mismatch)
  if mode is train and FLAGS.sweep and sweep.is_sweep(path):
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
  logging.info(
    'pneumo_jax %s, JAX %s on %s: %d process(es), local devices %s',
    pneumo_jax.__version__,
    jax.__version__,
    jax.default_backend(),
    jax.process_count(),
    jax.local_devices(),
  )
  if warning := gpu_unused(jax.default_backend(), _has_nvidia_gpu(), jax.config.jax_platforms):
    logging.warning(warning)
  validate.check_devices(config, jax.device_count())
  given = {name: inputs if name == 'inputs' else FLAGS[name].value for name in mode.FLAGS}
  mode.run(config, workdir, **given)


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
    mode = MODES[FLAGS.mode]
    _run(mode, FLAGS.workdir, _check_flags(mode, argv[1:]), joined)
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
