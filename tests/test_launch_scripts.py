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
import re
import shlex
import shutil
import signal
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
  out = lines(result)
  started = re.fullmatch(r"echo '=== local.sh attempt 1, started (\S+), process 0 of 3 ===' >>.*", out[1])[1]
  expected = [shlex.join(["mkdir", "-p", log_dir])]
  for i in range(3):
    log = shlex.quote(f"{log_dir}/process_{i}.log")
    command = shlex.join([
        "env", "JAX_PLATFORMS=cpu",
        "XLA_FLAGS=--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=4",
        "python3", "-m", "lsm2.main", f"--config={config_file}:tiny,aim,runlocal", f"--workdir={workdir}",
        "--config.lr=0.001", "--config.data.dir=/data dir/x", "--jax_debug_nans",
        "--coordinator_address=127.0.0.1:12345", "--num_processes=3", f"--process_id={i}"])
    # Appended to, after a header: a relaunch keeps the earlier attempts' logs.
    expected.append(f"echo '=== local.sh attempt 1, started {started}, process {i} of 3 ===' >>{log}")
    expected.append(f"{command} >>{log} 2>&1 &")
  expected.append("wait")
  assert out == expected
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", started)
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
(workdir / f"process_{pid}.json").write_text(json.dumps(
    {"argv": sys.argv[1:], "pid": os.getpid(), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
     "XLA_FLAGS": os.environ.get("XLA_FLAGS")}))
if os.environ.get("FAKE_MODE") == "saves_on_sigterm":  # As lsm2.main: save, exit 75.
  import signal
  signal.signal(signal.SIGTERM, lambda *_: (print(f"process {pid} saved", flush=True), sys.exit(75)))
print(f"fake main {pid} starting", flush=True)
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
if os.environ.get("FAKE_MODE") == "saves_on_sigterm":
  time.sleep(120)
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


def test_local_sigterm_to_the_script_exits_75_and_a_relaunch_keeps_the_log(tmp_path, config_file,
                                                                         fake_module):
  """A SIGTERM to local.sh (a scheduler stopping it) reaches the processes, which save and
  exit 75; local.sh exits 75 too (not 143), and the next attempt appends to the logs."""
  workdir = tmp_path / "w"
  args = [BASH, str(LAUNCH / "local.sh"), "2", "--module", "fake_main", "--config", str(config_file),
          "--workdir", str(workdir)]
  launcher = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **fake_module, "FAKE_MODE": "saves_on_sigterm"})
  deadline = time.monotonic() + 30
  while not all((workdir / f"process_{i}.json").exists() for i in range(2)):
    assert launcher.poll() is None and time.monotonic() < deadline, "the processes did not start"
    time.sleep(0.05)
  launcher.send_signal(signal.SIGTERM)
  _, err = launcher.communicate(timeout=60)
  assert launcher.returncode == 75, err
  assert "preempted; run the same command again to resume" in err
  relaunch = run_script("local.sh", 2, "--module", "fake_main", "--config", config_file, "--workdir", workdir,
                        env=fake_module)
  assert relaunch.returncode == 0, relaunch.stderr
  for i in range(2):
    log = (workdir / "logs" / f"process_{i}.log").read_text().splitlines()
    headers = [n for n, line in enumerate(log) if line.startswith("=== local.sh attempt ")]
    assert [log[n].split(",")[0] for n in headers] == ["=== local.sh attempt 1", "=== local.sh attempt 2"]
    assert log[headers[0] + 1:headers[1]] == [f"fake main {i} starting", f"process {i} saved"]
    assert log[headers[1] + 1:] == [f"fake main {i} starting"]


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
TPU_MAIN = ("python3 -m lsm2.main --distributed=on --config=configs/pretrain.py:S,aim "
            "--workdir=gs://my-bucket/runs/s-aim --config.data.dir=gs://my-bucket/data")


