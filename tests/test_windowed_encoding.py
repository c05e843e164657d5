"""Windowed encoding (SALMONN-style): audio longer than `audio_encoder.window_seconds` is cut into windows,
each encoded on its own, and the frames and masks concatenated along time before the Q-Former.

The reference encodes every window separately by hand (slices and lengths computed in NumPy) with the
same frozen tower.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slit import config as config_lib
from slit.train import sharding, stage1, stage1_model
from tests.conftest import tiny_config, train_batches

SR = 16000


def _build(config):
    config_lib.validate_stage1(config, num_devices=1)
    tokenizer = stage1_model.make_tokenizer(config, pathlib.Path("/nonexistent"))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return stage1.build_training(
        config, tokenizer, mesh, sharding.rules_dict(config.sharding_rules)
    ), tokenizer


def test_windows_match_encoding_each_window_by_hand(tiny_data_dir):
    # 2.5 s of audio in 1 s windows: two full windows and a half-filled third.
    config = tiny_config(tiny_data_dir, **{"data.max_seconds": 2.5, "audio_encoder.window_seconds": 1.0})
    config_lib.validate_stage1(config, num_devices=1)
    cfg = stage1_model.model_config(config, stage1_model.make_tokenizer(config, pathlib.Path("/nonexistent")))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    parts = stage1_model.create_model(cfg, 0, config.audio_encoder.init_seed, mesh, {})
    model = nnx.merge(parts.graphdef, parts.params, parts.frozen)
    assert model.config.audio.window_samples == SR

    rng = np.random.default_rng(0)
    lengths = np.array([40000, 17000, 9000, 100])  # 2.5 s, 1.06 s, 0.56 s, a few ms
    audio = np.zeros((4, 40000), np.float32)
    for i, n in enumerate(lengths):
        audio[i, :n] = 0.3 * np.sin(
            2 * np.pi * 300 * (i + 1) * np.arange(n) / SR
        ) + 0.05 * rng.standard_normal(n)

    encode = nnx.jit(lambda m, a, n: m.encode_audio(a, n))
    features, mask = (np.asarray(x) for x in encode(model, jnp.asarray(audio), jnp.asarray(lengths)))

    tower = nnx.jit(lambda m, a, n: m.audio_tower(a, n))
    expected_f, expected_m = [], []
    for k in range(3):
        window = np.zeros((4, SR), np.float32)
        piece = audio[:, k * SR : (k + 1) * SR]
        window[:, : piece.shape[1]] = piece
        inside = np.minimum(np.maximum(lengths - k * SR, 0), SR)
        f, m = tower(model, jnp.asarray(window), jnp.asarray(inside))
        expected_f.append(np.asarray(f))
        expected_m.append(np.asarray(m))
    expected_f, expected_m = np.concatenate(expected_f, 1), np.concatenate(expected_m, 1)

    assert features.shape == (4, 150, 32)  # 3 windows x 50 frames (20 ms each), width 32
    np.testing.assert_array_equal(mask, expected_m)
    np.testing.assert_allclose(features, expected_f, atol=1e-5, rtol=1e-5)
    # Real frames: 125 (2.5 s), 50 + 4, 29, 1; a window holding none of the clip is masked out.
    assert mask.sum(1).tolist() == [125, 54, 29, 1]
    assert not mask[2, 50:].any() and mask[1, 50:54].all() and not mask[1, 54:].any()

    # Windows are not the same as one pass over the whole clip (context stops at window edges).
    whole, _ = model.audio_tower(jnp.asarray(audio), jnp.asarray(lengths))
    assert np.asarray(whole).shape == (4, 125, 32)
    assert np.abs(np.asarray(whole)[0, :50] - features[0, :50]).max() > 1e-3


def test_a_windowed_run_trains(tiny_data_dir):
    config = tiny_config(tiny_data_dir, **{"data.max_seconds": 3.0, "audio_encoder.window_seconds": 1.0})
    setup, tokenizer = _build(config)
    batch = train_batches(config, tokenizer, 1)[0]
    batch = {k: batch[k] for k in stage1.BATCH_KEYS}
    state, metrics = setup.step_fn(setup.state, setup.parts.frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 1
