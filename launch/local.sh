#!/usr/bin/env bash
# N processes of lsm2.main on this machine over loopback: the multi-host code
# paths (jax.distributed, per-process data shards, multi-writer checkpoints)
# without any accelerator. See docs/launching.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/local.sh N --config PATH[:ARG] --workdir DIR [options]
                       [--config.KEY=VALUE ...] [-- LSM2_MAIN_FLAGS ...]

Starts N CPU processes of \`python -m lsm2.main\` joined through a coordinator
on 127.0.0.1, each appending to its own log WORKDIR/logs/process_I.log after a
header line "=== local.sh attempt K ..." (a relaunch keeps the earlier
attempts' lines). Waits for all; if one fails, stops the others and exits 1.
When the processes were preempted (SIGTERM: they save a checkpoint and exit
with config.preemption_exit_code, default 75), exits with that status: run the
same command again to resume. A SIGTERM or Ctrl-C to this script is passed to
the processes as SIGTERM, and it exits 75 too once they have saved.

Required:
  N                        number of processes (a positive integer)
  --config PATH[:ARG]      config file and argument, e.g. configs/pretrain.py:tiny,aim,runlocal
  --workdir DIR            run directory (shared by all processes)
Options:
  --devices-per-process K  fake CPU devices per process (XLA_FLAGS), default 1
  --port P                 coordinator port on 127.0.0.1, default: a free port
  --module M               Python module to run, default lsm2.main
  --dry-run                print the commands, run nothing
  --config.KEY=VALUE       config override, passed to every process
  -- FLAGS                 further flags for the module, passed verbatim
Environment:
  PYTHON                   interpreter, default python3
EOF
}

NUM_PROCESSES=""
DEVICES_PER_PROCESS=1
PORT=""
MODULE="lsm2.main"
PYTHON="${PYTHON:-python3}"

split_equals "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --devices-per-process) DEVICES_PER_PROCESS="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --port) PORT="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    --module) MODULE="$(value_of "$1" "$#" "${2-}")"; shift 2 ;;
    *)
      parse_common_arg "$@"
      if ((SHIFT)); then
        shift "$SHIFT"
      elif [[ "$1" != -* && -z "$NUM_PROCESSES" ]]; then
        NUM_PROCESSES="$1"
        shift
      else
        die "unknown argument '$1'"
      fi
      ;;
  esac
done

require "$NUM_PROCESSES" N "the number of processes, the first argument"
require_positive_int "$NUM_PROCESSES" N
require_positive_int "$DEVICES_PER_PROCESS" --devices-per-process
require_common
[[ -f "${CONFIG%%:*}" ]] || die "--config file '${CONFIG%%:*}' does not exist"
if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
require_positive_int "$PORT" --port

# Each process gets its own fake-device count; drop any inherited setting.
XLA_FLAGS_VALUE=""
read -r -a inherited_xla_flags <<<"${XLA_FLAGS-}"
for flag in "${inherited_xla_flags[@]}"; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || XLA_FLAGS_VALUE+="$flag "
done
XLA_FLAGS_VALUE+="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

main_args
LOG_DIR="$WORKDIR/logs"
preempted_status

# process_cmd I: sets CMD to process I's command line.
process_cmd() {
  CMD=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$XLA_FLAGS_VALUE" "$PYTHON" -m "$MODULE" "${MAIN_ARGS[@]}"
    "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$NUM_PROCESSES" "--process_id=$1")
}

# Logs are appended to, never truncated: the log of a preempted attempt is what
# tells why it stopped. The attempt number counts process 0's earlier headers.
ATTEMPT=1
if [[ -f "$LOG_DIR/process_0.log" ]]; then
  ATTEMPT=$(($(grep -c '^=== local.sh attempt ' "$LOG_DIR/process_0.log" || true) + 1))
fi
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# header I: prints process I's attempt header line.
header() {
  printf '=== local.sh attempt %s, started %s, process %s of %s ===' "$ATTEMPT" "$STARTED" "$1" "$NUM_PROCESSES"
}

if ((DRY_RUN)); then
  print_cmd mkdir -p "$LOG_DIR"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    process_cmd "$i"
    printf '%s >>%s\n' "$(quote echo "$(header "$i")")" "$(quote "$LOG_DIR/process_$i.log")"
    printf '%s >>%s 2>&1 &\n' "$(quote "${CMD[@]}")" "$(quote "$LOG_DIR/process_$i.log")"
  done
  printf 'wait\n'
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
declare -A finished=()
declare -A statuses=()

# stop_all: TERM the processes still running (lsm2.main checkpoints on
# SIGTERM), KILL those still there after 30 s; records their exit statuses.
stop_all() {
  local i status deadline=$((SECONDS + 30))
  for i in "${!pids[@]}"; do
    [[ -n "${finished[$i]-}" ]] || kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  for i in "${!pids[@]}"; do
    [[ -z "${finished[$i]-}" ]] || continue
    while kill -0 "${pids[$i]}" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -KILL "${pids[$i]}" 2>/dev/null || true
    status=0
    wait "${pids[$i]}" 2>/dev/null || status=$?
    statuses[$i]=$status
    finished[$i]=1
  done
}

# interrupted SIGNAL_STATUS: stops the processes; exits with the preemption
# status when every one of them saved (or had finished), so that a requeue
# loop around this script resumes the run, and with SIGNAL_STATUS otherwise.
interrupted() {
  echo "$SCRIPT_NAME: interrupted, stopping all processes (SIGTERM: they save a checkpoint)" >&2
  stop_all
  local i saved=0
  for i in "${!statuses[@]}"; do
    case "${statuses[$i]}" in
      0) ;;
      "$PREEMPTED_STATUS") saved=1 ;;
      *) echo "$SCRIPT_NAME: process $i exited with status ${statuses[$i]}; logs in $LOG_DIR" >&2; exit "$1" ;;
    esac
  done
  if ((saved)); then
    echo "$SCRIPT_NAME: preempted; run the same command again to resume. Logs in $LOG_DIR" >&2
    exit "$PREEMPTED_STATUS"
  fi
  exit "$1"
}
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  process_cmd "$i"
  echo "$(header "$i")" >>"$LOG_DIR/process_$i.log"
  "${CMD[@]}" >>"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "$SCRIPT_NAME: started $NUM_PROCESSES processes (coordinator 127.0.0.1:$PORT), logs in $LOG_DIR" >&2

# Poll: bash records each child's exit status, so `wait PID` after it is gone
# returns that status without blocking.
remaining=$NUM_PROCESSES
preempted=0
while ((remaining)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -z "${finished[$i]-}" ]] || continue
    if kill -0 "${pids[$i]}" 2>/dev/null; then continue; fi
    status=0
    wait "${pids[$i]}" || status=$?
    statuses[$i]=$status
    finished[$i]=1
    remaining=$((remaining - 1))
    if ((status == PREEMPTED_STATUS)); then
      # The others stop at the same step (Orbax's preemption sync point): wait for them.
      echo "$SCRIPT_NAME: process $i saved a preemption checkpoint and exited with status $status" >&2
      preempted=1
    elif ((status != 0)); then
      log="$LOG_DIR/process_$i.log"
      {
        echo "$SCRIPT_NAME: process $i exited with status $status; stopping the others. Last lines of $log:"
        tail -n 20 "$log" | sed 's/^/  | /'
      } >&2
      stop_all
      exit 1
    fi
  done
  if ((remaining)); then sleep 0.2; fi
done
if ((preempted)); then
  echo "$SCRIPT_NAME: preempted; run the same command again to resume. Logs in $LOG_DIR" >&2
  exit "$PREEMPTED_STATUS"
fi
echo "$SCRIPT_NAME: all $NUM_PROCESSES processes finished; logs in $LOG_DIR" >&2