def tpu_loop(main, log_dir="~/lsm2/logs/my-bucket_runs_s-aim", bucket_logs="gs://my-bucket/runs/s-aim/logs",
             detach=False, max_restarts=10):
  """The script every worker runs: attempts of `main`, each logged on the worker and copied to
  the bucket, relaunched while they exit 75."""
  show = "" if detach else 'tail -n +1 -f --pid="$child" "$log" & '
  return (f'log_dir={log_dir}; mkdir -p "$log_dir"; echo $$ >"$log_dir/loop.pid"; '
          'n=0; while [ -e "$log_dir/attempt_$n.log" ]; do n=$((n + 1)); done; '
          'restarts=0; stop=0; child=; '
          'trap \'stop=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null\' TERM; '
          'while :; do '
          'log="$log_dir/attempt_$n.log"; '
          'echo "=== tpu_vm.sh attempt $n on $(hostname), started $(date -u +%Y-%m-%dT%H:%M:%SZ) ===" >"$log"; '
          f'{main} >>"$log" 2>&1 & child=$!; '
          f'{show}while kill -0 "$child" 2>/dev/null; do sleep 1; done; '
          'status=0; wait "$child" || status=$?; child=; '
          'echo "=== attempt $n exited with status $status ===" >>"$log"; '
          f'gcloud storage cp --quiet "$log" {bucket_logs}/"$(hostname).attempt_$n.log" || '
          'echo "tpu_vm.sh: could not copy $log to the workdir" >&2; '
          f'if [ "$status" -ne 75 ] || [ "$stop" = 1 ] || [ "$restarts" -ge {max_restarts} ]; then break; fi; '
          'restarts=$((restarts + 1)); n=$((n + 1)); '
          'echo "tpu_vm.sh: $(hostname): preempted (status 75), relaunch $restarts of at most '
          f'{max_restarts}" >&2; '
          'done; exit "$status"')


TPU_RUN = f"cd ~/lsm2 && bash -c {shlex.quote(tpu_loop(TPU_MAIN))}"


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
      "/opt/lsm2/lsm2-0.1.0-py3-none-any.whl; cd /opt/lsm2 && bash -c " + shlex.quote(tpu_loop(
          "~/venv/bin/python -m lsm2.main --distributed=on --config=configs/pretrain.py:S,aim "
          "--workdir=gs://my-bucket/runs/s-aim", log_dir="/opt/lsm2/logs/my-bucket_runs_s-aim")))


def test_tpu_vm_detach_dry_run_starts_the_loop_in_its_own_session():
  result = run_script("tpu_vm.sh", *TPU_SETTINGS, "--git-ref", "v0.1", "--repo=r", "--detach", "--max-restarts=3",
                      "--config", "configs/pretrain.py:S,aim", "--workdir", "gs://my-bucket/runs/s-aim/",
                      "--config.data.dir=gs://my-bucket/data", "--dry-run")
  (line,) = lines(result)
  command = shlex.split(line)[-1]
  run = command.split("; cd ~/lsm2; ", 1)[1]
  log_dir = "~/lsm2/logs/my-bucket_runs_s-aim"
  loop = tpu_loop(TPU_MAIN.replace("s-aim", "s-aim/", 1), detach=True, max_restarts=3)
  assert run == (f"mkdir -p {log_dir}; setsid nohup bash -c {shlex.quote(loop)} >{log_dir}/loop.out 2>&1 "
                 f'</dev/null & echo "tpu_vm.sh: started on $(hostname): logs in {log_dir}, copied to '
                 'gs://my-bucket/runs/s-aim/logs"')


FAKE_GCLOUD = """#!/bin/bash
# One TPU VM worker, here: `gcloud ... ssh --command=CMD` runs CMD with bash; `gcloud storage cp
# [--quiet] SRC DST` copies, gs://BUCKET/PATH standing for $FAKE_GCS/BUCKET/PATH.
if [ "$1" = storage ]; then
  shift 2; [ "$1" = --quiet ] && shift
  src="${1/#gs:\/\//$FAKE_GCS/}"; dst="${2/#gs:\/\//$FAKE_GCS/}"
  case "$dst" in */) mkdir -p "$dst" ;; *) mkdir -p "$(dirname "$dst")" ;; esac
  exec cp "$src" "$dst"
fi
for arg in "$@"; do case "$arg" in --command=*) exec bash -c "${arg#--command=}" ;; esac; done
"""

