"""lsm2.config_files: config files by path, the same config as `--config=PATH[:ARG]`."""
import pathlib

from absl import flags
from ml_collections import config_flags
import pytest

from lsm2 import config_files

REPO = pathlib.Path(__file__).resolve().parents[1]


def _from_flag(spec: str):
  argv = ["prog", f"--config={spec}"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("name, arg", [("pretrain.py", "tiny,lsm1,runlocal"), ("eval.py", "fitabase"),
                                       ("eval.py", None), ("demo.py", None)])
def test_load_config_equals_the_config_flag(name, arg):
  path = REPO / "configs" / name
  want = _from_flag(str(path) if arg is None else f"{path}:{arg}")
  assert config_files.load_config(path, arg).to_dict() == want.to_dict()


def test_each_load_is_a_fresh_module(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text("import ml_collections\nCALLS = []\n"
                  "def get_config(arg='none'):\n  CALLS.append(arg)\n"
                  "  return ml_collections.ConfigDict({'arg': arg, 'calls': len(CALLS)})\n")
  assert config_files.load_config(path).arg == "none"
  assert config_files.load_config(path, "").arg == ""
  assert config_files.load_config(path, "x").calls == 1
  assert config_files.load_module(path) is not config_files.load_module(path)


def test_bad_paths_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"config file {tmp_path / 'nope.py'} does not exist"):
    config_files.load_config(tmp_path / "nope.py")
  empty = tmp_path / "empty.py"
  empty.write_text("X = 1\n")
  with pytest.raises(ValueError, match=f"config file {empty} does not define get_config"):
    config_files.load_config(empty)
