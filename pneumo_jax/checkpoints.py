"""Orbax checkpoints: a run's state and data iterator, initialisation from pretrained weights.

Layout under WORKDIR: `base/` (the leaves no phase changes, written once, with the sha256 of
their content), `checkpoints/<step>/{state,data,base_ref}` (the last `keep_checkpoints`),
`best/<step>/{state,base_ref}` and `damaged/<subdir>/<step>/` (steps that failed to restore,
moved there by training, never deleted). `state` holds what can change (step, optimizer state,
trainable params, batch statistics, EMA), keyed by scope names; `data` the grain iterator's
position; `base_ref` the base's hash and the paths taken from it, checked on every restore. So a
head-only checkpoint is the head and its optimizer state, and the workdir is self-sufficient:
copy it and predict works. Checkpoints written before base/ existed hold everything and load.
A step whose files cannot be read back raises DamagedCheckpointError: one line with the step,
its folder and the likely cause (truncated, corrupted, missing).
"""

import asyncio
import contextlib
import glob
import hashlib
import json
import logging as logging_lib
import os
import re
import shutil
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from pneumo_jax import distributed, errors, scopes
from pneumo_jax.models import weights
from pneumo_jax.models.backbone import Backbone

LATEST_DIR = 'checkpoints'
BEST_DIR = 'best'
BASE_DIR = 'base'
BASE_REF = 'base_ref'  # The JSON item naming the base a checkpoint was saved against.
DAMAGED_DIR = 'damaged'  # WORKDIR/damaged/<subdir>/<step>: steps that failed to restore, kept.
LABELS_FILE = 'labels.txt'  # The class names, one a line, in output order.
CONFIG_FILE = 'config.json'  # The run's resolved config, as training wrote it.
# Entry of a saved state → the base collection its frozen leaves come from.
_FROM_BASE = {'params': 'params', 'ema_params': 'params', 'batch_stats': 'batch_stats'}


class BaseMismatchError(errors.WeightsError):
  """WORKDIR/base is not what a checkpoint was saved against: replaced, edited or unreadable."""


class DamagedCheckpointError(errors.WeightsError):
  """A checkpoint step's files cannot be read back: truncated, corrupted or missing."""


class Base(NamedTuple):
  """What a run's checkpoints leave out: the paths, per collection, of leaves kept in
  WORKDIR/base, and the content hash of that base."""

  sha256: str
  paths: dict[str, frozenset[str]]  # 'params' / 'batch_stats' → paths.

  def within(self, frozen: Mapping[str, Collection[str]]) -> 'Base':
    """Only the paths also in `frozen`: a run resumed with a config that trains more of the model
    saves those leaves in full again (base/ itself stays as written)."""
    return self._replace(paths={c: p & frozenset(frozen.get(c, ())) for c, p in self.paths.items()})


def save_label_names(workdir: str, names: list[str]) -> None:
  """Keeps the class names with the run, so predict/explain need only the workdir."""
  with open(os.path.join(workdir, LABELS_FILE), 'w') as f:
    f.write(''.join(f'{n}\n' for n in names))


