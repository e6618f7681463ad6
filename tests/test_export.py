"""Serving exports (lsm2.export): each format, reloaded its own way, equals lsm2.load.

One export directory per module (the tiny checkpoint); days read from its
dataset with their natural gaps, plus an all-missing channel and NaN/inf junk at
unobserved minutes. f32 parity: 1e-5 relative to the largest output.
"""
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import lsm2
from lsm2 import export
from lsm2.data import dataset
from tiny_checkpoint import tiny_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5  # Of the largest |output|: f32 programs that differ only in op order.


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(export dir, model, signals with NaN gaps, observed, mask, lsm2.load's outputs)."""
  workdir, data = tiny_pretrained(tmp_path_factory.getbasetemp())
  model = lsm2.load(workdir)
  out = tmp_path_factory.mktemp("export")
  export.export(str(workdir), out, ("stablehlo", "savedmodel"), model=model)
  raw = dataset.read_split(data, "train", normalize=False, limit=3)
  observed = raw["observed"].copy()
  observed[1, :, 0] = False  # A channel missing all day.
  junk = np.random.default_rng(0).normal(0, 1e4, observed.shape).astype(np.float32)
  junk.flat[::7] = np.nan
  junk.flat[::11] = np.inf
  signals = np.where(observed, raw["signals"], junk)  # Junk must not reach the model.
  mask = np.zeros_like(observed)
  mask[2, 300:420] = True  # Observed minutes to hide and predict.
  want = (model.embed(signals, observed), model.reconstruct(signals, observed, mask))
  return out, model, signals, observed, mask, want


def _close(got, want):
  got = np.asarray(got)
  assert got.shape == want.shape and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def test_stablehlo_matches_load_for_any_batch(setup):
  out, _, signals, observed, mask, (emb, rec) = setup
  embed = jax.export.deserialize((out / "stablehlo" / "embed.bin").read_bytes())
  reconstruct = jax.export.deserialize((out / "stablehlo" / "reconstruct.bin").read_bytes())
  _close(embed.call(signals, observed), emb)
  _close(reconstruct.call(signals, observed, mask), rec)
  _close(embed.call(signals[:1], observed[:1]), emb[:1])  # n=1 from the same artefact.
  # Observed minutes outside the mask come back exactly as given.
  kept = observed & ~mask
  np.testing.assert_array_equal(np.asarray(reconstruct.call(signals, observed, mask))[kept],
                                signals[kept])


def test_savedmodel_signatures_match_load(setup):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out, _, signals, observed, mask, (emb, rec) = setup
  loaded = tf.saved_model.load(str(out / "savedmodel"))
  assert set(loaded.signatures) == {"embed", "reconstruct"}
  embed, reconstruct = loaded.signatures["embed"], loaded.signatures["reconstruct"]
  _close(embed(signals=tf.constant(signals), observed=tf.constant(observed))["embedding"], emb)
  _close(reconstruct(signals=tf.constant(signals), observed=tf.constant(observed),
                     mask=tf.constant(mask))["reconstruction"], rec)
  _close(embed(signals=tf.constant(signals[2:]), observed=tf.constant(observed[2:]))["embedding"],
         emb[2:])


def test_export_info_names_channels_and_formats(setup):
  out, model, *_ = setup
  info = export.read_info(out)
  assert info["channel_names"] == list(model.channel_names)
  assert info["formats"] == ["stablehlo", "savedmodel"]
  assert info["embedding_dim"] == model.model_cfg.enc_width


def test_bad_format_is_a_one_line_error(tmp_path):
  with pytest.raises(export.ExportError, match="--format='stablehlo,tflite'.*tflite"):
    export.parse_formats("stablehlo,tflite")
  run = subprocess.run([sys.executable, "-m", "lsm2.export", "--from=x", f"--out={tmp_path}",
                        "--format=pt"], capture_output=True, text=True, cwd=REPO, check=False)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1].startswith("lsm2: error: --format='pt'")
