"""A tiny pretrained checkpoint shared by the evaluation and API tests (built once per session)."""
import pathlib

from lsm2 import config_files
from lsm2.data import synthesize
from lsm2.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10  # Checkpoints at steps 5 and 10, then the export.


def pretrain_config(scheme: str = "aim"):
  return config_files.load_config(REPO / "configs" / "pretrain.py", f"tiny,{scheme},runlocal")


def tiny_pretrained(base: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir, data dir) of a 10-step tiny AIM run on 12 synthetic subjects x 2 days.

  Built under `base` (pytest's session temp dir) the first time and reused by
  every later caller in the session.
  """
  root = base / "lsm2_tiny_pretrained"
  workdir, data = root / "workdir", root / "data"
  if not (workdir / "export" / "lsm2.json").exists():
    synthesize.write_synthetic_dataset(data, subjects=12, days=2, seed=0, overwrite=True)
    config = pretrain_config()
    with config.unlocked():
      config.data.dir = str(data)
      config.data.synthesize_subjects = 0
      config.total_steps = STEPS
      config.checkpoint_every = 5
      config.eval_every = STEPS
      config.log_every = 5
    train.train_and_evaluate(config, str(workdir))
  return workdir, data