FAKE_WORKER_PYTHON = f"""#!{sys.executable}
\"\"\"The worker's Python: pip succeeds; lsm2.main counts its runs and behaves as FAKE_MODE says.\"\"\"
import os, pathlib, signal, sys, time
if sys.argv[1:3] == ["-m", "pip"]:
  sys.exit(0)
state = pathlib.Path(os.environ["FAKE_STATE"])
run = int(state.read_text()) if state.exists() else 0
state.write_text(str(run + 1))
signal.signal(signal.SIGTERM, lambda *_: (print("saved", flush=True), sys.exit(75)))
print(f"lsm2.main run {{run}}:", *sys.argv[3:], flush=True)
if os.environ["FAKE_MODE"] == "saves_on_sigterm":
  time.sleep(60)
sys.exit(75 if os.environ["FAKE_MODE"] == "preempted" else 0)
"""


@pytest.fixture
def tpu_worker(tmp_path):
  """Runs tpu_vm.sh for real against one fake worker (this machine) and a fake bucket."""
  bin_dir, gcs, remote = tmp_path / "bin", tmp_path / "gcs", tmp_path / "remote"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "python").write_text(FAKE_WORKER_PYTHON)
  for stub in bin_dir.iterdir():
    stub.chmod(0o755)
  (gcs / "b").mkdir(parents=True)
  (gcs / "b" / "lsm2-0.1.0-py3-none-any.whl").write_bytes(b"")
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_GCS": str(gcs),
         "FAKE_STATE": str(tmp_path / "runs")}
  args = [*TPU_SETTINGS, "--wheel", "gs://b/lsm2-0.1.0-py3-none-any.whl", "--remote-dir", remote,
          "--python", bin_dir / "python", "--config", "configs/pretrain.py:S", "--workdir", "gs://b/runs/r"]

  def launch(*extra, mode):
    return run_script("tpu_vm.sh", *args, *extra, env={**env, "FAKE_MODE": mode})

  return launch, gcs / "b" / "runs" / "r" / "logs", remote / "logs" / "b_runs_r"


def test_tpu_vm_relaunches_a_preempted_job_and_keeps_every_attempts_log(tpu_worker):
  launch, bucket_logs, worker_logs = tpu_worker
  host = os.uname().nodename
  result = launch("--max-restarts", 1, mode="preempted")
  assert result.returncode == 75, result.stderr
  assert f"tpu_vm.sh: {host}: preempted (status 75), relaunch 1 of at most 1" in result.stderr
  assert "lsm2.main run 0: --distributed=on --config=configs/pretrain.py:S --workdir=gs://b/runs/r" in result.stdout
  # A later launch numbers its attempts on from the earlier ones; nothing is overwritten.
  result = launch(mode="finishes")
  assert result.returncode == 0, result.stderr
  for n, status in enumerate([75, 75, 0]):
    log = (bucket_logs / f"{host}.attempt_{n}.log").read_text()
    assert log == (worker_logs / f"attempt_{n}.log").read_text()
    header, run, footer = log.splitlines()
    assert re.fullmatch(rf"=== tpu_vm.sh attempt {n} on {re.escape(host)}, started \S+Z ===", header)
    assert run.startswith(f"lsm2.main run {n}: --distributed=on")
    assert footer == f"=== attempt {n} exited with status {status} ==="
  assert sorted(p.name for p in bucket_logs.iterdir()) == [f"{host}.attempt_{n}.log" for n in range(3)]


