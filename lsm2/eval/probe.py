"""Linear probes on frozen embeddings, subject-disjoint splits and few-shot sampling.

The probe recipe follows the reference: Adam, batch 512, 500 steps, LR 5e-3,
features standardised with training statistics, and balanced softmax
(logit adjustment by the log class prior during training only) so that an
imbalanced training set does not bias predictions toward the majority class.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

KINDS = ("binary", "categorical", "regression")


def _check_kind(kind: str, num_classes: int | None) -> int:
  """Validates the task kind and returns the probe's output width."""
  if kind == "binary":
    if num_classes not in (None, 2):
      raise ValueError(f"kind='binary' has 2 classes, got num_classes={num_classes}")
    return 1
  if kind == "categorical":
    if num_classes is None or num_classes < 2:
      raise ValueError(f"kind='categorical' needs num_classes >= 2, got {num_classes}")
    return num_classes
  if kind == "regression":
    return 1
  raise ValueError(f"unknown probe kind {kind!r}; expected one of {KINDS}")


def _check_xy(
    x: np.ndarray, y: np.ndarray, kind: str, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float32)
  y = np.asarray(y)
  if x.ndim != 2:
    raise ValueError(f"features must be [n, d], got shape {x.shape}")
  if y.shape != (x.shape[0],):
    raise ValueError(f"labels must be [{x.shape[0]}] to match the features, got shape {y.shape}")
  if x.shape[0] == 0:
    raise ValueError("no training examples")
  if not np.all(np.isfinite(x)):
    raise ValueError("features contain NaN or inf")
  if kind == "regression":
    y = y.astype(np.float32)
    if not np.all(np.isfinite(y)):
      raise ValueError("regression targets contain NaN or inf")
  else:
    k = 2 if kind == "binary" else num_classes
    if not np.all(np.equal(np.mod(y, 1), 0)) or np.any((y < 0) | (y >= k)):
      raise ValueError(f"labels must be integers in [0, {k}), got values {np.unique(y)[:10]}")
    y = y.astype(np.int32)
  return x, y


@dataclasses.dataclass(frozen=True)
class Probe:
  """A fitted linear probe; `predict` standardises features like training did."""

  kind: str
  num_classes: int | None
  feature_mean: np.ndarray
  feature_scale: np.ndarray
  weights: np.ndarray
  bias: np.ndarray
  target_mean: float = 0.0
  target_scale: float = 1.0
  train_class_counts: np.ndarray | None = None

  def logits(self, x: Float[np.ndarray, "n d"]) -> Float[np.ndarray, "n k"]:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != self.feature_mean.shape[0]:
      raise ValueError(f"features must be [n, {self.feature_mean.shape[0]}], got shape {x.shape}")
    return ((x - self.feature_mean) / self.feature_scale) @ self.weights + self.bias

  def predict(self, x: Float[np.ndarray, "n d"]) -> np.ndarray:
    """Binary: P(y=1) [n]; categorical: class probabilities [n, K]; regression: values [n]."""
    z = self.logits(x)
    if self.kind == "binary":
      return 1.0 / (1.0 + np.exp(-z[:, 0]))
    if self.kind == "categorical":
      z = z - z.max(axis=1, keepdims=True)
      e = np.exp(z)
      return e / e.sum(axis=1, keepdims=True)
    return z[:, 0] * self.target_scale + self.target_mean


@functools.partial(jax.jit, static_argnames=("kind", "lr"))
def _train(
    x: Float[Array, "n d"],
    y: Array,
    batches: Int[Array, "steps b"],
    logit_offset: Float[Array, "k"],
    l2: Float[Array, ""],
    *,
    kind: str,
    lr: float,
) -> tuple[dict[str, Array], Float[Array, "steps"]]:
  """Adam on (balanced) cross-entropy or squared error plus `l2 * |w|^2`, one step per batch row."""
  width = logit_offset.shape[0]
  params = {"w": jnp.zeros((x.shape[1], width), jnp.float32), "b": jnp.zeros((width,), jnp.float32)}
  opt = optax.adam(lr)

  def loss_fn(params, xb, yb):
    z = xb @ params["w"] + params["b"] + logit_offset
    if kind == "binary":
      data = optax.sigmoid_binary_cross_entropy(z[:, 0], yb.astype(jnp.float32)).mean()
    elif kind == "categorical":
      data = optax.softmax_cross_entropy_with_integer_labels(z, yb).mean()
    else:
      data = jnp.mean((z[:, 0] - yb) ** 2)
    return data + l2 * jnp.sum(params["w"] ** 2)

  def step(carry, idx):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), batches)
  return params, losses


