#!/usr/bin/env bash
# Runs `slit train` as N processes on this machine (CPU), the way a multi-host job runs:
# each process owns its devices, reads its shard of the data and feeds its rows of the global batch.
#
#   launch/local_multiprocess.sh 2 --config configs/stage1_synthetic.py --workdir runs/mp
#
# On a TPU pod, run `SLIT_DISTRIBUTED=auto slit train ...` on every host instead (JAX finds the
# coordinator itself); on a GPU cluster set SLIT_COORDINATOR / SLIT_NUM_PROCESSES / SLIT_PROCESS_ID.
set -euo pipefail
num_processes="$1"
shift
port="${SLIT_PORT:-12355}"
pids=()
for ((i = 0; i < num_processes; i++)); do
  SLIT_COORDINATOR="localhost:${port}" SLIT_NUM_PROCESSES="${num_processes}" SLIT_PROCESS_ID="${i}" \
    slit train "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=$?
done
exit "${status}"
