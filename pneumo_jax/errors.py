"""Errors the user can fix, told apart from bugs.

`main.py` prints a `UserError`'s message on one line and exits with status 2; anything else is a
bug and keeps its traceback. Each message names the file, field or flag at fault and the fix.
The classes also derive from the builtin a caller would expect (ValueError, FileNotFoundError).
"""


class UserError(Exception):
  """Something the user can fix: a setting, a flag, an input file, a workdir's state."""


class ConfigError(UserError, ValueError):
  """A config field or command-line flag has a value that cannot work; names the field."""


class DatasetError(UserError, ValueError):
  """Bad input data: the message names the offending path and how to fix it."""


class NotFoundError(UserError, FileNotFoundError):
  """A named file, folder or checkpoint does not exist; names what was asked for."""


class BusyError(UserError):
  """Another live process is using the workdir (or building the dataset) this run needs."""


class WeightsError(UserError, ValueError):
  """A weights file or checkpoint does not fit the model or cannot be read; names the file."""


class NotWritableError(UserError, PermissionError):
  """An output folder cannot take a file (read-only, full, not a folder); names the folder."""