def fit_linear_probe(
    x_train: Float[np.ndarray, "n d"],
    y_train: np.ndarray,
    *,
    kind: str,
    num_classes: int | None = None,
    steps: int = 500,
    lr: float = 5e-3,
    batch_size: int = 512,
    seed: int = 0,
    class_balanced: bool = True,
    l2: float = 1e-4,
) -> Probe:
  """Fits a logistic ("binary"), softmax ("categorical") or linear ("regression") probe.

  Features are standardised with the training mean/std (regression targets
  too). Minibatches are drawn with replacement from a seeded generator; when
  the training set is no larger than `batch_size`, every step uses all of it.
  With `class_balanced`, training adds log(class prior) to the logits
  (balanced softmax / sigmoid logit adjustment); prediction uses the plain
  logits, which targets balanced accuracy. A class absent from training gets
  the prior of half an example.
  """
  width = _check_kind(kind, num_classes)
  x, y = _check_xy(x_train, y_train, kind, num_classes)
  if steps < 1 or batch_size < 1 or lr <= 0 or l2 < 0:
    raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0, l2 >= 0; "
                     f"got {steps}, {batch_size}, {lr}, {l2}")
  n = x.shape[0]
  mean = x.mean(axis=0, dtype=np.float64)
  std = x.std(axis=0, dtype=np.float64)
  scale = np.where(std > 1e-8, std, 1.0)
  xs = ((x - mean) / scale).astype(np.float32)

  target_mean, target_scale, counts = 0.0, 1.0, None
  offset = np.zeros(width, np.float32)
  if kind == "regression":
    target_mean = float(y.mean(dtype=np.float64))
    target_scale = float(y.std(dtype=np.float64)) or 1.0
    y = ((y - target_mean) / target_scale).astype(np.float32)
  else:
    counts = np.bincount(y, minlength=2 if kind == "binary" else num_classes)
    if np.count_nonzero(counts) < 2:
      raise ValueError(
          f"a {kind} probe needs at least two classes in training; class counts are {counts}")
    if class_balanced:
      prior = np.maximum(counts, 0.5) / n
      log_prior = np.log(prior[1] / prior[0])[None] if kind == "binary" else np.log(prior)
      offset = log_prior.astype(np.float32)

  rng = np.random.default_rng(seed)
  if n <= batch_size:
    batches = np.broadcast_to(np.arange(n, dtype=np.int32), (steps, n))
  else:
    batches = rng.integers(0, n, size=(steps, batch_size), dtype=np.int32)
  params, losses = _train(jnp.asarray(xs), jnp.asarray(y), jnp.asarray(batches),
                          jnp.asarray(offset), jnp.asarray(l2, jnp.float32),
                          kind=kind, lr=float(lr))
  if not np.all(np.isfinite(np.asarray(losses))):
    raise FloatingPointError(f"linear probe loss became NaN/inf (kind={kind}, lr={lr})")
  return Probe(kind=kind, num_classes=2 if kind == "binary" else num_classes,
               feature_mean=mean, feature_scale=scale,
               weights=np.asarray(params["w"], np.float64),
               bias=np.asarray(params["b"], np.float64),
               target_mean=target_mean, target_scale=target_scale, train_class_counts=counts)


@dataclasses.dataclass(frozen=True)
class ConstantPredictor:
  """Chance-level reference: the training class frequencies, or the training mean."""

  kind: str
  value: np.ndarray  # [] for binary (P(y=1)) and regression, [K] for categorical.

  def predict(self, x: np.ndarray) -> np.ndarray:
    n = np.asarray(x).shape[0]
    return np.broadcast_to(self.value, (n,) + self.value.shape).copy()


def fit_majority_baseline(
    y_train: np.ndarray, *, kind: str, num_classes: int | None = None
) -> ConstantPredictor:
  """Majority-class (class frequencies as scores) or mean predictor, same `predict` as `Probe`."""
  _check_kind(kind, num_classes)
  y = np.asarray(y_train)
  _check_xy(np.zeros((y.shape[0], 1), np.float32), y, kind, num_classes)
  if kind == "regression":
    value = np.asarray(y.mean(dtype=np.float64))
  elif kind == "binary":
    value = np.asarray(np.mean(y == 1, dtype=np.float64))
  else:
    value = np.bincount(y.astype(np.int64), minlength=num_classes) / y.shape[0]
  return ConstantPredictor(kind=kind, value=value)


# ---------------------------------------------------------------------------
# Splits and subject-level aggregation.


