#!/usr/bin/env bash
# lsm2.main as an xpk workload (a JobSet) on a GKE cluster of TPU slices: one
# process per TPU VM host, found by JAX through the GKE TPU environment.
# See docs/launching.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/gke_xpk.sh --cluster CLUSTER --workload NAME --tpu-type TYPE
                         --config PATH[:ARG] --workdir gs://BUCKET/DIR [options]
                         [--config.KEY=VALUE ...] [-- LSM2_MAIN_FLAGS ...]

Submits \`xpk workload create\`. The code reaches the pods in one of two ways:
  default                 the committed tree (git archive HEAD) is staged in
                          \${TMPDIR:-/tmp}/lsm2-xpk-NAME, xpk builds it onto
                          --base-docker-image (needs docker), and every pod
                          pip-installs it with its [tpu] extra, every package
                          at the version launch/constraints.txt pins, before
                          running
  --docker-image IMAGE    a prebuilt image (gcr.io / *-docker.pkg.dev) whose
                          working directory holds configs/ and whose Python
                          has lsm2 and JAX installed; nothing is built

Preemption: the JobSet restarts (at most --max-restarts times) when a pod is
evicted or a process exits non-zero; on SIGTERM lsm2.main saves a checkpoint
and exits 75, and the restarted pods resume from the workdir.

Required:
  --cluster CLUSTER        the GKE cluster (made with xpk cluster create)
  --workload NAME          workload name: lowercase letters, digits and '-',
                           starting with a letter, at most 40 characters
  --tpu-type TYPE          slice type, e.g. v5p-128, v5litepod-256
  --config PATH[:ARG]      config file, relative to the repository root
  --workdir gs://...       run directory on a bucket (pods share no disk)
Options:
  --num-slices N           number of slices, default 1
  --max-restarts N         restart the workload at most N times after a
                           preemption or failure (xpk --max-restarts),
                           default $DEFAULT_MAX_RESTARTS; 0: never
  --project PROJECT        Google Cloud project (default: gcloud's)
  --zone ZONE              the cluster's zone (default: gcloud's)
  --docker-image IMAGE     prebuilt image, see above
  --base-docker-image IMG  base for the built image, default python:3.11
  --jax-spec SPEC          install this JAX requirement with lsm2 instead of its
                           [tpu] extra, with no version pinned, e.g. to try
                           another JAX ('' installs none: the image's JAX is used)
  --xpk-flag FLAG          extra flag for xpk workload create (repeatable),
                           e.g. --xpk-flag=--spot --xpk-flag=--priority=high
  --dry-run                print the commands, run nothing
  --config.KEY=VALUE       config override
  -- FLAGS                 further lsm2.main flags, passed verbatim
EOF
}

CLUSTER=""
WORKLOAD=""
TPU_TYPE=""
NUM_SLICES=1
MAX_RESTARTS="$DEFAULT_MAX_RESTARTS"
PROJECT=""
ZONE=""
DOCKER_IMAGE=""
BASE_DOCKER_IMAGE="python:3.11"
JAX_SPEC=""
PINNED=1
XPK_FLAGS=()

split_equals "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --cluster) CLUSTER="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --workload) WORKLOAD="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --tpu-type) TPU_TYPE="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --num-slices) NUM_SLICES="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --project) PROJECT="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --zone) ZONE="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --docker-image) DOCKER_IMAGE="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --base-docker-image) BASE_DOCKER_IMAGE="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --jax-spec) JAX_SPEC="$(value_of "$1" "$#" "${2-}")"; PINNED=0; shift 2 ;;
    --xpk-flag) XPK_FLAGS+=("$(flag_value_of "$1" "$#" "${2-}")"); shift 2 ;;
    *)
      parse_common_arg "$@"
      ((SHIFT)) || die "unknown argument '$1'"
      shift "$SHIFT"
      ;;
  esac
done

require "$CLUSTER" --cluster "the GKE cluster name"
require "$WORKLOAD" --workload "the workload name"
[[ "$WORKLOAD" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#WORKLOAD} -le 40 ]] ||
  die "--workload '$WORKLOAD' is not a valid name: lowercase letters, digits and '-', starting with a letter, not ending with '-', at most 40 characters"
require "$TPU_TYPE" --tpu-type "the TPU slice type, e.g. v5p-128"
require_positive_int "$NUM_SLICES" --num-slices
require_nonnegative_int "$MAX_RESTARTS" --max-restarts
for flag in "${XPK_FLAGS[@]+"${XPK_FLAGS[@]}"}"; do
  [[ "$flag" != --max-restarts* ]] ||
    die "--xpk-flag=$flag: restarts are this script's own setting, write --max-restarts N (default $DEFAULT_MAX_RESTARTS)"
done
require_common
require_bucket_workdir
require_repo_relative_config
require_tool xpk

main_args
RUN="python3 -m lsm2.main $(quote "${MAIN_ARGS[@]}")"
XPK=(xpk workload create "--cluster=$CLUSTER" "--workload=$WORKLOAD" "--tpu-type=$TPU_TYPE"
  "--num-slices=$NUM_SLICES" "--max-restarts=$MAX_RESTARTS" ${PROJECT:+"--project=$PROJECT"} ${ZONE:+"--zone=$ZONE"})

if [[ -n "$DOCKER_IMAGE" ]]; then
  run_or_print "${XPK[@]}" "--docker-image=$DOCKER_IMAGE" "--command=$RUN" "${XPK_FLAGS[@]}"
  exit 0
fi

STAGE="${TMPDIR:-/tmp}/lsm2-xpk-$WORKLOAD"
if ! ((DRY_RUN)); then
  git -C "$REPO_ROOT" rev-parse --verify --quiet HEAD >/dev/null ||
    die "$REPO_ROOT is not a git checkout with a commit (needed to stage the code); use --docker-image"
fi
if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  echo "$SCRIPT_NAME: note: uncommitted changes are not shipped, only the commit HEAD" >&2
fi
# The staged tree is the image's working directory: the constraints file is in it.
if ((PINNED)); then
  INSTALL="python3 -m pip install --quiet -c $CONSTRAINTS $(quote ".[tpu]")"
else
  note_unpinned
  INSTALL="python3 -m pip install --quiet .${JAX_SPEC:+ $(quote "$JAX_SPEC")}"
fi
run_or_print rm -rf "$STAGE"
run_or_print mkdir -p "$STAGE"
if ((DRY_RUN)); then
  printf '%s | %s\n' "$(quote git -C "$REPO_ROOT" archive --format=tar HEAD)" "$(quote tar -x -C "$STAGE")"
else
  git -C "$REPO_ROOT" archive --format=tar HEAD | tar -x -C "$STAGE"
fi
run_or_print "${XPK[@]}" "--base-docker-image=$BASE_DOCKER_IMAGE" "--script-dir=$STAGE" \
  "--command=$INSTALL && $RUN" "${XPK_FLAGS[@]}"
