"""The pod and cluster launchers, run against stand-ins for `gcloud`, `srun` and `scontrol` that act
locally (two TPU workers as two directories; SLURM tasks as local processes): what each worker or task
runs, with which environment, and that a user's command with spaces and quotes arrives intact."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess

from tests.conftest import ROOT

COMMAND = ["python3", "-c", "import os, sys; print('ENV', os.environ.get('SLIT_DISTRIBUTED'), sys.argv[1:])"]

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud compute tpus tpu-vm {describe,scp,ssh} on two local "workers" ($FAKE_ROOT/w0, w1).
printf '%q ' "$@" >> "$FAKE_ROOT/calls"; echo >> "$FAKE_ROOT/calls"
shift 3  # compute tpus tpu-vm
verb="$1"; shift
worker="" command=""
args=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --worker=*) worker="${1#--worker=}"; shift ;;
    --zone|--project|--format) shift 2 ;;
    --format=*) shift ;;
    --command) command="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
workers=(0 1); if [ "$worker" != all ] && [ -n "$worker" ]; then workers=("$worker"); fi
case "$verb" in
  describe) echo '{"networkEndpoints": [{}, {}]}' ;;
  scp)
    src="${args[0]}" dst="${args[1]}"
    for w in "${workers[@]}"; do
      mkdir -p "$FAKE_ROOT/w$w"
      if [[ "$src" == *:* ]]; then cp "$FAKE_ROOT/w$w/${src#*:}" "$dst"
      else cp "$src" "$FAKE_ROOT/w$w/${dst#*:}"; fi
    done ;;
  ssh)
    for w in "${workers[@]}"; do
      (cd "$FAKE_ROOT/w$w" && HOME="$FAKE_ROOT/w$w" bash -c "$command") || exit $?
    done ;;
esac
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun: runs the task command once per task (2 nodes x --ntasks-per-node), SLURM's variables set.
per_node=1
while [ "$#" -gt 0 ]; do
  case "$1" in
    --ntasks-per-node=*) per_node="${1#*=}"; shift ;;
    --*) shift ;;
    *) break ;;
  esac
done
ntasks=$((2 * per_node)); status=0
for ((t = 0; t < ntasks; t++)); do
  SLURM_NTASKS=$ntasks SLURM_PROCID=$t SLURM_LOCALID=$((t % per_node)) "$@" || status=$?
done
exit $status
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_ROOT/calls"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\nnode-b\n'; fi
"""


def fake_bin(tmp_path: pathlib.Path, **scripts: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_ROOT=str(tmp_path))


def test_tpu_pod_copies_runs_on_every_worker_and_brings_the_logs_back(tmp_path):
    env = fake_bin(tmp_path, gcloud=FAKE_GCLOUD)
    logs = tmp_path / "logs"
    args = [
        "--tpu",
        "pod",
        "--zone",
        "z",
        "--no-install",
        "--logs",
        str(logs),
        "--",
        *COMMAND,
        "two words",
        "it's",
    ]
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "tpu_pod.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for worker in (0, 1):
        assert (tmp_path / f"w{worker}" / "slit" / "launch" / "tpu_pod.sh").is_file()  # the checkout arrived
        log = (logs / f"worker-{worker}.log").read_text()
        assert "ENV auto ['two words', \"it's\"]" in log
    calls = (tmp_path / "calls").read_text()
    assert calls.count("--worker=all") == 3 and "--worker=0" in calls and "--worker=1" in calls


def test_slurm_gpu_gives_every_task_its_place_and_requeues_a_preempted_run(tmp_path):
    env = fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    env |= {"SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_GPUS_ON_NODE": "2"}
    env["SLURM_JOB_ID"] = "77"
    show = [
        "python3",
        "-c",
        "import json, os, sys; keys = ('SLIT_COORDINATOR', 'SLIT_NUM_PROCESSES', 'SLIT_PROCESS_ID', "
        "'CUDA_VISIBLE_DEVICES'); print('TASK', json.dumps({k: os.environ.get(k) for k in keys} | "
        "{'argv': sys.argv[1:], 'xla': os.environ['XLA_FLAGS']}))",
        "two words",
    ]
    script = str(ROOT / "launch" / "slurm_gpu.sbatch")
    result = subprocess.run(["bash", script, *show], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tasks = [json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("TASK ")]
    assert [t["SLIT_PROCESS_ID"] for t in tasks] == ["0", "1", "2", "3"]  # 2 nodes x 2 GPUs
    assert {t["SLIT_COORDINATOR"] for t in tasks} == {"node-a:12355"}
    assert {t["SLIT_NUM_PROCESSES"] for t in tasks} == {"4"}
    assert [t["CUDA_VISIBLE_DEVICES"] for t in tasks] == ["0", "1", "0", "1"]
    assert {tuple(t["argv"]) for t in tasks} == {("two words",)}
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in tasks[0]["xla"]

    per_node = subprocess.run(
        ["bash", script, *show],
        capture_output=True,
        text=True,
        env=env | {"SLIT_PROCESS_PER": "node"},
        cwd=tmp_path,
    )
    tasks = [json.loads(line[5:]) for line in per_node.stdout.splitlines() if line.startswith("TASK ")]
    assert [(t["SLIT_PROCESS_ID"], t["CUDA_VISIBLE_DEVICES"]) for t in tasks] == [("0", None), ("1", None)]

    preempted = subprocess.run(
        ["bash", script, "sh", "-c", "exit 75"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert preempted.returncode == 75 and "requeueing" in preempted.stderr
    assert "scontrol requeue 77" in (tmp_path / "calls").read_text()


def test_slurm_xla_flags_are_known_to_this_xla(tmp_path):
    """Every XLA flag the SLURM script sets is one the installed XLA knows (an unknown flag aborts)."""
    env = fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    env |= {"SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NODELIST": "node-a", "SLIT_PROCESS_PER": "node"}
    check = ["python3", "-c", "import os; print('XLA', os.environ['XLA_FLAGS'])"]
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), *check], capture_output=True, text=True, env=env
    )
    flags = next(line[4:] for line in out.stdout.splitlines() if line.startswith("XLA "))
    import sys

    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        capture_output=True,
        text=True,
        env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
