"""Shared by the training tests (tests/test_train.py, tests/test_train_resume.py): the small
test geometry, its config and command-line flags, the dataset they train on, and the
goodput records a run writes."""
import json
import pathlib

from lsm2 import config_files
from lsm2.data import synthesize

REPO = pathlib.Path(__file__).resolve().parents[1]


# A test geometry: 60-minute x 2-signal tokens (24 x 13 = 312 tokens), so that
# every compile and step takes a fraction of the paper geometry's time.
SMALL = {
    "model.patch_time": 60, "model.patch_channels": 2, "masking.time_bars": 10,
    "batch_size": 8, "total_steps": 30, "checkpoint_every": 5, "log_every": 5,
    "eval_every": 15, "eval_batches": 1, "data.synthesize_subjects": 0,
}


def small_config(data_dir, **overrides):
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,aim,runlocal")
  with config.unlocked():
    config.data.dir = str(data_dir)
    config.update_from_flattened_dict({**SMALL, **overrides})
  return config


def cli_overrides(data_dir, **overrides):
  flags = [f"--config.data.dir={data_dir}"]
  flags += [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]
  return flags


def write_data(out: pathlib.Path) -> pathlib.Path:
  """20 subjects x 2 days: 32 train days, 4 validation days; ArrayRecord so that process
  slicing is by record."""
  synthesize.write_synthetic_dataset(out, subjects=20, days=2, seed=0, fmt="array_record",
                                     shards=2, split_fractions=(0.8, 0.2, 0.0))
  return out


def attempts(workdir) -> list[dict]:
  """The attempts WORKDIR/goodput.json records ([] before the first record)."""
  path = pathlib.Path(workdir) / "goodput.json"
  return json.loads(path.read_text())["attempts"] if path.exists() else []
