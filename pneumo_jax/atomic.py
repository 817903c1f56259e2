"""Replacing a file or a folder atomically: readers see the old one or the new one, never half.

`atomic_file(path)` yields a temporary file path beside `path`, and `atomic_folder(path)` a new
empty folder beside it; when the block succeeds it is renamed onto `path`, and when the block
fails it is removed and `path` is left as it was. Both sit in `path`'s own folder, so the rename
stays on one file system. A process killed inside the block leaves the old `path` intact and its
temporary beside it: a hidden `.NAME.*` file, or a `NAME.incomplete-*` folder that `leftovers`
finds for whoever may delete it (a caller holding the lock on that folder).
"""

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

INCOMPLETE = '.incomplete-'  # Between a folder's name and a unique suffix: its unfinished copy.


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` (with its extension, which writers such as
  matplotlib read the format from) that replaces `path` when the block succeeds."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    dir=folder, prefix=f'.{os.path.basename(path)}.', suffix=os.path.splitext(path)[1]
  )
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
  """Yields a new empty folder beside `path` that replaces `path` (a folder, or nothing) when the
  block succeeds. Which folders may be replaced is the caller's decision, made before.

  The old folder is moved aside before the new one moves in: between the two renames `path` is
  briefly absent, never half-written; if the second rename fails the old one is put back.
  """
  parent, name = os.path.split(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'{name}{INCOMPLETE}', dir=parent)
  fresh, old = os.path.join(staging, name), os.path.join(staging, 'replaced')
  try:
    os.mkdir(fresh)
    yield fresh
    if os.path.isdir(path):
      os.rename(path, old)
    try:
      os.rename(fresh, path)
    except OSError:
      if os.path.isdir(old):
        os.rename(old, path)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def leftovers(path: str) -> list[str]:
  """The unfinished `atomic_folder` copies of `path` that killed processes left, sorted; a live
  process's copy looks the same, so only a caller that excludes other writers may delete them."""
  parent, name = os.path.split(os.path.abspath(path))
  if not os.path.isdir(parent):
    return []
  pattern = re.compile(re.escape(name + INCOMPLETE) + r'\w+')
  return sorted(os.path.join(parent, n) for n in os.listdir(parent) if pattern.fullmatch(n))
