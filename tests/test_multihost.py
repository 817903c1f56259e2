"""Two processes on 127.0.0.1 (jax.distributed, gloo collectives) train, resume and evaluate as
one process with the same global batch does; the dataset is built once, by process 0."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from pneumo_jax import checkpoints, scopes
from pneumo_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo in miniature (75 px), with Mixed_7c and the heads training (their batch norm on batch
# statistics: global ones, across processes) and the feature cache off (a multi-process run
# trains uncached), global batch 4, checkpointed every 2 steps, evaluated at the end.
TINY = [
  'main.py',
  '--config',
  'configs/sweeps/tiny.py',
  '--nosweep',
  '--config.checkpoint_every_steps=2',
  '--config.trainable_scopes=Mixed_7c,Logits,AuxLogits',
  '--config.feature_cache=False',
]
BUILDING = 'Building the dataset'  # folder_builder's log line when it builds.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _main(workdir: str, processes: int, *args: str) -> list[tuple[int, str]]:
  """(exit status, stderr) of each process of a run of `processes` processes with 2 CPU devices
  in all: one process on 2 devices, or 2 on 1 each. (With another device count the sums of a
  step are in another order; RMSProp's first steps, ~lr · sign(gradient), turn that rounding into
  visible differences wherever a gradient is near 0.)"""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={2 // processes}',
  )
  joined = [] if processes == 1 else [f'--coordinator_address=127.0.0.1:{_free_port()}']
  with contextlib.ExitStack() as files:
    logs = [files.enter_context(tempfile.TemporaryFile('w+')) for _ in range(processes)]
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          *TINY,
          '--workdir',
          workdir,
          *args,
          *joined,
          *([f'--num_processes={processes}', f'--process_id={i}'] if joined else []),
        ],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=log,  # A file, not a pipe: a process never blocks on a full pipe.
      )
      for i, log in enumerate(logs)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    for log in logs:
      log.seek(0)
    return [(rc, log.read()) for rc, log in zip(codes, logs, strict=True)]


def _check(run: list[tuple[int, str]]) -> None:
  """Every process of `run` ended well; else the end of each one's log."""
  if any(rc for rc, _ in run):
    tails = [
      f'process {i}, exit {rc}:\n' + '\n'.join(line[:300] for line in err.splitlines()[-25:])
      for i, (rc, err) in enumerate(run)
    ]
    pytest.fail('\n\n'.join(tails))


def _weights(workdir: str) -> dict[str, np.ndarray]:
  variables, _ = checkpoints.load_for_inference(workdir, 'latest')
  return {
    f'{c}/{k}': np.asarray(v) for c in variables for k, v in scopes.flatten(variables[c]).items()
  }


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  one = str(tmp_path_factory.mktemp('one_process'))
  two = str(tmp_path_factory.mktemp('two_processes'))
  _check(_main(one, 1, '--config.num_steps=4'))
  first = _main(two, 2, '--config.num_steps=2')  # Stops after its checkpoint at step 2,
  _check(first)
  resumed = _main(two, 2, '--config.num_steps=4')  # and the same run goes on to step 4.
  _check(resumed)
  return one, two, first, resumed


@pytest.mark.slow
def test_two_processes_train_and_evaluate_as_one(runs):
  """Same global batches (each process its half), global batch statistics and gradients: only
  the order of float reductions differs (gloo across processes, XLA within one), so weights
  agree within 1e-4 relative after 2 + 2 steps with a resume in between."""
  one, two, _, _ = runs
  want, got = _weights(one), _weights(two)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for metric, value in _summary(one)['final'].items():
    assert _summary(two)['final'][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric


@pytest.mark.slow
def test_process_0_builds_the_dataset_and_writes_the_reports(runs):
  _, two, (lead, other), _ = runs
  assert BUILDING in lead[1] and BUILDING not in other[1]
  builds = os.listdir(os.path.join(two, 'data', 'class_folder'))
  assert len(builds) == 1, builds  # One build, which process 1 found.
  with open(os.path.join(two, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if '"train"' in line]
  assert steps == sorted(set(steps))  # One writer: no step logged twice.


def test_resuming_with_another_process_count_says_what_it_can_do(runs):
  """This (pytest) process is one process: it may read the two processes' weights (as _weights
  did above) but not resume their training."""
  _, two, _, _ = runs
  with checkpoints.manager(two) as mngr, pytest.raises(ConfigError) as refused:
    checkpoints.check_process_count(mngr, mngr.latest_step())
  assert 'written by a run of 2 process(es); this one has 1' in str(refused.value)