def load_label_names(workdir: str) -> list[str] | None:
  path = os.path.join(workdir, LABELS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().splitlines()


def load_recorded_config(workdir: str) -> dict[str, Any] | None:
  """WORKDIR/config.json as training wrote it; None when absent or unreadable (a workdir made
  before it was written, or copied without it)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    return None
  return recorded if isinstance(recorded, dict) else None


def manager(
  workdir: str, subdir: str = LATEST_DIR, keep: int = 3, *, cleanup: bool = False
) -> ocp.CheckpointManager:
  """A manager that writes WORKDIR/subdir (creating it).

  Args:
    cleanup: delete the `<step>.orbax-checkpoint-tmp` directories of saves a killed run left
      (orbax does it in the background, finished before the first save and before the process
      exits). Only for the training run, the workdir's one writer: for anyone else such a
      directory may be a live run's save in progress.
  """
  directory = os.path.abspath(os.path.join(workdir, subdir))
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      cleanup_tmp_directories=cleanup,
      # In a multi-process run orbax names its barriers after the step ('async_write_complete.2'):
      # the latest and the best checkpoint of one step, or the trials of a sweep, would meet at
      # the same barrier at once and fail. A prefix per directory keeps them apart.
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        barrier_sync_key_prefix=hashlib.sha256(directory.encode()).hexdigest()[:12]
      ),
    ),
  )


def content_hash(tree: Mapping[str, Any]) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes, in sorted path order."""
  h = hashlib.sha256()
  for path, leaf in sorted(scopes.flatten(tree).items()):
    a = np.asarray(leaf)
    h.update(f'{path}\0{a.dtype.str}\0{a.shape}\0'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def write_base(
  workdir: str, state: Mapping[str, Any], frozen: Mapping[str, Collection[str]]
) -> Base | None:
  """Writes the `frozen` leaves of `state` ({collection: paths}) to WORKDIR/base; returns the Base
  the run's checkpoints then refer to, or None when nothing is frozen (they store everything).

  Always written anew (a second or so), so nothing an earlier run left in this workdir
  can leak in. Called by the training run only, before any save.
  """
  if jax.process_index() == 0:
    for tmp in glob.glob(os.path.join(workdir, BASE_DIR + ocp.utils.TMP_DIR_SUFFIX + '*')):
      shutil.rmtree(tmp)  # What a run killed while writing its base left.
  if not any(frozen.values()):
    return None
  tree = {
    c: scopes.unflatten(
      {k: np.asarray(v) for k, v in scopes.flatten(state[c]).items() if k in frozen[c]}
    )
    for c in frozen
  }
  digest = content_hash(tree)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(
      os.path.abspath(os.path.join(workdir, BASE_DIR)),
      tree,
      force=True,
      custom_metadata={'sha256': digest},
    )
  return Base(digest, {c: frozenset(p) for c, p in frozen.items()})


def _paths(ref: Mapping[str, Any] | None) -> dict[str, frozenset[str]]:
  return {c: frozenset(p) for c, p in (ref or {}).get('paths', {}).items()}


def _drop(state: Mapping[str, Any], paths: Mapping[str, Collection[str]]) -> dict[str, Any]:
  """`state` without the leaves taken from the base."""
  out = dict(state)
  for entry, collection in _FROM_BASE.items():
    if entry in out and paths.get(collection):
      out[entry] = scopes.unflatten(
        {k: v for k, v in scopes.flatten(out[entry]).items() if k not in paths[collection]}
      )
  return out


def _merge(
  stored: Mapping[str, Any],
  base: Mapping[str, Mapping[str, Any]],
  paths: Mapping[str, Collection[str]],
  place: Callable[[str, str, Any], Any],
) -> dict[str, Any]:
  """`stored` with the base leaves put back, each through place(entry, path, array)."""
  out = dict(stored)
  for entry, collection in _FROM_BASE.items():
    if entry in out and paths.get(collection):
      out[entry] = scopes.unflatten(
        {
          **scopes.flatten(out[entry]),
          **{k: place(entry, k, base[collection][k]) for k in sorted(paths[collection])},
        }
      )
  return out


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: dict[str, Any],
  data_iterator: Any = None,
  base: Base | None = None,
) -> None:
  """Saves `state` as checkpoint `step`, less the leaves kept in `base` (the checkpoint records
  which, and the base's hash), with the grain iterator's position when given."""
  paths = base.paths if base else {}
  items = {
    'state': ocp.args.StandardSave(_drop(state, paths)),
    BASE_REF: ocp.args.JsonSave(
      {'sha256': base and base.sha256, 'paths': {c: sorted(p) for c, p in paths.items()}}
    ),
  }
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  mngr.save(step, args=ocp.args.Composite(**items))


def _read_ref(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The checkpoint's base_ref, None for one written before base/ existed (full state)."""
  if not (epath.Path(mngr.directory) / str(step) / BASE_REF).exists():
    return None
  return mngr.restore(step, args=ocp.args.Composite(**{BASE_REF: ocp.args.JsonRestore()}))[BASE_REF]


def _short(digest: str | None) -> str:
  return f'{digest[:12]}…' if digest else 'none'


# What tensorstore and orbax say when a checkpoint's files are damaged, by the likely cause.
_DAMAGE = (
  ('truncated', ('OUT_OF_RANGE', 'Truncated', 'not valid for value of size', 'Unexpected end')),
  ('missing', ('NOT_FOUND', 'does not exist')),
  ('corrupted', ('DATA_LOSS', 'Invalid JSON', 'Error decoding', 'decompress', 'Error reading')),
)


def _damage(e: BaseException) -> str | None:
  """'a file in it is truncated (…)' (or corrupted, or missing) when `e`, raised reading a
  checkpoint, says that its files are damaged; None for any other failure (a bug, a target of
  another structure), which is not taken for damage."""
  chain = [e]
  while chain[-1].__cause__ is not None and len(chain) < 10:
    chain.append(chain[-1].__cause__)
  if any(isinstance(x, json.JSONDecodeError | UnicodeDecodeError) for x in chain):
    cause = 'corrupted'
  elif any(isinstance(x, FileNotFoundError) for x in chain):
    cause = 'missing'
  else:
    text = ' '.join(map(str, chain))
    cause = next((c for c, marks in _DAMAGE if any(m in text for m in marks)), None)
  if cause is None:
    return None
  text = str(chain[-1]).split(' [tensorstore_spec=', 1)[0]
  status = re.match(r'[A-Z_]+: ', text)  # tensorstore's: OUT_OF_RANGE, DATA_LOSS, …
  if status and '": ' in text:  # After the paths it read ('at local file "…": '), what failed.
    text = status[0] + text.rsplit('": ', 1)[1]
  elif not status:
    text = f'{type(chain[-1]).__name__}: {text}'
  detail = ' '.join(text.split())  # One line.
  return f'a file in it is {cause} ({detail[:200]}{"…" if len(detail) > 200 else ""})'


class _DamageReports(logging_lib.Filter):
  """Drops asyncio's 'Task exception was never retrieved' for reads of damaged files: when one
  array of a restore fails, the failures of the others are never collected, and asyncio logs
  each with its traceback when the task is freed."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return not (record.exc_info and _abandoned_read(record.exc_info[1]))


def _quiet_abandoned_reads() -> None:
  """Once a restore fails, its other reads still report, each with a traceback, hundreds of lines
  after the one that matters: asyncio logs their uncollected failures (_DamageReports), and
  tensorstore completes them into the event loop orbax has closed, and coroutines freed with
  their read failed reach sys.unraisablehook. Those reports (`_abandoned_read`), and only those,
  are dropped."""
  asyncio_log = logging_lib.getLogger('asyncio')
  if not any(isinstance(f, _DamageReports) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DamageReports())
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_reports', False):
    return

  def hook(unraisable: Any) -> None:
    if not _abandoned_read(unraisable.exc_value):
      previous(unraisable)

  hook.drops_closed_loop_reports = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _abandoned_read(error: BaseException | None) -> bool:
  """Whether `error` reports a read a failed restore left behind: the closed event loop itself,
  or orbax's wrapper of a read that failed on damage, was cancelled, met the closed loop or was
  freed unfinished (closing a coroutine raises GeneratorExit in it, which orbax wraps)."""
  chain = [error]
  while chain[-1] is not None and len(chain) < 10:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return _damage(error) is not None or any(
    isinstance(x, asyncio.CancelledError | GeneratorExit)
    or (isinstance(x, RuntimeError) and str(x) == 'Event loop is closed')
    for x in chain
  )


@contextlib.contextmanager
def _naming_damage(error: Callable[[str], errors.UserError]) -> Iterator[None]:
  """A read inside the block that fails on damaged files raises error(cause) from it, one line;
  any other failure (a user error, a bug) propagates as it is."""
  _quiet_abandoned_reads()
  try:
    yield
  except errors.UserError:
    raise
  except Exception as e:
    cause = _damage(e)
    if cause is None:
      raise
    raise error(cause) from e


def _step_damage(mngr: ocp.CheckpointManager, step: int) -> contextlib.AbstractContextManager:
  path = epath.Path(mngr.directory) / str(step)
  return _naming_damage(
    lambda cause: DamagedCheckpointError(f'checkpoint {step} ({path}) cannot be restored: {cause}')
  )


def _load_base(workdir: str, ref: Mapping[str, Any], what: str) -> dict[str, dict[str, Any]]:
  """WORKDIR/base as {collection: {path: array}}, once it is shown to be the base `ref` names.

  Two checks: the hash base/ recorded when written is the checkpoint's (else base/ belongs to
  another run), and its arrays still hash to it (else they were changed since).
  """
  path = os.path.abspath(os.path.join(workdir, BASE_DIR))
  want = ref['sha256']
  count = sum(len(p) for p in ref['paths'].values())
  if not os.path.isdir(path):
    raise errors.NotFoundError(
      f'{what} keeps its {count} frozen arrays in {path}, which is missing; copy the whole '
      f'workdir {workdir} (base/ included), or train again'
    )
  damaged = _naming_damage(
    lambda cause: BaseMismatchError(
      f'{path} cannot be restored: {cause}; restore {workdir} from a copy, or train again in a '
      'new --workdir'
    )
  )
  with damaged, ocp.StandardCheckpointer() as ckptr:
    # The handler raises on an unreadable _METADATA, where the checkpointer only logs a warning.
    item = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
    recorded = (ckptr.metadata(path).custom_metadata or {}).get('sha256')
    if recorded != want:
      raise BaseMismatchError(
        f'{path} holds other frozen weights (sha256 {_short(recorded)}) than {what} was saved '
        f'against ({_short(want)}): base/ was replaced, perhaps copied from another run; put '
        f'back the base/ that came with {workdir}, or train again'
      )
    tree = ckptr.restore(path, jax.tree.map(lambda m: np.empty(m.shape, m.dtype), item.tree))
  got = content_hash(tree)
  if got != want:
    raise BaseMismatchError(
      f'{path} was modified after its run wrote it: its arrays hash to {_short(got)}, not '
      f'{_short(want)} as recorded; restore {workdir} from a copy, or train again'
    )
  return {c: scopes.flatten(tree.get(c, {})) for c in ref['paths']}


def restore(
  mngr: ocp.CheckpointManager, step: int, target: dict[str, Any], data_iterator: Any = None
) -> tuple[dict[str, Any], Base | None]:
  """Restores checkpoint `step`, base leaves merged back, into the shapes and shardings of
  `target`, and rewinds the iterator. Also returns the base it was saved against (None: it holds
  everything), which the resumed run's saves share. WORKDIR is the manager's parent.

  Raises:
    DamagedCheckpointError: the step's files cannot be read back (`set_aside` moves it away).
    BaseMismatchError: WORKDIR/base is not the one the step was saved against, or is damaged.
  """
  with _step_damage(mngr, step):
    ref = _read_ref(mngr, step)
    paths = _paths(ref)
    items = {
      'state': ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, _drop(target, paths))
      )
    }
    if data_iterator is not None:
      check_process_count(mngr, step)
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    stored = mngr.restore(step, args=ocp.args.Composite(**items))['state']
  if not any(paths.values()):
    return stored, None
  workdir = os.path.dirname(str(mngr.directory))
  base = _load_base(workdir, ref, f'checkpoint {step} in {mngr.directory}')
  flat_target = {e: scopes.flatten(target[e]) for e in _FROM_BASE if e in target}
  # Each process places its own (identical) copy: device_put would first check, with a collective
  # per array, that every process holds the same values.
  place = lambda entry, path, a: jax.make_array_from_callback(
    a.shape, flat_target[entry][path].sharding, lambda index: a[index]
  )
  return _merge(stored, base, paths, place), Base(ref['sha256'], paths)


def set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves damaged checkpoint `step` out of the manager's folder, to
  WORKDIR/damaged/<subdir>/<step> (<step>_2, … when taken), where no manager lists it, for
  inspection; returns where. Process 0 moves it; the others wait until it has."""
  workdir, subdir = os.path.split(str(mngr.directory))
  folder = os.path.join(workdir, DAMAGED_DIR, subdir)
  moved, n = os.path.join(folder, str(step)), 1
  while os.path.exists(moved):
    n += 1
    moved = os.path.join(folder, f'{step}_{n}')
  if jax.process_index() == 0:
    os.makedirs(folder, exist_ok=True)
    os.rename(os.path.join(str(mngr.directory), str(step)), moved)
  moved = distributed.share_text(moved)  # A collective: process 0 has moved it when it returns.
  mngr.reload()
  return moved


def check_process_count(mngr: ocp.CheckpointManager, step: int) -> None:
  """Refuses to resume with another number of processes than saved checkpoint `step`: each saved
  its own data iterator's position (grain's data/process_<i>-of-<n>.json), and a different
  count would read other slices of the stream."""
  saved = {
    int(m[1])
    for p in (epath.Path(mngr.directory) / str(step) / 'data').glob('process_*-of-*.json')
    if (m := re.fullmatch(r'process_\d+-of-(\d+)\.json', p.name))
  }
  if saved and saved != {jax.process_count()}:
    raise errors.ConfigError(
      f'checkpoint {step} in {mngr.directory} was written by a run of {min(saved)} process(es); '
      f'this one has {jax.process_count()}. Training resumes only with the same number (each '
      'process saved its own place in the data stream): relaunch with that many, or start a '
      'new --workdir. --mode eval, predict, explain and export read only the weights and work '
      'with any number of processes'
    )


def _reader(workdir: str, subdir: str) -> ocp.CheckpointManager | None:
  """A manager that only reads WORKDIR/subdir; None (nothing created) when it does not exist."""
  path = os.path.abspath(os.path.join(workdir, subdir))
  if not os.path.isdir(path):
    return None
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))


