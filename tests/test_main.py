"""main.py as a person runs it: one-line errors, a busy workdir, Ctrl-C during training."""

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config', 'configs/sweeps/tiny.py', '--nosweep']


def _main(*args: str, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, 'main.py', *args],
    cwd=REPO,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    **kwargs,
  )


@pytest.mark.parametrize(
  'args, expected',
  [
    (['--config.input.imge_size=3'], "no field 'input.imge_size'; did you mean 'input.image_size'"),
    (['--config.phases.head.num_steps=3'], "no field 'phases.head'"),
    (['--config.input.image_size=abc'], '--config.input.image_size=abc: invalid literal'),
  ],
)
def test_a_bad_field_is_one_line_not_a_traceback(tmp_path, args, expected):
  proc = _main('--config', 'configs/demo.py', '--workdir', str(tmp_path / 'w'), *args)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert expected in err and 'Traceback' not in err
  assert not os.path.exists(tmp_path / 'w')


def test_user_errors_exit_2_with_their_message_and_write_nothing(tmp_path):
  workdir = str(tmp_path / 'w')
  proc = _main('--config', 'configs/nope.py', '--workdir', workdir)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and 'configs/nope.py: no such file, nor a bundled config' in err
  assert 'default, demo, densenet_two_phase, two_phase, sweeps/cv' in err
  proc = _main(*TINY, '--workdir', workdir, '--mode', 'predict', '--inputs', 'typo.png')
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and "'typo.png' (no such file or folder)" in err
  assert 'Traceback' not in err and not os.path.exists(workdir)
  proc = _main(*TINY, '--workdir', workdir, '--mode', 'eval')
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and 'train first' in err and not os.path.exists(workdir)


def _wait_for_training(workdir: str, proc: subprocess.Popen, timeout: float = 300) -> None:
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(line)['split'] == 'train' for line in f if line.strip()):
          return
    time.sleep(0.5)
  proc.kill()
  pytest.fail('training did not start')


@pytest.mark.long
def test_busy_workdir_then_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
  workdir = str(tmp_path / 'w')
  # Heads only (the quickest step to compile), through the whole network (no feature cache).
  heads = ['--config.trainable_scopes=Logits,AuxLogits', '--config.feature_cache=False']
  run = [*TINY, '--workdir', workdir, '--config.num_steps=100000', *heads]
  first = _main(*run)
  _wait_for_training(workdir, first)

  second = _main(*run)
  _, err = second.communicate(timeout=120)
  assert second.returncode == 2, err[-3000:]
  assert f'in use by process {first.pid}' in err and 'Traceback' not in err

  first.send_signal(signal.SIGINT)
  _, err = first.communicate(timeout=120)
  assert first.returncode == 128 + signal.SIGINT, err[-3000:]
  assert 'Traceback' not in err
  line = next(x for x in err.splitlines() if x.startswith('stopped at step'))
  step = int(line.split()[3].rstrip(';'))
  assert line == f'stopped at step {step}; run the same command to resume'
  assert {'data', 'state'} <= set(os.listdir(os.path.join(workdir, 'checkpoints', str(step))))


def test_a_second_signal_aborts_at_once():
  """The first SIGINT only asks the loop to save; a second one ends the process there and then."""
  code = textwrap.dedent("""
      import os, signal, time
      from pneumo_jax.training import interrupt
      with interrupt.StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        print('still running', flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
      print('not reached')
  """)
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert proc.returncode == 128 + signal.SIGTERM
  assert proc.stdout == 'still running\n'
  assert 'aborted without saving' in proc.stderr


def test_several_inputs_follow_one_flag_as_a_shell_glob_expands_them(tmp_path):
  """`--inputs *.png` arrives as `--inputs a.png b.png`: both are inputs (here both missing, so
  the error lists both, before any checkpoint is looked for). Run as `python -m pneumo_jax`."""
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'pneumo_jax',
      *TINY,
      '--workdir',
      str(tmp_path / 'w'),
      '--mode',
      'predict',
      '--inputs',
      'typo1.png',
      'typo2.png',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "'typo1.png' (no such file or folder); 'typo2.png'" in proc.stderr


@pytest.mark.parametrize(
  'args, expected',
  [
    (['--mode', 'eval', '--tta'], '--tta is for --mode predict, not --mode eval'),
    (['--mode', 'train', '--layer', 'Mixed_5d'], '--layer is for --mode explain, not --mode train'),
    (['--mode', 'eval', 'extra.png'], "unexpected arguments ['extra.png']"),
  ],
)
def test_flags_a_mode_does_not_read_are_refused(tmp_path, args, expected):
  proc = _main(*TINY, '--workdir', str(tmp_path / 'w'), *args)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and expected in err and 'Traceback' not in err


