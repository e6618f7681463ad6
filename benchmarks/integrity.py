"""What content integrity costs: array checksums next to a checkpoint save, the export
hash check next to the export's restore.

A checkpoint save computes `pretrained.array_checksums` of the whole train state (one
jitted pass over the arrays where they live) and a load checks them; `lsm2.load` of an
export first reads every file of it once more for its SHA-256 (`verify_export`). Both
are timed here side by side with the operation they go with, on a train-state-shaped
tree of float32 arrays (parameters plus two Adam moments), alternating call for call:

  python benchmarks/integrity.py [--params-millions 6 25] [--repeats 5] [--json PATH]

`--params-millions 25` is the paper's S model (lsm2.model.config). Times are medians.
"""
import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # Run as a script from anywhere: import lsm2 from this checkout.

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2 import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position


def _tree(params_millions: float, seed: int = 0) -> dict:
  """Transformer-like layers (d=512 blocks) holding about `params_millions` parameters."""
  rng = np.random.default_rng(seed)
  layers = max(1, round(params_millions * 1e6 / (4 * 512 * 512)))
  params = {f"layer_{i}": {"kernel": rng.normal(size=(512, 4 * 512)).astype(np.float32)}
            for i in range(layers)}
  params = jax.tree.map(jax.numpy.asarray, params)
  zeros = jax.tree.map(jax.numpy.zeros_like, params)
  return {"params": params, "opt_state": {"mu": zeros, "nu": zeros}}


def _timed(f) -> float:
  start = time.perf_counter()
  jax.block_until_ready(f())
  return time.perf_counter() - start


def measure(params_millions: float, repeats: int, root: pathlib.Path) -> dict:
  state = _tree(params_millions)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  pretrained.array_checksums(state)  # Compiles.
  times = {"checksums_s": [], "save_s": [], "verify_export_s": [], "restore_export_s": []}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state["params"])
  for i in range(repeats):
    times["checksums_s"].append(_timed(lambda: pretrained.array_checksums(state)))
    with ocp.StandardCheckpointer() as ckptr:
      times["save_s"].append(_timed(lambda: (ckptr.save(root / f"save_{i}", state),
                                             ckptr.wait_until_finished())))
    workdir = root / f"run_{i}"
    export = pretrained.export_params(workdir, state["params"], {"benchmark": True})
    times["verify_export_s"].append(_timed(lambda: pretrained.verify_export(export)))
    times["restore_export_s"].append(_timed(lambda: pretrained.restore_params(
        export / pretrained.EXPORT_PARAMS, abstract)))
  medians = {k: statistics.median(v) for k, v in times.items()}
  return {"params_millions": params_millions, "state_mb": state_bytes / 1e6, **medians,
          "checksums_over_save": medians["checksums_s"] / medians["save_s"],
          "verify_over_restore": medians["verify_export_s"] / medians["restore_export_s"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params-millions", type=float, nargs="+", default=[6, 25])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", type=pathlib.Path)
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in args.params_millions:
      rows.append(measure(n, args.repeats, pathlib.Path(tmp) / str(n)))
      r = rows[-1]
      print(f"{r['params_millions']:g}M params ({r['state_mb']:.0f} MB train state): "
            f"checksums {r['checksums_s'] * 1e3:.0f} ms vs save {r['save_s'] * 1e3:.0f} ms "
            f"({r['checksums_over_save']:.2f}x); export verify {r['verify_export_s'] * 1e3:.0f} ms "
            f"vs restore {r['restore_export_s'] * 1e3:.0f} ms ({r['verify_over_restore']:.2f}x)",
            flush=True)
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
