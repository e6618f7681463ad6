r"""Serving exports of a pretrained model: StableHLO, TF SavedModel, LiteRT (docs/export.md).

  python -m lsm2.export --from=RUN_OR_EXPORT_DIR --out=DIR [--format=stablehlo,savedmodel,litert]
  python -m lsm2.export --from=WORKDIR --out=DIR_OR_GS_URL --release   (lsm2/release.py)

Each format holds the inference functions of `lsm2.load` on days of data in
the channels' original units (the description's normalisation is in the graph):

  embed(signals f32[n, T, C], observed bool[n, T, C])                          -> f32[n, d]
  embed_tokens(signals, observed)              -> tokens f32[n, K, d], visible bool[n, K]
  reconstruct(signals f32[n, T, C], observed bool[n, T, C], mask bool[n, T, C]) -> f32[n, T, C]

`embed_tokens` is `lsm2.load(...).embed(..., per_token=True)`: the encoder output
of each of the K tokens, row-major over the (time, signal) patch grid, zeros at
the tokens the encoder did not see (visible False: all their minutes unobserved).

`n` is dynamic (one artefact serves any number of days), except in LiteRT, whose
converter needs it fixed: n = 1 there. Minutes where
`observed` is False or the value is not finite are unobserved, as in
`lsm2.load`: their values (even NaN) never reach the model. `reconstruct` fills
the unobserved minutes and those of `mask`, and returns observed minutes outside
`mask` unchanged. The weights are constants of the graph.

Written under DIR:
  stablehlo/NAME.bin                      jax.export serialisations (jax.export.deserialize)
  savedmodel/                            TF SavedModel, one signature per function
  litert/model.tflite                    LiteRT (TFLite) float32, the same signatures
  litert/model_dynamic_int8.tflite       the same with int8 weights (dynamic range)
  lsm2_export.json                       channel names, shapes, functions, the formats written

Exports always compute attention with the XLA kernel (`attention="xla"`): the
blocked, splash and cuDNN kernels are custom loops or custom calls that other
runtimes cannot express; every kernel computes the same function.

ONNX is not written (NOT_WRITTEN): no jax2onnx release both installs beside
lsm2's orbax-checkpoint (>= 0.12) and runs on its JAX (docs/export.md).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lsm2 import api
from lsm2 import errors
from lsm2 import release
from lsm2 import storage
from lsm2.data import metadata as metadata_lib
from lsm2.model import mae

FORMATS = ("stablehlo", "savedmodel", "litert")
LITERT_BATCH = 1  # Days per LiteRT call (export_litert).
LITERT_FILES = ("model.tflite", "model_dynamic_int8.tflite")
INFO_FILE = "lsm2_export.json"
# Formats asked for that cannot be written yet, and why (said by --format's error).
NOT_WRITTEN = {"onnx": "ONNX is not written yet: jax2onnx 0.13.1-0.17.1 require "
                       "orbax-checkpoint < 0.11.37 (lsm2 needs >= 0.12) and 0.13.0 does not run "
                       "on JAX 0.10; see docs/export.md"}
# Each function's inputs and named outputs (serving clients read outputs by name).
SIGNATURES = {"embed": ("signals", "observed"), "embed_tokens": ("signals", "observed"),
              "reconstruct": ("signals", "observed", "mask")}
OUTPUTS = {"embed": ("embedding",), "embed_tokens": ("tokens", "visible"),
           "reconstruct": ("reconstruction",)}


class ExportError(errors.Error, ValueError):
  """An export that cannot be made as asked (the message names the flag and value)."""


def parse_formats(value: str) -> tuple[str, ...]:
  """--format's comma-separated list, checked against FORMATS."""
  names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
  bad = [n for n in names if n not in FORMATS]
  if not names or bad:
    why = "".join(f" ({NOT_WRITTEN[n]})" for n in bad if n in NOT_WRITTEN)
    raise ExportError(f"--format={value!r}: unknown format(s) {bad}{why}; choose one or more "
                      f"of {', '.join(FORMATS)}, comma-separated")
  return names


# ----------------------------------------------------------------------------
# The two functions on original units, weights closed over.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServingFunctions:
  """The functions of SIGNATURES of one model as pure JAX functions (see the module docstring)."""
  embed: Callable
  embed_tokens: Callable
  reconstruct: Callable
  time_steps: int
  num_channels: int
  channel_names: tuple[str, ...]
  embedding_dim: int
  token_grid: tuple[int, int]  # (time, signal) patches: K = their product.


