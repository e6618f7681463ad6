"""Storage: every path through etils.epath, so gs:// works wherever a local path does.

The gs:// tests run against a real object-store server, fake-gcs-server on
127.0.0.1 (tests/gcs_emulator.py explains how each library is pointed at it),
never a mock: a dataset written to and read from a bucket, a bucket that does
not exist, and a tiny run with its data, workdir and evaluation all on the
bucket, SIGKILLed after a checkpoint, resumed bit-exact, exported and loaded.
"""
import json
import os
import pathlib
import queue
import subprocess
import sys
import threading

from etils import epath
from flax import nnx
import grain
import jax
import numpy as np
import pytest

from lsm2 import config_files
from lsm2 import pretrained
from lsm2 import storage
from lsm2.data import channels as channels_lib
from lsm2.data import dataset
from lsm2.data import inspect
from lsm2.data import metadata as metadata_lib
from lsm2.data import pipeline
from lsm2.data import shards
from lsm2.data import synthesize
from lsm2.data import writer as writer_lib
from lsm2.sweeps import collect
from lsm2.train import checkpoint
from lsm2.train import train

import gcs_emulator

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "fault_driver.py"  # One pretraining run per process (test_faults.py).
BUCKET = "lsm2-test"
MISSING = "lsm2-no-such-bucket"
STEPS = 6
OVERRIDES = {"model.patch_time": 60, "model.patch_channels": 2, "masking.time_bars": 10,
             "batch_size": 8, "total_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 3,
             "log_every": 2, "eval_every": 1000, "eval_batches": 1,
             "data.synthesize_subjects": 0}


def _pretrain_config(data_dir: str = ""):
  config = config_files.load_config(REPO / "configs" / "pretrain.py", "tiny,aim,runlocal")
  with config.unlocked():
    config.data.synthesize_subjects = 0
    config.data.dir = data_dir
  return config


# ----------------------------------------------------------------------------
# Without a server: what is refused before any request.
# ----------------------------------------------------------------------------
def test_a_url_that_lost_a_slash_is_refused_not_made_a_local_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(storage.StorageError, match=r"'gs:/nobucket/run' is neither a local path "
                     r"nor a URL: a bucket path is written gs://BUCKET/PATH"):
    train.train_and_evaluate(_pretrain_config(), "gs:/nobucket/run")
  assert list(tmp_path.iterdir()) == []  # pathlib would have made gs:/nobucket/run here.


