#!/usr/bin/env bash
# N processes of `python -m resfuse_jax.main` on this machine, wired together through JAX's
# multi-controller runtime (a coordinator on 127.0.0.1). On a GPU box this is one process per
# GPU (ONE_GPU_PER_PROCESS=1); on CPU it exercises every multi-host code path.
#
#   launch/local_multiprocess.sh 2 --config=configs/phantom.py --workdir=runs/mp
#
# Environment: PYTHON (default: python), COORDINATOR_PORT (default: a free port),
# LOG_DIR (default: <workdir>/logs), ONE_GPU_PER_PROCESS=1 (CUDA_VISIBLE_DEVICES=<rank>).
# Each process logs to LOG_DIR/process_<rank>.log; if one fails the others are stopped and
# the script exits with its status.
set -euo pipefail

num_processes=${1:?usage: $0 NUM_PROCESSES [resfuse_jax.main flags...]}
shift
python=${PYTHON:-python}
port=${COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
workdir=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir=${arg#--workdir=} ;; esac
done
log_dir=${LOG_DIR:-${workdir:-.}/logs}
mkdir -p "$log_dir"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for ((rank = 0; rank < num_processes; rank++)); do
  if [[ "${ONE_GPU_PER_PROCESS:-0}" == 1 ]]; then export CUDA_VISIBLE_DEVICES=$rank; fi
  "$python" -m resfuse_jax.main \
    --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" \
    --process_id="$rank" \
    "$@" >"$log_dir/process_$rank.log" 2>&1 &
  pids+=($!)
done
echo "started $num_processes processes (coordinator 127.0.0.1:$port), logs in $log_dir"

status=0
for ((i = 0; i < num_processes; i++)); do
  if ! wait -n; then
    status=1
    echo "a process failed; stopping the others (see $log_dir)" >&2
    break
  fi
done
if ((status)); then exit 1; fi
trap - EXIT
echo "all $num_processes processes finished"
