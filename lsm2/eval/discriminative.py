"""Discriminative evaluation: linear probes, chance baselines and few-shot probes on frozen embeddings.

The examples of a task are days ("day" level) or subjects ("subject" level:
the mean of the subject's day embeddings); `lsm2.eval.windows` builds windows
of a day ("window" level) and probes them with the same folds and metrics.
Train/test folds are always subject-disjoint:
  "splits": fit on the dataset's fit split, score on its test split (the
            dataset's splits are subject-disjoint by construction);
  "cv":     pool the listed splits and run a subject k-fold (stratified by
            class); metrics are computed on the pooled out-of-fold predictions.
Metrics go through the CLU metric classes of `lsm2.eval.metrics`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np
from jaxtyping import Bool, Float

from lsm2.data.metadata import LabelSpec
from lsm2.eval import metrics as metrics_lib
from lsm2.eval import probe as probe_lib
from lsm2.eval import report

Fold = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Pool:
  """The days probes draw from: normalised inputs, subjects, each day's split and the labels.

  `labels[name]` is [n] per day, or [n, 1440] for a minute label (windows).
  """
  z: Float[np.ndarray, "n t c"]
  observed: Bool[np.ndarray, "n t c"]
  subject_id: np.ndarray
  split: np.ndarray
  labels: dict[str, np.ndarray]

  def with_observed(self, observed: np.ndarray) -> "Pool":
    """The same days with a reduced observed mask (removed minutes zeroed)."""
    return dataclasses.replace(self, observed=observed, z=np.where(observed, self.z, 0.0))


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str  # binary | categorical | regression
  level: str  # day | subject | window: what one example is
  num_classes: int | None
  label_level: str = "subject"  # day | subject | minute: what the label describes

  @property
  def stratify(self) -> bool:
    """Folds can be stratified only by labels that are constant within a subject."""
    return self.is_classification and self.label_level == "subject"

  @property
  def is_classification(self) -> bool:
    return self.kind != "regression"


@dataclasses.dataclass(frozen=True)
class Examples:
  """One task's examples and folds; `rows[i]` are the pool days behind example i."""
  x: np.ndarray
  y: np.ndarray
  subjects: np.ndarray
  folds: list[Fold]
  rows: list[np.ndarray]
  split_name: str


def tasks_for(specs: dict[str, LabelSpec], names: Sequence[str], levels: Sequence[str]) -> list[Task]:
  """Tasks for the named labels: day level always (if asked), subject level for subject labels."""
  out = []
  for name in names:
    spec = specs[name]
    if spec.level == "minute":
      raise ValueError(f"label {name!r} is a minute-level label: it is probed per window "
                       "(lsm2.eval.windows, config.windows.labels), not per day")
    num_classes = len(spec.classes) if spec.kind != "regression" else None
    for level in levels:
      if level == "subject" and spec.level != "subject":
        continue
      out.append(Task(name, spec.kind, level, num_classes, spec.level))
  return out


def _present(task: Task, y: np.ndarray) -> np.ndarray:
  return np.isfinite(y) if task.kind == "regression" else y >= 0


def build_examples(pool: Pool, embeddings: np.ndarray, task: Task,
                   protocol: ml_collections.ConfigDict, seed: int) -> Examples | str:
  """The task's examples and subject-disjoint folds, or the reason they cannot be built."""
  y_day = pool.labels[task.name]
  keep = np.flatnonzero(_present(task, y_day))
  if protocol.name == "splits":
    keep = keep[np.isin(pool.split[keep], (protocol.fit_split, protocol.test_split))]
  if keep.size == 0:
    return "no labelled days"
  x, y, subjects = embeddings[keep], y_day[keep], pool.subject_id[keep]
  rows = [np.array([r]) for r in keep]
  split_of = pool.split[keep]
  if task.level == "subject":
    uniq, x = probe_lib.aggregate_by_subject(x, subjects)
    _, y = probe_lib.subject_labels(y, subjects)
    rows = [keep[subjects == s] for s in uniq]
    split_of = np.array([pool.split[r[0]] for r in rows])
    subjects = uniq
  return examples_with_folds(task, x, y, subjects, split_of, rows, protocol, seed)