def serving_functions(model: api.PretrainedModel) -> ServingFunctions:
  """The model's inference with its normalisation, XLA attention and weights as constants."""
  cfg = dataclasses.replace(model.model_cfg, attention="xla")  # Expressible in every format.
  graphdef = nnx.split(nnx.eval_shape(lambda: mae.LSM2MAE(cfg, rngs=nnx.Rngs(0))))[0]
  # Host copies: the program must not carry the loading job's device placement.
  params = jax.device_get(model.params)
  mean = np.asarray(model.norm_mean, np.float32)
  std = np.asarray(model.norm_std, np.float32)
  inv_std = metadata_lib.inverse_std(model.norm_std)
  mask_cfg = model.mask_cfg

  def inputs(signals, observed):
    """(observed, normalised signals) as metadata.normalize computes them, in the graph."""
    observed = observed & jnp.isfinite(signals)
    z = jnp.clip((signals - mean) * inv_std, -metadata_lib.CLIP, metadata_lib.CLIP)
    return observed, jnp.where(observed, z, 0.0)  # NaN at unobserved minutes goes no further.

  def embed(signals, observed):
    observed, z = inputs(signals, observed)
    return nnx.merge(graphdef, params).embed(z, observed, mask_cfg=mask_cfg)

  def embed_tokens(signals, observed):
    observed, z = inputs(signals, observed)
    return nnx.merge(graphdef, params).embed(z, observed, mask_cfg=mask_cfg, per_token=True)

  def reconstruct(signals, observed, mask):
    observed, z = inputs(signals, observed)
    target = ~observed | mask
    # pylint: disable-next=protected-access  # lsm2.load's own reconstruction, unbatched.
    pred = api._reconstruct(graphdef, cfg, mask_cfg, params, z, observed,
                            api.token_any(target, cfg), pack=None)
    return jnp.where(observed & ~target, signals, pred * std + mean)

  return ServingFunctions(embed, embed_tokens, reconstruct, cfg.time_steps, cfg.num_channels,
                          tuple(model.channel_names), cfg.enc_width, tuple(cfg.grid))


def _arg_specs(fns: ServingFunctions, name: str, batch) -> list[jax.ShapeDtypeStruct]:
  shape = (batch, fns.time_steps, fns.num_channels)
  return [jax.ShapeDtypeStruct(shape, jnp.float32 if arg == "signals" else jnp.bool_)
          for arg in SIGNATURES[name]]


# ----------------------------------------------------------------------------
# The formats.
# ----------------------------------------------------------------------------
def export_stablehlo(fns: ServingFunctions, out: pathlib.Path) -> dict[str, jax.export.Exported]:
  """jax.export of each function with batch dimension "n", serialised to OUT/NAME.bin."""
  out.mkdir(parents=True, exist_ok=True)
  (n,) = jax.export.symbolic_shape("n")
  exported = {}
  for name in SIGNATURES:
    exported[name] = jax.export.export(jax.jit(getattr(fns, name)))(*_arg_specs(fns, name, n))
    (out / f"{name}.bin").write_bytes(exported[name].serialize())
  return exported


def _tf_module(fns: ServingFunctions, batch: int | None):
  """A tf.Module with one tf.function per SIGNATURES entry, running its jax2tf conversion.

  `batch`: days per call; None for a dynamic batch dimension.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  module = tf.Module()
  for name, args in SIGNATURES.items():
    shape = None if batch else [f"(n, {fns.time_steps}, {fns.num_channels})"] * len(args)
    converted = jax2tf.convert(getattr(fns, name), polymorphic_shapes=shape, with_gradient=False)
    specs = [tf.TensorSpec([batch, fns.time_steps, fns.num_channels],
                           tf.float32 if arg == "signals" else tf.bool, name=arg) for arg in args]
    setattr(module, name, tf.function(_named_outputs(converted, OUTPUTS[name]),
                                      input_signature=specs, autograph=False))
  return module


def _named_outputs(fn: Callable, outputs: tuple[str, ...]) -> Callable:
  """fn returning {name: result} for its one result or tuple of results, named `outputs`."""
  def named(*args):
    results = fn(*args)
    return dict(zip(outputs, results if len(outputs) > 1 else (results,)))
  return named


def export_savedmodel(fns: ServingFunctions, out: pathlib.Path, batch: int | None = None) -> None:
  """A TF SavedModel with one signature per SIGNATURES entry (jax2tf, native StableHLO).

  `batch`: days per call; None (the default) for a dynamic batch dimension.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  module = _tf_module(fns, batch)
  signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
  tf.saved_model.save(module, str(out), signatures=signatures)


