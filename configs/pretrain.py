r"""Pretraining config: `--config=configs/pretrain.py:ARG`.

ARG is a comma-separated list of switches (the big_vision way):
  size:     tiny | XXS | XS | S | B | L   (default S, the paper's ~25M model)
  scheme:   aim | lsm1 | dropout_only | attention_only   (default aim)
  runlocal  a small run that fits a laptop CPU in minutes.
  cpu       the CPU-scale recipe (implies runlocal's grid and batch): 5,000 steps,
            LR 3e-3, all five masking strategies, 1,920 synthetic subjects x 3 days
            (more people, not more steps, is what moved the small model;
            docs/results.md); with size XS about 30 minutes on a 2-core machine.

Examples:
  python -m lsm2.main --config=configs/pretrain.py:S,aim --workdir=gs://bucket/run1 \
      --config.data.dir=gs://bucket/data
  python -m lsm2.main --config=configs/pretrain.py:tiny,lsm1,runlocal --workdir=/tmp/run \
      --config.total_steps=50    # Synthetic data in /tmp/run/data.
  python -m lsm2.main --config=configs/pretrain.py:XS,aim,cpu --workdir=/tmp/xs

Model and masking defaults are the frozen dataclasses' own (lsm2/model/config.py),
so each is written once; this file only adds run-level choices (model size,
dtype and attention "auto", n_drop -1) and the runlocal settings.
"""
import ml_collections

from lsm2.model import config as model_config_lib

SIZES = model_config_lib.SIZES
SCHEMES = model_config_lib.SCHEMES