def few_shot_indices(
    labels: Int[np.ndarray, "n"],
    subject_ids: Sequence,
    k: int,
    seed: int,
    exclude_subjects: Sequence = (),
) -> Int[np.ndarray, "m"]:
  """k example indices per class, none from `exclude_subjects` (the test subjects), seeded.

  Within a class, examples are spread over as many different subjects as
  possible (one per subject before a second from anyone). Raises if a class
  has fewer than k eligible examples. Returns sorted indices.
  """
  labels = np.asarray(labels)
  subject_ids = np.asarray(subject_ids)
  if labels.shape != subject_ids.shape or labels.ndim != 1:
    raise ValueError(
        f"labels {labels.shape} and subject_ids {subject_ids.shape} must be equal 1-D shapes")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  eligible = ~np.isin(subject_ids, np.asarray(exclude_subjects))
  rng = np.random.default_rng(seed)
  chosen = []
  for cls in np.unique(labels):
    cand = np.flatnonzero(eligible & (labels == cls))
    if len(cand) < k:
      raise ValueError(f"class {cls} has {len(cand)} eligible examples, fewer than k={k}")
    cand = rng.permutation(cand)
    # Occurrence number of each candidate's subject within the shuffled order.
    _, subj = np.unique(subject_ids[cand], return_inverse=True)
    order = np.argsort(subj, kind="stable")
    sorted_subj = subj[order]
    first = np.r_[0, np.flatnonzero(sorted_subj[1:] != sorted_subj[:-1]) + 1]
    occurrence = np.empty(len(cand), np.int64)
    occurrence[order] = np.arange(len(cand)) - np.repeat(first, np.diff(np.r_[first, len(cand)]))
    chosen.append(cand[np.argsort(occurrence, kind="stable")[:k]])
  return np.sort(np.concatenate(chosen))


def aggregate_by_subject(
    values: np.ndarray, subject_ids: Sequence
) -> tuple[np.ndarray, np.ndarray]:
  """(sorted unique subjects, mean of `values` over each subject's examples along axis 0)."""
  values = np.asarray(values)
  subject_ids = np.asarray(subject_ids)
  if subject_ids.shape != values.shape[:1]:
    raise ValueError(
        f"subject_ids {subject_ids.shape} must match the first axis of values {values.shape}")
  subjects, inverse = np.unique(subject_ids, return_inverse=True)
  sums = np.zeros((len(subjects),) + values.shape[1:], np.float64)
  np.add.at(sums, inverse, values)
  counts = np.bincount(inverse, minlength=len(subjects)).reshape((-1,) + (1,) * (values.ndim - 1))
  return subjects, sums / counts


def subject_labels(labels: np.ndarray, subject_ids: Sequence) -> tuple[np.ndarray, np.ndarray]:
  """(sorted unique subjects, each subject's label); raises if a subject has two labels."""
  labels = np.asarray(labels)
  subject_ids = np.asarray(subject_ids)
  if labels.shape != subject_ids.shape or labels.ndim != 1:
    raise ValueError(
        f"labels {labels.shape} and subject_ids {subject_ids.shape} must be equal 1-D shapes")
  subjects, first, inverse = np.unique(subject_ids, return_index=True, return_inverse=True)
  per_subject = labels[first]
  conflict = per_subject[inverse] != labels
  if np.any(conflict):
    bad = np.unique(subject_ids[conflict])[:5]
    raise ValueError(f"subjects {bad.tolist()} have more than one label; "
                     "subject-level labels must be constant")
  return subjects, per_subject


def subject_kfold(
    subject_ids: Sequence, k: int, seed: int, stratify: np.ndarray | None = None
) -> list[tuple[Int[np.ndarray, "n_train"], Int[np.ndarray, "n_test"]]]:
  """k (train, test) example-index pairs; each subject is in exactly one test fold.

  Subjects are shuffled (seeded) and dealt round-robin into folds; with
  `stratify` (one label per example, constant within a subject) they are dealt
  label by label, so every fold gets a share of each class.
  """
  subject_ids = np.asarray(subject_ids)
  subjects, inverse = np.unique(subject_ids, return_inverse=True)
  if not 2 <= k <= len(subjects):
    raise ValueError(f"k={k} folds need 2 <= k <= number of subjects ({len(subjects)})")
  strata = (np.zeros(len(subjects), np.int64) if stratify is None
            else subject_labels(stratify, subject_ids)[1])
  rng = np.random.default_rng(seed)
  fold_of = np.empty(len(subjects), np.int64)
  dealt = 0
  for stratum in np.unique(strata):
    members = rng.permutation(np.flatnonzero(strata == stratum))
    fold_of[members] = (dealt + np.arange(len(members))) % k
    dealt += len(members)
  example_fold = fold_of[inverse]
  return [(np.flatnonzero(example_fold != f), np.flatnonzero(example_fold == f)) for f in range(k)]
