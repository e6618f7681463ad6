"""launch/*.sh: exact dry-run commands, refused settings, and local.sh's real processes;
launch/constraints.txt against pyproject.toml, and launch/lock.py that writes it.

The cloud tools (gcloud, sbatch, xpk) are replaced by stubs that record their
argv, so the real (non-dry-run) paths are checked to run exactly what the dry
run prints. No real TPU, Slurm or GKE is reachable from the test machine.
"""
import datetime
import importlib.util
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / "launch"
CONSTRAINTS = LAUNCH / "constraints.txt"
BASH = shutil.which("bash")


def run_script(script, *args, env=None, cwd=None, timeout=60):
  full_env = {**os.environ, "PYTHON": "python3", **(env or {})}
  return subprocess.run([BASH, str(LAUNCH / script), *map(str, args)], capture_output=True,
                        text=True, env=full_env, cwd=cwd, timeout=timeout)


def lines(result):
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "my configs" / "pretrain.py"
  path.parent.mkdir()
  path.write_text("def get_config(arg):\n  raise AssertionError('launchers never import configs')\n")
  return path


@pytest.fixture
def stub_bin(tmp_path):
  """A directory of stub commands that append their argv (as JSON) to a log."""
  bin_dir, log = tmp_path / "stub-bin", tmp_path / "stub-calls.jsonl"
  bin_dir.mkdir()
  for tool in ("gcloud", "sbatch", "xpk"):
    stub = bin_dir / tool
    stub.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(log)!r}, "a") as f:
          f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
        """))
    stub.chmod(0o755)

  def calls():
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


# --- local.sh ---------------------------------------------------------------------------------


def test_local_dry_run_prints_one_background_command_per_process(tmp_path, config_file):
  workdir = tmp_path / "my runs" / "w"
  result = run_script(
      "local.sh", 3, "--config", f"{config_file}:tiny,aim,runlocal", "--workdir", workdir,
      "--devices-per-process=4", "--port", 12345, "--config.lr=0.001", "--config.data.dir=/data dir/x",
      "--dry-run", "--", "--jax_debug_nans",
      env={"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"})
  log_dir = f"{workdir}/logs"
  expected = [shlex.join(["mkdir", "-p", log_dir])]
  for i in range(3):
    command = shlex.join([
        "env", "JAX_PLATFORMS=cpu",
        "XLA_FLAGS=--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=4",
        "python3", "-m", "lsm2.main", f"--config={config_file}:tiny,aim,runlocal", f"--workdir={workdir}",
        "--config.lr=0.001", "--config.data.dir=/data dir/x", "--jax_debug_nans",
        "--coordinator_address=127.0.0.1:12345", "--num_processes=3", f"--process_id={i}"])
    expected.append(f"{command} >{shlex.quote(f'{log_dir}/process_{i}.log')} 2>&1 &")
  expected.append("wait")
  assert lines(result) == expected
  assert not workdir.exists()


@pytest.mark.parametrize("args, message", [
    (["--config", "CFG", "--workdir", "W"], "missing required flag N"),
    ([0, "--config", "CFG", "--workdir", "W"], "N must be a positive integer, got '0'"),
    ([2, "--workdir", "W"], "missing required flag --config"),
    ([2, "--config", "CFG"], "missing required flag --workdir"),
    ([2, "--config", "CFG", "--workdir"], "--workdir needs a value"),
    ([2, "--config", "CFG", "--workdir", "W", "--config.lr"], "override --config.lr needs a value"),
    ([2, "--config", "nowhere.py:S", "--workdir", "W"], "--config file 'nowhere.py' does not exist"),
    ([2, "--config", "CFG", "--workdir", "W", "--devices-per-process", "x"],
     "--devices-per-process must be a positive integer"),
    ([2, "--config", "CFG", "--workdir", "W", "--bogus"], "unknown argument '--bogus'"),
])
def test_local_refuses_bad_settings(config_file, args, message):
  args = [str(config_file) if a == "CFG" else a for a in args]
  result = run_script("local.sh", *args, "--dry-run")
  assert result.returncode == 2
  assert f"local.sh: error: {message}" in result.stderr
  assert result.stdout == ""


FAKE_MAIN = '''
"""Stands in for lsm2.main: records what it was given, then behaves as FAKE_MODE says."""
import json, os, pathlib, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir, pid = pathlib.Path(args["workdir"]), args["process_id"]
print(f"fake main {pid} starting", flush=True)
(workdir / f"process_{pid}.json").write_text(json.dumps(
    {"argv": sys.argv[1:], "pid": os.getpid(), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
     "XLA_FLAGS": os.environ.get("XLA_FLAGS")}))
if os.environ.get("FAKE_MODE") == "fail":
  if pid == "1":
    while not (workdir / "process_0.json").exists():
      time.sleep(0.05)
    print("process 1 gives up", flush=True)
    sys.exit(3)
  time.sleep(120)  # Process 0 hangs, as a real one would in a collective.
if os.environ.get("FAKE_MODE") == "preempted":  # Both save at one step and exit with the code.
  time.sleep(0.5 * int(pid))
  sys.exit(int(os.environ["FAKE_STATUS"]))
'''


@pytest.fixture
def fake_module(tmp_path):
  module_dir = tmp_path / "modules"
  module_dir.mkdir()
  (module_dir / "fake_main.py").write_text(FAKE_MAIN)
  return {"PYTHONPATH": str(module_dir), "PYTHON": sys.executable}


def test_local_runs_processes_with_their_own_logs(tmp_path, config_file, fake_module):
  workdir = tmp_path / "run dir"
  result = run_script("local.sh", 2, "--module", "fake_main", "--config", config_file,
                      "--workdir", workdir, "--devices-per-process", 3, "--config.seed=7",
                      env=fake_module)
  assert result.returncode == 0, result.stderr
  records = [json.loads((workdir / f"process_{i}.json").read_text()) for i in range(2)]
  coordinators = set()
  for i, record in enumerate(records):
    flags = dict(a.split("=", 1) for a in record["argv"])
    assert flags["--process_id"] == str(i)
    assert flags["--num_processes"] == "2"
    assert flags["--workdir"] == str(workdir)
    assert flags["--config.seed"] == "7"
    coordinators.add(flags["--coordinator_address"])
    assert record["JAX_PLATFORMS"] == "cpu"
    assert record["XLA_FLAGS"].split()[-1] == "--xla_force_host_platform_device_count=3"
    assert f"fake main {i} starting" in (workdir / "logs" / f"process_{i}.log").read_text()
  assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")


def test_local_stops_the_others_when_one_process_fails(tmp_path, config_file, fake_module):
  workdir = tmp_path / "w"
  start = time.monotonic()
  result = run_script("local.sh", 2, "--module", "fake_main", "--config", config_file,
                      "--workdir", workdir, env={**fake_module, "FAKE_MODE": "fail"}, timeout=60)
  assert time.monotonic() - start < 30  # Process 0 would sleep 120 s if left alone.
  assert result.returncode == 1
  assert "process 1 exited with status 3" in result.stderr
  assert str(workdir / "logs" / "process_1.log") in result.stderr
  assert "process 1 gives up" in result.stderr  # The log's tail is shown.
  hung_pid = json.loads((workdir / "process_0.json").read_text())["pid"]
  with pytest.raises(ProcessLookupError):
    os.kill(hung_pid, 0)


@pytest.mark.parametrize("override,status", [(None, 75), ("--config.preemption_exit_code=42", 42)])
def test_local_exits_with_the_preemption_status_for_a_requeue(tmp_path, config_file, fake_module,
                                                              override, status):
  workdir = tmp_path / "w"
  result = run_script("local.sh", 2, "--module", "fake_main", "--config", config_file,
                      "--workdir", workdir, *([override] if override else []), timeout=60,
                      env={**fake_module, "FAKE_MODE": "preempted", "FAKE_STATUS": str(status)})
  assert result.returncode == status, result.stderr
  for i in range(2):
    assert f"process {i} saved a preemption checkpoint and exited with status {status}" in result.stderr
  assert "preempted; run the same command again to resume" in result.stderr
  assert "stopping the others" not in result.stderr


JAX_PROBE = '''
"""Joins jax.distributed with lsm2.main's flags and records the world it sees."""
import json, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
jax.distributed.initialize(args["coordinator_address"], int(args["num_processes"]), int(args["process_id"]))
gathered = multihost_utils.process_allgather(np.array([jax.process_index()]))
with open(f"{args['workdir']}/probe_{args['process_id']}.json", "w") as f:
  json.dump({"index": jax.process_index(), "count": jax.process_count(), "local": jax.local_device_count(),
             "global": jax.device_count(), "gathered": gathered.ravel().tolist()}, f)