def test_a_local_workdir_that_cannot_be_written_names_the_path_and_reason(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(storage.StorageError, match=rf"--workdir {blocker}/run: cannot write to it "
                     r"\((FileExistsError|NotADirectoryError)"):
    train.train_and_evaluate(_pretrain_config(), str(blocker / "run"))


@pytest.mark.parametrize("workdir,fragment", [
    ("gs:/x", "'gs:/x' is neither a local path nor a URL"),
    ("{blocker}/run", "--workdir {blocker}/run: cannot write to it"),
])
def test_the_command_line_prints_a_path_it_cannot_use_as_one_line_and_exits_1(
    tmp_path, workdir, fragment):
  """python -m lsm2.main: an lsm2.errors.Error is its message on stderr, not a traceback."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  workdir, fragment = (x.format(blocker=blocker) for x in (workdir, fragment))
  result = subprocess.run(
      [sys.executable, "-m", "lsm2.main", f"--config={REPO}/configs/pretrain.py:tiny,runlocal",
       f"--workdir={workdir}"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("lsm2: error: ")]
  assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
  assert list(tmp_path.iterdir()) == [blocker]  # No local directory made of the URL.


def test_the_command_line_prints_a_missing_config_file_as_one_line_and_exits_1(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "lsm2.main", "--config=configs/nope.py", f"--workdir={tmp_path}/run"],
      cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("lsm2: error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert "--config:" in errors[0] and "configs/nope.py" in errors[0]
  assert "No such file or directory" in errors[0]
  assert not (tmp_path / "run").exists()


def test_array_record_on_a_bucket_is_refused_with_the_ways_out():
  message = (r"gs://b/d: ArrayRecord shards cannot be read or written on a bucket \(array_record "
             r"opens local files only\). Copy the dataset to a local disk")
  with pytest.raises(shards.ArrayRecordNotLocalError, match=message):
    writer_lib.DatasetWriter("gs://b/d", channels=channels_lib.DEFAULT_CHANNELS,
                             fmt="array_record")
  with pytest.raises(shards.ArrayRecordNotLocalError, match="--format tfrecord"):
    shards.open_array_record("gs://b/d/train-00000-of-00001.array_record")


# ----------------------------------------------------------------------------
# Against the emulator.
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A fresh emulator with bucket BUCKET; this process's clients point at it meanwhile."""
  with gcs_emulator.serving(tmp_path_factory.mktemp("gcs"), BUCKET) as emulator:
    yield emulator


@pytest.fixture(scope="module")
def bucket_data(gcs, tmp_path_factory):
  """(gs:// dataset, the same dataset on local disk): 12 synthetic subjects x 2 days."""
  local = tmp_path_factory.mktemp("local") / "data"
  remote = f"gs://{BUCKET}/data"
  for out in (local, remote):
    synthesize.write_synthetic_dataset(out, subjects=12, days=2, seed=0)
  return remote, local


def test_a_missing_bucket_fails_early_naming_it_and_writes_nothing(gcs, bucket_data, tmp_path,
                                                                   tmp_path_factory, monkeypatch):
  monkeypatch.chdir(tmp_path)
  remote_data, _ = bucket_data
  missing = rf"bucket gs://{MISSING} does not exist \(or these credentials may not see it\)"
  no_credentials = "No Google Cloud credentials are configured here"
  with pytest.raises(storage.StorageError,
                     match=rf"--workdir gs://{MISSING}/run: {missing}.*{no_credentials}"):
    train.train_and_evaluate(_pretrain_config(remote_data), f"gs://{MISSING}/run")
  with pytest.raises(storage.StorageError,
                     match=rf"config.data.dir gs://{MISSING}/data: {missing}"):
    train.train_and_evaluate(_pretrain_config(f"gs://{MISSING}/data"),
                             f"gs://{BUCKET}/unused_run")
  assert gcs.objects(BUCKET, "unused_run") == []  # The write probe leaves nothing behind.
  with pytest.raises(storage.StorageError, match=rf"pretrained model gs://{MISSING}/run: {missing}"):
    pretrained.load_pretrained(f"gs://{MISSING}/run")
  with pytest.raises(storage.StorageError, match=rf"--out gs://{MISSING}/data: {missing}"):
    synthesize.write_synthetic_dataset(f"gs://{MISSING}/data", subjects=4, days=1, seed=0)
  assert list(tmp_path.iterdir()) == []
  # With credentials configured (here: gcloud's application-default file) no hint about them.
  gcloud = tmp_path_factory.mktemp("gcloud")
  (gcloud / "application_default_credentials.json").write_text("{}")
  monkeypatch.setenv("CLOUDSDK_CONFIG", str(gcloud))
  with pytest.raises(storage.StorageError, match=missing) as raised:
    storage.check_writable(f"gs://{MISSING}/run", "--workdir")
  assert no_credentials not in str(raised.value)


def test_a_dataset_on_a_bucket_reads_like_its_local_copy(bucket_data):
  remote, local = bucket_data
  meta = metadata_lib.load_metadata(remote)
  assert isinstance(meta.data_dir, epath.Path) and os.fspath(meta.data_dir) == remote
  assert meta.splits == metadata_lib.load_metadata(local).splits
  got, want = dataset.read_split(remote, "train"), dataset.read_split(local, "train")
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  def batches(data_dir, n, state=None):
    it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=4, seed=3)
    if state is not None:
      it.set_state(state)
    return it, [next(it) for _ in range(n)]

  assert inspect.main([remote]) == 0  # The command-line summary reads the bucket too.
  _, want = batches(local, 6)
  it, got = batches(remote, 2)  # Two batches, then resumed mid-shard from the iterator state.
  got += batches(remote, 4, json.loads(json.dumps(it.get_state())))[1]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["signals"], w["signals"])
    np.testing.assert_array_equal(g["observed"], w["observed"])


