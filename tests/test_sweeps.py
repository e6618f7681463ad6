"""Sweep expansion (lsm2.sweeps.sweep), the paper's sweep files, and the sweep CLI."""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from lsm2 import config_files
from lsm2.sweeps import sweep as sw

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEPS = REPO_ROOT / "configs" / "sweeps"


# --- helpers: axis, product, zip_axes, names ---------------------------------------------------


def test_product_varies_the_last_axis_fastest():
  points = sw.product(sw.axis("config.a", [1, 2]), sw.axis("config.b", ["x", "y", "z"]))
  assert points == [{"config.a": a, "config.b": b} for a in (1, 2) for b in "xyz"]


def test_zip_axes_pairs_points_and_composes_with_product():
  points = sw.product(sw.axis("config.seed", [0, 1]),
                      sw.zip_axes(sw.axis("config.batch_size", [1024, 4096]),
                                  sw.axis("config.total_steps", [100, 50])))
  assert points == [
      {"config.seed": 0, "config.batch_size": 1024, "config.total_steps": 100},
      {"config.seed": 0, "config.batch_size": 4096, "config.total_steps": 50},
      {"config.seed": 1, "config.batch_size": 1024, "config.total_steps": 100},
      {"config.seed": 1, "config.batch_size": 4096, "config.total_steps": 50},
  ]


