"""Checkpoints: exact resume after a real SIGTERM, restore across meshes, damage fallback, frozen-model
refusal, and the non-finite guard."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from slit.errors import UserError
from slit.train import checkpoint, loop, stage1, stage1_model
from slit.train.metrics import MetricWriter
from slit.train.optimizer import make_optimizer, nonfinite_counts
from slit.train.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatcher
from tests.conftest import ROOT, tiny_config, tiny_overrides, xla_flags
from tests.topology_check import by_name, read_checkpoint_on_host

TIMING_KEYS = {"steps_per_second", "examples_per_second", "data_wait_fraction"}


def train_args(workdir: pathlib.Path, data_dir: str, **extra: object) -> list[str]:
    overrides = [f"--config.{k}={v}" for k, v in tiny_overrides(data_dir, **extra).items()]
    config = str(ROOT / "configs" / "stage1_synthetic.py")
    return [
        sys.executable,
        "-m",
        "slit.cli",
        "train",
        "--config",
        config,
        "--workdir",
        str(workdir),
        *overrides,
    ]


def logged_steps(workdir: pathlib.Path) -> dict[int, dict]:
    """step -> the train metrics logged for it, without timings."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = {k: v for k, v in m.items() if k not in TIMING_KEYS}
    return out


def final_params(workdir: pathlib.Path, step: int) -> dict:
    return by_name(read_checkpoint_on_host(workdir / "checkpoints", step))


def stage2_train_args(
    workdir: pathlib.Path, data_dir: str, llm_dir: pathlib.Path, **extra: object
) -> list[str]:
    """`slit train` of configs/stage2_synthetic.py shrunk as tests/test_train_stage2.py shrinks it (a fresh
    bridge on the tiny random Llama; the final evaluation on 2 test clips)."""
    from tests.test_train_stage2 import CONFIG_FILE, cli_args, stage2_overrides

    overrides = stage2_overrides(data_dir, llm_dir, **{"eval.max_clips": 2, **extra})
    command = [sys.executable, "-m", "slit.cli", "train", "--config", str(CONFIG_FILE)]
    return [*command, "--workdir", str(workdir), *cli_args(overrides)]


