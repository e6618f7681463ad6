"""Serving exports (lsm2.export): each format, reloaded its own way, equals lsm2.load.

One export directory per module (the tiny checkpoint); days read from its
dataset with their natural gaps, plus an all-missing channel and NaN/inf junk at
unobserved minutes. f32 parity: 1e-5 relative to the largest output (per-token
embeddings: the same, and the same `visible` tokens); LiteRT runs one day per call, in
LiteRT's own interpreter (ai-edge-litert, the export extra).
"""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lsm2
from lsm2 import export
from lsm2.data import dataset
from lsm2.model import aim
from tiny_checkpoint import tiny_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5  # Of the largest |output|: f32 programs that differ only in op order.
# The int8 LiteRT's bound (docs/export.md), ~4x the largest error seen on the tiny model
# (embed 5.4e-3, reconstruct 6.7e-4, embed_tokens 1.0e-2 of the largest |output|, 2026-12-07).
INT8_RTOL = {"embed": 2e-2, "reconstruct": 3e-3, "embed_tokens": 4e-2}
FUNCTIONS = {"embed", "embed_tokens", "reconstruct"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(export dir, model, signals with NaN gaps, observed, mask, lsm2.load's outputs).

  lsm2.load's outputs: (embed, reconstruct, embed per_token=True's (tokens, visible)).
  """
  workdir, data = tiny_pretrained(tmp_path_factory.getbasetemp())
  model = lsm2.load(workdir)
  out = tmp_path_factory.mktemp("export")
  export.export(str(workdir), out, export.FORMATS, model=model)
  raw = dataset.read_split(data, "train", normalize=False, limit=3)
  observed = raw["observed"].copy()
  observed[1, :, 0] = False  # A channel missing all day.
  junk = np.random.default_rng(0).normal(0, 1e4, observed.shape).astype(np.float32)
  junk.flat[::7] = np.nan
  junk.flat[::11] = np.inf
  signals = np.where(observed, raw["signals"], junk)  # Junk must not reach the model.
  mask = np.zeros_like(observed)
  mask[2, 300:420] = True  # Observed minutes to hide and predict.
  want = (model.embed(signals, observed), model.reconstruct(signals, observed, mask),
          model.embed(signals, observed, per_token=True))
  visible = want[2][1]
  assert visible.any() and not visible.all()  # Masked tokens to represent, on these days.
  return out, model, signals, observed, mask, want


def _close(got, want):
  got = np.asarray(got)
  assert got.shape == want.shape and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())


def _tokens_close(tokens, visible, want):
  """embed_tokens' outputs equal lsm2.load's per_token ones: the same visible tokens, and
  zeros at the others (the values within RTOL)."""
  visible = np.asarray(visible)
  assert visible.dtype == bool
  np.testing.assert_array_equal(visible, want[1])
  _close(tokens, want[0])
  assert not np.asarray(tokens)[~visible].any()


def test_stablehlo_matches_load_for_any_batch(setup):
  out, _, signals, observed, mask, (emb, rec, tokens) = setup
  embed = jax.export.deserialize((out / "stablehlo" / "embed.bin").read_bytes())
  reconstruct = jax.export.deserialize((out / "stablehlo" / "reconstruct.bin").read_bytes())
  embed_tokens = jax.export.deserialize((out / "stablehlo" / "embed_tokens.bin").read_bytes())
  _close(embed.call(signals, observed), emb)
  _close(reconstruct.call(signals, observed, mask), rec)
  _tokens_close(*embed_tokens.call(signals, observed), tokens)
  _close(embed.call(signals[:1], observed[:1]), emb[:1])  # n=1 from the same artefact.
  # Observed minutes outside the mask come back exactly as given.
  kept = observed & ~mask
  np.testing.assert_array_equal(np.asarray(reconstruct.call(signals, observed, mask))[kept],
                                signals[kept])


def test_savedmodel_signatures_match_load(setup):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out, _, signals, observed, mask, (emb, rec, tokens) = setup
  loaded = tf.saved_model.load(str(out / "savedmodel"))
  assert set(loaded.signatures) == FUNCTIONS
  embed, reconstruct = loaded.signatures["embed"], loaded.signatures["reconstruct"]
  _close(embed(signals=tf.constant(signals), observed=tf.constant(observed))["embedding"], emb)
  _close(reconstruct(signals=tf.constant(signals), observed=tf.constant(observed),
                     mask=tf.constant(mask))["reconstruction"], rec)
  _close(embed(signals=tf.constant(signals[2:]), observed=tf.constant(observed[2:]))["embedding"],
         emb[2:])
  # n = 1 (StableHLO's test runs n = 3): the day with a channel missing all day. One call
  # per format: each new batch size compiles the program again.
  got = loaded.signatures["embed_tokens"](signals=tf.constant(signals[1:2]),
                                          observed=tf.constant(observed[1:2]))
  _tokens_close(got["tokens"], got["visible"].numpy(), (tokens[0][1:2], tokens[1][1:2]))


def _litert(path):
  """The LiteRT interpreter's signature runners of `path` by name, as a phone app calls them."""
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_path=str(path))
  assert set(interpreter.get_signature_list()) == FUNCTIONS
  return {name: interpreter.get_signature_runner(name) for name in FUNCTIONS}


