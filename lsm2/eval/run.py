"""The evaluation driver: restore a pretrained model, run the configured evaluations, write results.

  python -m lsm2.main --config=configs/eval.py:synthetic --workdir=OUT \
      --config.init_from=PRETRAIN_WORKDIR_OR_EXPORT

Steps: restore (`lsm2.api.load`, i.e. `lsm2.pretrained.load_pretrained`),
check the dataset's channels against the checkpoint's, read the splits and
normalise them with the checkpoint's statistics, then run the discriminative
probes (+ few-shot, fine-tuning; days, subjects and, for minute labels,
windows of a day), the generative tasks with their baselines and the
robustness removals, and write OUT/results.json, OUT/results.md, PNG plots
and CLU scalars (TensorBoard events in OUT).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np

from lsm2 import api
from lsm2 import errors
from lsm2 import storage
from lsm2.data import channels as channels_lib
from lsm2.data import dataset as dataset_lib
from lsm2.data import metadata as metadata_lib
from lsm2.eval import baselines as baselines_lib
from lsm2.eval import discriminative
from lsm2.eval import features as features_lib
from lsm2.eval import fine_tune as fine_tune_lib
from lsm2.eval import generative
from lsm2.eval import plots
from lsm2.eval import report
from lsm2.eval import robustness
from lsm2.eval import tasks as tasks_lib
from lsm2.eval import windows as windows_lib

LEVELS = ("day", "subject")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any restore or compilation, naming the offending field."""
  if not config.init_from:
    raise ValueError("config.init_from is required: a pretraining workdir or its export/ directory")
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size={config.batch_size} must be positive")
  bad = [lv for lv in config.probe.levels if lv not in LEVELS]
  if bad or not config.probe.levels:
    raise ValueError(f"config.probe.levels={tuple(config.probe.levels)} must be a non-empty subset "
                     f"of {LEVELS}")
  protocol = config.probe.protocol
  if protocol.name not in ("splits", "cv"):
    raise ValueError(f"config.probe.protocol.name={protocol.name!r}; expected 'splits' or 'cv'")
  if protocol.name == "splits" and protocol.fit_split == protocol.test_split:
    raise ValueError(f"config.probe.protocol: fit_split and test_split are both "
                     f"{protocol.fit_split!r}; they must be different (subject-disjoint) splits")
  if protocol.name == "cv" and protocol.folds < 2:
    raise ValueError(f"config.probe.protocol.folds={protocol.folds} must be >= 2")
  if config.few_shot.k < 0 or config.few_shot.repeats < 1:
    raise ValueError(f"config.few_shot.k={config.few_shot.k} must be >= 0 and "
                     f"config.few_shot.repeats={config.few_shot.repeats} >= 1")
  unknown = [b for b in config.generative.baselines if b not in baselines_lib.BASELINES]
  if unknown:
    raise ValueError(f"config.generative.baselines: unknown {unknown}; choose from "
                     f"{sorted(baselines_lib.BASELINES)}")
  if config.data.max_days < 0:
    raise ValueError(f"config.data.max_days={config.data.max_days} must be >= 0 (0 = all)")
  if config.windows.minutes < 1:
    raise ValueError(f"config.windows.minutes={config.windows.minutes} must be positive")
  if not 0.0 < config.windows.min_fraction <= 1.0:
    raise ValueError(f"config.windows.min_fraction={config.windows.min_fraction} must be in (0, 1]")
  for profile in config.robustness.device_profiles:
    try:
      channels_lib.profile_channels(profile)
    except ValueError as e:
      raise ValueError(f"config.robustness.device_profiles: {e}") from None