def _find(workdir: str, checkpoint: str) -> tuple[str, int] | None:
  """(subdir, step) of 'latest', 'best' or a step number (in checkpoints/, else best/)."""
  if checkpoint in ('latest', 'best'):
    subdirs, step = [BEST_DIR if checkpoint == 'best' else LATEST_DIR], None
  elif checkpoint.isdigit():
    subdirs, step = [LATEST_DIR, BEST_DIR], int(checkpoint)
  else:
    raise errors.ConfigError(f'--checkpoint={checkpoint!r}: use latest, best or a step number')
  for subdir in subdirs:
    mngr = _reader(workdir, subdir)
    if mngr is None:
      continue
    with mngr:
      steps = mngr.all_steps()
    if steps and step is None:
      return subdir, max(steps)
    if step in steps:
      return subdir, step
  return None


def _listing(workdir: str) -> str:
  parts = []
  for subdir in (LATEST_DIR, BEST_DIR):
    mngr = _reader(workdir, subdir)
    steps = []
    if mngr is not None:
      with mngr:
        steps = mngr.all_steps()
    parts.append(f'{subdir}/: {", ".join(map(str, steps)) or "none"}')
  return '; '.join(parts)


def read(workdir: str, checkpoint: str = 'latest') -> tuple[dict[str, Any], int]:
  """(saved state with its base leaves merged back, step) of a checkpoint: 'latest', 'best' or a
  step number. Reads only; raises NotFoundError, before touching anything, when there is none."""
  found = _find(workdir, checkpoint)
  if found is None:
    raise errors.NotFoundError(
      f'no checkpoint {checkpoint!r} in {workdir} ({_listing(workdir)}); train first '
      f'(--mode=train --workdir={workdir}), or pass --checkpoint with a step listed'
    )
  subdir, step = found
  try:
    stored, ref = _read_stored(workdir, subdir, step)
  except DamagedCheckpointError as e:
    raise DamagedCheckpointError(f'{e}; {_what_restores(workdir, subdir, step)}') from e
  paths = _paths(ref)
  if not any(paths.values()):
    return stored, step
  base = _load_base(workdir, ref, f'checkpoint {step} in {os.path.join(workdir, subdir)}')
  return _merge(stored, base, paths, lambda entry, path, a: a), step