def examples_with_folds(task: Task, x: np.ndarray, y: np.ndarray, subjects: np.ndarray,
                        split_of: np.ndarray, rows: list[np.ndarray],
                        protocol: ml_collections.ConfigDict, seed: int) -> Examples | str:
  """Examples with the protocol's subject-disjoint folds, or the reason there are none.

  `split_of[i]` is the dataset split example i comes from ("splits" protocol).
  """
  if protocol.name == "splits":
    folds = [(np.flatnonzero(split_of == protocol.fit_split),
              np.flatnonzero(split_of == protocol.test_split))]
    split_name = protocol.test_split
  elif protocol.name == "cv":
    n_subjects = len(np.unique(subjects))
    if n_subjects < 2:
      return f"{n_subjects} labelled subject(s): too few for cross-validation"
    k = min(protocol.folds, n_subjects)
    folds = probe_lib.subject_kfold(subjects, k, seed, stratify=y if task.stratify else None)
    split_name = f"cv{k}({'+'.join(protocol.splits)})"
  else:
    raise ValueError(f"config.probe.protocol.name={protocol.name!r}; expected 'splits' or 'cv'")
  reason = _check_folds(task, y, folds)
  if reason:
    return reason
  return Examples(x.astype(np.float32), y, subjects, folds, rows, split_name)


def _check_folds(task: Task, y: np.ndarray, folds: list[Fold]) -> str:
  for i, (train, test) in enumerate(folds):
    if test.size == 0:
      return f"fold {i}: no test examples"
    if task.is_classification and np.unique(y[train]).size < 2:
      return f"fold {i}: training examples hold {np.unique(y[train]).size} class(es), need 2"
    if not task.is_classification and train.size < 2:
      return f"fold {i}: {train.size} training example(s), need 2"
  return ""


