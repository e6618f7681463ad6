r"""A release: one directory (local or gs://) holding a trained model that a stranger can check.

  python -m lsm2.export --from=WORKDIR --out=DIR --release [--format=stablehlo,...]

writes DIR with
  model/                          the parameters and description `lsm2.load` reads (an
                                  export directory: params/, lsm2.json, manifest.json)
  stablehlo/, savedmodel/, ...    the serving exports of --format, and lsm2_export.json
  evaluation/[NAME/]results.json  each evaluation of the released step found in WORKDIR/eval
  MODEL_CARD.md                   generated from the run directory (`model_card`)
  release.json                    step, source, formats, lsm2 version, date
  manifest.json                   every other file with its size and SHA-256, written last

`lsm2.load(DIR)` (`load`) verifies the manifest before it reads anything else: a
file whose content or size differs, a listed file that is missing and a file the
manifest does not list are each refused, naming the file. The release is built in
a local directory (the converters write local files), then renamed into place
(local DIR) or copied file by file, the manifest last (gs:// DIR).

The release is read by `lsm2.load`, which must not import the converters
(TensorFlow): this module gets the serving exports as a function (`write`).
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Callable, Sequence

from etils import epath

import lsm2
from lsm2 import pretrained
from lsm2 import storage

MANIFEST = pretrained.EXPORT_MANIFEST  # The same format as an export's manifest.
INFO = "release.json"
CARD = "MODEL_CARD.md"
MODEL_DIR = "model"
EVALUATION_DIR = "evaluation"
FORMAT = "lsm2-release"
VERSION = 1
# Where evaluations of a run are found: WORKDIR/eval (the demo) and WORKDIR/eval/NAME (sweeps).
RUN_EVAL_DIR = "eval"
RESULTS = "results.json"
# The checkpoint an evaluation restored, as lsm2.eval.run writes it in results.md's header.
_EVAL_STEP = re.compile(r"^- checkpoint: `(?P<init_from>.*)` \(step (?P<step>\d+);", re.M)


class ReleaseError(pretrained.IntegrityError):
  """A release whose files differ from its manifest (the message names the files)."""


# ----------------------------------------------------------------------------
# Reading: verify, then load.
# ----------------------------------------------------------------------------
def is_release(path: str | os.PathLike) -> bool:
  """Whether `path` is a release directory (it holds INFO); StorageError when it cannot be asked."""
  return (storage.check_reachable(path, "pretrained model") / INFO).exists()


def verify(root: str | os.PathLike) -> dict[str, Any]:
  """The release's INFO once every file below `root` is the one its manifest lists.

  Raises ReleaseError naming each file that differs (size or SHA-256), is missing
  or is not listed, and StorageError for a listed name that leads outside `root`.
  """
  root = storage.as_path(root)
  try:
    listed = json.loads((root / MANIFEST).read_text())["files"]
    entries = {str(name): (int(e["bytes"]), str(e["sha256"])) for name, e in listed.items()}
  except FileNotFoundError:
    raise ReleaseError(f"{root}: release without its {MANIFEST}: its files cannot be checked, "
                       "nothing was loaded; download or copy the release again") from None
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ReleaseError(f"{root / MANIFEST} is unreadable ({type(e).__name__}: {e}); nothing "
                       "was loaded") from None
  for name in entries:  # Before any file is read: no name may lead outside the release.
    storage.contained(root, name, f"{root / MANIFEST} lists file")
  have = storage.list_files(root)
  have.pop(MANIFEST)
  problems = [f"{name} is not listed in {MANIFEST}" for name in sorted(set(have) - set(entries))]
  problems += [f"{name} is missing" for name in sorted(set(entries) - set(have))]
  for name, (size, digest) in sorted(entries.items()):
    if name not in have:
      continue
    if have[name] != size:
      problems.append(f"{name} has {have[name]} bytes, {MANIFEST} lists {size}")
    elif pretrained.sha256(root / name) != digest:
      problems.append(f"the content of {name} differs from its SHA-256 in {MANIFEST}")
  if problems:
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise ReleaseError(f"{root} is not the release its {MANIFEST} lists: "
                       f"{'; '.join(problems[:5])}{more}. Nothing was loaded: download or copy "
                       "the release again (a file added to it must be removed).")
  return json.loads((root / INFO).read_text())


def load(root: str | os.PathLike, step: int | None = None):
  """(model, description, step) of release `root` (as pretrained.load_pretrained), verified first."""
  info = verify(root)
  if step is not None and step != info["step"]:
    raise FileNotFoundError(f"{root} is the release of step {info['step']}; it holds no step "
                            f"{step}")  # As a workdir without that checkpoint.
  model, description, _ = pretrained.load_pretrained(storage.as_path(root) / MODEL_DIR)
  return model, description, info["step"]  # An export's own step is its run's total_steps.


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------
def run_dir(source: str | os.PathLike) -> epath.Path | None:
  """The run directory of a --from (a workdir or its export/), None when it is not in one."""
  path = storage.as_path(source)
  for candidate in (path, path.parent) if path.name == pretrained.EXPORT_DIR else (path,):
    if (candidate / pretrained.RUN_FILE).exists():
      return candidate
  return None


def evaluations(workdir: epath.Path | None, step: int) -> dict[str, epath.Path]:
  """{name: directory} of the evaluations of checkpoint `step` in WORKDIR/eval[/NAME].

  An evaluation's step is the one its results.md names (lsm2.eval.run's header);
  "" names WORKDIR/eval itself.
  """
  if workdir is None or not (workdir / RUN_EVAL_DIR).exists():
    return {}
  root = workdir / RUN_EVAL_DIR
  found = {}
  for directory in (root, *sorted(d for d in root.iterdir() if d.is_dir())):
    report = directory / "results.md"
    if not ((directory / RESULTS).exists() and report.exists()):
      continue
    match = _EVAL_STEP.search(report.read_text())
    if match and int(match["step"]) == step:
      found["" if directory == root else directory.name] = directory
  return found


def _staging(out: str) -> tuple[pathlib.Path, Callable[[pathlib.Path], None]]:
  """(a new local directory to build the release in, the function that puts it at `out`).

  Refuses an `out` that holds anything: a file left there would be unlisted.
  """
  target = storage.as_path(out)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise storage.StorageError(f"--out={out} is not empty: a release is written to a new or "
                               "empty directory (delete it or choose another)")
  if storage.is_remote(out):
    storage.check_writable(out, "--out")
    def place(built: pathlib.Path) -> None:
      storage.copy_tree(built, target, last=MANIFEST)  # Complete once its manifest is there.
      shutil.rmtree(built)
    return pathlib.Path(tempfile.mkdtemp(prefix="lsm2-release-")), place
  local = pathlib.Path(out).absolute()
  local.parent.mkdir(parents=True, exist_ok=True)
  # Beside `out`, on its filesystem: one rename puts the whole release in place.
  return pathlib.Path(tempfile.mkdtemp(prefix=f".{local.name}.tmp-", dir=local.parent)), (
      lambda built: os.replace(built, local))


def write(model, source: str, out: str, formats: Sequence[str],
          write_exports: Callable[[pathlib.Path], Any]) -> str:
  """Writes the release of `model` (an lsm2.api.PretrainedModel loaded from `source`) to `out`.

  `write_exports(directory)` writes the serving exports of `formats` there
  (lsm2.export.export). Returns the SHA-256 of the release's manifest, which a
  publisher gives beside the release so that the manifest itself can be checked.
  """
  built, place = _staging(out)
  try:
    write_exports(built)
    pretrained.export_params(built, model.params, model.config)
    (built / pretrained.EXPORT_DIR).rename(built / MODEL_DIR)
    workdir = run_dir(source)
    evals = evaluations(workdir, model.step)
    for name, directory in evals.items():
      (built / EVALUATION_DIR / name).mkdir(parents=True, exist_ok=True)
      (built / EVALUATION_DIR / name / RESULTS).write_bytes((directory / RESULTS).read_bytes())
    info = {"format": FORMAT, "version": VERSION, "step": model.step, "source": str(source),
            "formats": list(formats), "lsm2_version": lsm2.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (built / INFO).write_text(json.dumps(info, indent=1) + "\n")
    (built / CARD).write_text(model_card(model.config, info, workdir, evals))
    pretrained.write_manifest(built)
    digest = pretrained.sha256(epath.Path(built / MANIFEST))
    place(built)
  except BaseException:
    shutil.rmtree(built, ignore_errors=True)
    raise
  return digest


# ----------------------------------------------------------------------------
# The model card: only what the run, its dataset and its evaluations recorded.
# ----------------------------------------------------------------------------
def _read_json(path: epath.Path) -> tuple[Any, str | None]:
  """(the JSON at `path`, None) or (None, why it could not be read)."""
  try:
    return json.loads(path.read_text()), None
  except FileNotFoundError:
    return None, f"{path} does not exist"
  except Exception as e:  # pylint: disable=broad-except  # Any storage or JSON error: said in the card.
    return None, f"{path} is unreadable ({type(e).__name__})"


def _pct(fraction: float | None) -> str:
  return "not recorded" if fraction is None else f"{100 * fraction:.1f}%"


def _number(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4g}"


def is_synthetic(meta: dict[str, Any] | None) -> bool:
  """Whether a dataset's metadata.json says lsm2's synthetic generator wrote it."""
  return bool(meta) and meta.get("source", {}).get("generator") == "lsm2.data.synthetic"


def _data_section(description: dict[str, Any], workdir: epath.Path | None,
                  meta: dict[str, Any] | None, meta_problem: str | None) -> list[str]:
  data_dir = description.get("data_dir", "")
  record = _read_json(workdir / pretrained.RUN_FILE)[0] if workdir else None
  config = (record or {}).get("config", {})
  counts = (record or {}).get("dataset", {}).get("record_counts") or (meta or {}).get(
      "record_counts", {})
  subjects = (meta or {}).get("subjects", {})
  train_split = config.get("data.train_split",
                           description.get("run_config", {}).get("data", {}).get("train_split"))
  lines = ["## Training data", ""]
  if is_synthetic(meta):
    src = meta["source"]
    lines.append(f"- dataset: `{data_dir}`, **synthetic**: written by `lsm2.data.synthetic` "
                 f"(seed {src.get('seed')}, {src.get('subjects')} subjects x {src.get('days')} "
                 "days); no real person's data")
  elif meta:
    lines.append(f"- dataset: `{data_dir}`, source: `{json.dumps(meta.get('source', {}))}`")
  else:
    lines.append(f"- dataset: `{data_dir}`; its metadata.json could not be read "
                 f"({meta_problem}): subjects, missingness and channel coverage are not recorded "
                 "here")
  if counts:
    lines += ["", "| split | subjects | days |", "|---|---|---|"]
    lines += [f"| {split} | {len(subjects[split]) if split in subjects else 'not recorded'} | "
              f"{days} |" for split, days in counts.items()]
    lines.append("")
  else:
    lines.append("- days per split: not recorded (no run.json and no dataset metadata)")
  if config.get("data.source") == "synthetic_stream":
    lines.append("- trained on fresh synthetic subjects generated on demand by the same "
                 "generator and seed (data.source=synthetic_stream), never this dataset's "
                 "subjects: its splits only validated and evaluated")
  elif train_split:
    limit = config.get("data.max_train_subjects", 0)
    lines.append(f"- trained on split `{train_split}`" + (
        f", at most {limit} of its subjects (data.max_train_subjects)" if limit else
        ", all its subjects"))
  missing = (meta or {}).get("missingness", {})
  if missing:
    lines.append(f"- missing minutes: {_pct(missing.get('overall_fraction'))} over all splits")
    split = missing.get("per_split", {}).get(train_split or "", {})
    if split:
      p = split.get("day_fraction_percentiles", {})
      lines.append(f"- missing minutes per `{train_split}` day: mean "
                   f"{_pct(split.get('mean_day_fraction'))}, p10 {_pct(p.get('p10'))}, "
                   f"p50 {_pct(p.get('p50'))}, p90 {_pct(p.get('p90'))}")
  elif meta:
    lines.append("- missingness: not recorded in the dataset's metadata.json")
  if meta and "sanitized" in meta:
    s = meta["sanitized"]
    lines.append(f"- values dropped at conversion: {s.get('nonfinite')} not finite, "
                 f"{s.get('out_of_range')} outside the channel's valid range")
  return lines


def _channel_section(description: dict[str, Any], meta: dict[str, Any] | None) -> list[str]:
  per_channel = (meta or {}).get("missingness", {}).get("per_channel_fraction", {})
  lines = ["## Channels", "",
           "Inputs are these channels in this order, in their original units; minutes outside "
           "the valid range or not finite count as unobserved. Coverage: the fraction of "
           "minutes observed in the dataset (all splits).", "",
           "| # | channel | group | unit | valid range | coverage |", "|---|---|---|---|---|---|"]
  for i, c in enumerate(description["channels"]):
    missing = per_channel.get(c["name"])
    coverage = "not recorded" if missing is None else _pct(1 - missing)
    lines.append(f"| {i} | {c['name']} | {c.get('group', '')} | {c.get('unit', '')} | "
                 f"{c.get('valid_min')} to {c.get('valid_max')} | {coverage} |")
  return lines


def _model_section(description: dict[str, Any], info: dict[str, Any]) -> list[str]:
  m, k, run = description["model"], description["masking"], description.get("run_config", {})
  tokens = (m["time_steps"] // m["patch_time"]) * (m["num_channels"] // m["patch_channels"])
  rows = [
      ("step", info["step"]),
      ("size", description.get("model_size", "not recorded")),
      ("encoder", f"{m['enc_depth']} layers, width {m['enc_width']}, {m['enc_heads']} heads, "
                  f"MLP {m['enc_mlp']}"),
      ("decoder", f"{m['dec_depth']} layers, width {m['dec_width']}, {m['dec_heads']} heads, "
                  f"MLP {m['dec_mlp']}"),
      ("input", f"{m['time_steps']} minutes x {m['num_channels']} channels"),
      ("patch", f"{m['patch_time']} minutes x {m['patch_channels']} channel(s), {tokens} tokens"),
      ("masking", f"{k['scheme']}, random ratio {k['random_ratio']}"),
      ("batch size", run.get("batch_size", "not recorded")),
      ("total steps", run.get("total_steps", "not recorded")),
      ("learning rate", run.get("lr", "not recorded")),
      ("seed", run.get("seed", "not recorded")),
  ]
  return ["## Model and training", "",
          f"An LSM-2 masked autoencoder: it embeds a day of minute-level wearable data and fills "
          f"its missing minutes. Released from `{info['source']}` by lsm2 "
          f"{info['lsm2_version']} on {info['created']}. The whole configuration is in "
          f"`{MODEL_DIR}/lsm2.json`.", "",
          "| field | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]


def _spread(record: dict[str, Any]) -> str:
  if record.get("std") is None:
    return "none recorded"
  over = record.get("std_over", "")
  count = record.get(over) if over else None
  return f"± {record['std']:.4g} (std over {count} {over})" if count else f"± {record['std']:.4g}"


def _evaluation_section(evals: dict[str, epath.Path], info: dict[str, Any],
                        workdir: epath.Path | None) -> list[str]:
  lines = ["## Evaluation", ""]
  if not evals:
    where = f"`{workdir / RUN_EVAL_DIR}`" if workdir else "its run directory (not known here)"
    return lines + [f"No evaluation of step {info['step']} was found in {where}: this model's "
                    "quality is not measured in this card. Evaluate it into WORKDIR/eval "
                    "(docs/evaluation.md) before releasing to include one."]
  lines.append("Records of the data as recorded (masking `natural`); the others (sensors or "
               "parts of the day removed) are in the release's results.json. lsm2.eval "
               "records a spread only over few-shot repeats or cross-validation folds; a single "
               "number has no interval.")
  for name, directory in evals.items():
    records = json.loads((directory / RESULTS).read_text())
    copy = "/".join(p for p in (EVALUATION_DIR, name, RESULTS) if p)
    lines += ["", f"### `{directory}` (step {info['step']}; `{copy}`)", "",
              "| task | level | method | metric | value | spread | split | n |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r.get('level', '')} | {r.get('method', '')} | {r['metric']} | "
              f"{_number(r['value'])} | {_spread(r)} | {r['split']} | {r['n']} |"
              for r in records if r.get("masking") == "natural"]
  return lines


def model_card(description: dict[str, Any], info: dict[str, Any], workdir: epath.Path | None,
               evals: dict[str, epath.Path]) -> str:
  """MODEL_CARD.md of a release: what its run, dataset and evaluations recorded, nothing else.

  A model trained on synthetic data says so in the card's first line.
  """
  data_dir = description.get("data_dir")
  meta, meta_problem = (_read_json(storage.as_path(data_dir) / "metadata.json") if data_dir else
                        (None, "the description names no data directory"))
  title = f"# Model card: LSM-2 `{description.get('model_size', '')}` model, step {info['step']}"
  lines = [title, ""]
  if is_synthetic(meta):  # Before anything else: the one thing every reader must see.
    lines[:0] = ["**Trained on synthetic data only** (lsm2.data.synthetic): this model has seen "
                 "no real person's data; use it to test software, never to draw conclusions "
                 "about people.", ""]
  lines += _model_section(description, info) + [""]
  lines += _data_section(description, workdir, meta, meta_problem) + [""]
  lines += _channel_section(description, meta) + [""]
  lines += _evaluation_section(evals, info, workdir) + [""]
  lines += [
      "## Intended use and limits", "",
      "- For research on minute-level wearable data: day embeddings for downstream models, and "
      "filling missing minutes.",
      "- **Not a medical device.** It is not meant or validated to diagnose, treat or monitor "
      "any condition, nor for decisions about a person's health.",
      "- It has only seen the training data above; on other devices, populations or "
      "channel definitions its behaviour is not measured.",
      "- Its inputs must be the channels above, in that order and unit (or named, through "
      "`lsm2.load`); a missing channel is masked, not guessed.",
      "", "## Files and how to check them", "",
      f"`{MANIFEST}` lists every other file with its size and SHA-256; `lsm2.load(RELEASE_DIR)` "
      "refuses the release when a file differs from it, is missing or is not listed. "
      f"Formats: {', '.join(info['formats']) or 'none'} (docs/export.md).", ""]
  return "\n".join(lines)