def _read_stored(workdir: str, subdir: str, step: int) -> tuple[dict[str, Any], Any]:
  """(the `state` item of WORKDIR/subdir/step, its base_ref), in host arrays: a checkpoint saved
  on other devices (8 GPUs, or 2 processes) restores on any machine."""
  with _reader(workdir, subdir) as mngr, _step_damage(mngr, step):
    ref = _read_ref(mngr, step)
    saved = ocp.StandardCheckpointHandler().metadata(
      epath.Path(mngr.directory) / str(step) / 'state'
    )
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved.tree)
    stored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return stored['state'], ref


def _what_restores(workdir: str, damaged_subdir: str, damaged_step: int) -> str:
  """Which --checkpoint works instead of a damaged one: the newest other step that restores."""
  found = {}
  for subdir in (LATEST_DIR, BEST_DIR):
    mngr = _reader(workdir, subdir)
    if mngr is not None:
      with mngr:
        found[subdir] = mngr.all_steps()
  # Newest first; of one step, checkpoints/ first, as --checkpoint N looks there first.
  candidates = sorted(((s, d) for d, steps in found.items() for s in steps), reverse=True)
  for step, subdir in candidates:
    if (subdir, step) == (damaged_subdir, damaged_step):
      continue
    try:
      _read_stored(workdir, subdir, step)
    except DamagedCheckpointError:
      continue
    flag = 'best' if subdir == BEST_DIR and step in found.get(LATEST_DIR, []) else step
    return f'the newest that restores is {subdir}/{step}: pass --checkpoint {flag}'
  return f'no other checkpoint restores ({_listing(workdir)}): train again in a new --workdir'


