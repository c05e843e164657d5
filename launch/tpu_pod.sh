#!/usr/bin/env bash
# A slit command on every worker of a Cloud TPU VM pod (one process per worker, one JAX runtime).
#
#   launch/tpu_pod.sh --tpu my-v5p-64 --zone us-east5-a -- \
#       slit train --config configs/stage2_audiocaps.py --workdir SHARED/runs/s2
#
# 1. copies this checkout (the files git tracks, plus uncommitted changes) to every worker;
# 2. installs it there in a virtual environment with JAX's TPU build (skip with --no-install);
# 3. runs the same command on all workers at once with SLIT_DISTRIBUTED=auto (JAX finds the
#    coordinator and each worker's id from the TPU metadata);
# 4. brings every worker's log back to logs/tpu_pod/<tpu>-<time>/worker-<i>.log.
# The data must be on a filesystem every worker mounts at the same path (SHARED above: e.g. a
# Filestore/NFS share), and so must the workdir unless it is a gs:// bucket path: each worker writes its
# shards of every checkpoint there. Re-running the same command
# resumes from the newest checkpoint; a preempted run exits 75 on every worker after saving.
#
# Options: --tpu NAME (required), --zone ZONE (required), --project PROJECT, --remote-dir DIR (default
# slit, under each worker's home), --logs DIR (default logs/tpu_pod/<tpu>-<time>), --no-install,
# --dry-run (print the gcloud commands, run nothing).
set -euo pipefail

tpu="" zone="" project="" remote_dir="slit" logs="" install=1 dry_run=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
done
if [ -z "$tpu" ] || [ -z "$zone" ] || [ "$#" -eq 0 ]; then
  echo "usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] -- slit train --config ... --workdir SHARED/..." >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [ -n "$project" ]; then where+=(--project "$project"); fi
run() {  # prints, and runs unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$dry_run" -eq 0 ]; then "$@"; fi
}

stamp="$(date +%Y%m%d-%H%M%S)"
logs="$(mkdir -p "${logs:-logs/tpu_pod/${tpu}-${stamp}}" && cd "${logs:-logs/tpu_pod/${tpu}-${stamp}}" && pwd)"
cd "$(dirname "$0")/.."

# The worker count, from the pod's network endpoints (one per worker).
workers=1
if [ "$dry_run" -eq 0 ]; then
  workers="$("${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" --format=json |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin).get("networkEndpoints", [])) or 1)')"
fi
echo "tpu_pod.sh: $tpu has $workers worker(s); logs in $logs"

archive="$(mktemp -t slit-XXXXXX.tar.gz)"
trap 'rm -f "$archive"' EXIT
git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -
run "${gcloud_tpu[@]}" scp "$archive" "$tpu:slit.tar.gz" --worker=all "${where[@]}"
unpack="mkdir -p $(printf %q "$remote_dir") && tar -xzf slit.tar.gz -C $(printf %q "$remote_dir")"
run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "$unpack"
if [ "$install" -eq 1 ]; then
  setup="cd $(printf %q "$remote_dir") && python3 -m venv .venv && .venv/bin/pip install --quiet -e . 'jax[tpu]'"
  run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "$setup"
fi

command="$(printf ' %q' "$@")"
remote="cd $(printf %q "$remote_dir") && mkdir -p logs && PATH=\$PWD/.venv/bin:\$PATH SLIT_DISTRIBUTED=auto${command} > logs/pod-${stamp}.log 2>&1"
status=0
run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "$remote" || status=$?

for ((i = 0; i < workers; i++)); do
  run "${gcloud_tpu[@]}" scp "$tpu:$remote_dir/logs/pod-${stamp}.log" "$logs/worker-$i.log" --worker="$i" "${where[@]}" ||
    echo "tpu_pod.sh: could not fetch worker $i's log" >&2
done
echo "tpu_pod.sh: exit status $status (75: preempted after saving; re-run the same command to resume)"
exit "$status"
