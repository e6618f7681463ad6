"""Config and sweep files loaded by path, as `--config=PATH[:ARG]` loads them.

Config files (configs/*.py, configs/sweeps/*.py) are not a package: they are
imported from their path, so that they work from any directory.
"""
import importlib.util
import os
import pathlib
import types

import ml_collections


def load_module(path: str | os.PathLike) -> types.ModuleType:
  """Imports the Python file at `path` (a fresh module on every call)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"lsm2_config_file_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`; `get_config()` when arg is None.

  The same config as `--config=PATH:ARG` (or `--config=PATH`) before any
  `--config.KEY=VALUE` override.
  """
  module = load_module(path)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path} does not define get_config()")
  return module.get_config() if arg is None else module.get_config(arg)