def load_for_inference(
  workdir: str, checkpoint: str = 'latest', use_ema: bool = True
) -> tuple[dict[str, Any], int]:
  """({'params', 'batch_stats'}, step) from WORKDIR; EMA weights when present and `use_ema`.

  Args:
    checkpoint: 'latest', 'best', or a step number.
  """
  state, step = read(workdir, checkpoint)
  params = state.get('ema_params') if use_ema else None
  return {'params': params or state['params'], 'batch_stats': state['batch_stats']}, step


def _convert(path: str, workdir: str, backbone: Backbone) -> str:
  """Reads a raw weights file (`backbone.weight_formats`) once; returns the cached orbax copy."""
  out = os.path.join(workdir, 'converted', os.path.basename(path.rstrip('/')) + '_orbax')
  if not os.path.isdir(out):
    if not backbone.recognise(path):
      raise errors.WeightsError(
        f'config.init_checkpoint={path!r} is not {backbone.weight_formats} '
        f'(config.model.name={backbone.name!r}); give that, or set config.model.name to the '
        'backbone the file holds'
      )
    weights.save_variables(backbone.load_weights(path), out)
  logging.warning(
    'Converted %s; the orbax copy is cached at %s (pass it as init_checkpoint next time).',
    path,
    out,
  )
  return out


