"""Every third-party package that lsm2/ and configs/ import is declared in pyproject.toml.

An undeclared import works where the package happens to be installed (here, it comes
with another dependency) and breaks, or runs an unpinned version, on a host that
installs lsm2 from its declared dependencies (launch/constraints.txt pins only what
pyproject.toml leads to).
"""
import ast
import importlib.metadata
import pathlib
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO_ROOT / "lsm2").rglob("*.py"), *(REPO_ROOT / "configs").rglob("*.py")])
# Modules whose extra, not the core dependencies, declares what only they import.
MODULE_EXTRAS = {"lsm2/data/beam_convert.py": "beam"}
PACKAGES = importlib.metadata.packages_distributions()


def imported_modules(path):
  """The absolute imports of the file at `path`, anywhere in it (functions included),
  as dotted names: `from a.b import c` gives a.b.c (c may be a module of a namespace
  package such as google)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return {n for n in names if n.split(".")[0] not in sys.stdlib_module_names | {"lsm2"}}


def distributions(module):
  """The canonical names of the installed distributions that provide `module`. A top-level
  name shared by several (the google namespace) is narrowed to the one shipping its files."""
  parts = module.split(".")
  found = PACKAGES.get(parts[0], [])
  if len(found) > 1:
    prefix = "/".join(parts[:2])
    found = [d for d in found
             if any(str(f).startswith(f"{prefix}/") or str(f) == f"{prefix}.py"
                    for f in importlib.metadata.distribution(d).files or [])]
  return {canonicalize_name(d) for d in found}


def declared():
  """The core dependencies' names, and each extra's."""
  project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

  def names(lines):
    return {canonicalize_name(Requirement(line).name) for line in lines}

  return names(project["dependencies"]), {
      extra: names(lines) for extra, lines in project["optional-dependencies"].items()}


def test_every_imported_package_is_declared():
  core, extras = declared()
  problems = []
  for path in SOURCES:
    module_file = path.relative_to(REPO_ROOT).as_posix()
    allowed = core | extras.get(MODULE_EXTRAS.get(module_file), set())
    for module in sorted(imported_modules(path)):
      dists = distributions(module)
      if not dists:
        problems.append(f"{module_file} imports {module}, which no installed distribution provides")
      elif not dists & allowed:
        problems.append(f"{module_file} imports {module}: distribution {' or '.join(sorted(dists))} is "
                        "not in pyproject.toml's dependencies"
                        + (f" nor its [{MODULE_EXTRAS[module_file]}] extra" if module_file in MODULE_EXTRAS
                           else ""))
  assert not problems, "\n".join(problems)


def test_each_module_extra_is_needed():
  """An entry of MODULE_EXTRAS that lets nothing through would hide a later mistake."""
  core, extras = declared()
  for module_file, extra in MODULE_EXTRAS.items():
    only_extra = {d for module in imported_modules(REPO_ROOT / module_file)
                  for d in distributions(module)} & (extras[extra] - core)
    assert only_extra, f"{module_file} imports nothing that only the [{extra}] extra declares"


def test_namespace_packages_map_to_the_distribution_that_ships_the_module():
  assert distributions("google.protobuf.message") == {"protobuf"}
  assert distributions("google_crc32c") == {"google-crc32c"}
  assert distributions("tensorflow.io") == {"tensorflow-cpu"}
