"""CLU metrics and the progress line for pretraining.

Losses are accumulated as (sum, count) pairs so that an average over many steps
weighs every observed minute equally, and a strategy that was not drawn in a
window reports nothing instead of a misleading 0 or NaN.
"""
from collections.abc import Mapping, Sequence
import datetime
import time

from clu import metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class SumCount(metrics.Metric):
  """Mean of `NAME` weighted by `NAME_count` (both in the model output)."""
  total: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def from_output(cls, name: str):  # pylint: disable=arguments-renamed
    @flax.struct.dataclass
    class FromOutput(cls):
      @classmethod
      def from_model_output(cls, **outputs) -> "SumCount":
        return cls(total=jnp.asarray(outputs[name], jnp.float32),
                   count=jnp.asarray(outputs[name + "_count"], jnp.float32))
    return FromOutput

  @classmethod
  def empty(cls) -> "SumCount":
    return cls(total=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))

  def merge(self, other: "SumCount") -> "SumCount":
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self) -> jnp.ndarray:
    return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1.0), jnp.nan)


def train_metrics_collection(strategy_names: Sequence[str]) -> type[metrics.Collection]:
  """Loss, per-strategy losses, inherited-missing fraction, learning rate, grad norm."""
  fields = {
      "loss": metrics.Average.from_output("loss"),
      "inherited_fraction": metrics.Average.from_output("inherited_fraction"),
      "learning_rate": metrics.LastValue.from_output("learning_rate"),
      "grad_norm": metrics.Average.from_output("grad_norm"),
  }
  for name in strategy_names:
    fields[f"loss_{name}"] = SumCount.from_output(f"sse_{name}")
  return metrics.Collection.create(**fields)


def eval_metrics_collection(strategy_names: Sequence[str]) -> type[metrics.Collection]:
  """Validation reconstruction MSE, overall and per masking strategy (observed minutes only)."""
  fields = {"mse": SumCount.from_output("sse")}
  for name in strategy_names:
    fields[f"mse_{name}"] = SumCount.from_output(f"sse_{name}")
  return metrics.Collection.create(**fields)


def finite_scalars(values: Mapping[str, jnp.ndarray], prefix: str = "") -> dict[str, float]:
  """Host floats for the writer, leaving out metrics with nothing accumulated (NaN)."""
  out = {}
  for k, v in values.items():
    v = float(np.asarray(jax.device_get(v)))
    if np.isfinite(v):
      out[prefix + k] = v
  return out


class Progress:
  """Steps/s over the last log interval and the time left at that pace (the log line's ETA)."""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps
    self._last = None  # (step, time.monotonic()) of the previous report.

  def report(self, step: int) -> tuple[dict[str, float], str]:
    now = time.monotonic()
    last, self._last = self._last, (step, now)
    if last is None or step <= last[0]:
      return {}, ""
    rate = (step - last[0]) / max(now - last[1], 1e-9)
    eta = datetime.timedelta(seconds=round((self.total_steps - step) / rate))
    return {"steps_per_sec": rate}, f"{rate:.3g} steps/s, ETA {eta}"
