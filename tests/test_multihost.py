"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives) train, are killed, resume,
evaluate and sweep as one process with the same global batch does; the dataset is built once,
by process 0, and the feature cache too. (--mode eval, predict and explain use the same
gathering as the training's evaluations checked here.)"""

import contextlib
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from pneumo_jax import checkpoints, scopes
from pneumo_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo in miniature (75 px, global batch 4) in two phases of 2 steps, with Mixed_7c and the
# heads training (their batch norm on batch statistics: global ones, across processes): the
# first reads images, the second trains from a feature cache of Mixed_7b (and of the aux head's
# input), which the processes build together. Checkpointed every 2 steps, evaluated at the ends.
CONFIG = """
from configs.sweeps import tiny

TRAINED = 'Mixed_7c,Logits,AuxLogits'


def get_config():
  c = tiny.get_config()
  c.checkpoint_every_steps = 2
  c.phase_order = 'images,cached'
  c.phases.images = dict(num_steps=2, trainable_scopes=TRAINED, feature_cache=False)
  c.phases.cached = dict(num_steps=2, trainable_scopes=TRAINED)
  return c
"""
BUILDING = 'Building the dataset'  # folder_builder's log line when it builds.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _slurm_job() -> int:
  """A SLURM job id whose coordinator port is free here (jax.distributed's SLURM detection puts
  it at 61440 + job id % 4096)."""
  for job in random.sample(range(4096), 4096):
    with socket.socket() as s, contextlib.suppress(OSError):
      s.bind(('127.0.0.1', 61440 + job))
      return job
  raise RuntimeError('no free port in 61440-65535')


def _main(
  workdir: str, processes: int, *args: str, kill_after: int | None = None, srun: bool = False
) -> list[tuple[int, str]]:
  """(exit status, stderr) of each process of a run of `processes` processes with 2 CPU devices
  in all: one process on 2 devices, or 2 on 1 each. (With another device count the sums of a
  step are in another order; RMSProp's first steps, ~lr · sign(gradient), turn that rounding into
  visible differences wherever a gradient is near 0.) Processes join by flags, or with `srun`
  by the variables srun sets (no flags: jax.distributed finds the coordinator). With
  `kill_after`, every process is killed (SIGKILL) once the checkpoint of that step is on disk."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={2 // processes}',
  )
  flags, envs = [[] for _ in range(processes)], [env] * processes
  if processes > 1 and srun:
    job = str(_slurm_job())
    envs = [
      dict(
        env,
        SLURM_JOB_ID=job,
        SLURM_STEP_NODELIST='localhost',
        SLURM_NTASKS=str(processes),
        SLURM_STEP_NUM_TASKS=str(processes),
        SLURM_PROCID=str(i),
        SLURM_LOCALID=str(i),
      )
      for i in range(processes)
    ]
  elif processes > 1:
    joined = [f'--coordinator_address=127.0.0.1:{_free_port()}', f'--num_processes={processes}']
    flags = [[*joined, f'--process_id={i}'] for i in range(processes)]
  with contextlib.ExitStack() as files:
    logs = [files.enter_context(tempfile.TemporaryFile('w+')) for _ in range(processes)]
    procs = [
      subprocess.Popen(
        [sys.executable, 'main.py', '--workdir', workdir, *args, *flags[i]],
        cwd=REPO,
        env=envs[i],
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=log,  # A file, not a pipe: a process never blocks on a full pipe.
      )
      for i, log in enumerate(logs)
    ]
    if kill_after is not None:
      saved = os.path.join(workdir, checkpoints.LATEST_DIR, str(kill_after))  # Renamed when whole.
      deadline = time.time() + 600
      while not os.path.isdir(saved) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
          break
        time.sleep(0.05)
      for p in procs:
        p.kill()
    codes = [p.wait(timeout=600) for p in procs]
    for log in logs:
      log.seek(0)
    return [(rc, log.read()) for rc, log in zip(codes, logs, strict=True)]


def _tails(run: list[tuple[int, str]]) -> str:
  return '\n\n'.join(
    f'process {i}, exit {rc}:\n' + '\n'.join(line[:300] for line in err.splitlines()[-25:])
    for i, (rc, err) in enumerate(run)
  )


def _check(run: list[tuple[int, str]]) -> None:
  """Every process of `run` ended well; else the end of each one's log."""
  if any(rc for rc, _ in run):
    pytest.fail(_tails(run))


def _weights(workdir: str) -> dict[str, np.ndarray]:
  variables, _ = checkpoints.load_for_inference(workdir, 'latest')
  return {
    f'{c}/{k}': np.asarray(v) for c in variables for k, v in scopes.flatten(variables[c]).items()
  }


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _validation(workdir: str) -> dict[int, dict]:
  """The logged validation metrics by step."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {
    r['step']: {k: v for k, v in r.items() if k not in ('step', 'split')}
    for r in records
    if r['split'] == 'validation'
  }


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The reference (one process, 4 steps); two processes killed after their step-2 checkpoint
  (during the cache build or the second phase's compile), then resumed to the end."""
  config = tmp_path_factory.mktemp('config') / 'two_phases.py'
  config.write_text(CONFIG)
  train = ('--config', str(config))
  one = str(tmp_path_factory.mktemp('one_process'))
  two = str(tmp_path_factory.mktemp('two_processes'))
  _check(_main(one, 1, *train))
  killed = _main(two, 2, *train, kill_after=2)
  if [rc for rc, _ in killed] != [-signal.SIGKILL] * 2:
    pytest.fail('expected both processes killed after the step-2 checkpoint:\n' + _tails(killed))
  resumed = _main(two, 2, *train)
  _check(resumed)
  return one, two, killed, resumed


@pytest.mark.slow
def test_two_processes_train_and_evaluate_as_one(runs):
  """Same global batches (each process its half), global batch statistics and gradients: only
  the order of float reductions differs (gloo across processes, XLA within one), so weights
  agree within 1e-4 relative after 2 + 2 steps with a kill and resume in between."""
  one, two, _, resumed = runs
  want, got = _weights(one), _weights(two)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # Step 2 evaluated from images, step 4 from the cache: each process its block of each batch.
  want, got = _validation(one), _validation(two)
  assert sorted(got) == sorted(want) == [2, 4]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), step
  assert 'Resumed from' in resumed[0][1] and 'at step 2' in resumed[0][1]