'''


@pytest.mark.slow
def test_local_processes_form_one_jax_runtime_over_loopback(tmp_path, config_file):
  (tmp_path / "jax_probe.py").write_text(JAX_PROBE)
  workdir = tmp_path / "w"
  result = run_script("local.sh", 2, "--module", "jax_probe", "--devices-per-process", 2,
                      "--config", config_file, "--workdir", workdir,
                      env={"PYTHONPATH": str(tmp_path), "PYTHON": sys.executable}, timeout=120)
  assert result.returncode == 0, result.stderr
  for i in range(2):
    probe = json.loads((workdir / f"probe_{i}.json").read_text())
    assert probe == {"index": i, "count": 2, "local": 2, "global": 4, "gathered": [0, 1]}


# --- tpu_vm.sh --------------------------------------------------------------------------------

TPU_SETTINGS = ["--name", "lsm2-v4-32", "--zone", "us-central2-b"]
TPU_RUN = ("cd ~/lsm2 && python3 -m lsm2.main --distributed=on --config=configs/pretrain.py:S,aim "
           "--workdir=gs://my-bucket/runs/s-aim --config.data.dir=gs://my-bucket/data")


def tpu_ssh(command, *extra):
  return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lsm2-v4-32", "--zone=us-central2-b",
                     *extra, "--worker=all", f"--command={command}"])


def test_tpu_vm_git_ref_dry_run():
  result = run_script("tpu_vm.sh", *TPU_SETTINGS, "--git-ref", "v0.1", "--repo=https://github.com/o/lsm2.git",
                      "--config", "configs/pretrain.py:S,aim", "--workdir", "gs://my-bucket/runs/s-aim",
                      "--config.data.dir=gs://my-bucket/data", "--dry-run")
  remote = ("set -euo pipefail; "
            "if [ ! -d ~/lsm2/.git ]; then git clone --quiet https://github.com/o/lsm2.git ~/lsm2; fi; "
            "git -C ~/lsm2 remote set-url origin https://github.com/o/lsm2.git; "
            "git -C ~/lsm2 fetch --quiet origin v0.1; "
            "git -C ~/lsm2 checkout --quiet --detach FETCH_HEAD; "
            "python3 -m pip install --quiet -c ~/lsm2/launch/constraints.txt -e ~/lsm2'[tpu]'; " + TPU_RUN)
  assert lines(result) == [tpu_ssh(remote)]
  # The workers find the constraints file in their checkout of the ref.
  tracked = subprocess.run(["git", "-C", REPO_ROOT, "ls-files", "--error-unmatch", CONSTRAINTS],
                           capture_output=True)
  assert tracked.returncode == 0, "launch/constraints.txt is not tracked by git"


def test_tpu_vm_local_wheel_dry_run_copies_wheel_configs_and_constraints(tmp_path):
  wheel = tmp_path / "dist dir" / "lsm2-0.1.0-py3-none-any.whl"
  wheel.parent.mkdir()
  wheel.write_bytes(b"")
  result = run_script("tpu_vm.sh", *TPU_SETTINGS, "--project", "my-proj", "--wheel", wheel,
                      "--gcloud-flag=--internal-ip", "--config", "configs/pretrain.py:S,aim",
                      "--workdir", "gs://my-bucket/runs/s-aim", "--config.data.dir=gs://my-bucket/data",
                      "--dry-run")
  common = ["--zone=us-central2-b", "--project=my-proj", "--worker=all", "--internal-ip"]

  def ssh(command):
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lsm2-v4-32", *common, f"--command={command}"])

  whl = "~/lsm2/lsm2-0.1.0-py3-none-any.whl"
  assert lines(result) == [
      ssh("mkdir -p ~/lsm2"),
      shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", str(REPO_ROOT / "configs"),
                  str(CONSTRAINTS), str(wheel), "lsm2-v4-32:lsm2/", *common]),
      ssh(f"set -euo pipefail; python3 -m pip install --quiet -c ~/lsm2/constraints.txt {whl}'[tpu]'; "
          f"python3 -m pip install --quiet --force-reinstall --no-deps {whl}; " + TPU_RUN),
  ]


def test_tpu_vm_bucket_wheel_is_fetched_on_the_workers():
  result = run_script("tpu_vm.sh", *TPU_SETTINGS, "--wheel", "gs://my-bucket/lsm2-0.1.0-py3-none-any.whl",
                      "--remote-dir", "/opt/lsm2", "--python", "~/venv/bin/python", "--jax-spec=",
                      "--config", "configs/pretrain.py:S,aim", "--workdir", "gs://my-bucket/runs/s-aim",
                      "--dry-run")
  out = lines(result)
  assert len(out) == 3
  assert out[0] == tpu_ssh("mkdir -p /opt/lsm2")
  assert "/opt/lsm2/ " in out[1]  # configs/ copied into the remote dir.
  # The workers' JAX is kept, so nothing is pinned, and the script says so.
  assert "--jax-spec given: installing without launch/constraints.txt" in result.stderr
  assert out[2] == tpu_ssh(
      "set -euo pipefail; gcloud storage cp gs://my-bucket/lsm2-0.1.0-py3-none-any.whl /opt/lsm2/; "
      "~/venv/bin/python -m pip install --quiet /opt/lsm2/lsm2-0.1.0-py3-none-any.whl; "
      "~/venv/bin/python -m pip install --quiet --force-reinstall --no-deps "
      "/opt/lsm2/lsm2-0.1.0-py3-none-any.whl; cd /opt/lsm2 && ~/venv/bin/python -m lsm2.main --distributed=on "
      "--config=configs/pretrain.py:S,aim --workdir=gs://my-bucket/runs/s-aim")


def test_tpu_vm_remote_command_keeps_awkward_overrides_intact():
  awkward = ["--config.data.dir=gs://my bucket/it's here", "--config.model.size=S;rm -rf ~"]
  result = run_script("tpu_vm.sh", *TPU_SETTINGS, "--git-ref", "main", "--repo", "r",
                      "--config", "configs/pretrain.py:S", "--workdir", "gs://b/w", *awkward, "--dry-run")
  (line,) = lines(result)
  command = shlex.split(line)[-1].removeprefix("--command=")
  run = command.split("cd ~/lsm2 && ", 1)[1]
  assert shlex.split(run) == ["python3", "-m", "lsm2.main", "--distributed=on", "--config=configs/pretrain.py:S",
                              "--workdir=gs://b/w", *awkward]


def test_tpu_vm_runs_what_its_dry_run_prints(stub_bin):
  env, calls = stub_bin
  args = [*TPU_SETTINGS, "--git-ref", "main", "--repo", "r", "--config", "configs/pretrain.py:S",
          "--workdir", "gs://b/w", "--config.lr=0.01"]
  printed = [shlex.split(l) for l in lines(run_script("tpu_vm.sh", *args, "--dry-run", env=env))]
  assert calls() == []
  assert run_script("tpu_vm.sh", *args, env=env).returncode == 0
  assert calls() == printed


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--git-ref", "m", "--repo", "r"], "missing required flag --name"),
    (["--name", "t", "--git-ref", "m", "--repo", "r"], "missing required flag --zone"),
    (["--name", "t", "--zone", "z"], "missing required flag --git-ref (with --repo) or --wheel"),
    (["--name", "t", "--zone", "z", "--git-ref", "m"], "missing required flag --repo"),
    (["--name", "t", "--zone", "z", "--repo", "r", "--wheel", "gs://b/x.whl"], "--repo needs --git-ref"),
    (["--name", "t", "--zone", "z", "--git-ref", "m", "--repo", "r", "--wheel", "gs://b/x.whl"],
     "--git-ref and --wheel exclude each other"),
    (["--name", "t", "--zone", "z", "--wheel", "/no/such.whl"], "--wheel file '/no/such.whl' does not exist"),
])
def test_tpu_vm_refuses_missing_settings(args, message):
  result = run_script("tpu_vm.sh", *args, "--config", "configs/pretrain.py", "--workdir", "gs://b/w",
                      "--dry-run")
  assert result.returncode == 2
  assert f"tpu_vm.sh: error: {message}" in result.stderr


@pytest.mark.parametrize("config, workdir, message", [
    ("configs/pretrain.py", "/local/dir", "--workdir must be a gs:// bucket path"),
    ("/abs/pretrain.py", "gs://b/w", "--config must be relative to the repository root"),
    ("", "gs://b/w", "missing required flag --config"),
    ("configs/pretrain.py", "", "missing required flag --workdir"),
])
def test_tpu_vm_refuses_bad_paths(config, workdir, message):
  args = [*TPU_SETTINGS, "--git-ref", "m", "--repo", "r", "--dry-run"]
  args += ["--config", config] if config else []
  args += ["--workdir", workdir] if workdir else []
  result = run_script("tpu_vm.sh", *args)
  assert result.returncode == 2
  assert message in result.stderr


def test_tpu_vm_without_gcloud_says_so(tmp_path):
  empty_bin = tmp_path / "bin"
  empty_bin.mkdir()
  for tool in ("basename", "dirname"):
    (empty_bin / tool).symlink_to(shutil.which(tool))
  result = run_script("tpu_vm.sh", *TPU_SETTINGS, "--git-ref", "m", "--repo", "r",
                      "--config", "configs/pretrain.py", "--workdir", "gs://b/w", env={"PATH": str(empty_bin)})
  assert result.returncode == 2
  assert "'gcloud' is not on PATH" in result.stderr


# --- slurm_gpu.sh -----------------------------------------------------------------------------


SBATCH_NOTE = ["# lsm2.main sees SLURM_NTASKS > 1 and calls jax.distributed.initialize(),",
               "# which reads the coordinator (first node), process count and ids from Slurm.",
               "set -euo pipefail",
               f"cd {shlex.quote(str(REPO_ROOT))}"]


def test_slurm_dry_run_one_process_per_gpu(tmp_path, config_file):
  workdir = tmp_path / "shared fs" / "run"
  result = run_script("slurm_gpu.sh", "--nodes", 4, "--config", f"{config_file}:S,aim", "--workdir", workdir,
                      "--job-name", "masking_scheme/scheme=aim", "--partition", "a100", "--time=2-00:00:00",
                      "--sbatch-option=--exclusive", "--setup", "source /opt/venv/bin/activate",
                      "--install", "--config.masking.scheme=aim", "--dry-run")
  script = f"{workdir}/launch.sbatch"
  assert lines(result) == [
      f"# {script}:",
      "#!/bin/bash",
      '#SBATCH --job-name="masking_scheme/scheme=aim"',
      "#SBATCH --nodes=4",
      "#SBATCH --ntasks-per-node=8",
      "#SBATCH --gpus-per-node=8",
      '#SBATCH --partition="a100"',
      '#SBATCH --time="2-00:00:00"',
      f'#SBATCH --output="{workdir}/logs/slurm-%j.out"',
      "#SBATCH --exclusive",
      "# Written by launch/slurm_gpu.sh: one process per GPU; "
      "JAX gives task SLURM_LOCALID its node's GPU SLURM_LOCALID.",
      *SBATCH_NOTE,
      "source /opt/venv/bin/activate",
      "python3 -m pip install --quiet -c launch/constraints.txt -e '.[cuda12]'",
      "srun --kill-on-bad-exit=1 " + shlex.join(
          ["python3", "-m", "lsm2.main", f"--config={config_file}:S,aim", f"--workdir={workdir}",
           "--config.masking.scheme=aim"]),
      "# submit:",
      shlex.join(["sbatch", script]),
  ]


def test_slurm_dry_run_one_process_per_node_with_relative_paths(tmp_path, config_file):
  result = run_script("slurm_gpu.sh", "--nodes=2", "--per-node", "--gpus-per-node", 4, "--cpus-per-task", 32,
                      "--config", "my configs/pretrain.py", "--workdir", "runs/r%1", "--dry-run", "--",
                      "--jax_log_compiles", cwd=tmp_path)
  workdir = f"{tmp_path}/runs/r%1"
  assert lines(result) == [
      f"# {workdir}/launch.sbatch:",
      "#!/bin/bash",
      '#SBATCH --job-name="lsm2"',
      "#SBATCH --nodes=2",
      "#SBATCH --ntasks-per-node=1",
      "#SBATCH --gpus-per-node=4",
      "#SBATCH --cpus-per-task=32",
      f'#SBATCH --output="{tmp_path}/runs/r%%1/logs/slurm-%j.out"',
      "# Written by launch/slurm_gpu.sh: one process per node, each driving its 4 GPUs.",
      *SBATCH_NOTE,
      "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
      "srun --kill-on-bad-exit=1 --cpus-per-task=32 " + shlex.join(
          ["python3", "-m", "lsm2.main", f"--config={config_file}", f"--workdir={workdir}",
           "--jax_log_compiles"]),
      "# submit:",
      shlex.join(["sbatch", f"{workdir}/launch.sbatch"]),
  ]


def test_slurm_writes_the_printed_script_and_submits_it(tmp_path, config_file, stub_bin):
  env, calls = stub_bin
  workdir = tmp_path / "w"
  args = ["--nodes", 2, "--config", config_file, "--workdir", workdir, "--config.seed=3"]
  printed = lines(run_script("slurm_gpu.sh", *args, "--dry-run", env=env))
  assert not workdir.exists()
  result = run_script("slurm_gpu.sh", *args, env=env)
  assert result.returncode == 0, result.stderr
  script = workdir / "launch.sbatch"
  assert script.read_text().splitlines() == printed[1:-2]
  assert (workdir / "logs").is_dir()
  assert calls() == [["sbatch", str(script)]]


@pytest.mark.parametrize("args, message", [
    (["--config", "CFG", "--workdir", "W"], "missing required flag --nodes"),
    (["--nodes", "two", "--config", "CFG", "--workdir", "W"], "--nodes must be a positive integer, got 'two'"),
    (["--nodes", 2, "--workdir", "W"], "missing required flag --config"),
    (["--nodes", 2, "--config", "CFG"], "missing required flag --workdir"),
    (["--nodes", 2, "--config", "CFG", "--workdir", "W", "--gpus-per-node", 0],
     "--gpus-per-node must be a positive integer"),
    (["--nodes", 2, "--config", "missing.py", "--workdir", "W"], "--config file 'missing.py' does not exist"),
    (["--nodes", 2, "--config", "CFG", "--workdir", "W", "--setup"], "--setup needs a value"),
])
def test_slurm_refuses_missing_settings(config_file, args, message):
  args = [str(config_file) if a == "CFG" else a for a in args]
  result = run_script("slurm_gpu.sh", *args, "--dry-run")
  assert result.returncode == 2
  assert f"slurm_gpu.sh: error: {message}" in result.stderr


# --- gke_xpk.sh -------------------------------------------------------------------------------

GKE_SETTINGS = ["--cluster", "tpu-cluster", "--workload", "lsm2-s-aim", "--tpu-type", "v5p-128",
                "--config", "configs/pretrain.py:S,aim", "--workdir", "gs://my-bucket/runs/s-aim",
                "--config.data.dir=gs://my-bucket/data"]
GKE_RUN = ("python3 -m lsm2.main --config=configs/pretrain.py:S,aim --workdir=gs://my-bucket/runs/s-aim "
           "--config.data.dir=gs://my-bucket/data")
XPK = ["xpk", "workload", "create", "--cluster=tpu-cluster", "--workload=lsm2-s-aim", "--tpu-type=v5p-128"]


def test_gke_dry_run_builds_the_committed_tree_into_an_image(tmp_path):
  stage = f"{tmp_path}/lsm2-xpk-lsm2-s-aim"
  result = run_script("gke_xpk.sh", *GKE_SETTINGS, "--num-slices", 2, "--xpk-flag=--max-restarts=3",
                      "--dry-run", env={"TMPDIR": str(tmp_path)})
  assert lines(result) == [
      f"rm -rf {stage}",
      f"mkdir -p {stage}",
      f"git -C {shlex.quote(str(REPO_ROOT))} archive --format=tar HEAD | tar -x -C {stage}",
      shlex.join([*XPK, "--num-slices=2", "--base-docker-image=python:3.11", f"--script-dir={stage}",
                  f"--command=python3 -m pip install --quiet -c launch/constraints.txt '.[tpu]' && {GKE_RUN}",
                  "--max-restarts=3"]),
  ]


def test_gke_jax_spec_installs_that_jax_unpinned(tmp_path):
  result = run_script("gke_xpk.sh", *GKE_SETTINGS, "--jax-spec", "jax[tpu]==0.10.1", "--dry-run",
                      env={"TMPDIR": str(tmp_path)})
  command = shlex.split(lines(result)[-1])[-1]
  assert command == f"--command=python3 -m pip install --quiet . 'jax[tpu]==0.10.1' && {GKE_RUN}"
  assert "--jax-spec given: installing without launch/constraints.txt" in result.stderr


def test_gke_dry_run_with_a_prebuilt_image():
  result = run_script("gke_xpk.sh", *GKE_SETTINGS, "--project", "p", "--zone", "us-east5-a",
                      "--docker-image", "gcr.io/p/lsm2:v1", "--dry-run")
  assert lines(result) == [shlex.join([*XPK, "--num-slices=1", "--project=p", "--zone=us-east5-a",
                                       "--docker-image=gcr.io/p/lsm2:v1", f"--command={GKE_RUN}"])]


def test_gke_stages_the_repository_and_runs_what_it_prints(tmp_path, stub_bin):
  env, calls = stub_bin
  env = {**env, "TMPDIR": str(tmp_path)}
  printed = lines(run_script("gke_xpk.sh", *GKE_SETTINGS, "--dry-run", env=env))
  result = run_script("gke_xpk.sh", *GKE_SETTINGS, env=env)
  assert result.returncode == 0, result.stderr
  assert calls() == [shlex.split(printed[-1])]
  stage = tmp_path / "lsm2-xpk-lsm2-s-aim"
  assert (stage / "pyproject.toml").is_file() and (stage / "lsm2" / "__init__.py").is_file()
  assert (stage / "launch" / "constraints.txt").is_file()
  assert not (stage / ".git").exists() and not (stage / ".venv").exists()


@pytest.mark.parametrize("drop, extra, message", [
    ("--cluster", [], "missing required flag --cluster"),
    ("--workload", [], "missing required flag --workload"),
    ("--tpu-type", [], "missing required flag --tpu-type"),
    ("--config", [], "missing required flag --config"),
    ("--workdir", [], "missing required flag --workdir"),
    (None, ["--workload", "Bad_Name"], "--workload 'Bad_Name' is not a valid name"),
    (None, ["--workload", "a" * 41], f"--workload '{'a' * 41}' is not a valid name"),
    (None, ["--workdir", "/nfs/run"], "--workdir must be a gs:// bucket path"),
    (None, ["--num-slices", "-1"], "--num-slices must be a positive integer, got '-1'"),
])
def test_gke_refuses_missing_settings(drop, extra, message):
  args = list(GKE_SETTINGS)
  if drop:
    i = args.index(drop)
    del args[i:i + 2]
  result = run_script("gke_xpk.sh", *args, *extra, "--dry-run")
  assert result.returncode == 2
  assert f"gke_xpk.sh: error: {message}" in result.stderr


# --- launch/constraints.txt and launch/lock.py -----------------------------------------------

# What the TPU and GPU hosts install through the [tpu] and [cuda12] extras' jax[...].
ACCELERATOR_PACKAGES = ["jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt"]


def pinned_versions():
  pins = {}
  for line in CONSTRAINTS.read_text().splitlines():
    if line and not line.startswith("#"):
      requirement = Requirement(line)
      (spec,) = requirement.specifier
      assert spec.operator == "==", f"constraints.txt: {line!r} is not pinned with =="
      name = canonicalize_name(requirement.name)
      assert name not in pins, f"constraints.txt: {name} pinned twice"
      pins[name] = spec.version
  return pins


def test_constraints_pin_every_declared_dependency_within_its_range():
  project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
  optional = project["optional-dependencies"]
  pins = pinned_versions()
  assert "lsm2" not in pins
  for line in [*project["dependencies"], *optional["tpu"], *optional["cuda12"]]:
    requirement = Requirement(line)
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{name} ({line!r} in pyproject.toml) is not pinned: rerun python launch/lock.py"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {line!r}: "
        "rerun python launch/lock.py")
  for name in ACCELERATOR_PACKAGES:
    assert name in pins, f"{name} is not pinned: rerun python launch/lock.py"


def load_lock():
  spec = importlib.util.spec_from_file_location("lock", LAUNCH / "lock.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_lock_ignores_this_machines_pip_configuration():
  env = load_lock().pip_env({"PATH": "bin", "PIP_CERT": "ca.pem", "PIP_FIND_LINKS": "wheels",
                             "PIP_INDEX_URL": "https://mirror.example/simple", "PIP_CONSTRAINT": "c.txt",
                             "PIP_CONFIG_FILE": "pip.conf"})
  assert env == {"PATH": "bin", "PIP_CERT": "ca.pem", "PIP_CONFIG_FILE": os.devnull}


def test_lock_writes_sorted_normalized_pins_without_lsm2():
  report = {
      "environment": {"implementation_name": "cpython", "python_full_version": "3.11.7",
                      "sys_platform": "linux", "platform_machine": "x86_64"},
      "install": [{"metadata": {"name": name, "version": version}}
                  for name, version in [("lsm2", "0.1.0"), ("tensorflow_cpu", "2.21.0"), ("jaxlib", "0.10.2"),
                                        ("jax-cuda12-plugin", "0.10.2"), ("jax", "0.10.2"), ("PyYAML", "6.0.4")]],
  }
  text = load_lock().constraints_text(report, datetime.date(2026, 1, 2))
  header = [l for l in text.splitlines() if l.startswith("#")]
  assert header[:2] == [
      "# Generated by `python launch/lock.py` on 2026-01-02 from pyproject.toml:",
      "# what pip resolves for lsm2[tpu,cuda12] on cpython 3.11.7, linux x86_64."]
  assert [l for l in text.splitlines() if not l.startswith("#")] == [
      "jax==0.10.2", "jax-cuda12-plugin==0.10.2", "jaxlib==0.10.2", "pyyaml==6.0.4", "tensorflow-cpu==2.21.0"]