@pytest.mark.parametrize("make, message", [
    (lambda: sw.zip_axes(sw.axis("config.a", [1, 2]), sw.axis("config.b", [1])), "equal length, got lengths [2, 1]"),
    (lambda: sw.product(sw.axis("config.a", [1]), sw.axis("config.a", [2])), "'config.a' appears in more than one"),
    (lambda: sw.axis("model.size", ["S"]), "'model.size' must look like 'config.field"),
    (lambda: sw.axis("config.size", []), "non-empty list of values"),
    (lambda: sw.axis("config.size", "SB"), "non-empty list of values"),
])
def test_helpers_refuse_malformed_axes(make, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    make()


def test_point_names_and_flags():
  points = sw.name_points(sw.product(
      sw.axis("config.masking.random_ratio", [0.8, 1e-5]),
      sw.axis("config.mesh", [{"data": -1, "fsdp": 4}]),
      sw.axis("config.model.remat", [True]),
      sw.axis("config.data.dir", ["/data/a b"]),
  ))
  assert [p.name for p in points] == [
      "random_ratio=0.8,data=-1,fsdp=4,remat=true,dir=_data_a_b",
      "random_ratio=1e-05,data=-1,fsdp=4,remat=true,dir=_data_a_b",
  ]
  assert points[1].flags() == ["--config.masking.random_ratio=1e-05", "--config.mesh.data=-1",
                               "--config.mesh.fsdp=4", "--config.model.remat=true",
                               "--config.data.dir=/data/a b"]


def test_labels_keep_the_full_path_when_last_names_clash():
  points = sw.name_points(sw.product(sw.axis("config.model.size", ["S"]), sw.axis("config.data.size", [3])))
  assert points[0].name == "model.size=S,data.size=3"


def test_points_with_the_same_name_are_refused():
  with pytest.raises(ValueError, match="points 0 and 1 are both named 'dir=a_b'"):
    sw.name_points(sw.axis("config.dir", ["a b", "a/b"]))


def test_unsupported_override_values_are_refused():
  with pytest.raises(TypeError, match="cannot pass None"):
    sw.name_points(sw.axis("config.init_from", [None]))


@pytest.mark.parametrize("parts, expected", [
    (("lsm2", "masking_scheme", "scheme=aim"), "lsm2-masking-scheme-scheme-aim"),
    (("9lives", "x"), "w-9lives-x"),
])
def test_k8s_names(parts, expected):
  assert sw.k8s_name(*parts) == expected


def test_long_k8s_names_are_cut_with_a_hash_that_keeps_them_distinct():
  a = sw.k8s_name("lsm2", "data_size", "scheme=aim,max_train_subjects=100")
  b = sw.k8s_name("lsm2", "data_size", "scheme=aim,max_train_subjects=1000")
  assert a != b
  for name in (a, b):
    assert len(name) <= 40 and name[0].isalpha() and name[-1] != "-"
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


# --- the sweep files ---------------------------------------------------------------------------

EXPECTED_SWEEPS = {
    "masking_scheme": ["scheme=aim", "scheme=lsm1", "scheme=dropout_only", "scheme=attention_only"],
    "model_size": [f"scheme={s},size={m}" for s in ("aim", "lsm1") for m in ("tiny", "S", "B")],
    "data_size": [f"scheme={s},max_train_subjects={n}" for s in ("aim", "lsm1") for n in (100, 1000, 10000, 0)],
    "mask_ratio": [f"random_ratio={r}" for r in (0.5, 0.6, 0.7, 0.8, 0.9)],
    "learning_rate": [f"size={m},lr={lr}" for m in ("tiny", "S", "B") for lr in (0.001, 0.002, 0.005, 0.01)],
    "paper_recipes": ["scheme=aim,batch_size=1024,total_steps=100000",
                      "scheme=lsm1,batch_size=4096,total_steps=50000"],
}


def test_every_sweep_file_is_known():
  assert sorted(p.stem for p in SWEEPS.glob("*.py")) == sorted(EXPECTED_SWEEPS)


def _parse_config(config: str, point_flags: list[str]):
  """The config lsm2.main would build from --config=CONFIG and the point's flags."""
  path, _, arg = config.partition(":")
  argv = ["prog", f"--config={REPO_ROOT / path}:{arg}", *point_flags]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("name", sorted(EXPECTED_SWEEPS))
def test_sweep_files_expand_to_points_that_the_config_flags_accept(name):
  sweep = sw.load_sweep(SWEEPS / f"{name}.py")
  assert sweep.name == name
  assert [p.name for p in sweep.points] == EXPECTED_SWEEPS[name]
  assert sweep.base_config.startswith("configs/pretrain.py:")
  for point in sweep.points:
    config = _parse_config(sweep.base_config, point.flags())
    for key, value in point.overrides.items():
      field = config
      for part in key.split(".")[1:]:
        field = getattr(field, part)
      assert field == value and type(field) is type(value), (name, key)


# --- jobs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masking():
  return sw.load_sweep(SWEEPS / "masking_scheme.py")


def test_local_jobs(masking):
  jobs = sw.jobs(masking, "local", "/runs root", ["2", "--config.data.dir=/d", "--", "--jax_debug_nans"],
                 dry_run=True)
  assert len(jobs) == 4
  assert jobs[1].workdir == "/runs root/masking_scheme/scheme=lsm1"
  # BASE_CONFIG is relative to the repository root; the launcher gets it absolute.
  assert jobs[1].argv == ("bash", str(REPO_ROOT / "launch" / "local.sh"), "2", "--config.data.dir=/d",
                          "--config", f"{REPO_ROOT}/configs/pretrain.py:S,aim",
                          "--workdir", "/runs root/masking_scheme/scheme=lsm1",
                          "--config.masking.scheme=lsm1", "--dry-run", "--", "--jax_debug_nans")


def test_slurm_and_gke_jobs_get_distinct_names(masking, monkeypatch):
  monkeypatch.chdir(REPO_ROOT / "configs")  # A relative --config is relative to the current directory.
  slurm = sw.jobs(masking, "slurm", "/shared", ["--nodes", "2"], config="pretrain.py:B,aim")
  assert slurm[3].argv[2:] == ("--nodes", "2", "--config", f"{REPO_ROOT}/configs/pretrain.py:B,aim", "--workdir",
                               "/shared/masking_scheme/scheme=attention_only",
                               "--config.masking.scheme=attention_only",
                               "--job-name", "masking_scheme/scheme=attention_only")
  gke = sw.jobs(masking, "gke", "gs://b/sweeps", config="pretrain.py:B,aim")
  # The pods read the config from their own copy of the repository: relative to its root.
  assert gke[0].argv[gke[0].argv.index("--config") + 1] == "configs/pretrain.py:B,aim"
  names = [j.argv[j.argv.index("--workload") + 1] for j in gke]
  assert names == ["lsm2-masking-scheme-scheme-aim", "lsm2-masking-scheme-scheme-lsm1",
                   "lsm2-masking-scheme-scheme-dropout-only",
                   "lsm2-masking-scheme-scheme-attent-a723aa"]  # 41 characters cut to 40.


def test_eval_jobs_restore_each_point(masking):
  jobs = sw.jobs(masking, "tpu_vm", "gs://b/sweeps", ["--name", "t"], eval_taskset="depresjon")
  assert jobs[0].workdir == "gs://b/sweeps/masking_scheme/scheme=aim/eval/depresjon"
  assert jobs[0].argv[2:] == ("--name", "t", "--config", "configs/eval.py:depresjon", "--workdir",
                              "gs://b/sweeps/masking_scheme/scheme=aim/eval/depresjon",
                              "--config.init_from=gs://b/sweeps/masking_scheme/scheme=aim")
  # The eval config the jobs name accepts the task set.
  assert _parse_config("configs/eval.py:depresjon", []).taskset == "depresjon"


def test_eval_task_sets_are_those_of_the_eval_config():
  eval_config = config_files.load_module(REPO_ROOT / "configs" / "eval.py")
  assert sw.eval_tasksets() == tuple(eval_config.TASKSETS)
  for taskset in sw.eval_tasksets():
    assert eval_config.get_config(taskset).taskset == taskset


@pytest.mark.parametrize("taskset", ["probe", "configs/eval.py:probe"])
def test_eval_jobs_refuse_an_unknown_task_set(masking, taskset):
  with pytest.raises(ValueError) as error:
    sw.jobs(masking, "local", "/r", eval_taskset=taskset)
  assert str(error.value) == (f"--eval {taskset!r} is not a task set of configs/eval.py: it takes "
                              "one of synthetic, depresjon, fitabase")


def test_remote_launchers_refuse_a_config_outside_the_repository(masking, tmp_path):
  config = tmp_path / "mine.py"
  config.write_text("")
  assert sw.jobs(masking, "local", "/r", config=f"{config}:S")[0].argv[3] == f"{config}:S"
  with pytest.raises(ValueError, match=f"config '{config}' .* is outside the repository {REPO_ROOT}: the "
                                       "tpu_vm workers read their config from their own copy"):
    sw.jobs(masking, "tpu_vm", "gs://b/r", config=f"{config}:S")


def test_a_missing_base_config_names_the_sweep(tmp_path):
  sweep = sw.Sweep(name="mine", base_config="configs/nowhere.py:S", points=sw.name_points([{}]))
  with pytest.raises(FileNotFoundError, match="BASE_CONFIG of sweep mine .*: config file "
                                              "'configs/nowhere.py' .* does not exist"):
    sw.jobs(sweep, "slurm", "/r")


@pytest.mark.parametrize("arg", ["--workdir=/x", "--config", "--job-name", "--dry-run"])
def test_jobs_refuse_launcher_arguments_the_sweep_sets(masking, arg):
  with pytest.raises(ValueError, match="is set by the sweep itself"):
    sw.jobs(masking, "slurm", "/r", [arg, "v"])


# --- the CLI ---------------------------------------------------------------------------------


def run_sweep(*args, env=None, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, "-m", "lsm2.sweeps.sweep", *map(str, args)], capture_output=True,
                        text=True, cwd=cwd, env={**os.environ, "PYTHON": "python3", **(env or {})},
                        timeout=120)


