"""The sharded pretraining system: config validation, mesh equivalence, buckets, resume."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from flax import nnx
import jax
import numpy as np
from jax.sharding import PartitionSpec as P
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

from lsm2 import config_files
from lsm2 import pretrained
from lsm2 import sharding
from lsm2.data import pipeline
from lsm2.data import synthesize
from lsm2.model import aim
from lsm2.train import encoder_layout
from lsm2.train import train

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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("data") / "synth"
  # 20 subjects x 2 days: 32 train days, 4 validation days; ArrayRecord so that
  # process slicing is by record.
  synthesize.write_synthetic_dataset(out, subjects=20, days=2, seed=0, fmt="array_record",
                                     shards=2, split_fractions=(0.8, 0.2, 0.0))
  return out


# ---------------------------------------------------------------------------
# Config validation: fails before compiling, naming the field.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"model.patch_time": 7}, "patch_time=7 does not divide time_steps=1440"),
    ({"batch_size": 6}, "config.batch_size=6 must be a positive multiple of the data-parallel size 8"),
    ({"masking.n_drop": 100000}, "n_drop=100000"),
    ({"mesh.data": 3}, "config.mesh"),
    ({"masking.scheme": "nope"}, "scheme"),
    ({"masking.pack_encoder": True}, "pack_encoder needs config.masking.encoder_buckets > 0"),
    ({"keep_checkpoints": 0}, "config.keep_checkpoints=0 must be >= 1"),
    ({"lr": float("nan")}, "config.lr=nan must be a finite number > 0"),
    ({"lr": -1.0}, "config.lr=-1.0 must be a finite number > 0"),
    ({"optim.b2": 1.5}, r"config.optim.b2=1.5 must be in \[0, 1\)"),
    ({"optim.weight_decay": -1e-4}, "config.optim.weight_decay=-0.0001 must be a finite number >= 0"),
    ({"optim.grad_clip_norm": -1.0}, "config.optim.grad_clip_norm=-1.0 must be a finite number > 0"),
    ({"seed": -1}, r"config.seed=-1 must be in \[0, 2\*\*31\)"),
])
def test_invalid_config_fails_before_compiling(data_dir, tmp_path, overrides, message):
  config = small_config(data_dir, **overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_a_data_dir_without_a_dataset_is_refused_never_filled_with_synthetic_data(tmp_path):
  """runlocal asks for synthetic subjects: a misspelt data.dir was filled with them and
  trained on; now it is an error naming it, and nothing is written there."""
  misspelt = tmp_path / "dtaa"
  config = small_config(misspelt, **{"data.synthesize_subjects": 3, "data.synthesize_days": 1})
  with pytest.raises(train.errors.ConfigError,
                     match=rf"config.data.dir={misspelt}: .* is not an lsm2 dataset directory"
                           r".*written only into WORKDIR/data"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not misspelt.exists()


def test_synthetic_data_goes_only_into_a_missing_or_empty_workdir_data(tmp_path):
  config = small_config("", **{"data.synthesize_subjects": 3, "data.synthesize_days": 1})
  data = tmp_path / "run" / "data"
  data.mkdir(parents=True)
  (data / "notes.txt").write_text("mine")
  with pytest.raises(train.errors.ConfigError, match=rf"{data} holds files but no dataset"):
    train.synthesize_if_asked(config, tmp_path / "run")
  assert [p.name for p in data.iterdir()] == ["notes.txt"]
  (data / "notes.txt").unlink()
  resolved = train.synthesize_if_asked(config, tmp_path / "run")
  assert resolved.data.dir == str(data)
  assert sum(train.metadata_lib.load_metadata(data).record_counts.values()) == 3


@pytest.mark.parametrize("case", ["not_a_dataset", "missing_init_from", "truncated_run_json",
                                  "negative_seed", "unknown_masking_weight"])
def test_user_fixable_errors_are_one_line_without_a_traceback(data_dir, tmp_path, case):
  workdir, flags = tmp_path / "run", cli_overrides(data_dir, total_steps=2)
  want = {"not_a_dataset": f"config.data.dir={tmp_path}: ",
          "missing_init_from": f"config.init_from={tmp_path / 'nothing'}: ",
          "truncated_run_json": f"{workdir / 'run.json'} is not valid JSON",
          "negative_seed": "config.seed=-1 must be in",
          "unknown_masking_weight": "--config.masking.weights.bogus: the config has no field "
                                    "'bogus'"}[case]
  if case == "not_a_dataset":
    flags.append(f"--config.data.dir={tmp_path}")
  elif case == "missing_init_from":
    flags.append(f"--config.init_from={tmp_path / 'nothing'}")
  elif case == "truncated_run_json":
    workdir.mkdir()
    (workdir / "run.json").write_text('{"config": {"seed"')
  elif case == "negative_seed":
    flags.append("--config.seed=-1")
  else:
    flags.append("--config.masking.weights.bogus=1.0")
  proc = subprocess.run(
      [sys.executable, "-m", "lsm2.main", "--config=configs/pretrain.py:tiny,aim,runlocal",
       f"--workdir={workdir}", *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr
  [line] = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
  assert line.startswith(f"lsm2: error: {want}"), proc.stderr


def test_divergence_stops_before_saving_or_exporting_it(data_dir, tmp_path):
  """A learning rate that blows the parameters up: the run stops at the first non-finite
  step, every checkpoint it kept is finite, and no model is exported."""
  config = small_config(data_dir, lr=1e30, total_steps=20, checkpoint_every=1, log_every=1,
                        keep_checkpoints=100)
  with pytest.raises(train.Diverged, match=r"training diverged at step (\d+)") as raised:
    train.train_and_evaluate(config, str(tmp_path))
  assert raised.value.EXIT_CODE == 3 and 1 < raised.value.step < 20
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < raised.value.step
  assert f"the newest checkpoint, step {saved[-1]}, is from before it" in str(raised.value)
  assert not (tmp_path / "export").exists()
  (attempt,) = _attempts(tmp_path)  # The divergence exit wrote its goodput record.
  assert (attempt["status"], attempt["last_step"]) == ("diverged", raised.value.step)
  model, _, step = pretrained.load_pretrained(tmp_path)
  assert step == saved[-1]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------
# Meshes: data, FSDP and tensor parallel give the single-device loss.
# ---------------------------------------------------------------------------
def _run_steps(config, mesh, batches, buckets=None, pack_groups=0):
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  train.validate_config(config, model_cfg, mask_cfg, mesh)
  setup = train.make_setup(config, model_cfg, mask_cfg, mesh)
  state = train.create_state(setup)
  train_step = train.make_train_step(setup, mask_cfg.strategy_names)
  layout = encoder_layout.MaskLayout(train.make_mask_fn(setup), buckets, pack_groups)
  eval_step = train.make_eval_step(setup, mask_cfg.strategy_names)
  losses = []
  with sharding.mesh_context(mesh, config.logical_axis_rules):
    # Learning is judged on one batch under fixed masks, before and after
    # training: the training losses come from other batches and masks each step.
    probe = pipeline.to_global_batch(batches[0], setup.batch_sharding)
    probe_masks = layout.draw(jax.random.PRNGKey(7), 0, probe["observed"])

    def probe_loss(params):
      out = eval_step(params, probe, probe_masks)
      return float(out["sse"] / out["sse_count"])

    before = probe_loss(state["params"])
    for local in batches:
      batch = pipeline.to_global_batch(local, setup.batch_sharding)
      masks = layout.draw(state["rng"], state["step"], batch["observed"])
      state, out = train_step(state, batch, masks)
      losses.append(float(out["loss"]))
    probe_losses = (before, probe_loss(state["params"]))
  return losses, state, layout, train_step, probe_losses


@pytest.fixture(scope="module")
def batches(data_dir):
  it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=8, seed=0,
                                    process_index=0, process_count=1)
  return [next(it) for _ in range(3)]


@pytest.fixture(scope="module")
def single_device_run(data_dir, batches):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  return _run_steps(small_config(data_dir), mesh, batches)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
])
def test_parallel_meshes_match_single_device(data_dir, batches, single_device_run, mesh_sizes):
  mesh = sharding.make_mesh(mesh_sizes)
  config = small_config(data_dir)
  losses, state, _, _, (before, after) = _run_steps(config, mesh, batches)
  reference = single_device_run[0]
  # Same math, different reduction orders across shards: float32 round-off only.
  np.testing.assert_allclose(losses, reference, rtol=2e-5)
  np.testing.assert_allclose((before, after), single_device_run[4], rtol=2e-5)
  assert after < before

  # Parameters (and Adam moments) are laid out as the logical axis rules say.
  fc1 = state["params"]["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"].value
  assert fc1.sharding.spec == P("fsdp", "tensor")  # ("embed", "mlp") -> (fsdp, tensor)
  qkv = state["params"]["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"].value
  assert qkv.sharding.spec == P("fsdp", None, "tensor", None)  # (embed, None, heads, kv)
  mu = state["opt_state"][1][0].mu["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"].value
  assert mu.sharding.spec == fc1.sharding.spec
  if mesh_sizes["fsdp"] > 1:
    shard_rows = {s.data.shape[0] for s in fc1.addressable_shards}
    assert shard_rows == {fc1.shape[0] // mesh_sizes["fsdp"]}


@pytest.mark.slow
def test_encoder_buckets_are_exact_and_bounded(data_dir, batches, single_device_run):
  config = small_config(data_dir)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  buckets = aim.encoder_buckets(4, model_cfg.num_tokens - mask_cfg.n_drop)
  losses, _, layout, train_step, _ = _run_steps(config, mesh, batches * 2, buckets=buckets)
  reference = single_device_run[0]
  np.testing.assert_allclose(losses[:3], reference, rtol=1e-5)
  # Only the buckets' lengths were compiled, one program each, and some
  # batches ran the encoder on fewer tokens than the fixed split keeps.
  assert layout.compiled_lengths <= set(buckets)
  assert train_step._cache_size() == len(layout.compiled_lengths)
  assert min(layout.compiled_lengths) < buckets[-1]


@pytest.mark.slow
def test_packed_encoder_is_exact_and_bounded(data_dir, batches, single_device_run):
  """Packing per data shard (2 shards, 2 groups) trains with the fixed split's losses."""
  config = small_config(data_dir)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  rows = (model_cfg.num_tokens - mask_cfg.n_drop) * config.batch_size // 2
  buckets = aim.encoder_buckets(8, rows)
  losses, _, layout, train_step, _ = _run_steps(config, mesh, batches * 2, buckets=buckets,
                                             pack_groups=2)
  reference = single_device_run[0]
  np.testing.assert_allclose(losses[:3], reference, rtol=2e-5)
  assert layout.compiled_lengths <= set(buckets)
  assert train_step._cache_size() == len(layout.compiled_lengths)
  assert max(layout.compiled_lengths) < buckets[-1]  # fewer encoder rows than the fixed split


