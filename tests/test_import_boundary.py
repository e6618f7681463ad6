"""Import boundaries: inference without the trainer, and data flowing one way.

The rules (DEVELOPERS.md): the model never imports data readers, training or
evaluation; the input pipeline never imports the model; inference
(lsm2.api) and evaluation read checkpoints without the trainer.
"""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

from tiny_checkpoint import tiny_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lsm2"
TRAINER_PACKAGES = ("grain", "optax", "clu", "tensorflow")  # What the trainer's imports bring.


def _module_files() -> dict[str, pathlib.Path]:
  """Every module of the lsm2 package by dotted name (packages by their __init__)."""
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(REPO).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _module_files()


def _import_nodes(tree: ast.AST, top_level_only: bool):
  """Import statements anywhere, or only those that run when the module is imported."""
  if not top_level_only:
    yield from ast.walk(tree)
    return
  todo = [tree]
  while todo:
    node = todo.pop()
    yield node
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      todo += ast.iter_child_nodes(node)


def _imports(name: str, top_level_only: bool = False) -> tuple[set[str], set[str]]:
  """(lsm2 modules, other top-level packages) that module `name` imports.

  Anywhere in it (a function's import runs when it is called), or with
  `top_level_only` those that run on import.
  """
  tree = ast.parse(MODULES[name].read_text())
  package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
  ours, others = set(), set()

  def add(dotted: str):
    if dotted.split(".")[0] != "lsm2":
      others.add(dotted.split(".")[0])
      return
    while dotted not in MODULES:  # `from lsm2.x import SomeName` imports lsm2.x.
      dotted = dotted.rpartition(".")[0]
    ours.add(dotted)

  for node in _import_nodes(tree, top_level_only):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative import.
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      if base == "__future__":
        continue
      for alias in node.names:
        add(f"{base}.{alias.name}")
  return ours, others


def _closure(name: str) -> tuple[set[str], set[str]]:
  """(lsm2 modules, other packages) that importing and using `name` can reach.

  Every import of a reached module counts; of its parent packages (whose
  __init__ runs first) only the ones that run on import.
  """
  full, others, todo = {}, set(), [(name, True)]
  while todo:
    module, everything = todo.pop()
    if full.get(module, False) or (module in full and not everything):
      continue
    full[module] = everything
    parts = module.split(".")
    todo += [(".".join(parts[:i]), False) for i in range(1, len(parts))]
    ours, theirs = _imports(module, top_level_only=not everything)
    todo += [(m, True) for m in ours]
    others |= theirs
  return set(full), others


def _under(modules, prefixes) -> list[str]:
  return sorted(m for m in modules for p in prefixes if m == p or m.startswith(p + "."))


def test_the_import_graph_is_complete():
  """The static graph sees the imports that matter (a check on the checker)."""
  ours, others = _imports("lsm2.train.train")
  assert {"lsm2.train.checkpoint", "lsm2.pretrained", "lsm2.sharding", "lsm2.model.mae"} <= ours
  assert {"optax", "jax"} <= others
  assert "clu" in _imports("lsm2.train.metrics")[1] and "clu" in _closure("lsm2.train.train")[1]
  assert "lsm2.train.train" in _closure("lsm2.demo")[0]


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("lsm2.model.")))
def test_model_imports_no_data_training_or_evaluation(name):
  ours, others = _closure(name)
  assert not _under(ours, ("lsm2.data", "lsm2.train", "lsm2.eval", "lsm2.api", "lsm2.pretrained"))
  assert not _under(others, TRAINER_PACKAGES)


def test_input_pipeline_imports_no_model_training_or_evaluation():
  ours, _ = _closure("lsm2.data.pipeline")
  assert not _under(ours, ("lsm2.model", "lsm2.train", "lsm2.eval", "lsm2.api", "lsm2.pretrained"))


@pytest.mark.parametrize("name", ["lsm2.api", "lsm2.pretrained", "lsm2.sharding"])
def test_inference_modules_import_no_trainer(name):
  ours, others = _closure(name)
  assert not _under(ours, ("lsm2.train", "lsm2.eval", "lsm2.data.pipeline",
                           "lsm2.data.grain_sources"))
  assert not _under(others, TRAINER_PACKAGES)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("lsm2.eval")))
def test_evaluation_imports_no_trainer(name):
  ours, _ = _closure(name)
  assert not _under(ours, ("lsm2.train",))


_EMBED_IN_A_FRESH_PROCESS = """
import json, sys
import numpy as np
import lsm2
from lsm2.data import dataset
model = lsm2.load(sys.argv[1])
raw = dataset.read_split(sys.argv[2], "train", normalize=False, limit=3)
emb = model.embed(raw["signals"], raw["observed"])
print(json.dumps({"shape": list(emb.shape), "finite": bool(np.isfinite(emb).all()),
                  "modules": sorted(sys.modules),
                  "files": {m: getattr(sys.modules[m], "__file__", None)
                            for m in sys.modules if m.split(".")[0] == "lsm2"}}))
"""


@pytest.mark.slow  # A fresh interpreter: imports JAX and compiles the embedding (~10 s).
def test_load_and_embed_never_import_the_trainer(tmp_path_factory):
  """lsm2.load(...).embed(...) runs without lsm2.train, Grain, CLU or TensorFlow.

  optax is in that process too: flax.nnx imports it itself (flax depends on
  it); no lsm2 module it loads imports optax.
  """
  workdir, data = tiny_pretrained(tmp_path_factory.getbasetemp())
  proc = subprocess.run([sys.executable, "-c", _EMBED_IN_A_FRESH_PROCESS, str(workdir), str(data)],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["finite"] and out["shape"][0] == 3
  assert not _under(out["modules"], ("lsm2.train", "lsm2.eval", "grain", "clu", "tensorflow"))
  loaded = set(out["files"])
  assert {"lsm2.api", "lsm2.pretrained", "lsm2.sharding", "lsm2.model.mae"} <= loaded
  for name in loaded:  # Each loaded lsm2 module, by its source: none imports the trainer's packages.
    assert pathlib.Path(out["files"][name]).resolve() == MODULES[name].resolve()
    assert not _under(_imports(name)[1], TRAINER_PACKAGES), name