def test_cli_dry_run_prints_each_launcher_command_and_its_dry_run(tmp_path):
  result = run_sweep("configs/sweeps/model_size.py", "--launcher", "local", "--workdir-root", tmp_path,
                     "--dry-run", "--", "2", "--port", "4321")
  assert result.returncode == 0, result.stderr
  out = result.stdout.splitlines()
  headers = [l for l in out if l.startswith("# [")]
  assert headers == [f"# [{i}/6] model_size/{name} -> {tmp_path}/model_size/{name}"
                     for i, name in enumerate(EXPECTED_SWEEPS["model_size"], 1)]
  assert shlex.split(out[1]) == ["bash", str(REPO_ROOT / "launch" / "local.sh"), "2", "--port", "4321",
                                 "--config", f"{REPO_ROOT}/configs/pretrain.py:S,aim", "--workdir",
                                 f"{tmp_path}/model_size/scheme=aim,size=tiny", "--config.masking.scheme=aim",
                                 "--config.model.size=tiny", "--dry-run"]
  process_lines = [shlex.split(l) for l in out if l.startswith("env JAX_PLATFORMS=cpu")]
  assert len(process_lines) == 12  # 6 points x 2 processes.
  assert "--config.model.size=B" in process_lines[-1] and "--process_id=1" in process_lines[-1]
  assert not (tmp_path / "model_size").exists()


