"""Serving exports (lsm2.export) next to lsm2.load: size, load time, latency per day.

Exports the run (StableHLO, SavedModel, LiteRT float32 and int8), then for each format and for
`lsm2.load().embed`: the bytes on disk, the time to load it (to a first answer:
deserialise or restore plus the first call's compile), and the median time per day
of `embed` on a batch of the run's own days (one warm-up call, then `--repeats`
timed calls; LiteRT takes one day per call, in LiteRT's own interpreter, ai-edge-litert,
the export extra). One process, one run; the outputs are checked against lsm2.load.
ONNX is not exported (docs/export.md says why), so it has no row.

With --probe, also what the int8 LiteRT model's error does to a downstream task: the
days of the run's (synthetic) dataset are embedded by lsm2.load, the float32 and the
dynamic-range int8 LiteRT models, and lsm2.eval's linear probe (configs/eval.py:synthetic:
its probe recipe and levels; --probe-protocol, default its protocol) is fitted and scored
on the hypertension label with each; the AUROCs and their change from lsm2.load's.

  python benchmarks/export.py --workdir RUN [--days 8] [--repeats 5] [--json OUT.json]
      [--probe [--probe-protocol splits|cv]]
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
import lsm2  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2 import config_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2 import export  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2.data import dataset  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2.data import metadata as metadata_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2.eval import discriminative  # pylint: disable=g-import-not-at-top,wrong-import-position
from lsm2.eval import report as report_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

PROBE_LABEL = "hypertension"  # The synthetic data's label with a known mechanism (nocturnal HR dip).


def _bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
      else path.stat().st_size


def _time(call, repeats: int) -> float:
  """Median seconds of `call()` after one warm-up call."""
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _litert_embed(path: pathlib.Path, signals: np.ndarray, observed: np.ndarray) -> np.ndarray:
  """Embeddings of every day by the LiteRT model at `path`, one day per call."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  run = Interpreter(model_path=str(path)).get_signature_runner("embed")
  return np.concatenate([run(signals=signals[i:i + 1], observed=observed[i:i + 1])["embedding"]
                         for i in range(signals.shape[0])])


