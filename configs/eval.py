r"""Downstream evaluation config: `--config=configs/eval.py:TASKSET`.

TASKSET: synthetic | depresjon | fitabase.

  python -m lsm2.main --config=configs/eval.py:synthetic --workdir=OUT \
      --config.init_from=PRETRAIN_WORKDIR_OR_EXPORT [--config.step=N] [--config.data.dir=DIR]

Writes OUT/results.json, OUT/results.md, OUT/*.png and TensorBoard events.
"""
import ml_collections

TASKSETS = ("synthetic", "depresjon", "fitabase")


def get_config(taskset: str = "synthetic") -> ml_collections.ConfigDict:
  if taskset not in TASKSETS:
    raise ValueError(f"configs/eval.py: unknown task set {taskset!r}; expected one of {TASKSETS}")
  config = ml_collections.ConfigDict()
  config.mode = "evaluate"
  config.taskset = taskset
  config.init_from = ""  # Pretraining workdir or its export/ (required).
  config.step = -1  # -1: the export if training finished, else the latest checkpoint.
  config.seed = 0
  config.batch_size = 64  # Days per compiled batch (rounded up to a multiple of the devices).

  config.data = ml_collections.ConfigDict()
  config.data.dir = ""  # Empty: the pretraining run's data dir (from the checkpoint description).
  config.data.max_days = 0  # Per split read, first days in storage order; 0 = all.

  # Linear probe on frozen embeddings (the reference recipe: Adam, 500 steps, batch 512, LR 5e-3).
  config.probe = ml_collections.ConfigDict()
  config.probe.labels = ()  # Label names; empty = every label of the dataset.
  config.probe.levels = ("day", "subject")  # "subject": mean day embedding per subject.
  config.probe.steps = 500
  config.probe.lr = 5e-3
  config.probe.batch_size = 512
  config.probe.l2 = 1e-4
  config.probe.class_balanced = True
  config.probe.protocol = ml_collections.ConfigDict()
  config.probe.protocol.name = "splits"  # "splits": fit on fit_split, score test_split; "cv".
  config.probe.protocol.fit_split = "train"
  config.probe.protocol.test_split = "test"
  config.probe.protocol.splits = ("train", "validation", "test")  # Pooled for "cv".
  config.probe.protocol.folds = 5

  config.few_shot = ml_collections.ConfigDict()
  config.few_shot.k = 0  # Labelled examples per class; 0 = off.
  config.few_shot.repeats = 3  # Seeds seed .. seed + repeats - 1; mean and std reported.

  config.fine_tune = ml_collections.ConfigDict()
  config.fine_tune.enabled = False
  config.fine_tune.labels = ()  # Empty: the probe labels (day level).
  config.fine_tune.steps = 100
  config.fine_tune.lr = 1e-4
  config.fine_tune.batch_size = 16

  # Windowed recognition of minute-level labels (lsm2/eval/windows.py): linear probe on windows.
  config.windows = ml_collections.ConfigDict()
  config.windows.enabled = True
  config.windows.labels = ()  # Minute-level labels; empty = every one the dataset has.
  config.windows.minutes = 60  # Window length: a multiple of the patch that divides the day.
  config.windows.min_fraction = 0.5  # A window takes class k when >= this fraction of it is k.

  config.generative = ml_collections.ConfigDict()
  config.generative.enabled = True
  config.generative.tasks = ()  # Names from lsm2.eval.tasks.generative_task_suite; empty = all.
  config.generative.split = "test"
  config.generative.baselines = ("channel_mean", "locf", "linear_interpolation")

  config.robustness = ml_collections.ConfigDict()
  config.robustness.enabled = True
  config.robustness.sensor_groups = True
  config.robustness.time_segments = True
  # Inputs restricted to a device's channels (lsm2.data.channels.DEVICE_PROFILES).
  config.robustness.device_profiles = ("apple_watch_basic",)
  config.robustness.labels = ()  # Empty: the probe labels.
  config.robustness.generative_task = "random_imputation_80"
  config.robustness.missingness_buckets = True

  config.plots = ml_collections.ConfigDict()
  config.plots.enabled = True
  config.plots.days = 2  # Reconstructed example days per plotted task.
  config.plots.tasks = ("random_imputation_80", "temporal_interpolation_180min")

  if taskset == "synthetic":
    config.probe.labels = ("hypertension", "anxiety", "activity", "age", "bmi")
    config.windows.labels = ("activity_bouts",)  # Activity type per bout window.
    config.few_shot.k = 5
  elif taskset == "depresjon":
    # 55 subjects: a held-out split of ~6 subjects says little, so the probe
    # runs a stratified subject 5-fold over every split.
    config.probe.labels = ("depressed", "madrs1", "madrs2")
    config.probe.protocol.name = "cv"
    config.few_shot.k = 5
    config.generative.split = "test"
  elif taskset == "fitabase":
    # 33 users, weak labels: minutes asleep (24 users), BMI (8 users).
    config.probe.labels = ("minutes_asleep", "bmi")
    config.probe.protocol.name = "cv"
  return config.lock()
