"""Errors that the user can fix, told apart from bugs.

`Error` is the base of every exception whose message says what is wrong and what
to do: a path that cannot be used (storage.StorageError), a workdir owned by
another run or writer (train/run_dir.py), a checkpoint of another model
(pretrained.CheckpointMismatchError), an invalid config field (ConfigError).
`python -m lsm2.main` prints such an error as its message alone on stderr and
exits with status 1; anything else is a bug and keeps its traceback. Each
subclass also derives from the built-in type callers already catch (OSError,
ValueError, RuntimeError).
"""


class Error(Exception):
  """A fault in the user's input, files or storage that the message explains."""


class ConfigError(Error, ValueError):
  """An invalid config field: the message names the field, its value and what is allowed."""
