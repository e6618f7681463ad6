"""A plain CPU process never starts libtpu, even where the [tpu] extra installed it."""
import importlib.util
import os
import subprocess
import sys

import pytest

from lsm2 import backends
from tiny_checkpoint import tiny_pretrained

EMBED = """
import sys
import numpy as np
import lsm2
import jax
model = lsm2.load(sys.argv[1])
emb = model.embed(np.zeros((2, 1440, model.model_cfg.num_channels), np.float32))
assert emb.shape[0] == 2 and np.all(np.isfinite(emb)), emb
print(jax.default_backend())
"""


def _env_without_platform_choice():
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.slow
def test_load_and_embed_on_a_cpu_host_print_nothing_from_libtpu(tmp_path_factory):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (the [tpu] extra): nothing could print")
  workdir, _ = tiny_pretrained(tmp_path_factory.getbasetemp())
  proc = subprocess.run([sys.executable, "-c", EMBED, str(workdir)], capture_output=True,
                        text=True, timeout=300, env=_env_without_platform_choice())
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["cpu"]
  for trace in ("libtpu", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "INVALID_ARGUMENT"):
    assert trace not in proc.stderr, proc.stderr


def test_import_lsm2_stays_cheap_on_a_host_without_accelerators():
  """The check reads sysfs: `import lsm2` (every CLI) imports no JAX to make it."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (the [tpu] extra): there is nothing to keep off")
  if backends._may_have_accelerators():  # pylint: disable=protected-access
    pytest.skip("this host has a PCI device of an accelerator vendor: JAX's probes decide")
  code = "import os, sys, lsm2; print('jax' in sys.modules, os.environ.get('JAX_PLATFORMS'))"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, env=_env_without_platform_choice())
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["False", "cpu"]


def test_a_users_platform_choice_is_kept(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not backends.use_cpu_without_accelerators()
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setenv("JAX_FORCE_TPU_INIT", "1")
  assert not backends.use_cpu_without_accelerators()


def test_without_libtpu_jax_is_left_alone(monkeypatch):
  """No libtpu: nothing to keep off, so JAX chooses (and `import lsm2` need not import JAX)."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  assert not backends.use_cpu_without_accelerators()
