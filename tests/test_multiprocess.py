"""The multi-host path, run for real: `launch/local.py` starts 2 processes x 4 simulated CPU devices that
form one JAX runtime (cross-process collectives through gloo), as the hosts of a pod do.

Reference: the same config from the same CLI as 1 process with 8 devices (same mesh, data=2 x fsdp=4).
The losses of every logged step and the end-of-run evaluation reports must be the same; checkpoints
written by 2 processes must resume in 1 and the other way round, continuing the same
data order (the global batch does not depend on the number of processes).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
import soundfile

from tests.conftest import ROOT, tiny_overrides, xla_flags
from tests.test_train_stage2 import stage2_overrides, write_tiny_llama

MESH = {"mesh.data": 2, "mesh.fsdp": 4}
LAUNCHER = [
    sys.executable,
    str(ROOT / "launch" / "local.py"),
    "--processes",
    "2",
    "--devices-per-process",
    "4",
]


def cli_args(overrides: dict[str, object]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def slit_command(config: str, workdir: pathlib.Path, overrides: dict[str, object]) -> list[str]:
    return [
        sys.executable, "-m", "slit.cli", "train", "--config", str(ROOT / "configs" / config),
        "--workdir", str(workdir), *cli_args(overrides),
    ]  # fmt: skip


def run_one_process(command: list[str], devices: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_two_processes(command: list[str], **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*LAUNCHER, "--", *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, **env),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result


def losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def reports(workdir: pathlib.Path) -> dict[str, dict]:
    """The evaluation reports (JSON) without the config each records."""
    out = {}
    for path in sorted((workdir / "eval").glob("*-test.json")):
        report = json.loads(path.read_text())
        report.pop("config", None)
        out[path.name] = report
    assert out, f"no evaluation report in {workdir / 'eval'}"
    return out


def assert_close_reports(got: dict, want: dict) -> None:
    """Equal reports, numbers within float32 reduction noise. A ROC AUC over the matching head's scores
    (27 true x 340 hard-negative pairs) may differ by a pair or two whose scores tie to ~1e-6 and swap
    (1 / 9,180 each): AUCs within 5e-4; retrieval ranks and every other number within 1e-5."""
    assert got.keys() == want.keys()
    for name in want:
        flat_got, flat_want = _flatten(got[name]), _flatten(want[name])
        assert flat_got.keys() == flat_want.keys(), name
        for key, value in flat_want.items():
            if isinstance(value, float) and "auc" in key:
                assert flat_got[key] == pytest.approx(value, abs=5e-4), f"{name}: {key}"
            elif isinstance(value, float):
                assert flat_got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{name}: {key}"
            else:
                assert flat_got[key] == value, f"{name}: {key}"


def _flatten(tree: object, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}{i}/").items()}
    return {prefix: tree}


@pytest.fixture(scope="module")
def stage_one_reference(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: str) -> pathlib.Path:
    """4 stage-one steps as 1 process with 8 devices (checkpoints at 2 and 4, test-split evaluation)."""
    workdir = tmp_path_factory.mktemp("mp") / "one_process"
    overrides = tiny_overrides(tiny_data_dir) | MESH | {"log_every_steps": 1}
    run_one_process(slit_command("stage1_synthetic.py", workdir, overrides), 8)
    return workdir


def test_stage_one_as_two_processes_equals_one_and_checkpoints_move_between_process_counts(
    stage_one_reference: pathlib.Path, tiny_data_dir: str, tmp_path: pathlib.Path
):
    want = losses(stage_one_reference)
    overrides = tiny_overrides(tiny_data_dir) | MESH | {"log_every_steps": 1}

    # 2 processes resume the 1-process run's step 2, train steps 3-4 (saving each) and evaluate.
    two = tmp_path / "two"
    resume = {"resume_from": stage_one_reference / "checkpoints" / "2", "checkpoint_every_steps": 1}
    run_two_processes(slit_command("stage1_synthetic.py", two, overrides | resume))
    for step in (3, 4):
        assert losses(two)[step] == pytest.approx(want[step], rel=1e-5)
    assert_close_reports(reports(two), reports(stage_one_reference))
    assert sorted(p.name for p in (two / "checkpoints" / "3" / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    # The other way round: 1 process resumes the 2 processes' step 3 and trains step 4.
    one = tmp_path / "one"
    resumed = run_one_process(
        slit_command("stage1_synthetic.py", one, overrides | {"resume_from": two / "checkpoints" / "3"}), 8
    )
    assert "(step 3; resume_from=" in resumed.stderr
    assert losses(one)[4] == pytest.approx(want[4], rel=1e-5)


def test_stage_two_as_two_processes_equals_one(tiny_data_dir: str, tmp_path: pathlib.Path):
    """Stage two from scratch (tiny random Q-Former, tiny Llama), trained and evaluated (captioning,
    question answering, classification by the LLM's loss) as 2 processes and as 1."""
    llm_dir = write_tiny_llama(tmp_path / "llm")
    overrides = stage2_overrides(tiny_data_dir, llm_dir, **MESH, **{"eval.max_clips": 8})
    one, two = tmp_path / "one", tmp_path / "two"
    run_one_process(slit_command("stage2_synthetic.py", one, overrides), 8)
    run_two_processes(slit_command("stage2_synthetic.py", two, overrides))
    want, got = losses(one), losses(two)
    assert want.keys() == got.keys() == {2, 4}
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
    assert_close_reports(reports(two), reports(one))


@pytest.mark.slow  # a second stage-two run; export and generate have no collective of their own
def test_export_and_generate_started_on_every_host(tiny_data_dir: str, tmp_path: pathlib.Path):
    """`slit export` and `slit generate` started as 2 processes: process 0 writes and answers."""
    llm_dir = write_tiny_llama(tmp_path / "llm")
    overrides = stage2_overrides(tiny_data_dir, llm_dir, **MESH, total_steps=2, **{"eval.max_clips": 2})
    run = tmp_path / "run"
    run_one_process(slit_command("stage2_synthetic.py", run, overrides), 8)
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, 0.3 * np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000), 16000)
    slit = f"{shlex.quote(sys.executable)} -m slit.cli"
    both = (
        f"{slit} export --workdir {run} --format bundle --out {tmp_path / 'bundle'} && "
        f"{slit} generate --workdir {run} --audio {clip} --prompt 'describe the sound.'"
    )
    result = run_two_processes(["bash", "-c", both])
    assert (tmp_path / "bundle" / "model.safetensors").is_file()
    assert "[p0] (checkpoint step 2 of" in result.stdout and "[p1] (checkpoint step" not in result.stdout