def probe_aurocs(model, out: pathlib.Path, protocol: str | None) -> dict:
  """lsm2.eval's linear-probe AUROC of PROBE_LABEL on lsm2.load's and each LiteRT model's
  embeddings of the run's dataset, and the change from lsm2.load's, per probe level.

  `protocol`: "splits" or "cv"; None keeps configs/eval.py:synthetic's.
  """
  data_dir = model.config["data_dir"]
  meta = metadata_lib.load_metadata(data_dir)
  if PROBE_LABEL not in meta.labels:
    raise SystemExit(f"--probe: dataset {data_dir} (the run's) has no label {PROBE_LABEL!r} "
                     f"(its labels: {sorted(meta.labels)}); --probe needs a synthetic-data run")
  config = config_files.load_config(REPO / "configs" / "eval.py", "synthetic")
  proto = config.probe.protocol
  if protocol:
    proto.name = protocol  # A locked ConfigDict takes new values of its fields.
  # The days lsm2.eval pools for this protocol, in original units for every embedder.
  splits = tuple(proto.splits) if proto.name == "cv" else (proto.fit_split, proto.test_split)
  parts = [dataset.read_split(data_dir, s, normalize=False,
                              limit=config.data.max_days or None) for s in splits]
  cat = lambda key: np.concatenate([p[key] for p in parts])
  signals, observed = cat("signals"), cat("observed")
  pool = discriminative.Pool(
      z=metadata_lib.normalize(signals, observed, model.norm_mean, model.norm_std),
      observed=observed, subject_id=cat("subject_id"),
      split=np.concatenate([np.full(len(p["subject_id"]), s) for s, p in zip(splits, parts)]),
      labels={PROBE_LABEL: cat(f"label/{PROBE_LABEL}")})
  tasks = discriminative.tasks_for(meta.labels, [PROBE_LABEL], config.probe.levels)
  embeddings = {"lsm2.load": model.embed(signals, observed)}
  for name, filename in zip(("litert", "litert_int8"), export.LITERT_FILES):
    embeddings[name] = _litert_embed(out / "litert" / filename, signals, observed)
  rows = {}
  for name, emb in embeddings.items():
    results = report_lib.Results()
    discriminative.run(results, pool, emb, tasks, config, baselines=False)
    for r in results.select(metric="auroc", method="linear_probe"):
      rows.setdefault(r["level"], {})[name] = {k: r.get(k) for k in ("value", "std", "n", "folds")}
    for what, why in results.skipped:
      print(f"probe on {name}: {what} skipped: {why}")
  for by_name in rows.values():
    base = by_name["lsm2.load"]["value"]
    for row in by_name.values():
      row["change"] = None if base is None or row["value"] is None else row["value"] - base
  return {"label": PROBE_LABEL, "protocol": proto.name, "splits": splits, "days": len(signals),
          "subjects": len(np.unique(pool.subject_id)),
          "max_abs_embedding_diff": {name: float(np.abs(e - embeddings["lsm2.load"]).max())
                                     for name, e in embeddings.items()},
          "auroc": rows}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="training workdir (or its export/) to export")
  p.add_argument("--split", default="train")
  p.add_argument("--days", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument("--probe", action="store_true",
                 help=f"also the linear-probe AUROC of {PROBE_LABEL} on each embedding")
  p.add_argument("--probe-protocol", choices=("splits", "cv"), default=None,
                 help="lsm2.eval's probe protocol (default: configs/eval.py:synthetic's); "
                      "cv when the test split holds one class (the tiny test run)")
  args = p.parse_args()

  start = time.perf_counter()
  model = lsm2.load(args.workdir, batch_size=args.days)
  raw = dataset.read_split(model.config["data_dir"], args.split, normalize=False, limit=args.days)
  signals, observed = raw["signals"], raw["observed"]
  days = signals.shape[0]
  want = model.embed(signals, observed)  # Also lsm2.load's compile: part of its load time.
  load_s = time.perf_counter() - start
  params = pathlib.Path(args.workdir) / "export" / "params"
  rows = {"lsm2.load": {
      "bytes": _bytes(params) if params.exists() else None, "load_s": load_s,
      "s_per_day": _time(lambda: model.embed(signals, observed), args.repeats) / days}}

  out = pathlib.Path(tempfile.mkdtemp(prefix="lsm2_export_bench_"))
  start = time.perf_counter()
  export.export(args.workdir, out, export.FORMATS, model=model)
  export_s = time.perf_counter() - start

  start = time.perf_counter()
  embed = jax.jit(jax.export.deserialize((out / "stablehlo" / "embed.bin").read_bytes()).call)
  got = np.asarray(embed(signals, observed))
  rows["stablehlo"] = {
      "bytes": _bytes(out / "stablehlo" / "embed.bin"), "load_s": time.perf_counter() - start,
      "s_per_day": _time(lambda: np.asarray(embed(signals, observed)), args.repeats) / days,
      "max_abs_diff": float(np.abs(got - want).max())}

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  tf_embed = tf.saved_model.load(str(out / "savedmodel")).signatures["embed"]
  inputs = dict(signals=tf.constant(signals), observed=tf.constant(observed))
  got = tf_embed(**inputs)["embedding"].numpy()
  rows["savedmodel"] = {
      "bytes": _bytes(out / "savedmodel"), "load_s": time.perf_counter() - start,
      "s_per_day": _time(lambda: tf_embed(**inputs)["embedding"].numpy(), args.repeats) / days,
      "max_abs_diff": float(np.abs(got - want).max())}

  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  for name, filename in zip(("litert", "litert_int8"), export.LITERT_FILES):
    path = out / "litert" / filename
    start = time.perf_counter()
    interpreter = Interpreter(model_path=str(path))
    run = interpreter.get_signature_runner("embed")
    got = np.concatenate([run(signals=signals[i:i + 1], observed=observed[i:i + 1])["embedding"]
                          for i in range(days)])  # One day per call (export.LITERT_BATCH).
    load = time.perf_counter() - start
    rows[name] = {
        "bytes": _bytes(path), "load_s": load,
        "s_per_day": _time(lambda: run(signals=signals[:1], observed=observed[:1]), args.repeats),
        "max_abs_diff": float(np.abs(got - want).max())}

  report = {"workdir": args.workdir, "days": days, "repeats": args.repeats,
            "export_s": export_s, "devices": [str(d) for d in jax.devices()], "formats": rows}
  if args.probe:
    report["probe"] = probe_aurocs(model, out, args.probe_protocol)
  print(f"{'format':<11} {'MB':>8} {'load s':>8} {'ms/day':>8}  max |diff|")
  for name, row in rows.items():
    size = f"{row['bytes'] / 1e6:8.2f}" if row["bytes"] is not None else f"{'-':>8}"
    print(f"{name:<11} {size} {row['load_s']:8.2f} {row['s_per_day'] * 1e3:8.2f}  "
          f"{row.get('max_abs_diff', 0.0):.2e}")
  if args.probe:
    probe = report["probe"]
    print(f"\nlinear-probe AUROC of {probe['label']} ({probe['protocol']}: {probe['days']} days, "
          f"{probe['subjects']} subjects)")
    print(f"{'level':<8} {'embedder':<11} {'AUROC':>7} {'std':>7} {'change':>8}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"
    for level, by_name in probe["auroc"].items():
      for name, row in by_name.items():
        print(f"{level:<8} {name:<11} {fmt(row['value'], '7.4f')} {fmt(row['std'], '7.4f')} "
              f"{fmt(row['change'], '+8.4f')}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
  main()
