"""Parity of slit's Whisper encoder (weights converted by `slit.interop.hf_convert`) with transformers'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit.interop import hf_convert  # noqa: E402
from slit.models.audio.whisper import WhisperAudioTower, WhisperEncoder  # noqa: E402

SR = 16000
ATOL = 1e-4


def _hf_whisper(num_mel_bins: int) -> transformers.WhisperModel:
    """A small random WhisperModel in eval mode; 1-D params (biases, LayerNorms) randomised too."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        num_mel_bins=num_mel_bins,
        max_source_positions=1500,
        vocab_size=100,  # decoder: tiny, unused
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    model = transformers.WhisperModel(config).eval()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _slit_encoder(hf: transformers.WhisperModel) -> WhisperEncoder:
    config = hf_convert.whisper_encoder_config(hf.config)
    encoder = WhisperEncoder(config, rngs=nnx.Rngs(0))
    # Full WhisperModel state dict: the `encoder.` prefix is detected, decoder keys are ignored.
    hf_convert.load_params(encoder, hf_convert.whisper_encoder_params(_state_dict(hf), config))
    return encoder


def _hf_encode_any_length(hf_encoder: torch.nn.Module, mel_bmt: torch.Tensor) -> np.ndarray:
    """HF's encoder forward without its 3000-frame check: positions [0, frames) for shorter inputs."""
    with torch.no_grad():
        x = torch.nn.functional.gelu(hf_encoder.conv1(mel_bmt))
        x = torch.nn.functional.gelu(hf_encoder.conv2(x)).permute(0, 2, 1)
        x = x + hf_encoder.embed_positions.weight[: x.shape[1]]
        for layer in hf_encoder.layers:
            x = layer(x, None)
        return hf_encoder.layer_norm(x).numpy()


@pytest.mark.parametrize("num_mel_bins", [80, 128])
def test_encoder_matches_transformers(num_mel_bins):
    hf = _hf_whisper(num_mel_bins)
    encoder = _slit_encoder(hf)
    mel_bmt = np.random.default_rng(0).uniform(-1.0, 1.5, (2, num_mel_bins, 3000)).astype(np.float32)

    with torch.no_grad():
        expected = hf.encoder(torch.from_numpy(mel_bmt)).last_hidden_state.numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(encoder, jnp.asarray(mel_bmt.transpose(0, 2, 1))))
    assert got.shape == expected.shape == (2, 1500, 64)
    err = np.abs(got - expected).max()
    print(f"whisper encoder, {num_mel_bins} mels, 3000 frames: max abs diff {err:.2e}")
    assert err < ATOL

    # Shorter (and odd-length) inputs use the first position embeddings, as HF's layers would.
    short = mel_bmt[:, :, :1001]
    got_short = np.asarray(encoder(jnp.asarray(short.transpose(0, 2, 1))))
    expected_short = _hf_encode_any_length(hf.encoder, torch.from_numpy(short))
    assert got_short.shape == expected_short.shape == (2, 501, 64)
    err = np.abs(got_short - expected_short).max()
    print(f"whisper encoder, {num_mel_bins} mels, 1001 frames: max abs diff {err:.2e}")
    assert err < ATOL


def test_audio_tower_matches_feature_extractor_and_encoder():
    """Waveform -> slit log-mel + encoder vs WhisperFeatureExtractor + HF encoder, on 30 s of audio."""
    hf = _hf_whisper(80)
    config = hf_convert.whisper_encoder_config(hf.config)
    tower = WhisperAudioTower(config, rngs=nnx.Rngs(0))
    params = hf_convert.whisper_encoder_params(_state_dict(hf.encoder), config)  # no prefix
    hf_convert.load_params(tower, {"encoder": params})

    rng = np.random.default_rng(1)
    t = np.arange(30 * SR) / SR
    wave = 0.02 * rng.standard_normal(t.shape) + 0.3 * np.sin(2 * np.pi * 220 * t)
    wave = (wave * (0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t) ** 2)).astype(np.float32)

    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    features = extractor(wave, sampling_rate=SR, return_tensors="np").input_features  # (1, 80, 3000)
    with torch.no_grad():
        expected = hf.encoder(torch.from_numpy(features)).last_hidden_state.numpy()

    got, mask = nnx.jit(lambda m, w, n: m(w, n))(tower, jnp.asarray(wave[None]), jnp.array([wave.size]))
    got = np.asarray(got)
    assert got.shape == expected.shape == (1, 1500, 64)
    assert bool(jax.device_get(mask).all())
    err = np.abs(got - expected).max()
    print(f"whisper tower (waveform, 30 s): max abs diff {err:.2e}")
    assert err < ATOL


def test_missing_and_misshapen_tensors_are_named():
    hf = _hf_whisper(80)
    config = hf_convert.whisper_encoder_config(hf.config)
    sd = _state_dict(hf.encoder)

    missing = {k: v for k, v in sd.items() if k != "layers.1.fc1.weight"}
    with pytest.raises(ValueError, match=r"layers\.1\.fc1\.weight.*\(128, 64\)"):
        hf_convert.whisper_encoder_params(missing, config)

    wrong = dict(sd, **{"conv2.weight": sd["conv2.weight"][:, :, :2]})
    with pytest.raises(ValueError, match=r"conv2\.weight.*\(64, 64, 3\)"):
        hf_convert.whisper_encoder_params(wrong, config)

    extra = dict(sd, **{"layers.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unused.*layers\.0\.extra\.weight"):
        hf_convert.whisper_encoder_params(extra, config)
    with pytest.warns(UserWarning, match=r"layers\.0\.extra\.weight"):
        hf_convert.whisper_encoder_params(extra, config, strict=False)