def test_workdir_is_required_only_where_a_mode_keeps_a_run(tmp_path):
  proc = _main(*TINY, '--mode', 'eval')
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and '--mode eval needs --workdir' in err
  Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(tmp_path / 'cat.png')
  proc = _main(*TINY, '--mode', 'imagenet', '--inputs', str(tmp_path / 'cat.png'))
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and 'config.init_checkpoint is empty' in err


def test_importing_the_package_keeps_log_lines_naming_their_source():
  """Silencing library noise must not break absl's logger: records still name the caller's file
  (which main.py's filter of library chatter relies on) and the noise itself is dropped."""
  code = textwrap.dedent("""
      import pneumo_jax
      from absl import app, logging
      def main(argv):
        logging.info('mine')
        logging.warning('Using custom data configuration: x')
      app.run(main)
  """)
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert '<string>:5] mine' in proc.stderr, proc.stderr
  assert 'custom data configuration' not in proc.stderr


def test_an_eval_crop_unlike_the_training_view_is_named(tmp_path):
  proc = _main(
    '--config',
    'configs/demo.py',
    '--workdir',
    str(tmp_path / 'w'),
    '--mode',
    'eval',
    '--config.input.central_crop_fraction=0.875',
  )
  _, err = proc.communicate(timeout=120)
  assert 'input.central_crop_fraction=0.875 zooms evaluation images 1.14×' in err
  assert proc.returncode == 2 and 'train first' in err


def test_a_bundled_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
  """As from an installed wheel: `--config NAME` (or the repository's relative path, which does
  not exist here) is the bundled file, `:arg` and overrides kept; a file that exists wins."""
  from pneumo_jax.__main__ import _bundled_config

  bundled = os.path.join(REPO, 'configs', 'sweeps', 'tiny.py')
  assert _bundled_config(['x', '--config', 'sweeps/tiny', '--config.seed=1']) == [
    'x',
    '--config',
    bundled,
    '--config.seed=1',
  ]
  assert _bundled_config(['x', '--config=demo:arg']) == [
    'x',
    f'--config={os.path.join(REPO, "configs", "demo.py")}:arg',
  ]
  assert _bundled_config(['x', '--config', 'nope']) == ['x', '--config', 'nope']
  (tmp_path / 'demo').write_text('')
  monkeypatch.chdir(tmp_path)
  assert _bundled_config(['x', '--config', 'demo']) == ['x', '--config', 'demo']
  assert _bundled_config(['x', '--config', 'configs/sweeps/tiny.py']) == ['x', '--config', bundled]
  # A whole command from elsewhere (configs/ as the installed package, here the checkout's).
  args = ['--config', 'sweeps/tiny', '--nosweep', '--workdir', 'w', '--mode', 'eval']
  proc = subprocess.run(
    [sys.executable, '-m', 'pneumo_jax', *args],
    cwd=tmp_path,
    env={**os.environ, 'PYTHONPATH': REPO},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2 and 'train first' in proc.stderr, proc.stderr[-2000:]


def test_a_gpu_machine_running_on_the_cpu_is_warned():
  from pneumo_jax.__main__ import gpu_unused

  warning = gpu_unused('cpu', True, None)
  assert "pip install 'pneumo_jax[cuda]'" in warning and 'NVIDIA GPU' in warning
  assert gpu_unused('cpu', True, 'cpu') is None  # JAX_PLATFORMS=cpu: meant.
  assert gpu_unused('cpu', False, None) is None and gpu_unused('gpu', True, None) is None


def test_every_mode_declares_its_name_flags_and_run():
  """The registry __main__ dispatches through: each mode's `run` takes the flags it declares (by
  keyword, after config and workdir) and needs nothing else; each flag is a command-line flag."""
  from pneumo_jax.__main__ import FLAGS
  from pneumo_jax.modes import MODES

  assert list(MODES) == ['train', 'eval', 'predict', 'explain', 'export', 'imagenet']
  for name, mode in MODES.items():
    assert name == mode.NAME and mode.HELP and isinstance(mode.NEEDS_WORKDIR, bool)
    params = inspect.signature(mode.run).parameters
    assert list(params)[:2] == ['config', 'workdir'], name
    for flag in mode.FLAGS:
      assert flag in FLAGS and flag in params, (name, flag)
    rest = [p for p in list(params.values())[2:] if p.name not in mode.FLAGS]
    assert all(p.default is not p.empty for p in rest), (name, rest)
  assert [n for n, m in MODES.items() if not m.NEEDS_WORKDIR] == ['imagenet']
