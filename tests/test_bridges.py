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


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory, tiny_data_dir) -> pathlib.Path:
    """A 2-step stage-two workdir with the linear bridge (MLP, 4 tokens), and its test evaluation."""
    root = tmp_path_factory.mktemp("linear_bridge")
    llm_dir = write_tiny_llama(root / "llm")
    workdir = root / "run"
    workdir.mkdir()
    config = stage2_config(
        tiny_data_dir,
        llm_dir,
        total_steps=2,
        checkpoint_every_steps=2,
        **{
            "eval.max_clips": 8,
            "bridge.kind": "linear",
            "bridge.num_tokens": 4,
            "bridge.hidden": 16,
            "optimizer.lr_multipliers": "",  # the config's names the Q-Former, which this bridge has not
        },
    )
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")  # as `slit train` does
    stage2.train(config, workdir)
    return workdir


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
