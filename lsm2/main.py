r"""Entry point: parses flags, joins the multi-process runtime, dispatches.

  python -m lsm2.main --config=configs/pretrain.py:S,aim --workdir=DIR \
      [--config.key=value ...] [--coordinator_address=H:P --num_processes=N --process_id=I]

The config's `mode` field (default "pretrain") picks what runs: "pretrain",
"evaluate" (configs/eval.py) or "demo" (configs/demo.py: pretrain, then
evaluate with the sibling configs/eval.py:synthetic into WORKDIR/eval).

Exit status: 0 finished, 1 failed, config.preemption_exit_code (75) after a
preemption checkpoint (train.Preempted is a SystemExit with that code), so that
launchers can requeue, 3 when training diverged (train.Diverged: a non-finite
loss, gradient or parameter; nothing of it saved or exported). An error the user
can fix (lsm2.errors.Error: a path that cannot be used, a workdir of another run
or writer, an invalid config field, a checkpoint of another model, a train step
that does not fit in memory (preflight.DoesNotFit), a --config.FIELD override of
a field the config lacks) is printed as its message alone, without a traceback;
any other exception is a bug and keeps its traceback.
"""
import logging as std_logging
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lsm2 import config_files
from lsm2 import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (PATH[:ARG]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Join a multi-process job via jax.distributed.initialize(): 'on' always (Cloud TPU VM "
    "slices, where JAX finds the peers itself), 'auto' when Slurm/Open MPI/GKE variables say so.")
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    "keep_freed_memory", True,
    "Tune glibc malloc in this process and its Grain data workers to keep large freed blocks "
    "(lsm2.data.grain_sources.keep_freed_memory; up to 2x faster input pipeline). "
    "Process-wide, so the entry point opts in; library calls never do.")
flags.mark_flags_as_required(["config", "workdir"])

# Environment variables that mean "this is one process of a cluster job", for
# which jax.distributed.initialize() finds the coordinator by itself.
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")  # > 1 on a multi-process job.
_CLUSTER_FLAG_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JOBSET_NAME")


def _initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and _is_cluster_job()):
    jax.distributed.initialize()  # Auto-detects Slurm, Cloud TPU, GKE/JobSet, Open MPI.
  logging.info("JAX process %d/%d, %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _is_cluster_job() -> bool:
  return (any(int(os.environ.get(k, "1")) > 1 for k in _CLUSTER_SIZE_ENV)
          or any(os.environ.get(k) for k in _CLUSTER_FLAG_ENV))


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every save step at INFO; keep its warnings, drop the chatter."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  try:
    _main(argv)
  except errors.Error as e:  # Its message says what is wrong and what to do.
    print(f"lsm2: error: {e}", file=sys.stderr, flush=True)
    sys.exit(getattr(e, "EXIT_CODE", 1))


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if _KEEP_FREED_MEMORY.value:
    from lsm2.data import grain_sources  # pylint: disable=g-import-not-at-top
    grain_sources.keep_freed_memory()
  _initialize_distributed()
  config = _CONFIG.value
  try:
    mode = config.get("mode", "pretrain")
  except OSError as e:  # ml_collections raises on first use: the file is missing or unreadable.
    raise errors.ConfigError("--config: " + " ".join(str(e).split())) from None
  if mode == "pretrain":
    from lsm2.train import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, _WORKDIR.value)
  elif mode == "evaluate":
    from lsm2.eval import run  # pylint: disable=g-import-not-at-top
    run.evaluate(config, _WORKDIR.value)
  elif mode == "demo":
    from lsm2 import demo  # pylint: disable=g-import-not-at-top
    demo.demo(config, _WORKDIR.value, _sibling_config("eval.py", "synthetic"))
  else:
    raise app.UsageError(
        f"config.mode={mode!r} is not a known mode ('pretrain', 'evaluate', 'demo')")


def _sibling_config(filename: str, arg: str):
  """get_config(arg) of a config file beside the --config file."""
  path = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).with_name(filename)
  return config_files.load_config(path, arg)


def _parse_flags(argv):
  """absl's flag parsing; a --config.FIELD override of a field the config does not have is
  one `lsm2: error:` line naming the flag (ml_collections raises AttributeError/KeyError)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    missing = str(e).strip("\"'")
    named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
             and missing in a.split("=")[0][len("--config."):].split(".")]
    print(f"lsm2: error: {named[0] if named else '--config'}: the config has no field "
          f"{missing!r}; check its spelling against the config file", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