# Two processes that join the run as `slit` does (slit.train.distributed.initialize) and then sum across
# every device of both, over and over, as training steps do; an error is handled as slit's CLI does.
COLLECTIVES = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from slit.train import distributed
distributed.initialize()
mesh = jax.make_mesh((jax.device_count(),), ("d",))
x = jax.make_array_from_callback((8,), NamedSharding(mesh, PartitionSpec("d")), lambda i: np.ones(8)[i])
total = jax.jit(lambda a: a.sum())
try:
    for step in range(100000):
        assert float(total(x * step)) == 8.0 * step
        print("step", step, flush=True)
        time.sleep(0.05)
except Exception as e:
    distributed.wait_for_lost_peer(e)
    raise
"""


def run_and_kill_process_1(
    command: list[str], tmp_path: pathlib.Path, started: Callable[[str], bool]
) -> tuple:
    """Starts `command` as 2 processes, kills process 1 once `started(log text)`; returns (launcher exit
    code, the log, seconds from the kill to the end)."""
    log = tmp_path / "launch.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*LAUNCHER, "--grace", "300", "--", *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, SLIT_PEER_TIMEOUT="10"),
        )
        try:
            deadline = time.monotonic() + 600
            while not started(log.read_text()):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            victim = int(re.search(r"process 1: pid (\d+)", log.read_text()).group(1))
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            code = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    return code, log.read_text(), time.monotonic() - killed_at


def assert_lost_peer_named(code: int, text: str, seconds: float) -> None:
    from slit.train.distributed import LOST_PEER_EXIT_CODE

    assert seconds < 60 and code != 0
    assert "lost process 1 of 2" in text and "process 0 exits" in text, text[-3000:]
    codes = re.search(r"exit codes by process: \[(-?\d+), (-?\d+)\]", text)
    assert codes and int(codes.group(1)) == LOST_PEER_EXIT_CODE and int(codes.group(2)) == -signal.SIGKILL


def test_a_lost_peer_stops_the_other_process_naming_it(tmp_path: pathlib.Path):
    """Process 1 is killed while both run collectives: process 0 exits non-zero within a bounded time,
    saying which process it lost (not hanging, and not a collective's traceback)."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    code, text, seconds = run_and_kill_process_1(
        [sys.executable, str(script)], tmp_path, lambda log: "[p1] step 20" in log
    )
    assert_lost_peer_named(code, text, seconds)
    assert "Traceback" not in text.split("[launch] process 1 exited")[-1]


@pytest.mark.slow  # the same through `slit train` (startup and compilation of two processes: minutes)
def test_a_lost_peer_stops_slit_train_naming_it(tiny_data_dir: str, tmp_path: pathlib.Path):
    """Process 1 is killed mid-run: process 0 exits non-zero within a bounded time, saying which
    process it lost (not hanging in its next collective)."""
    workdir = tmp_path / "run"
    overrides = tiny_overrides(tiny_data_dir) | MESH | {"total_steps": 500, "checkpoint_every_steps": 0}
    metrics = workdir / "metrics.jsonl"
    code, text, seconds = run_and_kill_process_1(
        slit_command("stage1_synthetic.py", workdir, overrides),
        tmp_path,
        lambda log: metrics.exists() and '"loss"' in metrics.read_text(),  # training steps are running
    )
    assert_lost_peer_named(code, text, seconds)


def test_cache_features_as_two_processes_writes_the_cache_one_process_writes(
    tiny_data_dir: str, tmp_path: pathlib.Path
):
    from slit.data import feature_cache

    overrides = tiny_overrides(tiny_data_dir) | MESH
    config = str(ROOT / "configs" / "stage1_synthetic.py")

    def command(out: pathlib.Path) -> list[str]:
        return [sys.executable, "-m", "slit.cli", "cache-features", "--config", config, "--out", str(out)]

    run_one_process([*command(tmp_path / "one"), *cli_args(overrides)], 8)
    two = run_two_processes([*command(tmp_path / "two"), *cli_args(overrides)])
    assert two.stdout.count('"written": true') == 1  # process 0 reports for both

    def splits(root: pathlib.Path) -> dict[str, feature_cache.CachedFeatures]:
        return {
            p.parent.name: feature_cache.CachedFeatures(p.parent) for p in root.rglob(feature_cache.INDEX)
        }

    one, both = splits(tmp_path / "one"), splits(tmp_path / "two")
    assert one.keys() == both.keys() == {"train", "validation", "test"}
    for name, want in one.items():
        got = both[name]
        assert len(got) == len(want) > 0
        np.testing.assert_array_equal(got.num_samples, want.num_samples)
        for i in range(len(want)):
            np.testing.assert_array_equal(got[i][1], want[i][1])
            np.testing.assert_allclose(got[i][0], want[i][0], rtol=1e-5, atol=1e-6, err_msg=f"{name}[{i}]")