def test_sweep_results_are_collected_from_and_to_a_bucket(gcs):
  for point, value in (("scheme=aim", 0.6), ("scheme=lsm1", 0.5)):
    epath.Path(f"gs://{BUCKET}/sweep/{point}/eval/results.json").write_text(json.dumps(
        [{"task": "bmi", "metric": "mae", "value": value, "split": "test", "masking": "none",
          "n": 4}]))
  assert collect.main([f"gs://{BUCKET}/sweep", "--out", f"gs://{BUCKET}/tables/sweep"]) == 0
  assert epath.Path(f"gs://{BUCKET}/tables/sweep.csv").read_text().splitlines()[1:] == [
      "scheme=aim/eval,aim,bmi,,,mae,0.6,test,none,4",  # No level, no method: a probe's row.
      "scheme=lsm1/eval,lsm1,bmi,,,mae,0.5,test,none,4"]
  assert "| scheme=lsm1/eval | lsm1 | 0.5 |" in (
      epath.Path(f"gs://{BUCKET}/tables/sweep.md").read_text())


def test_an_export_on_a_bucket_moves_with_its_manifest_and_a_part_of_one_is_refused(gcs):
  """On a bucket a directory move is a copy and a delete, object by object: an export counts
  only with its manifest (written last) and every file it lists."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = {"w": jax.ShapeDtypeStruct((4, 8), np.float32, sharding=replicated)}
  root = f"gs://{BUCKET}/exports"
  for value in (1.0, 2.0):  # The second export moves the first aside, object by object.
    pretrained.export_params(
        root, {"w": jax.device_put(np.full((4, 8), value, np.float32), replicated)},
        {"v": value})
  names = gcs.objects(BUCKET, "exports/")
  assert "exports/export/manifest.json" in names
  assert not [n for n in names if "export.tmp" in n or "export.old" in n], names  # None left.
  assert all(n.startswith("exports/export/") for n in names if not n.endswith("/")), names
  export = pretrained.find_export(root)
  assert os.fspath(export) == f"{root}/export" and pretrained.read_description(export)["v"] == 2
  restored = pretrained.restore_params(export / pretrained.EXPORT_PARAMS, abstract)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((4, 8), 2.0))

  victim = max((n for n in names if "/params/" in n and "/d/" in n), key=len)
  epath.Path(f"gs://{BUCKET}/{victim}").unlink()  # What a kill mid-move leaves.
  missing = victim[len("exports/export/"):]
  with pytest.raises(pretrained.IncompleteExportError,
                     match=rf"{root}/export is not a complete export: {missing} is missing"):
    pretrained.load_pretrained(f"{root}/export")


def test_an_unreadable_step_on_a_bucket_is_copied_aside_before_it_is_deleted(gcs):
  """The fallback from a torn step on a bucket: every object of the step lands in
  checkpoints_corrupt/ with REASON.txt, and the step is gone, Orbax's commit marker last."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  workdir = f"gs://{BUCKET}/torn"
  ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=3)
  for step in (1, 2):
    ckpt.maybe_save(step, {"w": jax.device_put(np.full((4, 8), step, np.float32), replicated)},
                    iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
  ckpt.wait()
  ckpt.close()
  step_2 = {n[len("torn/checkpoints/2/"):] for n in gcs.objects(BUCKET, "torn/checkpoints/2/")
            if not n.endswith("/")}
  assert checkpoint.COMMIT_FILE in step_2
  for name in step_2:
    if "/d/" in name:  # Array data: torn in half.
      obj = epath.Path(f"{workdir}/checkpoints/2/{name}")
      obj.write_bytes(obj.read_bytes()[:len(obj.read_bytes()) // 2])
  ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=3)
  step, state, _ = ckpt.restore_latest(
      {"w": jax.ShapeDtypeStruct((4, 8), np.float32, sharding=replicated)}, None)
  assert step == 1 and float(state["w"][0, 0]) == 1.0 and ckpt.manager.all_steps() == [1]
  ckpt.close()
  assert [n for n in gcs.objects(BUCKET, "torn/checkpoints/2/") if not n.endswith("/")] == []
  moved = [n for n in gcs.objects(BUCKET, f"torn/{checkpoint.CORRUPT_DIR}/") if not n.endswith("/")]
  [where] = {n.split("/")[2] for n in moved}
  assert where.startswith("2.")
  assert {n[len(f"torn/{checkpoint.CORRUPT_DIR}/{where}/"):] for n in moved} == (
      step_2 | {checkpoint.REASON_FILE})


def _params(path) -> list[np.ndarray]:
  model, _, _ = pretrained.load_pretrained(path)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _run(env, workdir: str, data: str, kill_at_step: int | None, log: pathlib.Path) -> str:
  """tests/fault_driver.py on `workdir`: "done", or "killed" (SIGKILL) once it reports step
  `kill_at_step`, i.e. when the save at the checkpoint before it has finished."""
  overrides = {**OVERRIDES, "data.dir": data}
  with open(log, "ab") as err:
    proc = subprocess.Popen([sys.executable, str(DRIVER), workdir, json.dumps(overrides)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
  lines = queue.Queue()
  threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)],
                   daemon=True).start()
  try:
    while (line := lines.get(timeout=300)) is not None:
      if kill_at_step is not None and line.strip() == f"STEP {kill_at_step}":
        proc.kill()
        assert proc.wait(timeout=60) == -9
        return "killed"
    assert proc.wait(timeout=60) == 0, f"the run failed; see {log}:\n{log.read_text()[-3000:]}"
    return "done"
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.slow  # Three short training processes, a load and an evaluation (~2 min).
def test_train_kill_resume_export_load_and_evaluate_all_on_a_bucket(gcs, bucket_data, tmp_path):
  remote_data, _ = bucket_data
  workdir = f"gs://{BUCKET}/run"
  env = {**gcs_emulator.run_env(gcs), "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  log = tmp_path / "runs.log"
  # The reference: uninterrupted, the same data from the bucket, its workdir on local disk.
  reference = tmp_path / "reference"
  assert _run(env, str(reference), remote_data, None, log) == "done"

  # Killed at step 5: checkpoint step 2 is complete (step 4's save may be in flight).
  assert _run(env, workdir, remote_data, 5, log) == "killed"
  objects = gcs.objects(BUCKET, "run/")
  assert "run/checkpoints/2/commit_success.txt" in objects
  assert not any(o.startswith("run/export") for o in objects)
  assert _run(env, workdir, remote_data, None, log) == "done"
  assert "Resumed from gs://lsm2-test/run/checkpoints at step" in log.read_text()

  objects = gcs.objects(BUCKET, "run/")
  assert {"run/lsm2.json", "run/run.json", "run/export/lsm2.json",
          f"run/checkpoints/{STEPS}/commit_success.txt"} <= set(objects)
  assert any(o.startswith("run/events.out.tfevents.") for o in objects)  # TensorBoard.
  want = _params(reference / pretrained.EXPORT_DIR)
  for got in (_params(workdir), _params(f"{workdir}/export")):  # lsm2.load's own path.
    assert len(got) == len(want)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)

  # Evaluation: the model and the data from the bucket, its results to the bucket.
  from lsm2.eval import run as eval_run  # pylint: disable=g-import-not-at-top
  config = config_files.load_config(REPO / "configs" / "eval.py", "synthetic")
  with config.unlocked():
    config.init_from = workdir
    config.robustness.enabled = False
    config.windows.enabled = False
  records = eval_run.evaluate(config, f"gs://{BUCKET}/eval")
  out = epath.Path(f"gs://{BUCKET}/eval")
  assert json.loads((out / "results.json").read_text()) == records and records
  assert "LSM-2 evaluation: synthetic" in (out / "results.md").read_text()
  written = gcs.objects(BUCKET, "eval/")
  assert any(o.endswith(".png") for o in written)
  assert any(o.startswith("eval/events.out.tfevents.") for o in written)
