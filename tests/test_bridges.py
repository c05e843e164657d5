"""Bridges other than the Q-Former, through stage two and export: the linear bridge's pooling against a
NumPy reference written from its definition, a stage-two run with it, and its bundle's greedy tokens."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from slit import config as config_lib
from slit import export, runs
from slit.data import pipeline, sources
from slit.generate import answerer
from slit.models.bridges.linear import segment_means
from slit.train import stage2
from tests.conftest import TINY_DATA, run_slit
from tests.test_train_stage2 import stage2_config, write_tiny_llama


def reference_segment_means(frames: np.ndarray, mask: np.ndarray, parts: int) -> np.ndarray:
    """Each row's valid frames cut into `parts` equal consecutive parts (frame f of n goes to part
    floor(f * parts / n)), each part averaged; an empty part is zero."""
    out = np.zeros((frames.shape[0], parts, frames.shape[2]))
    for b in range(frames.shape[0]):
        n = int(mask[b].sum())
        for p in range(parts):
            members = [f for f in range(n) if f * parts // n == p]
            if members:
                out[b, p] = frames[b, members].mean(axis=0)
    return out


@pytest.mark.parametrize("parts", [1, 3, 8])
def test_segment_means_match_the_definition(parts):
    rng = np.random.default_rng(parts)
    frames = rng.normal(size=(4, 20, 5)).astype(np.float32)
    lengths = [20, 13, 5, 2]  # the last has fewer frames than 3 or 8 parts
    mask = np.arange(20)[None, :] < np.array(lengths)[:, None]
    got = np.asarray(segment_means(jnp.asarray(frames), jnp.asarray(mask), parts))
    np.testing.assert_allclose(got, reference_segment_means(frames, mask, parts), atol=1e-6)


def bridge_run(root: pathlib.Path, data_dir: str, **bridge: object) -> pathlib.Path:
    """A 2-step stage-two workdir in `root` with the tiny Llama and the bridge settings `bridge`
    (`{"kind": ..., ...}`: bridge.* fields), evaluated on 8 test clips."""
    llm_dir = write_tiny_llama(root / "llm")
    workdir = root / "run"
    workdir.mkdir()
    config = stage2_config(
        data_dir,
        llm_dir,
        total_steps=2,
        checkpoint_every_steps=2,
        **{
            "eval.max_clips": 8,
            **{f"bridge.{key}": value for key, value in bridge.items()},
            "optimizer.lr_multipliers": "",  # the config's names the Q-Former, which these bridges lack
        },
    )
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")  # as `slit train` does
    stage2.train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory, tiny_data_dir) -> pathlib.Path:
    """A 2-step stage-two workdir with the linear bridge (MLP, 4 tokens), and its test evaluation."""
    return bridge_run(
        tmp_path_factory.mktemp("linear_bridge"), tiny_data_dir, kind="linear", num_tokens=4, hidden=16
    )


def test_linear_bridge_trains_evaluates_and_its_bundle_generates_the_same_tokens(linear_run, tmp_path):
    run = runs.load_run(linear_run)
    assert set(run.params["bridge"]) == {"norm", "hidden", "projection"}
    assert np.shape(run.params["bridge"]["projection"]["kernel"])[0] == 16
    assert {p.name.split("-")[0] for p in (linear_run / "eval").glob("*.json")} >= {"captioning", "aqa"}

    trained = runs.load_trained(linear_run)
    bundle = export.export(linear_run, "bundle", tmp_path / "bundle")
    rebuilt, _, info = export.load_bundle(bundle)
    assert info["model"]["bridge"]["kind"] == "linear"
    test = sources.open_split(TINY_DATA, trained.config.data.data_dir, "test")
    batch = next(pipeline.eval_audio_batches(test, trained.spec, 4))
    gen = answerer.generation_config(trained.config, num_beams=1, do_sample=False)
    instructions = ["describe the sound."] * 4
    want = trained.answer(batch["audio"], batch["num_samples"], instructions, gen)
    assert rebuilt.answer(batch["audio"], batch["num_samples"], instructions, gen) == want

    card_dir = tmp_path / "weights"
    result = run_slit(
        "export", "--workdir", str(linear_run), "--format", "safetensors", "--out", str(card_dir)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    card = (card_dir / "README.md").read_text()
    assert "a linear bridge's soft prompt" in card and "4 soft-prompt tokens" in card
    assert json.loads((card_dir / "config.json").read_text())["model"]["bridge"]["kind"] == "linear"
    # BLIP-2's layouts need a Q-Former: one line saying so.
    result = run_slit(
        "export", "--workdir", str(linear_run), "--format", "hf-blip2", "--out", str(tmp_path / "hf")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "linear" in result.stderr


def test_a_bridge_without_stage_one_refuses_init_from(tiny_data_dir, tmp_path):
    config = stage2_config(tiny_data_dir, tmp_path, **{"bridge.kind": "linear"})
    config.init_from = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="bridge.kind=linear has none"):
        stage2.validate(config, num_devices=1)


@pytest.mark.parametrize("with_instruction", [False, True])
def test_window_qformer_is_the_qformer_on_each_window_alone(with_instruction):
    """SALMONN's window-level Q-Former: soft-prompt tokens k*Q .. (k+1)*Q-1 are the Q-Former bridge's
    output on window k's frames alone (the last window zero-padded and masked), clip by clip."""
    from flax import nnx

    from slit.models.bridges.qformer import QFormerBridge, QFormerBridgeConfig
    from slit.models.bridges.window_qformer import WindowQFormerBridge, WindowQFormerBridgeConfig
    from slit.models.qformer import QFormerConfig

    q = QFormerConfig(
        vocab_size=50, num_queries=2, num_layers=2, width=32, num_heads=4, mlp_dim=64, encoder_width=12,
        max_text_positions=32, dropout_rate=0.0, initializer_range=0.2,
    )  # fmt: skip
    window, frames_count, llm_width = 3, 8, 24
    bridge = WindowQFormerBridge(
        WindowQFormerBridgeConfig(q, window_frames=window, instruction_in_qformer=with_instruction),
        llm_width,
        rngs=nnx.Rngs(0),
    )
    plain = QFormerBridge(
        QFormerBridgeConfig(q, instruction_in_qformer=with_instruction), llm_width, rngs=nnx.Rngs(1)
    )
    nnx.update(plain, nnx.state(bridge))  # the same weights
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(2, frames_count, 12)).astype(np.float32)
    mask = np.arange(frames_count)[None] < np.array([[8], [5]])  # clip 1 ends inside window 1
    instruction = np.array([[5, 6, 7, 0], [8, 9, 0, 0]]) if with_instruction else None
    got = np.asarray(bridge(jnp.asarray(frames), jnp.asarray(mask), instruction, None))
    windows = -(-frames_count // window)
    assert got.shape == (2, windows * q.num_queries, llm_width)
    for b in range(2):
        for k in range(windows):
            part = np.zeros((1, window, 12), np.float32)
            part_mask = np.zeros((1, window), bool)
            taken = frames[b, k * window : (k + 1) * window]
            part[0, : len(taken)], part_mask[0, : len(taken)] = taken, mask[b, k * window : (k + 1) * window]
            ids = None if instruction is None else instruction[b : b + 1]
            want = np.asarray(plain(jnp.asarray(part), jnp.asarray(part_mask), ids, None))[0]
            np.testing.assert_allclose(
                got[b, k * 2 : (k + 1) * 2], want, atol=1e-5, err_msg=f"clip {b} window {k}"
            )


def test_window_qformer_continues_a_stage_one_qformer_and_trains(tiny_data_dir, trained_run, tmp_path):
    import jax

    from slit.train import init_from
    from tests.test_train_stage2 import Built, flat

    stage1_dir, _ = trained_run
    overrides = {"bridge.kind": "window_qformer", "bridge.window_frames": 50}
    config = stage2_config(tiny_data_dir, write_tiny_llama(tmp_path / "llm"), **overrides)
    config.init_from = str(stage1_dir)
    stage2.validate(config, num_devices=1)
    built = Built(config, num_batches=1)
    start = init_from.init_from_stage_one(
        config.init_from, built.setup.state, built.setup.state_shardings, built.qformer_tok
    )
    saved = flat(init_from.read_params(stage1_dir)[0])
    got = flat(jax.device_get(start.state["params"]))
    for name in ("qformer/query_tokens", "qformer/layers/0/cross_attention/key/kernel"):
        np.testing.assert_array_equal(got["bridge/" + name], saved[name], err_msg=name)

    # The soft prompt: one window's queries per 50 encoder frames, in front of the instruction.
    model = built.model(start.state["params"])
    batch = built.batches[0]
    frames, mask = model.encode_audio(jnp.asarray(batch["audio"]), jnp.asarray(batch["num_samples"]))
    prompt = model.bridge(frames, mask, None, None)
    windows = -(-frames.shape[1] // 50)
    assert prompt.shape[1] == windows * config.qformer.num_queries and windows > 1
    state, metrics = built.setup.step_fn(start.state, built.setup.parts.frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
