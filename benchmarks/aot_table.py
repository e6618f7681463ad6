"""The "before you launch" table of docs/launching.md: S, B and L compiled for TPU slices.

  python benchmarks/aot_table.py --json /tmp/aot_table.json [--jobs 2]

For each slice (v5e-256, v5p-64, v6e-64), model size (S, B, L) and attention
kernel (xla, splash), runs `python -m lsm2.aot` at the paper geometry (1440 x 26,
10-minute patches: 3,744 tokens) and the paper batch (1024) with the default
data-parallel mesh; where that does not fit, again with FSDP (parameters and
optimizer state sharded over every device). Each compile is its own process
(no TPU needed; one L compile takes minutes of CPU). Prints the table as
Markdown; --json writes every report.
"""
import argparse
import concurrent.futures
import json
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGIES = (("v5e-256", "v5e:16x16"), ("v5p-64", "v5p:4x4x4"), ("v6e-64", "v6e:8x8"))
SIZES = ("S", "B", "L")
ATTENTION = ("xla", "splash")
MESHES = {"data": ("--config.mesh.data=-1", "--config.mesh.fsdp=1"),
          "fsdp": ("--config.mesh.data=1", "--config.mesh.fsdp=-1")}


def compile_one(topology: str, size: str, attention: str, mesh: str, batch: int) -> dict:
  """One `python -m lsm2.aot` report (it exits 1 when the step does not fit)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "report.json"
    cmd = [sys.executable, "-m", "lsm2.aot", f"--config={REPO / 'configs' / 'pretrain.py'}:{size}",
           f"--topology={topology}", f"--config.batch_size={batch}",
           f"--config.model.attention={attention}", *MESHES[mesh], f"--json={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if not out.exists():
      raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def markdown(rows: list[dict]) -> str:
  names = {t: n for n, t in TOPOLOGIES}
  lines = ["| slice | model | attention | mesh | HBM / device | fits | est. step | est. MFU |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mesh = "FSDP" if r["mesh"]["fsdp"] > 1 else "data"
    step = "-" if r["est_step_s"] is None else f"{r['est_step_s'] * 1e3:.0f} ms"
    mfu = "-" if r["est_mfu"] is None else f"{r['est_mfu']:.0%}"
    hbm = f"{r['hbm_bytes_per_device'] / 2**30:.1f} of {r['hbm_capacity_bytes'] / 2**30:.2f} GiB"
    fits = "yes" if r["fits"] else "**no**"
    lines.append(f"| {names[r['topology']]} | {r['model_size']} | {r['attention']} | {mesh} "
                 f"| {hbm} | {fits} | {step} | {mfu} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json", default=None, help="write every report here")
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--sizes", default=",".join(SIZES))
  ap.add_argument("--topologies", default=",".join(t for _, t in TOPOLOGIES))
  ap.add_argument("--jobs", type=int, default=1, help="compiles at a time")
  args = ap.parse_args()
  cases = [(t, s, a) for t in args.topologies.split(",") for s in args.sizes.split(",")
           for a in ATTENTION]

  def case_rows(case):
    rows = [compile_one(*case[:2], case[2], "data", args.batch)]
    print(f"{case}: data parallel {'fits' if rows[0]['fits'] else 'does not fit'}", flush=True)
    if not rows[0]["fits"]:
      rows.append(compile_one(*case[:2], case[2], "fsdp", args.batch))
      print(f"{case}: FSDP {'fits' if rows[1]['fits'] else 'does not fit'}", flush=True)
    return rows

  done = {}
  ordered = lambda: [r for case in cases if case in done for r in done[case]]
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    futures = {pool.submit(case_rows, case): case for case in cases}
    for future in concurrent.futures.as_completed(futures):
      done[futures[future]] = future.result()
      if args.json:  # After every case: a long run that stops keeps what it compiled.
        pathlib.Path(args.json).write_text(json.dumps(ordered(), indent=2) + "\n")
  print(markdown(ordered()))


if __name__ == "__main__":
  main()
