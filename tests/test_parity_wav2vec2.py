"""Parity of slit's wav2vec2-family encoders (data2vec-audio, wav2vec2, HuBERT) with transformers'.

transformers writes small random checkpoints with `save_pretrained`; slit loads the directories with
`slit.interop.hf_wav2vec2` and encodes a zero-padded batch of two clips of different lengths.
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.interop import hf_wav2vec2  # noqa: E402
from slit.interop.pretrained import read_safetensors  # noqa: E402
from slit.models.audio import wav2vec2  # noqa: E402
from slit.models.layers import Frozen  # noqa: E402

SR = 16000
ATOL = 1e-4
LENGTHS = (2400, 1700)  # samples; 119 and 84 frames with the tiny feature encoder below
NUM_LAYERS = 3

TINY = dict(
    hidden_size=32,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=2,
    intermediate_size=37,
    conv_dim=(16, 16, 16),
    conv_kernel=(10, 3, 2),
    conv_stride=(5, 2, 2),
    num_conv_pos_embedding_groups=4,
    vocab_size=12,  # the CTC head of the *ForCTC variant
)

# name: (model class, config class, config overrides). Each covers a different switch of the family.
VARIANTS = {
    # data2vec-audio: LayerNorm after every feature conv, a stack of 2 position convs (even kernel: the
    # last frame is trimmed), each with a parameter-free LayerNorm.
    "data2vec-audio": (
        transformers.Data2VecAudioModel,
        transformers.Data2VecAudioConfig,
        dict(num_conv_pos_embeddings=2, conv_pos_kernel_size=6),
    ),
    # wav2vec2-base layout: GroupNorm on the first conv, post-LN; weights read from a Wav2Vec2ForCTC
    # checkpoint (prefix `wav2vec2.`, CTC head ignored); weight-normed position conv, even kernel.
    "wav2vec2-group-postln": (
        transformers.Wav2Vec2ForCTC,
        transformers.Wav2Vec2Config,
        dict(feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=8),
    ),
    # wav2vec2-large-lv60 layout: LayerNorm on every conv, conv bias, pre-LN ("stable") layers.
    "wav2vec2-layer-stable": (
        transformers.Wav2Vec2Model,
        transformers.Wav2Vec2Config,
        dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=5),
    ),
    # HuBERT without the feature-projection LayerNorm, odd position kernel.
    "hubert": (
        transformers.HubertModel,
        transformers.HubertConfig,
        dict(feat_proj_layer_norm=False, num_conv_pos_embeddings=7),
    ),
    # HuBERT with a BatchNorm before a plain (not weight-normed) position conv, stable layer norm.
    "hubert-batchnorm-stable": (
        transformers.HubertModel,
        transformers.HubertConfig,
        dict(
            conv_pos_batch_norm=True,
            do_stable_layer_norm=True,
            feat_extract_norm="layer",
            num_conv_pos_embeddings=4,
        ),
    ),
}


def _hf_model(variant: str) -> torch.nn.Module:
    """A small random model in eval mode; norms, biases, weight-norm gains and BatchNorm statistics
    are randomised too (their defaults would hide mistakes)."""
    model_cls, config_cls, overrides = VARIANTS[variant]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("original0"):
                p.mul_(1.0 + 0.2 * torch.randn_like(p)).add_(0.1 * torch.randn_like(p))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand_like(buffer))
    return model


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix, model)


def _checkpoint(variant: str, directory) -> torch.nn.Module:
    """Writes the variant's checkpoint and a feature extractor config into `directory`; returns the model."""
    model = _hf_model(variant)
    model.save_pretrained(directory)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(
        directory
    )
    return model


def _clips() -> list[np.ndarray]:
    """Two clips of different lengths, amplitudes and offsets (so that normalisation matters)."""
    rng = np.random.default_rng(0)
    t0, t1 = (np.arange(n) / SR for n in LENGTHS)
    clip0 = 0.3 * np.sin(2 * np.pi * 440 * t0) + 0.05 * rng.standard_normal(t0.size) + 0.1
    clip1 = 0.05 * np.sin(2 * np.pi * 97 * t1) * (1 + t1 * 20) - 0.02
    return [clip0.astype(np.float32), clip1.astype(np.float32)]


