"""`audio_encoder.kind=htsat` end to end: stage one and stage two train on a tiny CLAP audio checkpoint
written by transformers (the one tests/test_parity_htsat.py checks against transformers), frozen or
trainable, and the config checks name the htsat encoder's limits.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from slit import config as config_lib  # noqa: E402
from slit.config import ConfigError  # noqa: E402
from slit.train import pretrained, stage1, stage2  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.test_parity_htsat import write_clap_audio  # noqa: E402
from tests.test_train_stage2 import Built, adam_moments, flat, stage2_config, write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def htsat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The audio_encoder overrides that load a tiny random CLAP audio model (16 kHz, 2 s windows)."""
    directory = tmp_path_factory.mktemp("clap_audio")
    write_clap_audio(directory)
    return {"audio_encoder.kind": "htsat", "audio_encoder.path": str(directory)}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


# A slow second variant: random HTSAT trains stage one in tests/test_random_architectures.py, and this
# CLAP directory's HTSAT loads and trains in stage two below.
@pytest.mark.slow
def test_stage_one_trains_on_htsat(htsat, tiny_data_dir, tmp_path):
    config = tiny_config(tiny_data_dir, total_steps=2, **htsat)
    config_lib.validate_stage1(config, num_devices=1)
    audio = pretrained.audio_encoder_config(config)
    assert audio.width == 16 and audio.weights == f"htsat:{htsat['audio_encoder.path']}"
    stage1.train(config, tmp_path)
    metadata = json.loads((tmp_path / "checkpoints" / "2" / "metadata" / "metadata").read_text())
    assert "CLAP HTSAT" in metadata["frozen_models"]["audio_tower"]["source"]


def test_htsat_feature_cache_is_keyed_by_its_log_mel_settings(htsat, tiny_data_dir):
    """A feature cache of an htsat encoder names the family and its log-mel settings (from
    preprocessor_config.json, which the weights' fingerprint does not cover)."""
    from slit.train import feature_cache

    config = tiny_config(tiny_data_dir, **htsat)
    settings = feature_cache.frontend_settings(
        config, feature_cache.EncoderOnly(pretrained.audio_encoder_config(config))
    )
    assert settings["encoder"] == "htsat"
    assert settings["frontend"]["sample_rate"] == 16000 and settings["frontend"]["hop_length"] == 160


def test_htsat_limits_are_named(htsat, tiny_data_dir):
    long_clips = tiny_config(tiny_data_dir, **htsat, **{"data.max_seconds": 3.0})
    with pytest.raises(ConfigError, match=r"data\.max_seconds=3\.0: the htsat encoder takes at most 2 s"):
        config_lib.validate_stage1(long_clips, num_devices=1)
    windows = tiny_config(
        tiny_data_dir, **htsat, **{"data.max_seconds": 3.0, "audio_encoder.window_seconds": 1.5}
    )
    config_lib.validate_stage1(windows, num_devices=1)  # 1.5 s windows: each fits
    other_rate = tiny_config(tiny_data_dir, **htsat, **{"data.sample_rate": 48000})
    with pytest.raises(ConfigError, match=r"data\.sample_rate=48000: this htsat encoder takes 16000 Hz"):
        config_lib.validate_stage1(other_rate, num_devices=1)
    layer = tiny_config(tiny_data_dir, **htsat, **{"audio_encoder.hidden_layer": -2})
    with pytest.raises(ConfigError, match=r"audio_encoder\.hidden_layer=-2: the htsat encoder feeds only"):
        config_lib.validate_stage1(layer, num_devices=1)


def two_steps(built: Built) -> dict:
    state = jax.tree.map(lambda x: x.copy(), built.setup.state)
    for seed in (3, 4):
        state, metrics = built.setup.step_fn(
            state, built.setup.parts.frozen, built.batches[0], jax.random.key(seed)
        )
        assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    return state


# (frozen HTSAT in stage two also trains in tests/test_pengi_published.py and, random, in
# tests/test_random_architectures.py: the frozen variant is the slow-marked second one here)
@pytest.mark.parametrize("trainable", [pytest.param(False, marks=pytest.mark.slow), True])
def test_stage_two_trains_on_htsat(trainable, htsat, tiny_data_dir, llm_dir):
    config = stage2_config(tiny_data_dir, llm_dir, **htsat, **{"audio_encoder.trainable": trainable})
    stage2.validate(config, num_devices=1)
    built = Built(config, num_batches=1)
    kernel = "audio_tower/encoder/patch_embed/kernel"
    if trainable:
        assert "audio_tower" not in built.setup.parts.frozen
        before = flat(jax.device_get(built.setup.state["params"]))
    else:
        before = {
            f"audio_tower/{k}": v
            for k, v in flat(jax.device_get(built.setup.parts.frozen["audio_tower"])).items()
        }
    assert kernel in before
    state = two_steps(built)
    moments = flat(jax.device_get(adam_moments(state["opt_state"]).mu))
    assert np.abs(moments["bridge/projection/kernel"]).max() > 1e-7
    if trainable:
        # Gradients reach the encoder's first layer through the whole Swin stack, and the steps move it.
        assert np.abs(moments[kernel]).max() > 0
        after = flat(jax.device_get(state["params"]))
        assert not np.array_equal(after[kernel], before[kernel])
    else:
        assert not any(name.startswith("audio_tower") for name in moments)
        after = flat(jax.device_get(built.setup.parts.frozen["audio_tower"]))
        np.testing.assert_array_equal(after["encoder/patch_embed/kernel"], before[kernel])