@pytest.mark.slow
def test_process_0_builds_the_dataset_and_the_feature_cache(runs):
  _, two, (lead, other), _ = runs
  assert BUILDING in lead[1] and BUILDING not in other[1]
  builds = os.listdir(os.path.join(two, 'data', 'class_folder'))
  assert len(builds) == 1, builds  # One build, which process 1 found.
  (cache,) = os.listdir(os.path.join(two, 'features'))  # Any killed build's folder is gone.
  assert os.path.exists(os.path.join(two, 'features', cache, 'done.json'))
  with open(os.path.join(two, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if '"train"' in line]
  assert steps == [1, 2, 3, 4]  # One writer: no step logged twice, none lost to the kill.


@pytest.mark.long  # ~60 s; `pytest -m long` (CI) runs it.
def test_a_sweep_runs_each_trial_on_both_processes(tmp_path):
  """Launched as srun launches tasks (SLURM variables, no flags), the processes go through the
  trials together (training heads from a feature cache they build together); process 0 builds
  the dataset and writes the tables and logs. Two trials, each saving its step 2: orbax's
  barriers stay apart."""
  workdir = str(tmp_path / 'sweep')
  sweep = _main(
    workdir,
    2,
    '--config=configs/sweeps/tiny.py',
    '--config.trainable_scopes=Logits,AuxLogits',
    srun=True,
  )
  _check(sweep)
  (_, lead), (_, other) = sweep
  assert BUILDING in lead and BUILDING not in other
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['status'] for r in rows] == ['done', 'done'], rows
  for r in rows:
    assert _summary(os.path.join(workdir, r['name']))['step'] == 2
    with open(os.path.join(workdir, r['name'], 'log.txt')) as f:
      assert 'in process, 2 processes' in f.read()


def test_resuming_with_another_process_count_says_what_it_can_do(runs):
  """This (pytest) process is one process: it may read the two processes' weights (as _weights
  did above) but not resume their training."""
  _, two, _, _ = runs
  with checkpoints.manager(two) as mngr, pytest.raises(ConfigError) as refused:
    checkpoints.check_process_count(mngr, mngr.latest_step())
  assert 'written by a run of 2 process(es); this one has 1' in str(refused.value)
