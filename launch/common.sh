# Shared argument handling for the launch/*.sh scripts (sourced, not run).
#
# Every launcher takes the same lsm2.main arguments:
#   --config PATH[:ARG]      the config file and its argument string
#   --workdir DIR            where the run writes checkpoints, metrics, results
#   --config.KEY=VALUE       config overrides, passed through verbatim
#   -- FLAG ...              anything after `--` goes to lsm2.main unchanged
#   --dry-run                print what would run, run nothing
# plus its own settings. Each script defines `usage` (printing its help text)
# before calling `parse_common_arg`.

SCRIPT_NAME="$(basename "$0")"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The exact versions every host installs, relative to the repository root
# (written by launch/lock.py; see docs/launching.md).
CONSTRAINTS="launch/constraints.txt"

CONFIG=""
WORKDIR=""
DRY_RUN=0
OVERRIDES=()
EXTRA_ARGS=()

# die MESSAGE: prints "SCRIPT: error: MESSAGE" and a hint, exits 2.
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$1" >&2
  printf "Run '%s --help' for usage.\n" "$SCRIPT_NAME" >&2
  exit 2
}

# require VALUE FLAG WHAT: dies naming FLAG when VALUE is empty.
require() {
  [[ -n "$1" ]] || die "missing required flag $2 ($3)"
}

# require_positive_int VALUE FLAG
require_positive_int() {
  [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "$2 must be a positive integer, got '$1'"
}

# require_nonnegative_int VALUE FLAG
require_nonnegative_int() {
  [[ "$1" =~ ^(0|[1-9][0-9]*)$ ]] || die "$2 must be a non-negative integer, got '$1'"
}

# How many times a launcher relaunches a preempted job by itself, unless told
# otherwise (--max-requeues, --max-restarts): enough for a run to outlive ten
# preemptions or time limits, few enough that a job preempted in a loop stops.
DEFAULT_MAX_RESTARTS=10

# preempted_status: sets PREEMPTED_STATUS to the status lsm2.main exits with
# after a preemption checkpoint: config.preemption_exit_code (default 75), as
# the overrides set it.
preempted_status() {
  PREEMPTED_STATUS=75
  local override
  for override in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    if [[ "$override" == --config.preemption_exit_code=* ]]; then PREEMPTED_STATUS="${override#*=}"; fi
  done
  require_positive_int "$PREEMPTED_STATUS" --config.preemption_exit_code
}

# split_equals ARGS...: sets ARGS to the arguments with every `--opt=value`
# (before `--`, except --config.KEY=VALUE overrides) split into `--opt value`,
# so the scripts' parsers only handle the separate form.
split_equals() {
  ARGS=()
  local passthrough=0 arg
  for arg in "$@"; do
    if ((passthrough)); then
      ARGS+=("$arg")
    elif [[ "$arg" == "--" ]]; then
      passthrough=1
      ARGS+=("$arg")
    elif [[ "$arg" == --config.* ]]; then
      ARGS+=("$arg")
    elif [[ "$arg" == --*=* ]]; then
      ARGS+=("${arg%%=*}" "${arg#*=}")
    else
      ARGS+=("$arg")
    fi
  done
}

# value_of FLAG ARG_COUNT NEXT_ARG: prints NEXT_ARG, dying when it is absent or
# looks like the next flag (`--name --zone z` forgot the name).
value_of() {
  if (($2 < 2)) || [[ "$3" == --* && "$3" != --config.* ]]; then
    die "$1 needs a value"
  fi
  printf '%s' "$3"
}

# flag_value_of FLAG ARG_COUNT NEXT_ARG: like value_of, for flags whose value
# is itself a flag (--gcloud-flag=--internal-ip).
flag_value_of() {
  (($2 >= 2)) || die "$1 needs a value"
  printf '%s' "$3"
}

# parse_common_arg "$@": consumes one common argument from the front of "$@",
# setting SHIFT to how many words it used (0: not a common argument).
parse_common_arg() {
  SHIFT=1
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --config) CONFIG="$(value_of "$1" "$#" "${2-}")"; SHIFT=2 ;;
    --workdir) WORKDIR="$(value_of "$1" "$#" "${2-}")"; SHIFT=2 ;;
    --config.*=*) OVERRIDES+=("$1") ;;
    --config.*) die "override $1 needs a value: write $1=VALUE" ;;
    --) shift; EXTRA_ARGS+=("$@"); SHIFT=$(($# + 1)) ;;
    *) SHIFT=0 ;;
  esac
}

# require_common: the checks every launcher shares.
require_common() {
  require "$CONFIG" --config "the config file, PATH[:ARG]"
  require "$WORKDIR" --workdir "where the run writes its outputs"
}

# require_bucket_workdir: remote workers share no disk, only a bucket.
require_bucket_workdir() {
  [[ "$WORKDIR" == gs://?* ]] ||
    die "--workdir must be a gs:// bucket path (the workers share no disk), got '$WORKDIR'"
}

# require_repo_relative_config: remote workers read the config from their own
# copy of the repository, so the path must be relative to its root.
require_repo_relative_config() {
  [[ "$CONFIG" != /* ]] ||
    die "--config must be relative to the repository root (workers read it from their checkout), got '$CONFIG'"
}

# main_args: sets MAIN_ARGS to the lsm2.main arguments (after `-m lsm2.main`).
main_args() {
  MAIN_ARGS=("--config=$CONFIG" "--workdir=$WORKDIR" "${OVERRIDES[@]}" "${EXTRA_ARGS[@]}")
}

# quote WORDS...: prints the words shell-quoted (exactly as Python's
# shlex.quote does), space-separated, no newline.
quote() {
  local out="" word sq="'" escaped_sq="'\"'\"'"
  for word in "$@"; do
    if [[ ! "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      word="'${word//$sq/$escaped_sq}'"
    fi
    out+="${out:+ }$word"
  done
  printf '%s' "$out"
}

# quote_remote_path PATH: like `quote`, but a leading ~/ stays unquoted so
# that the remote shell expands it to the remote home directory.
quote_remote_path() {
  if [[ "$1" == "~/"* ]]; then
    printf '~/%s' "$(quote "${1#\~/}")"
  else
    quote "$1"
  fi
}

# print_cmd WORDS...: prints one shell-quoted command line.
print_cmd() {
  printf '%s\n' "$(quote "$@")"
}

# run_or_print WORDS...: prints the command under --dry-run, runs it otherwise.
run_or_print() {
  if ((DRY_RUN)); then
    print_cmd "$@"
  else
    "$@"
  fi
}

# note_unpinned: says that --jax-spec installs without the constraints file.
note_unpinned() {
  echo "$SCRIPT_NAME: note: --jax-spec given: installing without $CONSTRAINTS, so no version is pinned" >&2
}

# require_tool NAME: outside --dry-run, NAME must be on PATH.
require_tool() {
  ((DRY_RUN)) || command -v "$1" >/dev/null ||
    die "'$1' is not on PATH (use --dry-run to only print the commands)"
}
