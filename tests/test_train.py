"""The sharded pretraining system: config validation, mesh equivalence, buckets.

Resume and runs across processes: tests/test_train_resume.py."""
import os
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
from jax.sharding import PartitionSpec as P
import pytest

from lsm2 import pretrained
from lsm2 import sharding
from lsm2.data import pipeline
from lsm2.model import aim
from lsm2.train import encoder_layout
from lsm2.train import train

from train_runs import REPO, attempts, cli_overrides, small_config, write_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_data(tmp_path_factory.mktemp("data") / "synth")


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
  (attempt,) = attempts(tmp_path)  # The divergence exit wrote its goodput record.
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