class SplitReader:
  """Reads splits once, normalised with the checkpoint's statistics (not the dataset's)."""

  def __init__(self, model: api.PretrainedModel, data_dir: str, max_days: int):
    self.model, self.data_dir, self.max_days = model, data_dir, max_days
    self._cache: dict[str, dict[str, np.ndarray]] = {}

  def read(self, split: str) -> dict[str, np.ndarray]:
    if split not in self._cache:
      raw = dataset_lib.read_split(self.data_dir, split, normalize=False,
                                   limit=self.max_days or None)
      if raw["signals"].shape[0] == 0:
        raise ValueError(f"split {split!r} of dataset {self.data_dir} holds no days")
      raw["z"] = metadata_lib.normalize(raw.pop("signals"), raw["observed"],
                                        self.model.norm_mean, self.model.norm_std)
      self._cache[split] = raw
    return self._cache[split]

  def summary(self) -> str:
    """Days and subjects of every split read so far."""
    return ", ".join(f"{s}: {v['z'].shape[0]} days / {len(np.unique(v['subject_id']))} subjects"
                     for s, v in self._cache.items())

  def pool(self, splits: tuple[str, ...], labels: list[str]) -> discriminative.Pool:
    parts = [self.read(s) for s in splits]
    return discriminative.Pool(
        z=np.concatenate([p["z"] for p in parts]),
        observed=np.concatenate([p["observed"] for p in parts]),
        subject_id=np.concatenate([p["subject_id"] for p in parts]),
        split=np.concatenate([np.full(len(p["subject_id"]), s) for s, p in zip(splits, parts)]),
        labels={n: np.concatenate([p[f"label/{n}"] for p in parts]) for n in labels})


def _labels(names, meta: metadata_lib.DatasetMetadata, field: str) -> list[str]:
  """The named day/subject labels (all of the dataset's when empty), checked against the dataset."""
  names = list(names) or [n for n, s in meta.labels.items() if s.level != "minute"]
  unknown = [n for n in names if n not in meta.labels]
  if unknown:
    raise ValueError(f"config.{field}: {unknown} not in dataset {meta.data_dir} "
                     f"(its labels: {sorted(meta.labels)})")
  minute = [n for n in names if meta.labels[n].level == "minute"]
  if minute:
    raise ValueError(f"config.{field}: {minute} are minute-level labels; they are probed per "
                     "window (config.windows.labels), not per day")
  return names


def _window_labels(config: ml_collections.ConfigDict, meta: metadata_lib.DatasetMetadata,
                   results: report.Results) -> list[str]:
  """The minute labels of the window task (all of the dataset's when empty).

  A named label the dataset lacks is skipped with the reason (a task set names
  the labels its usual data has); one that is not minute-level is an error.
  """
  if not config.windows.enabled:
    return []
  names = list(config.windows.labels) or [n for n, s in meta.labels.items()
                                          if s.level == "minute"]
  out = []
  for name in names:
    if name not in meta.labels:
      reason = f"dataset {meta.data_dir} has no label {name!r} (its labels: {sorted(meta.labels)})"
      logging.warning("Window task %s skipped: %s.", name, reason)
      results.skip(f"{name} (windows)", reason)
    elif meta.labels[name].level != "minute":
      raise ValueError(f"config.windows.labels: {name!r} is a {meta.labels[name].level}-level "
                       "label; windows need a minute-level label")
    else:
      out.append(name)
  return out


