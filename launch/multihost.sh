#!/usr/bin/env bash
# One process of a multi-host run, on any cluster that gives each host its rank:
#
#   COORDINATOR_ADDRESS=node0:12345 NUM_PROCESSES=4 PROCESS_ID=$RANK \
#     launch/multihost.sh --config=configs/brats.py --workdir=/shared/runs/brats
#
# Run it once per host (each host uses all of its local GPUs); the workdir must be on a file
# system every host sees (Orbax writes one checkpoint from all of them).
set -euo pipefail
: "${COORDINATOR_ADDRESS:?set COORDINATOR_ADDRESS=host:port of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES to the number of hosts (processes)}"
: "${PROCESS_ID:?set PROCESS_ID to the rank of this host, 0..NUM_PROCESSES-1}"

exec "${PYTHON:-python}" -m resfuse_jax.main \
  --coordinator_address="$COORDINATOR_ADDRESS" \
  --num_processes="$NUM_PROCESSES" \
  --process_id="$PROCESS_ID" \
  "$@"
