#!/usr/bin/env bash
# Writes a Slurm batch script for a multi-node GPU run of lsm2.main and submits
# it with sbatch. JAX reads the coordinator, process count and process ids from
# the Slurm environment of each `srun` task. See docs/launching.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/slurm_gpu.sh --nodes N --config PATH[:ARG] --workdir DIR [options]
                           [--config.KEY=VALUE ...] [-- LSM2_MAIN_FLAGS ...]

Writes WORKDIR/launch.sbatch and submits it with sbatch. Each attempt of the
job writes WORKDIR/logs/slurm-JOBID.ATTEMPT.out (ATTEMPT: Slurm's restart
count, 0 first); WORKDIR/logs/slurm-JOBID.out keeps Slurm's own messages.
The script runs on a shared filesystem: this checkout, its Python environment
(--setup) and WORKDIR must be visible from every node. Install that environment
once with \`pip install -c launch/constraints.txt -e '.[cuda12]'\` (the pinned
versions), or let every job do it with --install.

Preemption: the job is submitted with --requeue. Ahead of the time limit
(--signal-before) and on preemption the batch script passes SIGTERM to the
step; lsm2.main saves a checkpoint and exits 75 (config.preemption_exit_code),
and the script then requeues the job with \`scontrol requeue\`, at most
--max-requeues times; the requeued job resumes from the checkpoint.

Process layout:
  default      one process per GPU: --gpus-per-node tasks per node, each task
               sees all GPUs of its node and JAX picks GPU SLURM_LOCALID
  --per-node   one process per node driving all its GPUs
               (JAX_LOCAL_DEVICE_IDS=0,...,G-1)

Required:
  --nodes N                number of nodes
  --config PATH[:ARG]      config file and argument
  --workdir DIR            run directory on the shared filesystem
Options:
  --gpus-per-node G        GPUs per node, default 8
  --per-node               one process per node instead of one per GPU
  --job-name NAME          Slurm job name, default lsm2
  --partition P            Slurm partition
  --account A              Slurm account
  --time T                 time limit, e.g. 24:00:00
  --cpus-per-task C        CPUs for each task
  --max-requeues N         requeue a preempted job at most N times (counted by
                           SLURM_RESTART_COUNT), default $DEFAULT_MAX_RESTARTS; 0: never
  --signal-before S        seconds before the time limit at which the step is
                           told to save and stop, default 300
  --sbatch-option OPT      any other #SBATCH option (repeatable),
                           e.g. --sbatch-option=--exclusive
  --setup CMD              shell line run before srun (repeatable), e.g.
                           --setup 'source ~/lsm2/.venv/bin/activate'
  --install                after the --setup lines, pip-install this checkout
                           with its [cuda12] extra at the versions that
                           launch/constraints.txt pins (once, on the first
                           node, which must reach the package index)
  --dry-run                print the batch script and the sbatch command
  --config.KEY=VALUE       config override
  -- FLAGS                 further lsm2.main flags, passed verbatim
EOF
}

NODES=""
GPUS_PER_NODE=8
PER_NODE=0
JOB_NAME="lsm2"
PARTITION=""
ACCOUNT=""
TIME_LIMIT=""
CPUS_PER_TASK=""
SBATCH_OPTIONS=()
SETUP=()
INSTALL=0
MAX_REQUEUES="$DEFAULT_MAX_RESTARTS"
SIGNAL_BEFORE=300

split_equals "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --nodes) NODES="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --gpus-per-node) GPUS_PER_NODE="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --per-node) PER_NODE=1; shift ;;
    --job-name) JOB_NAME="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --partition) PARTITION="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --account) ACCOUNT="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --time) TIME_LIMIT="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --cpus-per-task) CPUS_PER_TASK="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --sbatch-option) SBATCH_OPTIONS+=("$(flag_value_of "$1" "$#" "${2-}")"); shift 2 ;;
    --setup) SETUP+=("$(value_of "$1" "$#" "${2-}")"); shift 2 ;;
    --install) INSTALL=1; shift ;;
    --max-requeues) MAX_REQUEUES="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --signal-before) SIGNAL_BEFORE="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    *)
      parse_common_arg "$@"
      ((SHIFT)) || die "unknown argument '$1'"
      shift "$SHIFT"
      ;;
  esac
done

require "$NODES" --nodes "how many nodes"
require_positive_int "$NODES" --nodes
require_positive_int "$GPUS_PER_NODE" --gpus-per-node
[[ -z "$CPUS_PER_TASK" ]] || require_positive_int "$CPUS_PER_TASK" --cpus-per-task
require_nonnegative_int "$MAX_REQUEUES" --max-requeues
require_positive_int "$SIGNAL_BEFORE" --signal-before
require_common
preempted_status
CONFIG_FILE="${CONFIG%%:*}"
[[ -f "$CONFIG_FILE" ]] || die "--config file '$CONFIG_FILE' does not exist"
require_tool sbatch

# The job runs from the repository root: make the paths independent of where
# this script was called from.
absolute() {
  if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi
}
CONFIG="$(absolute "$CONFIG_FILE")${CONFIG#"$CONFIG_FILE"}"
WORKDIR="$(absolute "$WORKDIR")"
SCRIPT_PATH="$WORKDIR/launch.sbatch"

# sbatch_value VALUE: a double-quoted #SBATCH value (sbatch's own parser
# groups quoted words and honours backslash escapes).
sbatch_value() {
  local value="${1//\\/\\\\}"
  printf '"%s"' "${value//\"/\\\"}"
}

if ((PER_NODE)); then
  TASKS_PER_NODE=1
  LAYOUT="one process per node, each driving its $GPUS_PER_NODE GPUs"
else
  TASKS_PER_NODE="$GPUS_PER_NODE"
  LAYOUT="one process per GPU; JAX gives task SLURM_LOCALID its node's GPU SLURM_LOCALID"
fi

# batch_script: prints the batch script.
batch_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$(sbatch_value "$JOB_NAME")"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  if [[ -n "$CPUS_PER_TASK" ]]; then echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"; fi
  if [[ -n "$PARTITION" ]]; then echo "#SBATCH --partition=$(sbatch_value "$PARTITION")"; fi
  if [[ -n "$ACCOUNT" ]]; then echo "#SBATCH --account=$(sbatch_value "$ACCOUNT")"; fi
  if [[ -n "$TIME_LIMIT" ]]; then echo "#SBATCH --time=$(sbatch_value "$TIME_LIMIT")"; fi
  # %j is the job id; a literal % in the workdir is written %%. Appended to,
  # so that a requeued job keeps the earlier attempts' lines.
  echo "#SBATCH --output=$(sbatch_value "${WORKDIR//%/%%}/logs/slurm-%j.out")"
  echo "#SBATCH --open-mode=append"
  if ((MAX_REQUEUES)); then echo "#SBATCH --requeue"; else echo "#SBATCH --no-requeue"; fi
  # USR1 to the batch shell only: it passes SIGTERM on to the step (below).
  echo "#SBATCH --signal=B:USR1@$SIGNAL_BEFORE"
  for option in "${SBATCH_OPTIONS[@]}"; do echo "#SBATCH $option"; done
  echo "# Written by launch/slurm_gpu.sh: $LAYOUT."
  echo "# lsm2.main sees SLURM_NTASKS > 1 and calls jax.distributed.initialize(),"
  echo "# which reads the coordinator (first node), process count and ids from Slurm."
  echo "set -euo pipefail"
  echo "cd $(quote "$REPO_ROOT")"
  echo "# This attempt's output, one file per attempt (SLURM_RESTART_COUNT: 0, then 1 per requeue)."
  echo "ATTEMPT=\"\${SLURM_RESTART_COUNT:-0}\""
  echo "ATTEMPT_LOG=$(quote "$WORKDIR/logs")/slurm-\"\$SLURM_JOB_ID.\$ATTEMPT\".out"
  echo "echo \"attempt \$ATTEMPT of job \$SLURM_JOB_ID on \$(hostname): output in \$ATTEMPT_LOG\""
  echo "exec >\"\$ATTEMPT_LOG\" 2>&1"
  for line in "${SETUP[@]}"; do echo "$line"; done
  if ((INSTALL)); then
    echo "python3 -m pip install --quiet -c $CONSTRAINTS -e $(quote ".[cuda12]")"
  fi
  if ((PER_NODE)); then
    echo "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  fi
  echo "# USR1 (--signal, ahead of the time limit) or TERM (preemption, scancel): SIGTERM to the"
  echo "# step, whose processes save a checkpoint and exit $PREEMPTED_STATUS."
  echo "STEP="
  echo "trap '[ -z \"\$STEP\" ] || kill -TERM \"\$STEP\" 2>/dev/null || true' USR1 TERM"
  # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
  echo "srun --kill-on-bad-exit=1 ${CPUS_PER_TASK:+--cpus-per-task=$CPUS_PER_TASK }$(quote python3 -m lsm2.main "${MAIN_ARGS[@]}") &"
  echo "STEP=\$!"
  echo "# A trapped signal ends \`wait\` early: poll until the step is over, then collect its status."
  echo "while kill -0 \"\$STEP\" 2>/dev/null; do sleep 1; done"
  echo "STATUS=0"
  echo "wait \"\$STEP\" || STATUS=\$?"
  if ((MAX_REQUEUES)); then
    echo "if [ \"\$STATUS\" -eq $PREEMPTED_STATUS ]; then"
    echo "  if [ \"\$ATTEMPT\" -lt $MAX_REQUEUES ]; then"
    echo "    echo \"slurm_gpu.sh: preempted (status $PREEMPTED_STATUS): requeueing job \$SLURM_JOB_ID, requeue \$((ATTEMPT + 1)) of at most $MAX_REQUEUES\""
    echo "    scontrol requeue \"\$SLURM_JOB_ID\""
    echo "  else"
    echo "    echo \"slurm_gpu.sh: preempted (status $PREEMPTED_STATUS) after $MAX_REQUEUES requeues (--max-requeues): not requeued; resume with sbatch\" $(quote "$(quote "$SCRIPT_PATH")")"
    echo "  fi"
    echo "fi"
  fi
  echo "exit \"\$STATUS\""
}

main_args
if ((DRY_RUN)); then
  echo "# $SCRIPT_PATH:"
  batch_script
  echo "# submit:"
  print_cmd sbatch "$SCRIPT_PATH"
  exit 0
fi
mkdir -p "$WORKDIR/logs"
batch_script >"$SCRIPT_PATH"
sbatch "$SCRIPT_PATH"