def _padded(clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    waveform = np.zeros((len(clips), max(len(c) for c in clips)), np.float32)
    for i, clip in enumerate(clips):
        waveform[i, : len(clip)] = clip
    return waveform, np.array([len(c) for c in clips])


def _max_diff(got: jax.Array, expected: torch.Tensor) -> float:
    got, expected = np.asarray(got), expected.numpy()
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_matches_transformers(variant, tmp_path):
    hf = _checkpoint(variant, tmp_path)
    clips = _clips()
    extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)
    inputs = extractor(clips, sampling_rate=SR, padding=True, return_attention_mask=True, return_tensors="pt")
    base = _base(hf)  # the bare encoder inside a *ForCTC model
    with torch.no_grad():
        expected = base(**inputs, output_hidden_states=True)
    assert len(expected.hidden_states) == NUM_LAYERS + 1

    waveform, num_samples = _padded(clips)
    waveform, num_samples = jnp.asarray(waveform), jnp.asarray(num_samples)
    # Waveform normalisation as Wav2Vec2FeatureExtractor(do_normalize=True) does it.
    normalized = wav2vec2.normalize_waveform(waveform, num_samples)
    assert _max_diff(normalized, inputs.input_values) < 1e-5

    tower = hf_wav2vec2.load_wav2vec2_tower(tmp_path)  # last hidden state
    assert tower.normalize and tower.mask_padding  # from preprocessor_config.json
    assert tower.width == TINY["hidden_size"]
    assert not jax.tree.leaves(nnx.state(tower, nnx.Param))  # everything is Frozen
    features, mask = tower(waveform, num_samples)

    hf_lengths = base._get_feat_extract_output_lengths(torch.tensor(LENGTHS))
    hf_mask = base._get_feature_vector_attention_mask(features.shape[1], inputs.attention_mask)
    np.testing.assert_array_equal(np.asarray(mask), hf_mask.numpy())
    np.testing.assert_array_equal(np.asarray(mask).sum(1), hf_lengths.numpy())
    assert int(hf_lengths[1]) < features.shape[1]  # the second clip really is padded

    err = _max_diff(features, expected.last_hidden_state)
    print(f"{variant}: last hidden state, max abs diff {err:.2e}")
    assert err < ATOL

    # Every hidden state, numbered as transformers numbers them (for stable layer norm, -1 is the
    # output of the last layer before the final LayerNorm).
    for index in (0, 1, -2, -1):
        got, _ = tower.encoder(normalized, num_samples, hidden_layer=index)
        err = _max_diff(got, expected.hidden_states[index])
        print(f"{variant}: hidden state {index}, max abs diff {err:.2e}")
        assert err < ATOL, index


def test_forward_stops_at_the_chosen_hidden_layer(tmp_path):
    """A tower reading hidden state 1 never runs layers 1 and 2: poisoning their weights changes nothing."""
    hf = _checkpoint("wav2vec2-layer-stable", tmp_path)
    clips = _clips()
    inputs = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)(
        clips, sampling_rate=SR, padding=True, return_attention_mask=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = hf(**inputs, output_hidden_states=True).hidden_states[1]

    tower = hf_wav2vec2.load_wav2vec2_tower(tmp_path, hidden_layer=1)
    for layer in list(tower.encoder.layers)[1:]:
        layer.fc1.kernel[...] = jnp.full_like(layer.fc1.kernel[...], jnp.nan)
    waveform, num_samples = _padded(clips)
    features, _ = tower(jnp.asarray(waveform), jnp.asarray(num_samples))
    assert _max_diff(features, expected) < ATOL

    with pytest.raises(UserError, match=r"hidden_layer 4 is out of range.*4 hidden states"):
        hf_wav2vec2.load_wav2vec2_tower(tmp_path, hidden_layer=4)


def test_without_attention_mask_as_wav2vec2_base_processors(tmp_path):
    """wav2vec2-base's feature extractor returns no attention mask: the model then sees the padding."""
    hf = _base(_hf_model("wav2vec2-group-postln"))
    hf.save_pretrained(tmp_path)
    transformers.Wav2Vec2FeatureExtractor(return_attention_mask=False).save_pretrained(tmp_path)
    tower = hf_wav2vec2.load_wav2vec2_tower(tmp_path, hidden_layer=-2)
    assert tower.normalize and not tower.mask_padding

    waveform, num_samples = (jnp.asarray(a) for a in _padded(_clips()))
    normalized = wav2vec2.normalize_waveform(waveform, num_samples)
    with torch.no_grad():
        expected = hf(torch.tensor(np.asarray(normalized)), output_hidden_states=True).hidden_states[-2]
    features, mask = tower(waveform, num_samples)
    assert _max_diff(features, expected) < ATOL
    hf_lengths = hf._get_feat_extract_output_lengths(torch.tensor(LENGTHS))
    np.testing.assert_array_equal(np.asarray(mask).sum(1), hf_lengths.numpy())


def test_bfloat16_weights(tmp_path):
    _checkpoint("data2vec-audio", tmp_path)
    waveform, num_samples = (jnp.asarray(a) for a in _padded(_clips()))
    f32 = hf_wav2vec2.load_wav2vec2_tower(tmp_path, hidden_layer=-2)
    bf16 = hf_wav2vec2.load_wav2vec2_tower(tmp_path, hidden_layer=-2, param_dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(bf16, Frozen))
    assert leaves and all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    want, got = np.asarray(f32(waveform, num_samples)[0]), np.asarray(bf16(waveform, num_samples)[0])
    assert got.dtype == np.float32  # activations stay float32
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"bfloat16 weights: relative error {relative:.2e}")
    assert relative < 2e-2