def test_cli_works_from_any_directory(tmp_path):
  """Run from elsewhere with the sweep file's path, the launcher gets the repository's config."""
  result = run_sweep(SWEEPS / "model_size.py", "--launcher", "slurm", "--workdir-root", "runs",
                     "--only", "scheme=lsm1,size=B", "--dry-run", "--", "--nodes", "1", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  (srun,) = [shlex.split(l) for l in result.stdout.splitlines() if l.startswith("srun ")]
  assert srun[3:8] == ["-m", "lsm2.main", f"--config={REPO_ROOT}/configs/pretrain.py:S,aim",
                       f"--workdir={tmp_path}/runs/model_size/scheme=lsm1,size=B", "--config.masking.scheme=lsm1"]


def test_cli_stops_when_a_launcher_refuses_its_settings(tmp_path):
  result = run_sweep("configs/sweeps/masking_scheme.py", "--launcher", "tpu_vm", "--workdir-root", "gs://b/s",
                     "--dry-run", "--", "--zone", "z", "--git-ref", "main", "--repo", "r")
  assert result.returncode == 2
  assert result.stdout.count("# [") == 1
  assert "tpu_vm.sh: error: missing required flag --name" in result.stderr


def test_cli_reports_a_bad_sweep_file(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return []\n")
  result = run_sweep(bad, "--launcher", "local", "--dry-run")
  assert result.returncode == 2
  assert f"lsm2: error: sweep file {bad} does not define BASE_CONFIG" in result.stderr


BASE = "from lsm2.sweeps.sweep import axis, product\nBASE_CONFIG = 'configs/pretrain.py:S,aim'\n"
MALFORMED_SWEEPS = {  # File text -> what the error line says after "sweep file PATH".
    BASE + "def get_sweep(:\n  return []\n": " line 3: SyntaxError: ",
    "BASE_CONFIG = PRETRAIN\n": " line 1: NameError: name 'PRETRAIN' is not defined",
    "BASE_CONFIG = None\ndef get_sweep():\n  return []\n":
        ": BASE_CONFIG must name a config such as 'configs/pretrain.py:S,aim', got None",
    BASE + "def get_sweep():\n  return product(axis('config.seed', [0]), axis('model.depth', [1]))\n":
        " line 4: get_sweep() raised ValueError: sweep key 'model.depth' must look like ",
    BASE + "def get_sweep():\n  return [('config.seed', 1)]\n":
        ": get_sweep() must return a non-empty list of override dicts (built with axis, product, "
        "zip_axes), got [('config.seed', 1)]",
    BASE + "def get_sweep():\n  return [{'config.seed': 1}, {'config.seed': 1}]\n":
        ": sweep points 0 and 1 are both named 'seed=1'",
}


@pytest.mark.parametrize("text", MALFORMED_SWEEPS, ids=range(len(MALFORMED_SWEEPS)))
def test_a_malformed_sweep_file_is_one_error_line_naming_it(text, tmp_path, capsys):
  bad = tmp_path / "bad.py"
  bad.write_text(text)
  assert sw.main([str(bad), "--launcher", "local", "--dry-run"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and len(err.splitlines()) == 1, err
  assert err.startswith(f"lsm2: error: sweep file {bad}{MALFORMED_SWEEPS[text]}"), err


FAKE_MAIN = '''
import pathlib, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
pathlib.Path(args["workdir"], "ran").write_text(" ".join(sys.argv[1:]))
sys.exit(5 if args.get("config.masking.scheme") == "lsm1" else 0)
'''


def test_cli_runs_every_point_and_reports_failures(tmp_path):
  (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
  root = tmp_path / "root"
  config = tmp_path / "cfg.py"
  config.write_text("")
  result = run_sweep("configs/sweeps/masking_scheme.py", "--launcher", "local", "--workdir-root", root,
                     "--config", f"{config}:tiny,aim,runlocal", "--", "1", "--module", "fake_main",
                     env={"PYTHONPATH": str(tmp_path), "PYTHON": sys.executable})
  assert result.returncode == 1
  assert "sweep: 1 of 4 points failed: scheme=lsm1" in result.stderr
  for name in EXPECTED_SWEEPS["masking_scheme"]:
    ran = (root / "masking_scheme" / name / "ran").read_text()
    assert f"--config={config}:tiny,aim,runlocal" in ran and f"--config.masking.{name}" in ran
    assert (root / "masking_scheme" / name / "logs" / "process_0.log").is_file()


def test_cli_only_selects_points_by_exact_name(tmp_path):
  result = run_sweep("configs/sweeps/data_size.py", "--launcher", "slurm", "--workdir-root", tmp_path,
                     "--only", "scheme=lsm1,max_train_subjects=100", "--only=scheme=aim,max_train_subjects=0",
                     "--dry-run", "--", "--nodes", "1")
  assert result.returncode == 0, result.stderr
  assert [l for l in result.stdout.splitlines() if l.startswith("# [")] == [
      f"# [1/2] data_size/scheme=aim,max_train_subjects=0 -> {tmp_path}/data_size/scheme=aim,max_train_subjects=0",
      f"# [2/2] data_size/scheme=lsm1,max_train_subjects=100 -> "
      f"{tmp_path}/data_size/scheme=lsm1,max_train_subjects=100",
  ]
  assert "sbatch --job-name=" not in result.stdout  # Job names live in the batch script.
  assert '#SBATCH --job-name="data_size/scheme=aim,max_train_subjects=0"' in result.stdout


def test_cli_refuses_an_unknown_eval_task_set():
  result = run_sweep("configs/sweeps/masking_scheme.py", "--launcher", "local", "--eval",
                     "configs/eval.py:probe", "--dry-run", "--", "1")
  assert result.returncode == 2
  assert result.stdout == ""
  assert ("lsm2: error: --eval 'configs/eval.py:probe' is not a task set of configs/eval.py: "
          "it takes one of synthetic, depresjon, fitabase") in result.stderr


def test_cli_refuses_an_unknown_point(tmp_path):
  result = run_sweep("configs/sweeps/masking_scheme.py", "--launcher", "local", "--only", "scheme=mae",
                     "--dry-run", "--", "1")
  assert result.returncode == 2
  assert "--only scheme=mae: not a point of masking_scheme" in result.stderr