def parse_arg(arg: str) -> dict:
  """Turns 'S,aim,runlocal' into {'size': 'S', 'scheme': 'aim', 'runlocal': True}."""
  out = {"size": "S", "scheme": model_config_lib.MaskConfig.scheme, "runlocal": False,
         "cpu": False}
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if token in SIZES:
      out["size"] = token
    elif token in SCHEMES:
      out["scheme"] = token
    elif token == "runlocal":
      out["runlocal"] = True
    elif token == "cpu":
      out["runlocal"] = out["cpu"] = True
    else:
      raise ValueError(
          f"configs/pretrain.py: unknown switch {token!r} in {arg!r}; expected one of "
          f"sizes {SIZES}, schemes {SCHEMES}, 'runlocal' or 'cpu'.")
  return out


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.mode = "pretrain"
  config.seed = 0

  # Data: a dataset directory written by lsm2.data.{synthesize,convert}.
  config.data = ml_collections.ConfigDict()
  config.data.dir = ""  # Empty: WORKDIR/data.
  config.data.train_split = "train"
  config.data.val_split = "validation"
  config.data.worker_count = 0
  config.data.max_train_subjects = 0  # 0 = all; the data-size sweep lowers it.
  # Training days: "files" reads data.train_split; "synthetic_stream" generates fresh
  # people without end, paired with the synthetic dataset in data.dir (same generator
  # and seed, never its subjects; its statistics normalise, its validation split
  # evaluates). docs/data.md, "Endless synthetic stream".
  config.data.source = "files"
  # Synthesize this many subjects x days into WORKDIR/data when data.dir is left empty
  # and WORKDIR/data is missing or empty; a data.dir that is set must hold a dataset
  # (a misspelt path is an error, never filled with synthetic data).
  config.data.synthesize_subjects = 0
  config.data.synthesize_days = 0

  # Model: a named size plus overrides of its frozen ModelConfig (field docs there).
  model = model_config_lib.field_defaults(model_config_lib.ModelConfig)
  config.model = ml_collections.ConfigDict()
  config.model.size = a["size"]
  # Widths, depths and heads of the size, each overridable (0 = the size's own), for
  # sweeps: e.g. a wider decoder --config.model.dec_width=128 --config.model.dec_mlp=256.
  for name in model_config_lib.SIZE_FIELDS:
    config.model[name] = 0
  config.model.patch_time = model["patch_time"]  # Minutes per token.
  config.model.patch_channels = model["patch_channels"]  # Signals per token.
  # Compute dtype. "auto" is the precision policy (docs/launching.md): bfloat16 on
  # TPU and GPU, float32 on CPU; parameters, optimizer state and loss stay float32.
  config.model.dtype = "auto"
  # Operands of the dense and blocked-attention products, accumulated in float32:
  # "bfloat16" is TPU-style mixed precision and ~2x faster on AVX512-BF16 CPUs.
  config.model.matmul_dtype = model["matmul_dtype"]
  # "auto": "blocked" on CPU (skips attention-masked blocks, ~4x XLA's speed
  # there), "splash" on TPU, "cudnn" on GPU in bfloat16, "xla" otherwise; or
  # name one of those.
  config.model.attention = "auto"
  config.model.remat = model["remat"]  # "none" | "attention" | "full"
  config.model.observed_in_embedding = model["observed_in_embedding"]

  # Masking (AIM): every MaskConfig field, paper defaults (docs/method.md).
  masking = model_config_lib.field_defaults(model_config_lib.MaskConfig)
  config.masking = ml_collections.ConfigDict()
  config.masking.scheme = a["scheme"]
  config.masking.inherited_threshold = masking["inherited_threshold"]
  config.masking.random_ratio = masking["random_ratio"]
  config.masking.time_bars = masking["time_bars"]
  config.masking.interp_gap_minutes = masking["interp_gap_minutes"]
  config.masking.extrap_gap_minutes = masking["extrap_gap_minutes"]
  config.masking.signal_imputation_k = masking["signal_imputation_k"]
  # Masked tokens dropped before the encoder. -1: the paper's ratio for any
  # grid, time_bars / n_time of all tokens (1,482 of 3,744 at 26 channels).
  # The lsm1 / dropout_only / attention_only schemes set their own.
  config.masking.n_drop = -1
  # Odds of each masking strategy per example; 0 leaves a strategy out of the
  # mix (and out of the per-strategy metrics). E.g. interpolation alone:
  #   --config.masking.weights.temporal_interpolation=1
  #   --config.masking.weights.random=0 --config.masking.weights.time_bars=0
  mix = dict(masking["strategy_weights"])
  config.masking.weights = ml_collections.ConfigDict(
      {name: float(mix.get(name, 0.0)) for name in model_config_lib.STRATEGIES})
  # Visible-token buckets: 0 = the paper's fixed split; K > 0 compiles K encoder
  # lengths and picks per batch the smallest that holds every visible token.
  config.masking.encoder_buckets = 0
  # Packed encoder: the K buckets are total visible tokens per data-parallel shard,
  # and per-token layers run on the visible tokens of all its examples end to end.
  config.masking.pack_encoder = False

  # Optimisation: paper defaults.
  config.batch_size = 1024
  config.total_steps = 100_000
  config.lr = 5e-3
  config.warmup_fraction = 0.05
  config.optim = ml_collections.ConfigDict()
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.weight_decay = 1e-4
  config.optim.grad_clip_norm = 1.0

  # Parallelism as data: mesh axis sizes (-1 = all remaining devices) and the
  # logical-axis rules that map parameter/activation axis names onto them.
  # Multi-slice TPU jobs: data/fsdp/tensor are the sizes inside one slice and
  # dcn_* those across slices (their product = the number of slices; -1 = all);
  # only data parallelism crosses the slow data-center network by default
  # (docs/launching.md, "Multi-slice"). One slice: every dcn_* resolves to 1.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1,
                                           "dcn_data": -1, "dcn_fsdp": 1, "dcn_tensor": 1})
  config.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("patch", None),
      ("head_out", None),
  )

  # Checkpoints, evaluation, logging.
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  # Save a checksum of every array with each checkpoint, verified on restore (bit rot, bad
  # copies). Costs a pass over the train state per save (benchmarks/integrity.py).
  config.checkpoint_checksums = True
  config.eval_every = 1000
  config.eval_batches = 8
  config.log_every = 50
  # > 0: trace steps profile_start_step .. + profile_steps - 1 on process 0 into
  # WORKDIR/profile (docs/launching.md, "Profiling steps on a pod").
  config.profile_steps = 0
  config.profile_start_step = 10
  # Step-time anomalies: a step slower than slow_step_factor x the running median is
  # logged with what it overlapped; the first slow_step_warmup steps of every start
  # (compiles, warming caches) are not judged (lsm2/train/throughput.py).
  config.perf = ml_collections.ConfigDict({"slow_step_factor": 3.0, "slow_step_warmup": 5})

  # The run directory (docs/architecture.md, "The run directory").
  # Fine-tuning: a fresh run starts from the parameters of another run (its
  # workdir or export/), not from a random init; recorded in WORKDIR/run.json.
  config.init_from = ""
  # Exit status after a preemption checkpoint (SIGTERM): launchers requeue on it.
  # 75 is EX_TEMPFAIL ("temporary failure, try again"), distinct from 0 and 1.
  config.preemption_exit_code = 75
  # A second writer is refused while the lease file WORKDIR/lock.json has a
  # heartbeat younger than this (renewed every quarter of it); older: taken over.
  config.lease_timeout_s = 120.0

  if a["runlocal"]:
    # Coarser tokens (30 min x 2 signals: 624 instead of 3,744 tokens) so that
    # attention fits a laptop CPU; time_bars keeps the paper's 40% of the day.
    config.model.patch_time = 30
    config.model.patch_channels = 2
    config.masking.time_bars = 19
    config.batch_size = 8
    config.total_steps = 200
    config.checkpoint_every = 50
    config.eval_every = 100
    config.eval_batches = 2
    config.log_every = 10
    # 3e-3: at batch 8 and a few hundred steps 1e-3 barely leaves the channel-mean
    # plateau (docs/results.md, "Why learning was slow").
    config.lr = 3e-3
    config.data.synthesize_subjects = 24
    config.data.synthesize_days = 4
  if a["cpu"]:
    # Every evaluation gap shape in the mix (the paper's random + bars stay the
    # larger part), more subjects than runlocal so the test split is not 4 people.
    config.masking.weights = ml_collections.ConfigDict({
        "random": 0.4, "time_bars": 0.3, "temporal_interpolation": 0.1,
        "temporal_extrapolation": 0.1, "signal_imputation": 0.1})
    config.masking.encoder_buckets = 4
    config.total_steps = 5000
    config.checkpoint_every = 500
    config.eval_every = 250
    config.eval_batches = 4
    config.log_every = 50
    # ~4,600 training days, each seen ~9 times in 5,000 steps of 8: with 120 subjects
    # (~290 days seen ~140 times) validation stalled while training loss kept falling.
    config.data.synthesize_subjects = 1920
    config.data.synthesize_days = 3
  return config.lock()