def test_feature_lengths_match_transformers():
    """Frame counts of the released models' feature encoder (kernels 10,3,3,3,3,2,2; strides 5,2,...)."""
    hf_config = transformers.Wav2Vec2Config()
    config = hf_wav2vec2.wav2vec2_config_from_hf(hf_config.to_dict())
    lengths = np.array([400, 401, 719, 720, 16000, 16001, 16319, 16320, 48000, 123457])
    expected = transformers.Wav2Vec2Model._get_feat_extract_output_lengths(
        types.SimpleNamespace(config=hf_config), torch.from_numpy(lengths)
    )
    np.testing.assert_array_equal(wav2vec2.feature_lengths(lengths, config), expected.numpy())
    assert (config.hop_samples, config.receptive_field) == (320, 400)
    mask = np.asarray(wav2vec2.frame_mask(jnp.asarray([16000, 399]), 49, config))
    assert mask[0].all() and not mask[1].any()  # a clip shorter than the receptive field has no frame


def _tensors(
    variant: str, tmp_path
) -> tuple[wav2vec2.Wav2Vec2Config, dict[str, np.ndarray], torch.nn.Module]:
    model = _checkpoint(variant, tmp_path)
    config = hf_wav2vec2.wav2vec2_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    return config, read_safetensors(tmp_path), model


def test_weight_norm_spellings_fold_to_the_same_kernel(tmp_path):
    config, tensors, model = _tensors("hubert", tmp_path)
    params = hf_wav2vec2.wav2vec2_params_from_hf(config, tensors)
    kernel = params["position_conv"]["layers"][0]["kernel"]  # (k, D/G, D)
    expected = model.encoder.pos_conv_embed.conv.weight.detach().numpy()  # torch's weight-normed weight
    np.testing.assert_allclose(kernel, expected.transpose(2, 1, 0), rtol=1e-6, atol=1e-6)

    base = "encoder.pos_conv_embed.conv."
    g, v = (tensors.pop(f"{base}parametrizations.weight.original{i}") for i in (0, 1))
    legacy = hf_wav2vec2.wav2vec2_params_from_hf(
        config, {**tensors, base + "weight_g": g, base + "weight_v": v}
    )
    np.testing.assert_array_equal(legacy["position_conv"]["layers"][0]["kernel"], kernel)
    plain = hf_wav2vec2.wav2vec2_params_from_hf(config, {**tensors, base + "weight": expected})
    np.testing.assert_allclose(plain["position_conv"]["layers"][0]["kernel"], kernel, rtol=1e-6, atol=1e-6)


def test_bad_tensors_are_named(tmp_path):
    config, tensors, _ = _tensors("wav2vec2-layer-stable", tmp_path)
    missing = "encoder.layers.1.feed_forward.intermediate_dense.weight"
    misshapen = "feature_extractor.conv_layers.1.conv.weight"
    bad = {k: v for k, v in tensors.items() if k != missing}
    bad[misshapen] = tensors[misshapen][:, :, :2]
    bad["encoder.layers.0.attention.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(UserError) as error:
        hf_wav2vec2.wav2vec2_params_from_hf(config, bad, source="my-checkpoint")
    message = str(error.value)
    print(message)
    assert "my-checkpoint" in message
    assert f"missing tensor {missing!r} (expected shape (37, 32)" in message
    assert f"tensor {misshapen!r} has shape (16, 16, 2), expected (16, 16, 3)" in message
    assert "unexpected tensor(s) under prefix '': ['encoder.layers.0.attention.extra.weight']" in message

    base = "encoder.pos_conv_embed.conv.parametrizations.weight."
    no_weight_norm = {k: v for k, v in tensors.items() if not k.startswith(base)}
    with pytest.raises(UserError, match=r"missing tensor encoder\.pos_conv_embed\.conv\.weight_g / weight_v"):
        hf_wav2vec2.wav2vec2_params_from_hf(config, no_weight_norm)

    # The same through a checkpoint directory: the directory is named.
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=rf"{tmp_path.name}(.|\n)*{missing}"):
        hf_wav2vec2.load_wav2vec2_encoder(tmp_path)


def test_bad_configs_fail_clearly(tmp_path):
    _checkpoint("hubert", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="wavlm")))
    with pytest.raises(UserError, match=r"config\.json: model_type 'wavlm' is not a supported.*'hubert'"):
        hf_wav2vec2.load_wav2vec2_encoder(tmp_path)

    with pytest.raises(UserError, match=r"add_adapter"):
        hf_wav2vec2.wav2vec2_config_from_hf(dict(config, add_adapter=True))
    with pytest.raises(UserError, match=r"hidden_act 'mish' is not supported"):
        hf_wav2vec2.wav2vec2_config_from_hf(dict(config, hidden_act="mish"))
    with pytest.raises(UserError, match=r"missing field 'conv_stride'"):
        hf_wav2vec2.wav2vec2_config_from_hf({k: v for k, v in config.items() if k != "conv_stride"})
    with pytest.raises(UserError, match=r"feature_norm must be 'group' or 'layer', got 'batch'"):
        hf_wav2vec2.wav2vec2_config_from_hf(dict(config, feat_extract_norm="batch"))

    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        hf_wav2vec2.load_wav2vec2_encoder(tmp_path)

    # Pickles are never read.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        hf_wav2vec2.load_wav2vec2_encoder(pickled)
