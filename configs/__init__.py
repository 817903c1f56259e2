"""The bundled configs, found by name (`--config demo`, `--config sweeps/lr`) from any directory.

The config files import each other as `configs.…`, so this folder ships as a package in the wheel.
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """Every bundled config's name, e.g. ['default', 'demo', …, 'sweeps/cv', …]."""
  found = []
  for root, _, files in os.walk(_HERE):
    for file in files:
      if file.endswith('.py') and file != '__init__.py':
        relative = os.path.relpath(os.path.join(root, file), _HERE)
        found.append(relative.removesuffix('.py').replace(os.sep, '/'))
  return sorted(found, key=lambda name: (name.count('/'), name))


def path(name: str) -> str | None:
  """The bundled file that `name` stands for (`demo`, `demo.py`, `configs/demo.py`), else None."""
  stem = name.removeprefix('configs/').removesuffix('.py')
  return os.path.join(_HERE, *stem.split('/')) + '.py' if stem in names() else None