def test_litert_float32_matches_load_day_by_day(setup):
  out, _, signals, observed, mask, (emb, rec, tokens) = setup
  run = _litert(out / "litert" / "model.tflite")
  for i in range(len(signals)):  # One day per call (export.LITERT_BATCH).
    day = dict(signals=signals[i:i + 1], observed=observed[i:i + 1])
    _close(run["embed"](**day)["embedding"], emb[i:i + 1])
    _close(run["reconstruct"](**day, mask=mask[i:i + 1])["reconstruction"], rec[i:i + 1])
    got = run["embed_tokens"](**day)
    _tokens_close(got["tokens"], got["visible"], (tokens[0][i:i + 1], tokens[1][i:i + 1]))


def test_litert_int8_within_its_bound(setup):
  """Dynamic-range int8 weights: within INT8_RTOL of lsm2.load (per-token: the same visible
  tokens), and not the float32 model."""
  out, _, signals, observed, mask, (emb, rec, (tokens, visible)) = setup
  run = _litert(out / "litert" / "model_dynamic_int8.tflite")
  embed_f32 = _litert(out / "litert" / "model.tflite")["embed"]
  for i in range(len(signals)):
    day = dict(signals=signals[i:i + 1], observed=observed[i:i + 1])
    per_token = run["embed_tokens"](**day)
    np.testing.assert_array_equal(per_token["visible"], visible[i:i + 1])
    got = {"embed": run["embed"](**day)["embedding"],
           "reconstruct": run["reconstruct"](**day, mask=mask[i:i + 1])["reconstruction"],
           "embed_tokens": per_token["tokens"]}
    for name, want in (("embed", emb[i:i + 1]), ("reconstruct", rec[i:i + 1]),
                       ("embed_tokens", tokens[i:i + 1])):
      err = np.abs(got[name] - want).max() / np.abs(want).max()
      assert err <= INT8_RTOL[name], (name, i, err)
    assert not np.array_equal(got["embed"], embed_f32(**day)["embedding"])  # Quantised.


def test_visible_first_is_a_stable_argsort():
  """The sort-free layout that makes the LiteRT conversion possible (aim._visible_first)."""
  total = np.random.default_rng(0).random((5, 37)) < np.linspace(0, 1, 5)[:, None]
  for row in total:
    np.testing.assert_array_equal(aim._visible_first(jnp.asarray(row)),  # pylint: disable=protected-access
                                  np.argsort(row, kind="stable"))


@pytest.mark.parametrize("doc", ["README.md", "docs/export.md"])
def test_docs_litert_lines(setup, doc):
  """The LiteRT lines of the README and docs/export.md, run as written, give lsm2.load's
  embedding of a day.

  (The SavedModel and StableHLO snippets are what the tests above do; not run again here
  to spare their compiles.)
  """
  out, _, signals, observed, _, (emb, *_) = setup
  text = (REPO / doc).read_text()
  block = text.split("tested: tests/test_export.py::test_docs_litert_lines")[1]
  code = block.split("```python\n")[1].split("```")[0]
  day = np.where(observed[1], signals[1], np.nan).astype(np.float32)  # NaN in the gaps.
  scope = {"export_dir": str(out), "day": day}
  exec(code, scope)  # pylint: disable=exec-used
  _close(scope["embedding"][None], emb[1:2])


def test_export_info_names_channels_and_formats(setup):
  out, model, *_ = setup
  info = export.read_info(out)
  assert info["channel_names"] == list(model.channel_names)
  assert info["formats"] == list(export.FORMATS)
  assert info["embedding_dim"] == model.model_cfg.enc_width
  assert info["num_tokens"] == model.model_cfg.num_tokens == np.prod(info["token_grid"])
  assert info["functions"]["embed_tokens"] == {"inputs": ["signals", "observed"],
                                               "outputs": ["tokens", "visible"]}
  assert set(info["functions"]) == FUNCTIONS


def test_bad_flags_are_one_line_errors(tmp_path):
  with pytest.raises(export.ExportError, match="--format='stablehlo,tflite'.*tflite"):
    export.parse_formats("stablehlo,tflite")
  with pytest.raises(export.ExportError, match=r"--format='onnx': .*\(ONNX is not written yet: "
                     r"jax2onnx .*orbax-checkpoint < 0.11.37.*docs/export.md\); choose"):
    export.parse_formats("onnx")  # Says why, not only that it is unknown.
  with pytest.raises(export.ExportError, match="--out=gs://bucket/x: .* local directory .* "
                     "gcloud storage cp -r DIR gs://BUCKET/PATH"):
    export.export(str(tmp_path), "gs://bucket/x")  # Refused before anything is read.
  assert list(tmp_path.iterdir()) == []
  run = subprocess.run([sys.executable, "-m", "lsm2.export", f"--from={tmp_path}",
                        f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO,
                       check=False)
  assert run.returncode == 1
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith(f"lsm2: error: --from={tmp_path}: ") and "lsm2.json" in last
  (tmp_path / "file").write_text("kept")
  run = subprocess.run([sys.executable, "-m", "lsm2.export", f"--from={tmp_path}",
                        f"--out={tmp_path / 'file'}"], capture_output=True, text=True, cwd=REPO,
                       check=False)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f"lsm2: error: --out={tmp_path / 'file'} is a file; name a directory")
  assert (tmp_path / "file").read_text() == "kept"
