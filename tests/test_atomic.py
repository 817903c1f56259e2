"""atomic_file and atomic_folder: the old file or folder stays whole until the new one is
complete, through an exception and through a killed process."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pneumo_jax import atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_file_is_replaced_only_when_its_block_succeeds(tmp_path):
  path = tmp_path / 'deep' / 'report.json'  # The folder does not exist yet.
  with atomic.atomic_file(str(path)) as tmp:
    assert tmp.endswith('.json') and os.path.dirname(tmp) == str(path.parent)
    with open(tmp, 'w') as f:
      f.write('old')
  with pytest.raises(RuntimeError), atomic.atomic_file(str(path)) as tmp:
    with open(tmp, 'w') as f:
      f.write('half')
    raise RuntimeError('disk full')
  assert path.read_text() == 'old' and os.listdir(path.parent) == ['report.json']


def test_a_folder_is_replaced_whole_only_when_its_block_succeeds(tmp_path):
  path = tmp_path / 'export'
  for text in ('old', 'new'):
    with atomic.atomic_folder(str(path)) as out:
      assert os.listdir(out) == []
      (tmp_path / out / 'a.txt').write_text(text)
  assert os.listdir(path) == ['a.txt'] and (path / 'a.txt').read_text() == 'new'
  with pytest.raises(KeyboardInterrupt), atomic.atomic_folder(str(path)) as out:
    (tmp_path / out / 'b.txt').write_text('half')
    raise KeyboardInterrupt
  assert os.listdir(tmp_path) == ['export'] and os.listdir(path) == ['a.txt']
  (tmp_path / 'a_file').write_text('mine')
  with pytest.raises(OSError), atomic.atomic_folder(str(tmp_path / 'a_file')):
    pass  # A file is no folder to replace: refused, and kept.
  assert (tmp_path / 'a_file').read_text() == 'mine' and atomic.leftovers(str(path)) == []


def test_a_killed_process_leaves_the_old_folder_and_a_leftover_to_find(tmp_path):
  path = tmp_path / 'synthetic'
  path.mkdir()
  (path / 'old.txt').write_text('old')
  (tmp_path / f'other{atomic.INCOMPLETE}123').mkdir()  # Another folder's: not ours to find.
  code = textwrap.dedent(f"""
      import os, signal
      from pneumo_jax import atomic
      with atomic.atomic_folder({str(path)!r}) as out:
        open(os.path.join(out, 'new.txt'), 'w').write('half')
        os.kill(os.getpid(), signal.SIGKILL)
  """)
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, timeout=120)
  assert proc.returncode == -signal.SIGKILL
  assert os.listdir(path) == ['old.txt']
  (leftover,) = atomic.leftovers(str(path))
  assert os.path.basename(leftover).startswith(f'synthetic{atomic.INCOMPLETE}')


def test_converted_weights_replace_a_folder_whole(tmp_path, monkeypatch):
  """models.weights.save_variables (the converters' orbax writer) goes through atomic_folder."""
  import numpy as np
  import orbax.checkpoint as ocp

  from pneumo_jax.models import weights

  out = str(tmp_path / 'orbax')
  for value in (1.0, 2.0):
    weights.save_variables({'params': {'w': np.full(3, value)}}, out, overwrite=True)
  np.testing.assert_array_equal(ocp.StandardCheckpointer().restore(out)['params']['w'], [2.0] * 3)

  def fail(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', fail)
  with pytest.raises(RuntimeError, match='disk full'):
    weights.save_variables({'params': {'w': np.zeros(3)}}, out, overwrite=True)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ['orbax']
  np.testing.assert_array_equal(ocp.StandardCheckpointer().restore(out)['params']['w'], [2.0] * 3)
