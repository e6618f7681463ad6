#!/usr/bin/env bash
# lsm2.main on every worker of a Cloud TPU VM slice: installs the package from
# a git ref or a wheel on each worker, at the versions of launch/constraints.txt,
# then starts one process per worker (JAX finds the other workers by itself).
# See docs/launching.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/tpu_vm.sh --name TPU --zone ZONE (--git-ref REF --repo URL | --wheel WHEEL)
                        --config PATH[:ARG] --workdir gs://BUCKET/DIR [options]
                        [--config.KEY=VALUE ...] [-- LSM2_MAIN_FLAGS ...]

Runs over \`gcloud compute tpus tpu-vm ssh --worker=all\`: installs lsm2 with its
[tpu] extra on every worker, every package at the version that
launch/constraints.txt pins (pip install -c), then runs \`python -m lsm2.main\`
on all of them at once, in the foreground (run it inside tmux/screen; Ctrl-C
stops the local ssh sessions), or with --detach in the background of every
worker (setsid), which outlives this script and the ssh sessions.

On every worker a loop runs the job and relaunches it when it exits 75 (on
SIGTERM lsm2.main saves a checkpoint and exits with that status), at most
--max-restarts times. Each attempt's log is written on the worker, in
REMOTE_DIR/logs/RUN/attempt_K.log (RUN: the workdir with '/' made '_'), and
copied to WORKDIR/logs/HOST.attempt_K.log when the attempt ends. To stop a
detached run, saving a checkpoint and relaunching nothing: SIGTERM the loop
(its pid is in REMOTE_DIR/logs/RUN/loop.pid).

Required:
  --name TPU               the TPU VM (slice) name
  --zone ZONE              its zone, e.g. us-central2-b
  --git-ref REF            install this branch, tag or commit of --repo ...
  --repo URL               ... cloned on every worker into --remote-dir
  --wheel WHEEL            ... or this wheel (a local file or gs:// path); the
                           local configs/ and launch/constraints.txt are
                           copied beside it
  --config PATH[:ARG]      config file, relative to the repository root
  --workdir gs://...       run directory on a bucket (workers share no disk)
Options:
  --project PROJECT        Google Cloud project (default: gcloud's)
  --remote-dir DIR         directory on the workers, default ~/lsm2
  --python PY              Python (>= 3.11) on the workers, default python3
  --detach                 run in the background of every worker and return
  --max-restarts N         relaunch a preempted job (exit 75) at most N times
                           per launch, default $DEFAULT_MAX_RESTARTS; 0: never
  --jax-spec SPEC          install this JAX requirement with lsm2 instead of its
                           [tpu] extra, with no version pinned, e.g. to try
                           another JAX ('' installs none: the workers' JAX is used)
  --gcloud-flag FLAG       extra flag for every gcloud call (repeatable),
                           e.g. --gcloud-flag=--internal-ip
  --dry-run                print the gcloud commands, run nothing
  --config.KEY=VALUE       config override
  -- FLAGS                 further lsm2.main flags, passed verbatim
EOF
}

NAME=""
ZONE=""
PROJECT=""
GIT_REF=""
REPO=""
WHEEL=""
REMOTE_DIR="~/lsm2"
REMOTE_PYTHON="python3"
JAX_SPEC=""
PINNED=1
GCLOUD_FLAGS=()
DETACH=0
MAX_RESTARTS="$DEFAULT_MAX_RESTARTS"

split_equals "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --name) NAME="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --zone) ZONE="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --project) PROJECT="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --git-ref) GIT_REF="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --repo) REPO="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --wheel) WHEEL="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --remote-dir) REMOTE_DIR="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --python) REMOTE_PYTHON="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --jax-spec) JAX_SPEC="$(value_of "$1" "$#" "${2-}")"; PINNED=0; shift 2 ;;
    --detach) DETACH=1; shift ;;
    --max-restarts) MAX_RESTARTS="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --gcloud-flag) GCLOUD_FLAGS+=("$(flag_value_of "$1" "$#" "${2-}")"); shift 2 ;;
    *)
      parse_common_arg "$@"
      ((SHIFT)) || die "unknown argument '$1'"
      shift "$SHIFT"
      ;;
  esac
done

require "$NAME" --name "the TPU VM name"
require "$ZONE" --zone "the TPU VM's zone"
if [[ -n "$GIT_REF" && -n "$WHEEL" ]]; then
  die "--git-ref and --wheel exclude each other: install from one"
fi
[[ -n "$GIT_REF" || -n "$WHEEL" ]] ||
  die "missing required flag --git-ref (with --repo) or --wheel (what to install on the workers)"
[[ -z "$GIT_REF" ]] || require "$REPO" --repo "the git URL that --git-ref refers to"
[[ -z "$REPO" || -n "$GIT_REF" ]] || die "--repo needs --git-ref (which branch, tag or commit to install)"
require_nonnegative_int "$MAX_RESTARTS" --max-restarts
require_common
require_bucket_workdir
preempted_status
require_repo_relative_config
if [[ -n "$WHEEL" && "$WHEEL" != gs://* && ! -f "$WHEEL" ]]; then
  die "--wheel file '$WHEEL' does not exist"
fi
require_tool gcloud
((PINNED)) || note_unpinned

GCLOUD_COMMON=("--zone=$ZONE" ${PROJECT:+"--project=$PROJECT"} "--worker=all" "${GCLOUD_FLAGS[@]}")
DIR_Q="$(quote_remote_path "$REMOTE_DIR")"
PY_Q="$(quote_remote_path "$REMOTE_PYTHON")"

# pip_install TARGET CONSTRAINTS_PATH: the remote pip command that installs
# TARGET (lsm2's directory or wheel, quoted for the remote shell) with its [tpu]
# extra at the pinned versions, or, after --jax-spec, with that JAX and no pins.
pip_install() {
  if ((PINNED)); then
    printf '%s -m pip install --quiet -c %s %s%s' "$PY_Q" "$2" "$1" "$(quote "[tpu]")"
  else
    printf '%s -m pip install --quiet %s%s' "$PY_Q" "$1" "${JAX_SPEC:+ $(quote "$JAX_SPEC")}"
  fi
}

# ssh_all SCRIPT: runs the shell SCRIPT on every worker.
ssh_all() {
  run_or_print gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_COMMON[@]}" "--command=$1"
}

# scp_all DEST SRC...: copies the SRCs into DEST (relative to the remote home) on every worker.
scp_all() {
  run_or_print gcloud compute tpus tpu-vm scp --recurse "${@:2}" "$NAME:$1" "${GCLOUD_COMMON[@]}"
}

main_args
# The worker's log directory of this run: one per workdir, so that the runs of
# a sweep on one slice keep their logs apart.
RUN_NAME="${WORKDIR#gs://}"
RUN_NAME="${RUN_NAME%/}"
RUN_NAME="${RUN_NAME//[^A-Za-z0-9._=,+-]/_}"
LOG_DIR_Q="$DIR_Q/logs/$(quote "$RUN_NAME")"
BUCKET_LOGS_Q="$(quote "${WORKDIR%/}/logs")"

# The loop every worker runs: an attempt of lsm2.main, its log written on the
# worker (shown on the ssh session too unless detached) and copied to the
# workdir, and a relaunch while it exits with the preemption status. A SIGTERM
# to the loop itself is passed to lsm2.main and ends the loop once it has
# saved. A plain TPU VM slice sets none of the cluster variables lsm2.main
# looks for: --distributed=on makes every worker join through
# jax.distributed.initialize().
if ((DETACH)); then SHOW=""; else SHOW='tail -n +1 -f --pid="$child" "$log" & '; fi
LOOP="log_dir=$LOG_DIR_Q; mkdir -p \"\$log_dir\"; echo \$\$ >\"\$log_dir/loop.pid\"; \
n=0; while [ -e \"\$log_dir/attempt_\$n.log\" ]; do n=\$((n + 1)); done; \
restarts=0; stop=0; child=; \
trap 'stop=1; [ -z \"\$child\" ] || kill -TERM \"\$child\" 2>/dev/null' TERM; \
while :; do \
log=\"\$log_dir/attempt_\$n.log\"; \
echo \"=== tpu_vm.sh attempt \$n on \$(hostname), started \$(date -u +%Y-%m-%dT%H:%M:%SZ) ===\" >\"\$log\"; \
$PY_Q -m lsm2.main --distributed=on $(quote "${MAIN_ARGS[@]}") >>\"\$log\" 2>&1 & child=\$!; \
${SHOW}while kill -0 \"\$child\" 2>/dev/null; do sleep 1; done; \
status=0; wait \"\$child\" || status=\$?; child=; \
echo \"=== attempt \$n exited with status \$status ===\" >>\"\$log\"; \
gcloud storage cp --quiet \"\$log\" $BUCKET_LOGS_Q/\"\$(hostname).attempt_\$n.log\" || \
echo \"tpu_vm.sh: could not copy \$log to the workdir\" >&2; \
if [ \"\$status\" -ne $PREEMPTED_STATUS ] || [ \"\$stop\" = 1 ] || [ \"\$restarts\" -ge $MAX_RESTARTS ]; then break; fi; \
restarts=\$((restarts + 1)); n=\$((n + 1)); \
echo \"tpu_vm.sh: \$(hostname): preempted (status $PREEMPTED_STATUS), relaunch \$restarts of at most $MAX_RESTARTS\" >&2; \
done; \
exit \"\$status\""
if ((DETACH)); then
  # Separate commands (set -e stops at a failure): `a && b &` would background
  # a subshell that holds the ssh session's output open until the job ends.
  RUN="cd $DIR_Q; mkdir -p $LOG_DIR_Q; \
setsid nohup bash -c $(quote "$LOOP") >$LOG_DIR_Q/loop.out 2>&1 </dev/null & \
echo \"tpu_vm.sh: started on \$(hostname): logs in $LOG_DIR_Q, copied to $BUCKET_LOGS_Q\""
else
  RUN="cd $DIR_Q && bash -c $(quote "$LOOP")"
fi

if [[ -n "$GIT_REF" ]]; then
  # Fetching the ref and checking out FETCH_HEAD works for branches, tags and
  # commits alike, and picks up a branch that moved since the last launch.
  REPO_Q="$(quote "$REPO")"
  ssh_all "set -euo pipefail; \
if [ ! -d $DIR_Q/.git ]; then git clone --quiet $REPO_Q $DIR_Q; fi; \
git -C $DIR_Q remote set-url origin $REPO_Q; \
git -C $DIR_Q fetch --quiet origin $(quote "$GIT_REF"); \
git -C $DIR_Q checkout --quiet --detach FETCH_HEAD; \
$(pip_install "-e $DIR_Q" "$DIR_Q/$CONSTRAINTS"); \
$RUN"
else
  # The wheel holds the package only; configs/ and the constraints file travel
  # beside it. Installing twice makes a rebuilt wheel with an unchanged version
  # number take effect.
  WHEEL_NAME="$(basename "$WHEEL")"
  ssh_all "mkdir -p $DIR_Q"
  if [[ "$REMOTE_DIR" == "~/"* ]]; then
    REMOTE_SCP_DIR="${REMOTE_DIR#\~/}"
  else
    REMOTE_SCP_DIR="$REMOTE_DIR"
  fi
  SOURCES=("$REPO_ROOT/configs" "$REPO_ROOT/$CONSTRAINTS")
  if [[ "$WHEEL" == gs://* ]]; then
    FETCH="gcloud storage cp $(quote "$WHEEL") $DIR_Q/; "
  else
    SOURCES+=("$WHEEL")
    FETCH=""
  fi
  scp_all "$REMOTE_SCP_DIR/" "${SOURCES[@]}"
  WHEEL_Q="$DIR_Q/$(quote "$WHEEL_NAME")"
  ssh_all "set -euo pipefail; \
${FETCH}$(pip_install "$WHEEL_Q" "$DIR_Q/$(basename "$CONSTRAINTS")"); \
$PY_Q -m pip install --quiet --force-reinstall --no-deps $WHEEL_Q; \
$RUN"
fi