def test_tpu_vm_detached_loop_outlives_the_launch_and_stops_on_sigterm(tpu_worker):
  launch, bucket_logs, worker_logs = tpu_worker
  result = launch("--detach", mode="saves_on_sigterm")
  assert result.returncode == 0, result.stderr
  assert f"tpu_vm.sh: started on {os.uname().nodename}: logs in {worker_logs}" in result.stdout
  deadline = time.monotonic() + 30
  while "lsm2.main run 0" not in ((worker_logs / "attempt_0.log").read_text()
                                  if (worker_logs / "attempt_0.log").exists() else ""):
    assert time.monotonic() < deadline, "the detached job did not start"
    time.sleep(0.05)
  loop = int((worker_logs / "loop.pid").read_text())
  os.kill(loop, signal.SIGTERM)  # How docs/launching.md stops a detached run.
  while not list(bucket_logs.glob("*.attempt_0.log")) or os.path.exists(f"/proc/{loop}"):
    assert time.monotonic() < deadline, "the detached loop did not stop"
    time.sleep(0.05)
  (log,) = bucket_logs.iterdir()
  assert log.read_text().splitlines()[1:] == [
      "lsm2.main run 0: --distributed=on --config=configs/pretrain.py:S --workdir=gs://b/runs/r", "saved",
      "=== attempt 0 exited with status 75 ==="]
  assert not (worker_logs / "attempt_1.log").exists()  # Stopped on purpose: no relaunch.


def test_tpu_vm_remote_command_keeps_awkward_overrides_intact():
  awkward = ["--config.data.dir=gs://my bucket/it's here", "--config.model.size=S;rm -rf ~"]
  result = run_script("tpu_vm.sh", *TPU_SETTINGS, "--git-ref", "main", "--repo", "r",
                      "--config", "configs/pretrain.py:S", "--workdir", "gs://b/w", *awkward, "--dry-run")
  (line,) = lines(result)
  command = shlex.split(line)[-1].removeprefix("--command=")
  (loop,) = shlex.split(command.split("cd ~/lsm2 && bash -c ", 1)[1])
  run = loop.split('>"$log"; ', 1)[1].split(' >>"$log" 2>&1 & child=$!', 1)[0]
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
# After --output: Slurm's own file is appended to, the job is requeueable, and the batch
# shell gets USR1 5 minutes before the time limit.
SBATCH_REQUEUE = ["#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"]


def sbatch_attempt_log(workdir):
  """The batch script's lines that send each attempt's output to its own file."""
  return ["# This attempt's output, one file per attempt (SLURM_RESTART_COUNT: 0, then 1 per requeue).",
          'ATTEMPT="${SLURM_RESTART_COUNT:-0}"',
          f'ATTEMPT_LOG={shlex.quote(f"{workdir}/logs")}/slurm-"$SLURM_JOB_ID.$ATTEMPT".out',
          'echo "attempt $ATTEMPT of job $SLURM_JOB_ID on $(hostname): output in $ATTEMPT_LOG"',
          'exec >"$ATTEMPT_LOG" 2>&1']


def sbatch_step(srun, script, max_requeues=10):
  """The batch script's lines that run the step, pass it SIGTERM, and requeue it on 75."""
  resume = shlex.quote(shlex.quote(script))
  return [
      "# USR1 (--signal, ahead of the time limit) or TERM (preemption, scancel): SIGTERM to the",
      "# step, whose processes save a checkpoint and exit 75.",
      "STEP=",
      """trap '[ -z "$STEP" ] || kill -TERM "$STEP" 2>/dev/null || true' USR1 TERM""",
      f"{srun} &",
      "STEP=$!",
      "# A trapped signal ends `wait` early: poll until the step is over, then collect its status.",
      'while kill -0 "$STEP" 2>/dev/null; do sleep 1; done',
      "STATUS=0",
      'wait "$STEP" || STATUS=$?',
      'if [ "$STATUS" -eq 75 ]; then',
      f'  if [ "$ATTEMPT" -lt {max_requeues} ]; then',
      '    echo "slurm_gpu.sh: preempted (status 75): requeueing job $SLURM_JOB_ID, requeue $((ATTEMPT + 1)) '
      f'of at most {max_requeues}"',
      '    scontrol requeue "$SLURM_JOB_ID"',
      "  else",
      f'    echo "slurm_gpu.sh: preempted (status 75) after {max_requeues} requeues (--max-requeues): '
      f'not requeued; resume with sbatch" {resume}',
      "  fi",
      "fi",
      'exit "$STATUS"',
  ]


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
      *SBATCH_REQUEUE,
      "#SBATCH --exclusive",
      "# Written by launch/slurm_gpu.sh: one process per GPU; "
      "JAX gives task SLURM_LOCALID its node's GPU SLURM_LOCALID.",
      *SBATCH_NOTE,
      *sbatch_attempt_log(workdir),
      "source /opt/venv/bin/activate",
      "python3 -m pip install --quiet -c launch/constraints.txt -e '.[cuda12]'",
      *sbatch_step("srun --kill-on-bad-exit=1 " + shlex.join(
          ["python3", "-m", "lsm2.main", f"--config={config_file}:S,aim", f"--workdir={workdir}",
           "--config.masking.scheme=aim"]), script),
      "# submit:",
      shlex.join(["sbatch", script]),
  ]