@pytest.mark.parametrize("buckets,pack,want_groups", [(0, False, 0), (4, False, 0), (4, True, 2)])
def test_mask_layout_follows_the_config(data_dir, buckets, pack, want_groups):
  """config.masking picks the layout: fixed split, buckets up to n_keep, or packed per shard."""
  config = small_config(data_dir, **{"masking.encoder_buckets": buckets,
                                     "masking.pack_encoder": pack})
  model_cfg, mask_cfg = train.model_and_mask_configs(config, num_channels=26)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
  drawn = []
  mask_fn = lambda *args: drawn.append(args) or "masks"
  layout = encoder_layout.make_mask_layout(config, mask_fn, model_cfg, mask_cfg, mesh)
  n_keep = model_cfg.num_tokens - mask_cfg.n_drop
  assert layout.pack_groups == want_groups
  if not buckets:
    assert layout.buckets is None
    assert layout.draw(1, 2, 3) == "masks" and drawn == [(1, 2, 3)]  # The fixed split: as drawn.
    assert not layout.compiled_lengths
  elif pack:  # Up to every kept token of a shard's 4 examples.
    assert layout.buckets == aim.encoder_buckets(4, n_keep * config.batch_size // 2)
  else:
    assert layout.buckets == aim.encoder_buckets(4, n_keep)


# ---------------------------------------------------------------------------
# Preemption, crash and exact resume (real processes).
# ---------------------------------------------------------------------------
def _launch(workdir, data_dir, **overrides):
  cmd = [sys.executable, "-m", "lsm2.main", "--config=configs/pretrain.py:tiny,aim,runlocal",
         f"--workdir={workdir}", *cli_overrides(data_dir, **overrides)]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  with open(pathlib.Path(workdir).with_suffix(".log"), "ab") as log:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_step(workdir, step, proc, timeout=300):
  path = pathlib.Path(workdir) / "checkpoints" / str(step)
  deadline = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None, f"training exited early ({proc.returncode}); see {workdir}.log"
    assert time.time() < deadline, f"no checkpoint {path} after {timeout}s"
    time.sleep(0.02)


def _scalars(workdir, tag) -> dict[int, float]:
  """Scalar `tag` per step from the workdir's TensorBoard events (later files win)."""
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def _attempts(workdir):
  """The attempts WORKDIR/goodput.json records ([] before the first record)."""
  path = pathlib.Path(workdir) / "goodput.json"
  return json.loads(path.read_text())["attempts"] if path.exists() else []


def _export_params(workdir):
  model, _, _ = pretrained.load_pretrained(workdir)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.mark.slow
def test_preempt_crash_and_resume_equals_uninterrupted(data_dir, tmp_path):
  steps = 60
  straight = tmp_path / "straight"
  proc = _launch(straight, data_dir, total_steps=steps)
  assert proc.wait(timeout=600) == 0

  resumed = tmp_path / "resumed"
  # 1. Preemption: SIGTERM saves a checkpoint and exits with the requeue status (75).
  proc = _launch(resumed, data_dir, total_steps=steps)
  _wait_for_step(resumed, 5, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 75
  log = pathlib.Path(f"{resumed}.log").read_text()
  assert "Preempted at step" in log and "exiting with status 75" in log
  assert not (resumed / "export").exists()
  preempted_at = max(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
  assert 5 <= preempted_at < steps
  (attempt,) = _attempts(resumed)  # The preemption wrote its goodput record.
  assert (attempt["status"], attempt["last_step"], attempt["last_saved"]) == (
      "preempted", preempted_at, preempted_at)

  # 2. Crash: kill -9 after a later checkpoint, once a log step past it is recorded (checkpoints
  #    every 10 steps, records every 5): the resume repeats the steps after the checkpoint.
  proc = _launch(resumed, data_dir, total_steps=steps, checkpoint_every=10)
  target = (preempted_at // 10 + 2) * 10
  _wait_for_step(resumed, target, proc)
  while len(_attempts(resumed)) < 2 or _attempts(resumed)[1]["last_step"] < target + 5:
    assert proc.poll() is None, f"training exited early ({proc.returncode})"
    time.sleep(0.02)
  proc.kill()
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert not (resumed / "export").exists()

  # 3. Resume to the end.
  proc = _launch(resumed, data_dir, total_steps=steps)
  assert proc.wait(timeout=600) == 0
  assert "Resumed from" in pathlib.Path(f"{resumed}.log").read_text()
  preempted, killed, finished = _attempts(resumed)  # goodput.json: the repeated steps.
  assert [a["status"] for a in (preempted, killed, finished)] == ["preempted", "killed", "finished"]
  assert killed["start_step"] == preempted_at and preempted["repeated_steps"] == 0
  assert finished["start_step"] == target and killed["repeated_steps"] == killed["last_step"] - target >= 5
  assert killed["restart_lost_s"] == pytest.approx(
      killed["repeated_steps"] * killed["step_s"] / killed["measured_steps"])

  for a, b in zip(_export_params(straight), _export_params(resumed)):
    np.testing.assert_array_equal(a, b)
  # Validation metrics depend on the parameters only: equal at every evaluation.
  # Training averages cover log_every steps; the preempted run resumed mid-window,
  # so compare them once the crash resume (on a checkpoint step) has taken over.
  for tag, first in (("val/mse", 0), ("train/loss", target + 1)):
    want, got = _scalars(straight, tag), _scalars(resumed, tag)
    assert steps in want
    for step in (s for s in want if s >= first):
      assert got[step] == pytest.approx(want[step], rel=1e-6), (tag, step)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_as_one(data_dir, tmp_path):
  """launch/local.sh 2 over loopback gives the single-process losses; 1 process resumes it.

  Both run the packed encoder (one packing group per process's shard)."""
  packed = {"mesh.data": 2, "masking.encoder_buckets": 4, "masking.pack_encoder": True}
  overrides = cli_overrides(data_dir, total_steps=10, eval_every=100, **packed)
  env = {**os.environ, "PYTHON": sys.executable}
  two = tmp_path / "two"
  subprocess.run(["bash", "launch/local.sh", "2", "--config", "configs/pretrain.py:tiny,aim,runlocal",
                  "--workdir", str(two), *overrides], cwd=REPO, env=env, check=True, timeout=600)
  one = tmp_path / "one"  # One process with two devices: the same mesh, the same global batches.
  subprocess.run([sys.executable, "-m", "lsm2.main", "--config=configs/pretrain.py:tiny,aim,runlocal",
                  f"--workdir={one}", *overrides], cwd=REPO, check=True, timeout=600,
                 env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  want, got = _scalars(one, "train/loss"), _scalars(two, "train/loss")
  assert sorted(want) == sorted(got) == [5, 10]
  # Downstream restore of the 2-process export in this 1-process, 8-device job.
  for a, b in zip(_export_params(two), _export_params(one)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for step in want:  # CPU collectives across processes vs within one: round-off only.
    assert got[step] == pytest.approx(want[step], rel=1e-5)

  # The 2-process checkpoint resumes in a 1-process job (with 2 devices).
  overrides = cli_overrides(data_dir, total_steps=15, eval_every=100, **packed)
  log = subprocess.run([sys.executable, "-m", "lsm2.main", "--config=configs/pretrain.py:tiny,aim,runlocal",
                        f"--workdir={two}", *overrides], cwd=REPO, check=True, timeout=600,
                       capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}).stderr
  assert "Resumed from" in log and "at step 10" in log
  assert "Encoder layout: packed encoder, 2 group(s)" in log
  assert "written by 2 processes, this job has 1" in log
  assert 15 in _scalars(two, "train/loss")


def _child_pid(parent: int, marker: str) -> int:
  """The pid of `parent`'s child process whose command line contains `marker`."""
  for proc in pathlib.Path("/proc").iterdir():
    try:
      ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
      cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
      continue
    if ppid == parent and marker in cmdline:
      return int(proc.name)
  raise AssertionError(f"no child of {parent} with {marker!r}")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(data_dir, tmp_path):
  """Orbax's preemption sync point (JAX's distributed runtime catches the SIGTERM): a SIGTERM
  to process 1 alone makes both processes save the same step and exit 75, and launch/local.sh
  exits 75 too, for a requeue."""
  workdir = tmp_path / "two"
  overrides = cli_overrides(data_dir, total_steps=100000, checkpoint_every=100000, log_every=1,
                            eval_every=100000, **{"mesh.data": 2})
  launcher = subprocess.Popen(
      ["bash", "launch/local.sh", "2", "--config", "configs/pretrain.py:tiny,aim,runlocal",
       "--workdir", str(workdir), *overrides], cwd=REPO, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "PYTHON": sys.executable})
  logs = [workdir / "logs" / f"process_{i}.log" for i in range(2)]
  deadline = time.time() + 300
  while not (logs[1].exists() and "step 3/" in logs[1].read_text()):
    assert launcher.poll() is None and time.time() < deadline, "training did not reach step 3"
    time.sleep(0.2)
  os.kill(_child_pid(launcher.pid, "--process_id=1"), signal.SIGTERM)
  _, err = launcher.communicate(timeout=300)
  assert launcher.returncode == 75, err
  assert "preempted; run the same command again to resume" in err
  texts = [log.read_text() for log in logs]
  assert "SIGTERM caught" in texts[1] and "SIGTERM caught" not in texts[0]
  steps = {int(s) for text in texts for s in re.findall(r"Preempted at step (\d+)", text)}
  assert len(steps) == 1
  assert (workdir / "checkpoints" / str(steps.pop())).exists()
  assert not (workdir / "export").exists()
