"""Parity of slit's HTSAT (CLAP's audio encoder) and its log-mel frontend with transformers'.

transformers writes a tiny random `ClapAudioModel` (two Swin stages with shifted windows, a mel shorter
than the image so that it is interpolated) and its `ClapFeatureExtractor` with `save_pretrained`; slit
loads the directory with `slit.interop.hf_clap` and encodes a zero-padded batch of two clips of different
lengths from the waveforms, against transformers' extractor + model. The frontend is also checked alone at
the extractor's defaults (48 kHz, 10 s).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.interop import hf_clap  # noqa: E402
from slit.interop.pretrained import read_safetensors  # noqa: E402
from slit.models.audio.clap_frontend import ClapFrontendConfig, clap_log_mel  # noqa: E402
from slit.models.audio.htsat import HTSATAudioTower  # noqa: E402
from slit.models.layers import Frozen  # noqa: E402

ATOL = 1e-4
SR = 16000  # the tiny checkpoint's extractor: 16 kHz, 2 s, hop 160, 16 mels -> 201 frames (image: 256)

TINY_AUDIO = dict(
    spec_size=64,
    num_mel_bins=16,
    window_size=4,  # grids 16 and 8: both stages shift their windows
    depths=[2, 2],
    num_attention_heads=[2, 4],
    patch_embeds_hidden_size=8,
    hidden_size=16,
    projection_dim=8,
)
TINY_EXTRACTOR = dict(
    feature_size=16,
    sampling_rate=SR,
    hop_length=160,
    fft_window_size=400,
    max_length_s=2,
    frequency_max=8000,
    truncation="rand_trunc",
)


def write_clap_audio(directory: pathlib.Path) -> transformers.ClapAudioModel:
    """A tiny random `ClapAudioModel` and its extractor in `directory`, with non-trivial biases, relative
    position tables and BatchNorm statistics (transformers initialises them to constants)."""
    torch.manual_seed(0)
    model = transformers.ClapAudioModel(transformers.ClapAudioConfig(**TINY_AUDIO)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "relative_position" in name:
                p.add_(0.3 * torch.randn_like(p))
        norm = model.audio_encoder.batch_norm
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(directory)
    transformers.ClapFeatureExtractor(**TINY_EXTRACTOR).save_pretrained(directory)
    return model


def clips(sample_rate: int, seconds: float, fractions: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Tones and a hum over broadband noise, zero-padded to `seconds`; clip i is `fractions[i]` of it."""
    rng = np.random.default_rng(0)
    total = int(seconds * sample_rate)
    lengths = np.array([int(f * total) for f in fractions])
    audio = np.zeros((len(lengths), total), np.float32)
    for i, n in enumerate(lengths):
        t = np.arange(n) / sample_rate
        audio[i, :n] = (
            0.3 * np.sin(2 * np.pi * (440 + 770 * i) * t)
            + 0.2 * np.sin(2 * np.pi * 3000 * t)
            + 0.1 * np.sin(2 * np.pi * 60 * t)
            + 0.2 * rng.standard_normal(n)
        )
    return audio, lengths


