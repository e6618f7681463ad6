"""Reconstruction loss of the masked autoencoder.

Mean squared error over the observed minutes of masked tokens
(`AimMasks.loss_weight`), normalized by the number of such minutes. Nothing is
ever imputed: minutes without ground truth have weight zero, and their values
(the pipeline's fill, whatever it is) never reach the loss or its gradient.
"""
import jax.numpy as jnp
from jaxtyping import Array, Float

from lsm2.model.aim import AimMasks
from lsm2.model.config import STRATEGIES


def reconstruction_loss(
    pred: Float[Array, "b t c"],
    signals: Float[Array, "b t c"],
    masks: AimMasks,
    strategy_names: tuple[str, ...],
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
  """Masked MSE and per-strategy auxiliaries.

  Args:
    pred: model reconstruction.
    signals: normalized inputs (any finite or non-finite fill where unobserved).
    masks: the batch's masks (`loss_weight` selects the minutes).
    strategy_names: strategies to report, e.g. `MaskConfig.strategy_names`.

  Returns:
    (loss, aux). The loss is 0.0 (not NaN) when no minute is selected. aux has
    "loss/<name>" (MSE over that strategy's examples, 0.0 when none),
    "minutes/<name>" (its selected minutes) and "examples/<name>" per
    strategy, and "minutes/total".
  """
  if pred.shape != signals.shape or pred.shape != masks.loss_weight.shape:
    raise ValueError(
        f"pred {pred.shape}, signals {signals.shape} and masks.loss_weight "
        f"{masks.loss_weight.shape} must have the same shape")
  unknown = [n for n in strategy_names if n not in STRATEGIES]
  if unknown:
    raise ValueError(f"unknown strategy name(s) {unknown}; expected names from {STRATEGIES}")
  selected = masks.loss_weight > 0
  # `where` on the difference (not a product, not after squaring) so that
  # non-finite fill values reach neither the loss nor its gradient.
  diff = jnp.where(selected, pred.astype(jnp.float32) - signals.astype(jnp.float32), 0.0)
  sq_err = jnp.square(diff) * masks.loss_weight
  err_per_example = sq_err.sum(axis=(1, 2))
  weight_per_example = masks.loss_weight.sum(axis=(1, 2))

  def mse(err, weight):
    return err / jnp.maximum(weight, 1.0)

  total_weight = weight_per_example.sum()
  loss = mse(err_per_example.sum(), total_weight)
  aux = {"minutes/total": total_weight}
  for name in strategy_names:
    chosen = masks.strategy == STRATEGIES.index(name)
    weight = jnp.where(chosen, weight_per_example, 0.0).sum()
    aux[f"loss/{name}"] = mse(jnp.where(chosen, err_per_example, 0.0).sum(), weight)
    aux[f"minutes/{name}"] = weight
    aux[f"examples/{name}"] = chosen.sum().astype(jnp.float32)
  return loss, aux