def score(task: Task, y_true: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
  """Metrics of predictions through the CLU metric classes."""
  if task.kind == "regression":
    return metrics_lib.RegressionMetrics.from_model_output(
        labels=y_true, predictions=predictions).compute()
  return metrics_lib.ClassificationMetrics.from_model_output(
      labels=y_true, scores=predictions).compute()


def metric_names(task: Task) -> tuple[str, ...]:
  return report.REGRESSION_METRICS if task.kind == "regression" else report.CLASSIFICATION_METRICS


def fold_metrics(ex: Examples, task: Task, predict) -> list[dict[str, Any]]:
  """Metrics of every test fold; `predict(train_idx, test_idx)` -> predictions for the test fold.

  Folds are scored separately (then averaged): pooling out-of-fold scores of
  differently trained predictors would rank across folds, which is not what
  any single predictor does (a majority predictor would score AUROC != 0.5).
  """
  return [score(task, ex.y[test], predict(train, test)) for train, test in ex.folds]


def mean_over(per_run: list[dict[str, Any]], name: str) -> tuple[float | None, float | None, int]:
  """(mean, std, how many runs had the metric defined) of one metric."""
  values = [m[name] for m in per_run if m[name] is not None]
  if not values:
    return None, None, 0
  return float(np.mean(values)), float(np.std(values)), len(values)


def add_fold_metrics(results: report.Results, per_fold: list[dict[str, Any]],
                     names: Sequence[str], **keys) -> None:
  """Fold-averaged metrics (with their spread over folds when there are several)."""
  n = sum(m["n"] for m in per_fold)
  for name in names:
    value, std, defined = mean_over(per_fold, name)
    extra = dict(std=std, std_over="folds", folds=defined) if len(per_fold) > 1 else {}
    results.add(metric=name, value=value, n=n, **extra, **keys)


def _probe_fit(ex: Examples, task: Task, cfg: ml_collections.ConfigDict, seed: int):
  def fit(train, test, subset=None):
    del test
    idx = train if subset is None else subset
    return probe_lib.fit_linear_probe(
        ex.x[idx], ex.y[idx], kind=task.kind, num_classes=task.num_classes, steps=cfg.steps,
        lr=cfg.lr, batch_size=cfg.batch_size, seed=seed, class_balanced=cfg.class_balanced,
        l2=cfg.l2)
  return fit


def run(results: report.Results, pool: Pool, embeddings: np.ndarray, tasks: Sequence[Task],
        config: ml_collections.ConfigDict, *, masking: str = report.NATURAL,
        baselines: bool = True) -> dict[tuple[str, str], Examples]:
  """Linear probe (and, with `baselines`, majority/mean and few-shot) for every task.

  Returns the examples built per (task, level), for fine-tuning.
  """
  built = {}
  for task in tasks:
    what = f"{task.name} ({task.level} level, {masking})"
    ex = build_examples(pool, embeddings, task, config.probe.protocol, config.seed)
    if isinstance(ex, str):
      results.skip(what, ex)
      continue
    built[(task.name, task.level)] = ex
    probe_examples(results, ex, task, config, what=what, baselines=baselines, masking=masking)
  return built


def probe_examples(results: report.Results, ex: Examples, task: Task,
                   config: ml_collections.ConfigDict, *, what: str, baselines: bool = True,
                   masking: str = report.NATURAL, method: str = "linear_probe", **extra) -> None:
  """Linear probe (and, with `baselines`, majority/mean and few-shot) on built examples.

  `method` names the probe's records (e.g. "features_probe" for hand-crafted features);
  `extra` keys (e.g. the window length) are stored in every record.
  """
  keys = dict(task=task.name, split=ex.split_name, masking=masking, level=task.level,
              family="discriminative", **extra)
  fit = _probe_fit(ex, task, config.probe, config.seed)
  probe = lambda train, test: fit(train, test).predict(ex.x[test])
  add_fold_metrics(results, fold_metrics(ex, task, probe), metric_names(task), method=method, **keys)
  if not baselines:
    return
  majority = lambda train, test: probe_lib.fit_majority_baseline(
      ex.y[train], kind=task.kind, num_classes=task.num_classes).predict(ex.x[test])
  add_fold_metrics(results, fold_metrics(ex, task, majority), metric_names(task),
                   method="majority" if task.is_classification else "mean", **keys)
  if config.few_shot.k > 0 and task.is_classification:
    _few_shot(results, ex, task, config, fit, keys, what)


def _few_shot(results, ex: Examples, task: Task, config, fit, keys, what) -> None:
  """k labelled training examples per class (subject-disjoint from the test fold), seeded repeats."""
  k = config.few_shot.k
  for i, (train, _) in enumerate(ex.folds):
    smallest = np.unique(ex.y[train], return_counts=True)[1].min()
    if smallest < k:
      results.skip(f"{what} few-shot k={k}", f"fold {i}: a class has only {smallest} training "
                   f"example(s), fewer than k={k}")
      return
  runs = []
  for repeat in range(config.few_shot.repeats):
    seed = config.seed + repeat
    def fit_k(train, test, seed=seed):
      chosen = probe_lib.few_shot_indices(ex.y[train], ex.subjects[train], k, seed,
                                          exclude_subjects=ex.subjects[test])
      return fit(train, test, subset=train[chosen]).predict(ex.x[test])
    per_fold = fold_metrics(ex, task, fit_k)
    runs.append({"n": sum(m["n"] for m in per_fold),
                 **{name: mean_over(per_fold, name)[0] for name in metric_names(task)}})
  for name in metric_names(task):
    value, std, defined = mean_over(runs, name)
    results.add(metric=name, value=value, n=runs[0]["n"], method=f"few_shot_k{k}", std=std,
                std_over="repeats", repeats=defined, **keys)