def load_tower(directory: pathlib.Path) -> HTSATAudioTower:
    config, params = hf_clap.load_htsat(directory)
    tower = HTSATAudioTower(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(tower)
    nnx.replace_by_pure_dict(state, {"encoder": params})
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[pathlib.Path, transformers.ClapAudioModel]:
    directory = tmp_path_factory.mktemp("clap_audio")
    return directory, write_clap_audio(directory)


def test_tower_matches_clap_audio_model(tiny):
    directory, hf = tiny
    tower = load_tower(directory)
    assert not nnx.state(tower, nnx.Param).flat_state()  # everything Frozen until unfreeze
    assert nnx.state(tower, Frozen).flat_state()
    audio, lengths = clips(SR, 2.0, (0.35, 1.0))  # a repeat-padded clip and a full one
    features, mask = nnx.jit(lambda t, a, n: t(a, n))(tower, jnp.asarray(audio), jnp.asarray(lengths))
    features = np.asarray(features)

    extractor = transformers.ClapFeatureExtractor.from_pretrained(directory)
    inputs = extractor([audio[i, :n] for i, n in enumerate(lengths)], sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        out = hf(input_features=inputs["input_features"])
    hidden = out.last_hidden_state.numpy()  # (B, width, bands, time)
    batch, width, bands, steps = hidden.shape
    assert (width, bands, steps) == (16, 2, 32) and tower.width == 16
    assert features.shape == (2, bands * steps, width) and np.asarray(mask).all()
    expected = hidden.transpose(0, 3, 2, 1).reshape(batch, steps * bands, width)  # time-major frames
    err = np.abs(features - expected).max()
    assert err < ATOL, err
    pooled = np.abs(features.mean(1) - out.pooler_output.numpy()).max()
    assert pooled < ATOL, pooled


@pytest.mark.parametrize("padding", ["repeatpad", "repeat", "pad"])
@pytest.mark.parametrize("truncation", ["fusion", "rand_trunc"])
def test_frontend_matches_the_feature_extractor(truncation, padding):
    """At the extractor's defaults (48 kHz, 10 s, 64 mels, HTK filters with "fusion", Slaney with
    "rand_trunc"); a 3 s clip fitted by `padding` and a 10 s one, batched as 10 s of zero-padded audio."""
    extractor = transformers.ClapFeatureExtractor(truncation=truncation, padding=padding)
    config = ClapFrontendConfig(truncation=truncation, padding=padding)
    audio, lengths = clips(48000, 10.0, (0.3, 1.0))
    expected = extractor(
        [audio[i, :n] for i, n in enumerate(lengths)], sampling_rate=48000, return_tensors="np"
    )["input_features"][:, 0]  # "fusion" stacks 4 identical copies for clips up to 10 s
    got = np.asarray(jax.jit(lambda a, n: clap_log_mel(a, n, config))(audio, lengths))
    assert got.shape == expected.shape == (2, 1001, 64)
    err = np.abs(got - expected)
    # float32's floor: a mel bin far below its frame's loudest one carries the rounding of the loud ones
    # (transformers computes in float64). Within 60 dB of it: 1e-4 dB; the rare deeper notches (narrow
    # low HTK filters between the hum and the tones): 1e-3 dB.
    near = expected >= expected.max(axis=-1, keepdims=True) - 60.0
    assert near.mean() > 0.99
    assert err[near].max() < ATOL, err[near].max()
    assert err.max() < 10 * ATOL, err.max()


def test_empty_window_gives_padding_frames(tiny):
    tower = load_tower(tiny[0])
    audio, lengths = clips(SR, 2.0, (0.5, 0.0))
    features, mask = tower(jnp.asarray(audio), jnp.asarray(lengths))
    assert np.asarray(mask[0]).all() and not np.asarray(mask[1]).any()
    assert np.isfinite(np.asarray(features)).all()
    with pytest.raises(ValueError, match=r"hidden_layer -2.*last hidden state"):
        HTSATAudioTower(tower.encoder.config, rngs=nnx.Rngs(0), hidden_layer=-2)


@pytest.mark.parametrize("kind", ["ClapModel", "ClapAudioModelWithProjection"])
def test_the_larger_models_hold_the_same_encoder(kind, tiny, tmp_path):
    """ClapModel (audio settings under audio_config, weights under audio_model.) and
    ClapAudioModelWithProjection give the same config and weights as the bare ClapAudioModel."""
    directory, hf = tiny
    audio_config = transformers.ClapAudioConfig(**TINY_AUDIO)
    if kind == "ClapModel":
        text = dict(
            vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
        )
        model = transformers.ClapModel(
            transformers.ClapConfig(audio_config=audio_config.to_dict(), text_config=text, projection_dim=8)
        )
    else:
        model = transformers.ClapAudioModelWithProjection(audio_config)
    model.audio_model.load_state_dict(hf.state_dict())
    model.save_pretrained(tmp_path)
    transformers.ClapFeatureExtractor(**TINY_EXTRACTOR).save_pretrained(tmp_path)
    config, params = hf_clap.load_htsat(tmp_path)
    want_config, want = hf_clap.load_htsat(directory)
    assert config == want_config
    flat, flat_want = (jax.tree_util.tree_leaves_with_path(p) for p in (params, want))
    assert len(flat) == len(flat_want)
    for (path, value), (_, expected) in zip(flat, flat_want, strict=True):
        np.testing.assert_array_equal(value, expected, err_msg=str(path))


def test_loader_errors_name_the_key_and_the_fix(tiny, tmp_path):
    directory, _ = tiny
    tensors = read_safetensors(directory)
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((directory / name).read_text())
    missing = "audio_encoder.layers.1.blocks.1.attention.self.relative_position_bias_table"
    save_file({k: v for k, v in tensors.items() if k != missing}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=rf"missing tensor '{missing}'.*use the complete checkpoint"):
        hf_clap.load_htsat(tmp_path)

    with pytest.raises(UserError, match=r"has no config\.json.*CLAP directory"):
        hf_clap.load_htsat(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no \*\.safetensors"):
        hf_clap.load_htsat(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(UserError, match=r"model_type 'wav2vec2' is not a CLAP model"):
        hf_clap.load_htsat(tmp_path)
    fused = dict(json.loads((directory / "config.json").read_text()), enable_fusion=True)
    (tmp_path / "config.json").write_text(json.dumps(fused))
    with pytest.raises(UserError, match=r"enable_fusion=true .* not supported"):
        hf_clap.load_htsat(tmp_path)