def test_slurm_dry_run_one_process_per_node_with_relative_paths(tmp_path, config_file):
  result = run_script("slurm_gpu.sh", "--nodes=2", "--per-node", "--gpus-per-node", 4, "--cpus-per-task", 32,
                      "--config", "my configs/pretrain.py", "--workdir", "runs/r%1", "--max-requeues=3",
                      "--signal-before", 120, "--dry-run", "--",
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
      "#SBATCH --open-mode=append",
      "#SBATCH --requeue",
      "#SBATCH --signal=B:USR1@120",
      "# Written by launch/slurm_gpu.sh: one process per node, each driving its 4 GPUs.",
      *SBATCH_NOTE,
      *sbatch_attempt_log(workdir),
      "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
      *sbatch_step("srun --kill-on-bad-exit=1 --cpus-per-task=32 " + shlex.join(
          ["python3", "-m", "lsm2.main", f"--config={config_file}", f"--workdir={workdir}",
           "--jax_log_compiles"]), f"{workdir}/launch.sbatch", max_requeues=3),
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


def test_slurm_without_requeues_submits_a_job_slurm_does_not_requeue(tmp_path, config_file):
  result = run_script("slurm_gpu.sh", "--nodes", 1, "--config", config_file, "--workdir", tmp_path,
                      "--max-requeues", 0, "--dry-run")
  script = lines(result)
  assert "#SBATCH --no-requeue" in script and "#SBATCH --requeue" not in script
  assert not any("scontrol" in line for line in script)
  assert script[-4:-2] == ['wait "$STEP" || STATUS=$?', 'exit "$STATUS"']


SRUN_STUB = f"""#!{sys.executable}
\"\"\"Stands in for srun: records its argv, then exits FAKE_SRUN_STATUS, or waits for SIGTERM
(FAKE_SRUN=wait) and exits 75 then, as lsm2.main's processes do.\"\"\"
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("step got SIGTERM", flush=True), sys.exit(75)))
print("step running", flush=True)
with open(os.environ["FAKE_CALLS"], "a") as f:
  f.write(json.dumps(["srun", *sys.argv[1:]]) + "\\n")
if os.environ.get("FAKE_SRUN") == "wait":
  time.sleep(60)
sys.exit(int(os.environ.get("FAKE_SRUN_STATUS", "0")))
"""


@pytest.fixture
def slurm_job(tmp_path, config_file):
  """Runs the batch script that slurm_gpu.sh writes as Slurm would, with stub srun/scontrol."""
  bin_dir, calls = tmp_path / "slurm-bin", tmp_path / "slurm-calls.jsonl"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(SRUN_STUB)
  (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "[\\"scontrol\\", \\"$1\\", \\"$2\\"]" >>{calls}\n')
  (bin_dir / "sbatch").write_text("#!/bin/sh\n")
  for stub in bin_dir.iterdir():
    stub.chmod(0o755)
  workdir = tmp_path / "w"
  submit = run_script("slurm_gpu.sh", "--nodes", 1, "--config", config_file, "--workdir", workdir,
                      "--max-requeues", 2, env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
  assert submit.returncode == 0, submit.stderr

  def start(restart_count, **env):
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_RESTART_COUNT": str(restart_count), "FAKE_CALLS": str(calls), **env}
    return subprocess.Popen([BASH, str(workdir / "launch.sbatch")], stdout=subprocess.PIPE, text=True, env=env)

  def recorded():
    return [json.loads(l) for l in calls.read_text().splitlines()] if calls.exists() else []

  return workdir, start, recorded


def test_slurm_job_passes_the_time_limit_signal_to_the_step_and_requeues_on_75(slurm_job):
  workdir, start, recorded = slurm_job
  job = start(1, FAKE_SRUN="wait")
  deadline = time.monotonic() + 30
  while not recorded():
    assert job.poll() is None and time.monotonic() < deadline, "the step did not start"
    time.sleep(0.05)
  job.send_signal(signal.SIGUSR1)  # What --signal=B:USR1@300 sends 5 minutes before the limit.
  out, _ = job.communicate(timeout=30)
  assert job.returncode == 75
  assert out == f"attempt 1 of job 77 on {os.uname().nodename}: output in {workdir}/logs/slurm-77.1.out\n"
  assert recorded()[-1] == ["scontrol", "requeue", "77"]
  assert (workdir / "logs" / "slurm-77.1.out").read_text().splitlines() == [
      "step running", "step got SIGTERM",
      "slurm_gpu.sh: preempted (status 75): requeueing job 77, requeue 2 of at most 2"]


@pytest.mark.parametrize("restart_count, status", [(2, 75), (0, 1)])
def test_slurm_job_requeues_only_a_preemption_and_at_most_max_requeues_times(slurm_job, restart_count, status):
  workdir, start, recorded = slurm_job
  job = start(restart_count, FAKE_SRUN_STATUS=str(status))
  job.communicate(timeout=30)
  assert job.returncode == status
  assert [c[0] for c in recorded()] == ["srun"]
  log = (workdir / "logs" / f"slurm-77.{restart_count}.out").read_text()
  assert ("after 2 requeues (--max-requeues): not requeued; resume with sbatch" in log) == (status == 75)


@pytest.mark.parametrize("args, message", [
    (["--config", "CFG", "--workdir", "W"], "missing required flag --nodes"),
    (["--nodes", "two", "--config", "CFG", "--workdir", "W"], "--nodes must be a positive integer, got 'two'"),
    (["--nodes", 2, "--workdir", "W"], "missing required flag --config"),
    (["--nodes", 2, "--config", "CFG"], "missing required flag --workdir"),
    (["--nodes", 2, "--config", "CFG", "--workdir", "W", "--gpus-per-node", 0],
     "--gpus-per-node must be a positive integer"),
    (["--nodes", 2, "--config", "missing.py", "--workdir", "W"], "--config file 'missing.py' does not exist"),
    (["--nodes", 2, "--config", "CFG", "--workdir", "W", "--setup"], "--setup needs a value"),
    (["--nodes", 2, "--config", "CFG", "--workdir", "W", "--max-requeues", -1],
     "--max-requeues must be a non-negative integer, got '-1'"),
    (["--nodes", 2, "--config", "CFG", "--workdir", "W", "--signal-before", 0],
     "--signal-before must be a positive integer, got '0'"),
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
  result = run_script("gke_xpk.sh", *GKE_SETTINGS, "--num-slices", 2, "--max-restarts=3",
                      "--xpk-flag=--spot", "--dry-run", env={"TMPDIR": str(tmp_path)})
  assert lines(result) == [
      f"rm -rf {stage}",
      f"mkdir -p {stage}",
      f"git -C {shlex.quote(str(REPO_ROOT))} archive --format=tar HEAD | tar -x -C {stage}",
      shlex.join([*XPK, "--num-slices=2", "--max-restarts=3", "--base-docker-image=python:3.11",
                  f"--script-dir={stage}",
                  f"--command=python3 -m pip install --quiet -c launch/constraints.txt '.[tpu]' && {GKE_RUN}",
                  "--spot"]),
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
  # Restarts are on by default: a preempted workload resumes from the workdir by itself.
  assert lines(result) == [shlex.join([*XPK, "--num-slices=1", "--max-restarts=10", "--project=p",
                                       "--zone=us-east5-a", "--docker-image=gcr.io/p/lsm2:v1",
                                       f"--command={GKE_RUN}"])]


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
    (None, ["--max-restarts", "x"], "--max-restarts must be a non-negative integer, got 'x'"),
    (None, ["--xpk-flag=--max-restarts=3"],
     "--xpk-flag=--max-restarts=3: restarts are this script's own setting, write --max-restarts N (default 10)"),
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