def export_litert(fns: ServingFunctions, out: pathlib.Path) -> None:
  """OUT/model.tflite (float32) and OUT/model_dynamic_int8.tflite, LITERT_BATCH day per call.

  The LiteRT converter refuses gathers on a dynamic dimension ("'mhlo.gather' op
  Dynamic shaped operand is not supported"), so these take a fixed number of days:
  one, what a phone or watch runs. The int8 variant quantises the weights
  (dynamic range: float32 activations, no calibration data), about 4x smaller.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    export_savedmodel(fns, pathlib.Path(tmp), batch=LITERT_BATCH)
    for filename, quantize in ((LITERT_FILES[0], False), (LITERT_FILES[1], True)):
      converter = tf.lite.TFLiteConverter.from_saved_model(tmp, list(SIGNATURES))
      if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
      (out / filename).write_bytes(converter.convert())


def check_local(out: str | pathlib.Path) -> None:
  """Refuses a bucket --out (pathlib would make gs://b/x a local gs:/b/x)."""
  if storage.is_remote(out):
    raise ExportError(
        f"--out={out}: serving exports are written to a local directory (the TensorFlow and "
        "LiteRT converters write local files); export locally, then copy it: "
        "gcloud storage cp -r DIR gs://BUCKET/PATH")


def export(source: str, out: str | pathlib.Path, formats: tuple[str, ...] = FORMATS,
           *, model: api.PretrainedModel | None = None) -> dict[str, Any]:
  """Writes `formats` of the model at `source` (or the loaded `model`) under `out`; the info."""
  check_local(out)
  out = pathlib.Path(out)
  if model is None:
    model = api.load(source)
  fns = serving_functions(model)
  out.mkdir(parents=True, exist_ok=True)
  if "stablehlo" in formats:
    export_stablehlo(fns, out / "stablehlo")
  if "savedmodel" in formats:
    export_savedmodel(fns, out / "savedmodel")
  if "litert" in formats:
    export_litert(fns, out / "litert")
  info = {
      "source": str(source), "step": model.step, "formats": list(formats),
      "channel_names": list(fns.channel_names), "time_steps": fns.time_steps,
      "embedding_dim": fns.embedding_dim, "token_grid": list(fns.token_grid),
      "num_tokens": fns.token_grid[0] * fns.token_grid[1], "attention": "xla",
      "functions": {name: {"inputs": list(args), "outputs": list(OUTPUTS[name])}
                    for name, args in SIGNATURES.items()},
  }
  storage.write_text_atomic(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
  return info


def read_info(directory: str | pathlib.Path) -> dict[str, Any]:
  """The INFO_FILE of an export directory: channels, shapes, formats, source step."""
  path = storage.as_path(directory) / INFO_FILE
  if not path.exists():
    raise ExportError(f"{path}: not an lsm2 serving export (no {INFO_FILE}); "
                      "write one with python -m lsm2.export")
  return json.loads(path.read_text())


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
_FROM = flags.DEFINE_string("from", None, "Training workdir or its export/ directory.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the exports into.")
_FORMAT = flags.DEFINE_string("format", ",".join(FORMATS),
                              f"Comma-separated formats: {', '.join(FORMATS)}.")
_RELEASE = flags.DEFINE_bool("release", False, "Write a release: the exports, the parameters, "
                             "a model card and a manifest (lsm2/release.py); --out may be gs://.")


def main(argv):
  try:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _FROM.value or not _OUT.value:
      raise ExportError("--from=RUN_OR_EXPORT_DIR and --out=DIR are both required")
    formats = parse_formats(_FORMAT.value)
    if not _RELEASE.value:  # A release is built locally, then copied (lsm2.release).
      check_local(_OUT.value)
      if pathlib.Path(_OUT.value).is_file():
        raise ExportError(f"--out={_OUT.value} is a file; name a directory")
    try:
      model = api.load(_FROM.value)
    except FileNotFoundError as e:  # No description there: not a run or an export.
      raise ExportError(f"--from={_FROM.value}: {e}") from e
    if _RELEASE.value:
      digest = release.write(model, _FROM.value, _OUT.value, formats,
                             lambda built: export(_FROM.value, built, formats, model=model))
      print(f"Released step {model.step} of {_FROM.value} to {_OUT.value}; the SHA-256 of its "
            f"{release.MANIFEST} (publish it beside the release): {digest}")
      return
    info = export(_FROM.value, pathlib.Path(_OUT.value), formats, model=model)
    print(f"Exported {', '.join(info['formats'])} of {info['source']} (step {info['step']}) "
          f"to {_OUT.value}")
  except errors.Error as e:  # Its message says what is wrong and what to do.
    print(f"lsm2: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
