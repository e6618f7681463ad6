"""TensorBoard events without TensorFlow: what TensorBoard reads back, and no TensorFlow import.

Training and evaluation processes start without importing TensorFlow (it cost ~7-14 s per
process start here); their local event files read back in TensorBoard's own reader.
"""
import json
import pathlib
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parents[1]

_WRITE_IN_A_FRESH_PROCESS = """
import json, sys
from absl import logging
import lsm2.main, lsm2.train.train, lsm2.eval.run
from lsm2 import metric_writer
logging.set_verbosity(logging.INFO)  # As lsm2.main does.
writer = metric_writer.create_writer(sys.argv[1])
writer.write_hparams({"lr": 0.003, "model": "tiny", "pack": True, "steps": 30})
writer.write_scalars(5, {"train/loss": 0.75, "perf/mfu": 0.125})
writer.write_scalars(10, {"train/loss": 0.5})
writer.flush()
writer.close()
print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "clu.metric_writers":
                  "clu.metric_writers" in sys.modules}))
"""


@pytest.mark.slow  # A fresh interpreter importing JAX, the trainer and evaluation (~8 s).
def test_training_and_evaluation_write_events_without_tensorflow(tmp_path):
  logdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-c", _WRITE_IN_A_FRESH_PROCESS, str(logdir)],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
      "tensorflow": False, "clu.metric_writers": False}
  assert "[5] perf/mfu=0.125, train/loss=0.75" in proc.stderr  # The console line.

  [events] = list(logdir.glob("events.out.tfevents.*"))
  acc = event_accumulator.EventAccumulator(str(events), size_guidance={"tensors": 0})
  acc.Reload()
  scalars = {tag: {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
             for tag in ("train/loss", "perf/mfu")}
  assert scalars == {"train/loss": {5: 0.75, 10: 0.5}, "perf/mfu": {5: 0.125}}
  assert "_hparams_/session_start_info" in acc.Tags()["tensors"]


def test_a_second_writer_in_one_process_gets_its_own_file(tmp_path):
  from lsm2 import metric_writer  # pylint: disable=g-import-not-at-top
  first, second = (metric_writer.create_writer(tmp_path) for _ in range(2))
  first.write_scalars(1, {"a": 1.0})
  second.write_scalars(1, {"a": 2.0})
  first.close()
  second.close()
  files = sorted(tmp_path.glob("events.out.tfevents.*"))
  assert len(files) == 2
  values = []
  for f in files:
    acc = event_accumulator.EventAccumulator(str(f), size_guidance={"tensors": 0})
    acc.Reload()
    values += [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("a")]
  assert sorted(values) == [1.0, 2.0]