def read_weights(init_checkpoint: str, backbone: Backbone, workdir: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} from an orbax directory (converters/) or a raw weights file of
  `backbone` (converted once, cached under WORKDIR/converted/)."""
  path = os.path.expanduser(init_checkpoint)
  if not os.path.exists(path) and not os.path.exists(path + '.index'):
    raise errors.NotFoundError(
      f'config.init_checkpoint={init_checkpoint!r} does not exist; give an orbax directory '
      f'(converters/) or {backbone.weight_formats}'
    )
  if not os.path.isdir(path):
    path = _convert(path, workdir, backbone)
  try:
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))
  except Exception as e:  # orbax's errors name its internal files (_METADATA), not the setting.
    raise errors.WeightsError(
      f'config.init_checkpoint={init_checkpoint!r} is a folder but not an orbax checkpoint '
      f'({type(e).__name__}); give a directory written by converters/ (see the README) or '
      f'{backbone.weight_formats}'
    ) from e


def load_init(
  init_checkpoint: str,
  variables: dict[str, Any],
  exclude_scopes: str,
  ignore_missing_vars: bool,
  workdir: str,
  backbone: Backbone,
) -> dict[str, Any]:
  """Overwrites `variables` with a pretrained checkpoint, except under `exclude_scopes`.

  Every variable outside the excluded scopes must be in the checkpoint with the same shape, and
  every checkpoint variable outside them must exist in the model (`ignore_missing_vars` relaxes
  the first, as slim's flag does); all offenders are listed in one error.
  """
  loaded = read_weights(init_checkpoint, backbone, workdir)
  problems = []
  out = {}
  for collection in ('params', 'batch_stats'):
    want = scopes.flatten(variables[collection])
    have = scopes.flatten(loaded.get(collection, {}))
    merged = {}
    for k, v in want.items():
      name = f'{collection}/{k}'
      if scopes.matches(exclude_scopes, k):
        merged[k] = v
      elif k not in have:
        if not ignore_missing_vars:
          problems.append(f'missing in checkpoint: {name} {tuple(v.shape)}')
        merged[k] = v
      elif tuple(have[k].shape) != tuple(v.shape):
        problems.append(
          f'shape mismatch: {name} model {tuple(v.shape)} vs checkpoint {tuple(have[k].shape)}'
        )
      else:
        merged[k] = np.asarray(have[k], dtype=v.dtype)
    problems += [
      f'not in model: {collection}/{k} {tuple(have[k].shape)}'
      for k in have
      if k not in want and not scopes.matches(exclude_scopes, k)
    ]
    out[collection] = scopes.unflatten(merged)
  if problems:
    raise errors.WeightsError(
      f'config.init_checkpoint={init_checkpoint!r} does not fit the model outside '
      f'config.exclude_scopes={exclude_scopes!r}:\n  '
      + '\n  '.join(problems)
      + f'\nAdd the offending scopes to config.exclude_scopes (e.g. {backbone.head_scopes} for a '
      'new number of classes) or fix config.model.'
    )
  return out