def _pool_splits(protocol) -> tuple[str, ...]:
  if protocol.name == "cv":
    return tuple(protocol.splits)
  return tuple(dict.fromkeys((protocol.fit_split, protocol.test_split)))


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Runs the evaluation of `config` into `workdir`; returns the result records."""
  start = time.time()
  validate_config(config)
  if jax.process_count() > 1:
    raise ValueError("evaluation runs in a single process (it uses every local device); "
                     f"got {jax.process_count()} processes")
  # Storage that cannot be used (no bucket, no credentials) stops here, naming the path.
  out = storage.check_writable(workdir, "--workdir")
  step = None if config.step < 0 else config.step
  try:
    model = api.load(config.init_from, step, batch_size=config.batch_size)
  except FileNotFoundError as e:  # No such workdir or step: named by the fields that chose them.
    chosen = f"config.init_from={config.init_from}"
    if step is not None:
      chosen += f", config.step={step}"
    raise errors.ConfigError(f"{chosen}: {e}") from None
  data_dir = config.data.dir or model.config["data_dir"]
  storage.check_reachable(data_dir, "config.data.dir")
  meta = metadata_lib.load_metadata(data_dir)
  model.check_dataset(meta, config.init_from)
  reader = SplitReader(model, data_dir, config.data.max_days)
  results = report.Results()
  plot_files: list[epath.Path] = []
  noise = (meta.noise_std, model.norm_std) if meta.noise_std is not None else None
  # Task names are checked against the model's patch before anything runs.
  suite = generative.select_tasks(model.model_cfg, tuple(config.generative.tasks))
  rob_task = config.robustness.generative_task
  rob_suite = generative.select_tasks(model.model_cfg, (rob_task,)) if rob_task else []

  # --- Discriminative ---------------------------------------------------------
  labels = _labels(config.probe.labels, meta, "probe.labels")
  ft_labels = _labels(config.fine_tune.labels or labels, meta, "fine_tune.labels")
  rob_labels = _labels(config.robustness.labels or labels, meta, "robustness.labels")
  window_labels = _window_labels(config, meta, results)
  if window_labels:
    windows_lib.tokens_per_window(config.windows.minutes, model.model_cfg.patch_time,
                                  model.model_cfg.time_steps)
  tasks = discriminative.tasks_for(meta.labels, labels, config.probe.levels)
  pool = reader.pool(_pool_splits(config.probe.protocol), labels + window_labels)
  logging.info("Embedding %d days for %d probe tasks.", pool.z.shape[0], len(tasks))
  embeddings = model.embed_normalized(pool.z, pool.observed)
  built = discriminative.run(results, pool, embeddings, tasks, config)
  # The clinician's baseline: the same probe on hand-crafted per-day features.
  features_lib.run(results, pool, tasks, config, model.channel_names, model.norm_mean,
                   model.norm_std)
  if config.fine_tune.enabled:
    ft_tasks = discriminative.tasks_for(meta.labels, ft_labels, ("day",))
    logging.info("Fine-tuning on %d tasks.", len(ft_tasks))
    fine_tune_lib.run(results, model, pool, built, ft_tasks, config)
  for name in window_labels:
    windows_lib.run(results, model, pool, meta.labels[name], config)

  # --- Generative ---------------------------------------------------------------
  gen_split = config.generative.split
  gen = reader.read(gen_split)
  gen_kwargs = dict(split=gen_split, seed=config.seed,
                    baseline_names=tuple(config.generative.baselines), noise=noise)
  # Outputs kept for later: the robustness task's (error by missingness) and the plotted ones.
  keep = {rob_task} if config.robustness.enabled and rob_task else set()
  keep |= set(config.plots.tasks) if config.plots.enabled else set()
  outputs = {}
  if config.generative.enabled:
    logging.info("Generative tasks: %d on %d days.", len(suite), gen["z"].shape[0])
    outputs = generative.run(results, model, gen["z"], gen["observed"], suite, keep=keep,
                             **gen_kwargs)

  # --- Robustness ---------------------------------------------------------------
  if config.robustness.enabled:
    rob_tasks = discriminative.tasks_for(meta.labels, rob_labels, config.probe.levels)
    plot_files += _robustness(results, model, meta, config, pool, gen, outputs, rob_tasks,
                              rob_suite, gen_kwargs, out)

  # --- Report -------------------------------------------------------------------
  if config.plots.enabled:
    plot_files += _day_plots(model, gen, outputs, config.plots, out)
  kinds = {name: spec.kind for name, spec in meta.labels.items()}
  restored_step = model.step  # Of the step restored: an unreadable newer one is skipped.
  header = _header(config, model, meta, data_dir, restored_step, reader, time.time() - start,
                   window_labels)
  report.write_json(results.records, out / "results.json")
  (out / "results.md").write_text(report.markdown(
      results, title=f"LSM-2 evaluation: {config.taskset}", header=header, kinds=kinds,
      plots=[p.name for p in plot_files]))
  (out / "eval_config.json").write_text(config.to_json_best_effort(indent=1) + "\n")
  report.write_scalars(results.records, out, restored_step)
  logging.info("Wrote %d metrics to %s (%.0f s).", len(results.records), out / "results.md",
               time.time() - start)
  return results.records


def _robustness(results, model, meta, config, pool, gen, outputs, rob_tasks, gen_task,
                gen_kwargs, out) -> list[epath.Path]:
  """Removal conditions (probe refitted, generative task rerun), buckets and their plots."""
  rcfg = config.robustness
  conditions, notes = robustness.conditions(model.channel_groups, groups=rcfg.sensor_groups,
                                            segments=rcfg.time_segments,
                                            channel_names=model.channel_names,
                                            device_profiles=tuple(rcfg.device_profiles))
  for note in notes:
    results.skip("robustness", note)
  if gen_task and rcfg.generative_task not in outputs:
    outputs.update(generative.run(results, model, gen["z"], gen["observed"], gen_task,
                                  keep=(rcfg.generative_task,), **gen_kwargs))
  for masking, transform in conditions:
    logging.info("Robustness: %s.", masking)
    reduced = pool.with_observed(transform(pool.observed))
    emb = model.embed_normalized(reduced.z, reduced.observed)
    discriminative.run(results, reduced, emb, rob_tasks, config, masking=masking, baselines=False)
    if gen_task:
      z, obs = robustness.reduce(gen["z"], gen["observed"], transform)
      generative.run(results, model, z, obs, gen_task, masking=masking, **gen_kwargs)

  files = []
  if not config.plots.enabled:
    return files
  for task in dict.fromkeys(t.name for t in rob_tasks):
    metric = report.PRIMARY_METRIC[meta.labels[task].kind]
    rows = results.select(task=task, metric=metric, method="linear_probe")
    series = {}
    for r in rows:
      series.setdefault(r["level"], {})[r["masking"]] = r["value"]
    if series and any(len(s) > 1 for s in series.values()):
      files.append(plots.plot_metric_by_condition(
          series, out / f"robustness_{task}.png", metric_name=f"{task} {metric}",
          title=f"{task}: linear probe with data removed"))
  if gen_task:
    name = rcfg.generative_task
    rows = [r for r in results.select(task=name, metric="mse")
            if not r["masking"].startswith("missing:")]
    series = {}
    for r in rows:
      series.setdefault(r["method"], {})[r["masking"]] = r["value"]
    if any(len(s) > 1 for s in series.values()):
      files.append(plots.plot_metric_by_condition(
          series, out / "robustness_generative.png", metric_name="MSE (normalised)",
          title=f"{name}: error with data removed"))
    if rcfg.missingness_buckets and name in outputs:
      series = generative.bucket_errors(results, outputs[name], gen["z"], gen["observed"],
                                        task=name, split=gen_kwargs["split"])
      rows = results.select(task=name, metric="mse", method="model")
      counts = {r["masking"][8:]: r["days"] for r in rows if r["masking"].startswith("missing:")}
      buckets = tasks_lib.bucket_labels()
      files.append(plots.plot_error_by_missingness(
          buckets, series, out / "error_by_missingness.png", metric_name="MSE (normalised)",
          title=f"{name}: error by the day's missing fraction",
          counts=[counts.get(b, 0) for b in buckets]))
  return files


def _day_plots(model, gen, outputs, pcfg, out) -> list[epath.Path]:
  """A few reconstructed days per task: the days with the most scored minutes."""
  files = []
  for task in pcfg.tasks:
    if task not in outputs:
      continue
    o = outputs[task]
    scored = o.target & gen["observed"]
    per_day = scored.sum(axis=(1, 2))
    for rank, i in enumerate(np.argsort(-per_day, kind="stable")[:pcfg.days]):
      if per_day[i] == 0:
        break
      channels = np.argsort(-scored[i].sum(axis=0), kind="stable")[:3]
      files.append(plots.plot_reconstructed_day(
          gen["z"][i], gen["observed"][i], o.target[i], o.predictions["model"][i],
          out / f"reconstruction_{task}_{rank}.png", channel_names=model.channel_names,
          line_channels=tuple(int(c) for c in channels),
          title=f"{task}: {gen['subject_id'][i]} {gen['day'][i]} (normalised units)"))
  return files


def _header(config, model, meta, data_dir, step, reader, seconds, window_labels) -> list[str]:
  cfg, mk = model.model_cfg, model.mask_cfg
  sizes = reader.summary()
  return [
      f"- checkpoint: `{config.init_from}` (step {step}; scheme `{mk.scheme}`, size "
      f"`{model.config.get('model_size', '?')}`, encoder width {cfg.enc_width} x {cfg.enc_depth} "
      f"layers, patch {cfg.patch_time} min x {cfg.patch_channels} channel(s), {cfg.num_tokens} "
      "tokens)",
      f"- data: `{data_dir}`, {meta.num_channels} channel(s); {sizes}",
      f"- probe protocol: `{config.probe.protocol.name}`; seed {config.seed}; "
      f"few-shot k={config.few_shot.k} x {config.few_shot.repeats} seeds; "
      f"fine-tuning {'on' if config.fine_tune.enabled else 'off'}",
      f"- inputs normalised with the checkpoint's statistics; reconstruction errors are on those "
      "normalised values, only over minutes that were really observed",
      f"- {jax.device_count()} {jax.default_backend()} device(s), {seconds:.0f} s",
  ] + ([f"- level `window` ({', '.join(window_labels)}): {config.windows.minutes}-min windows on "
        f"the token grid, labelled with the class of >= {config.windows.min_fraction:.0%} of "
        "their minutes; feature = mean encoder output over the window's visible tokens"]
       if window_labels else [])