# Both stages share the step loop, the watcher and the checkpointer: stage one is the slow second variant.
@pytest.mark.parametrize("stage", [pytest.param("stage1", marks=pytest.mark.slow), "stage2"])
def test_exact_resume_after_sigterm_at_a_random_step(tmp_path, tiny_data_dir, stage):
    """Both trainers (one harness): a run stopped by SIGTERM saves, exits 75, and the same command
    resumes it to the same losses at every step and the same final weights as an uninterrupted run."""
    total = 20  # slack after the signal: a tiny step takes ~30 ms, the test polls every 50 ms
    settings = dict(total_steps=total, log_every_steps=1, checkpoint_every_steps=0, eval_every_steps=0)
    if stage == "stage1":
        args = functools.partial(train_args, data_dir=tiny_data_dir, **settings)
    else:
        from tests.test_train_stage2 import write_tiny_llama

        llm_dir = write_tiny_llama(tmp_path / "tiny_llama")
        args = functools.partial(stage2_train_args, data_dir=tiny_data_dir, llm_dir=llm_dir, **settings)
    reference = subprocess.run(args(tmp_path / "ref"), capture_output=True, text=True, cwd=ROOT)
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupt_after = random.randint(2, total - 10)
    workdir = tmp_path / "interrupted"
    with (tmp_path / "log.txt").open("w") as log:
        proc = subprocess.Popen(args(workdir), stdout=log, stderr=log, cwd=ROOT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            metrics = workdir / "metrics.jsonl"
            if metrics.is_file() and max(logged_steps(workdir), default=0) >= interrupt_after:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
    log_text = (tmp_path / "log.txt").read_text()
    assert code == PREEMPTED_EXIT_CODE, log_text[-3000:]
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and interrupt_after <= saved[0] < total, (interrupt_after, saved)
    assert "SIGTERM received" in log_text and "re-run the same command" in log_text

    resumed = subprocess.run(args(workdir), capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {saved[0]}; this workdir)" in resumed.stderr

    # The same losses (every metric but timings) at every step, and the same final weights, bit for bit.
    assert logged_steps(workdir) == logged_steps(tmp_path / "ref"), f"interrupted after step {saved[0]}"
    ours, theirs = final_params(workdir, total), final_params(tmp_path / "ref", total)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    # and the same evaluation after the last step
    reports = sorted((tmp_path / "ref" / "eval").glob("*.json"))
    assert reports
    for report in reports:
        want, got = json.loads(report.read_text()), json.loads((workdir / "eval" / report.name).read_text())
        assert got.get("metrics") == want.get("metrics"), report.name


def run_hop(data_dir: str, workdir: pathlib.Path, devices: int, data: int, fsdp: int, steps: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "topology_check.py"),
            data_dir,
            str(workdir),
            str(data),
            str(fsdp),
        ]
        + [str(steps)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


# A slow second variant: tests/test_multiprocess.py moves checkpoints between 2 processes x 4 devices,
# 1 process x 8 and 1 device in the default run; this one checks bit-equality and shardings hop by hop.
@pytest.mark.slow
def test_restore_across_topologies_fsdp8_then_2x4_then_one_device(tmp_path, tiny_data_dir):
    workdir = tmp_path / "run"
    first = run_hop(tiny_data_dir, workdir, devices=8, data=1, fsdp=8, steps=1)
    assert first["devices"] == 8 and "restored_step" not in first

    second = run_hop(tiny_data_dir, workdir, devices=8, data=2, fsdp=4, steps=2)
    assert second["restored_step"] == 1 and second["same_names"]
    assert second["bitwise_equal"] and second["shardings_match"] and second["fsdp_sharded_leaves"] > 0

    third = run_hop(tiny_data_dir, workdir, devices=1, data=1, fsdp=1, steps=3)
    assert third["devices"] == 1 and third["restored_step"] == 2 and third["same_names"]
    assert third["bitwise_equal"] and third["shardings_match"]

    # Three steps over three meshes equal three steps on one device, up to reduction order. Attention
    # key biases are left out: softmax is invariant to them, so their true gradient is exactly zero and
    # what Adam makes of the rounding noise in it differs with the reduction order.
    config = tiny_config(tiny_data_dir, total_steps=3, checkpoint_every_steps=0)
    stage1.train(config, tmp_path / "one_device")
    hopped, single = final_params(workdir, 3), final_params(tmp_path / "one_device", 3)
    compared = [n for n in single if n.startswith("params/") and not n.endswith("key/bias")]
    assert len(compared) > 50
    for name in compared:
        np.testing.assert_allclose(hopped[name], single[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_data_dir, capfd):
    config = tiny_config(tiny_data_dir, total_steps=4, checkpoint_every_steps=2)
    workdir = tmp_path / "run"
    stage1.train(config, workdir)
    expected = final_params(workdir, 4)

    files = [p for p in (workdir / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    capfd.readouterr()

    stage1.train(config, workdir)
    err = capfd.readouterr().err
    assert "checkpoints/4 cannot be read" in err and "falling back" in err
    assert "(step 2; this workdir)" in err
    assert len(list((workdir / checkpoint.DAMAGED).iterdir())) == 1
    # Steps 3 and 4 were trained again from step 2 and give the same weights as the first time.
    again = final_params(workdir, 4)
    for name in expected:
        np.testing.assert_array_equal(again[name], expected[name], err_msg=name)


def test_resume_refuses_different_frozen_weights_unless_allowed(tmp_path, tiny_data_dir, capfd):
    workdir = tmp_path / "run"
    stage1.train(tiny_config(tiny_data_dir, total_steps=2), workdir)
    other_encoder = {"audio_encoder.init_seed": 99, "total_steps": 4}
    with pytest.raises(
        UserError, match=r"(?s)audio_tower: trained against .*init_seed 1234.*allow_frozen_mismatch"
    ):
        stage1.train(tiny_config(tiny_data_dir, **other_encoder), workdir)
    capfd.readouterr()
    stage1.train(tiny_config(tiny_data_dir, allow_frozen_mismatch=True, **other_encoder), workdir)
    assert "continuing: allow_frozen_mismatch=true" in capfd.readouterr().err


def test_fingerprint_sees_every_change_and_ignores_sharding():
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "b": {"c": jnp.ones(5, jnp.bfloat16)}}
    base = checkpoint.fingerprint(tree)
    assert checkpoint.fingerprint(jax.tree.map(lambda x: x + 0, tree)) == base
    assert checkpoint.fingerprint({**tree, "a": tree["a"].at[2, 3].add(1e-6)}) != base
    assert checkpoint.fingerprint({**tree, "a": tree["a"].T.reshape(3, 4)}) != base  # same values, moved
    assert checkpoint.fingerprint({"a": tree["a"], "b": {"d": tree["b"]["c"]}}) != base  # renamed


# --------------------------------------------------------------------------------------------------
# Non-finite steps and preemption, on the loop itself with a scripted step function
# --------------------------------------------------------------------------------------------------


def test_optimizer_skips_nonfinite_gradients_and_counts_them():
    opt = ml_collections.ConfigDict(
        dict(learning_rate=0.1, min_learning_rate=0.0, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.98)
    )
    opt.grad_clip_norm = 10.0
    tx, _ = make_optimizer(opt, total_steps=10)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    for bad in (jnp.nan, jnp.inf):
        updates, state = tx.update({"w": jnp.full((2, 2), bad)}, state, params)
        params_after = jax.tree.map(lambda p, u: p + u, params, updates)
        np.testing.assert_array_equal(params_after["w"], params["w"])
    counts = jax.device_get(nonfinite_counts(state))
    assert counts == {"nonfinite_consecutive": 2, "nonfinite_total": 2}
    updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    assert not np.array_equal(updates["w"], 0)
    assert jax.device_get(nonfinite_counts(state)) == {"nonfinite_consecutive": 0, "nonfinite_total": 2}


def scripted_loop(tmp_path, config, metrics_at, on_step=None):
    """Runs loop.run with a step function that returns `metrics_at(step)`; returns the checkpointer."""

    def step(state, frozen, batch, key):
        done = int(state["step"]) + 1
        if on_step:
            on_step(done)
        m = {"loss": 1.0, "nonfinite_consecutive": 0, "nonfinite_total": 0} | metrics_at(done)
        return {"step": jnp.asarray(done), "params": {"w": state["params"]["w"] + 1}}, {
            k: jnp.asarray(v) for k, v in m.items()
        }

    data_iter = iter(grain.MapDataset.range(1000).to_iter_dataset())
    state = {"step": jnp.asarray(0), "params": {"w": jnp.zeros(3)}}
    ckpt = checkpoint.Checkpointer(tmp_path, config, frozen={})
    fns = loop.StepFunctions(step, None, lambda: next(data_iter), jax.random.key(0), evaluate=None)
    writer = MetricWriter(tmp_path)
    try:
        with PreemptionWatcher() as watcher:
            loop.run(config, tmp_path, state, 0, fns, ckpt, writer, data_iter, watcher)
    finally:
        ckpt.close()
    return ckpt


def loop_config(tiny_data_dir, **extra):
    return tiny_config(
        tiny_data_dir,
        total_steps=20,
        log_every_steps=1,
        checkpoint_every_steps=0,
        max_consecutive_nonfinite=3,
        **extra,
    )


def test_loop_aborts_after_consecutive_nonfinite_steps_with_a_report(tmp_path, tiny_data_dir):
    config = loop_config(tiny_data_dir)
    skipped_from = 5
    with pytest.raises(loop.NonFiniteTrainingError, match="3 consecutive steps"):
        scripted_loop(tmp_path, config, lambda s: {"nonfinite_consecutive": max(0, s - skipped_from + 1)})
    report = json.loads((tmp_path / "nonfinite_report.json").read_text())
    assert report["first_bad_step"] == skipped_from and report["detected_at_step"] == skipped_from + 2
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [skipped_from + 3]  # the step in flight when the abort was seen
    assert report["last_logged_metrics"][-1]["step"] == skipped_from + 2


def test_loop_aborts_at_once_on_a_nonfinite_loss(tmp_path, tiny_data_dir):
    with pytest.raises(loop.NonFiniteTrainingError, match="non-finite loss"):
        scripted_loop(
            tmp_path, loop_config(tiny_data_dir), lambda s: {"loss": float("nan")} if s == 4 else {}
        )
    assert json.loads((tmp_path / "nonfinite_report.json").read_text())["first_bad_step"] == 4


def test_loop_saves_and_raises_on_sigterm_at_the_next_step_boundary(tmp_path, tiny_data_dir):
    def on_step(done):
        if done == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="saved step 6"):
        scripted_loop(tmp_path, loop_config(tiny_data_dir), lambda s: {}, on_step=on_step)
    saved = read_checkpoint_on_host(tmp_path / "checkpoints", 6)
    assert int(saved["step"]) == 6 and np.array_equal(saved["params"]["w"], np.full(3, 6.0))
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handler was put back


# --------------------------------------------------------------------------------------------------
# resume_from and init_from
# --------------------------------------------------------------------------------------------------


def start_of(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> tuple[checkpoint.Start, dict]:
    """Where a run in `workdir` with `config` would start, and its freshly initialised state."""
    from slit.data import pipeline, sources
    from slit.train import sharding

    tokenizer = stage1_model.make_tokenizer(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    setup = stage1.build_training(config, tokenizer, mesh, sharding.rules_dict(config.sharding_rules))
    fresh = jax.device_get(setup.state)
    identity = checkpoint.frozen_identity(setup.parts.frozen, stage1_model.frozen_sources(config))
    ckpt = checkpoint.Checkpointer(workdir, config, identity)
    spec = pipeline.AudioSpec(16000, int(config.data.max_seconds * 16000))
    source = sources.open_split(config.data.name, config.data.data_dir, "train")
    stream = pipeline.train_dataset(source, tokenizer, spec, max_text_length=24, global_batch_size=8, seed=0)
    try:
        return ckpt.resolve_start(setup.state, setup.state_shardings, iter(stream)), fresh
    finally:
        ckpt.close()


def test_resume_from_another_run_takes_its_state_and_step(tmp_path, trained_run, capfd):
    source_dir, config = trained_run
    config = tiny_config(config.data.data_dir, total_steps=4, resume_from=str(source_dir))
    start, _ = start_of(tmp_path / "new", config)
    assert start.step == 2 and "checkpoints/2" in start.origin
    saved = final_params(source_dir, 2)
    got = by_name(jax.device_get(start.state))
    assert sorted(got) == sorted(saved)
    for name in saved:
        np.testing.assert_array_equal(got[name], saved[name], err_msg=name)
    assert "resume_from=" in capfd.readouterr().err


def test_init_from_copies_matching_weights_only(tmp_path, trained_run, capfd):
    source_dir, config = trained_run
    same = tiny_config(config.data.data_dir, total_steps=4, init_from=str(source_dir))
    start, fresh = start_of(tmp_path / "same", same)
    assert start.step == 0 and start.origin.startswith("init_from")
    saved = final_params(source_dir, 2)
    got = by_name(jax.device_get(start.state))
    for name, value in got.items():
        if name.startswith("params/"):
            np.testing.assert_array_equal(value, saved[name], err_msg=name)
    # Fresh optimizer state: Adam moments are zero, nothing is counted yet.
    assert all(not np.any(v) for k, v in got.items() if k.startswith("opt_state/") and "/mu/" in k)
    assert "Initialised" in capfd.readouterr().err

    wider = tiny_config(config.data.data_dir, init_from=str(source_dir), **{"qformer.embed_dim": 8})
    with pytest.raises(UserError, match=r"(?s)differ in shape.*audio_projection.*\(32, 16\) vs \(32, 8\)"):
        start_of(tmp_path / "wider", wider)
