"""Tests for the JAX Whisper log-mel frontend against transformers' NumPy reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slit.models.audio.frontend import frame_mask, log_mel_spectrogram, mel_filter_bank, num_frames

transformers = pytest.importorskip("transformers")
from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank  # noqa: E402

SR = 16000
N_30S = 30 * SR


def _signal(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """Noise + a few tones + a chirp, with an amplitude envelope: speech-like dynamic range."""
    t = np.arange(num_samples) / SR
    f0 = rng.uniform(100, 300)
    x = 0.02 * rng.standard_normal(num_samples)
    x += 0.3 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 3.7 * f0 * t + 1.0)
    x += 0.05 * np.sin(2 * np.pi * (500 * t + 400 * t**2))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t) ** 2
    return x.astype(np.float32)


@functools.cache
def _extractor(n_mels: int) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=n_mels)


def _reference(x_bs: np.ndarray, n_mels: int) -> np.ndarray:
    """transformers' NumPy Whisper features, transposed to (batch, frames, mels)."""
    return _extractor(n_mels)._np_extract_fbank_features(x_bs, "cpu").transpose(0, 2, 1)


_jit_log_mel = jax.jit(log_mel_spectrogram, static_argnames=("num_mel_bins",))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filter_bank_matches_transformers(n_mels):
    ours = mel_filter_bank(n_mels)
    ref = hf_mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SR,
        norm="slaney",
        mel_scale="slaney",
    )
    assert ours.shape == (201, n_mels)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)
    # float64 is the same construction without the float32 rounding.
    np.testing.assert_allclose(mel_filter_bank(n_mels, dtype=np.float64), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor_30s(n_mels):
    """Full 30 s input through the extractor's public __call__ (no padding happens)."""
    x = _signal(np.random.default_rng(n_mels), N_30S)
    ref = _extractor(n_mels)(x, sampling_rate=SR, return_tensors="np")["input_features"].transpose(0, 2, 1)
    out = np.asarray(_jit_log_mel(jnp.asarray(x[None]), num_mel_bins=n_mels))
    assert out.shape == (1, 3000, n_mels) and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_reference_short_clip_padded(n_mels):
    """A 3.7 s clip zero-padded to 30 s, as the extractor's default padding does."""
    n = int(3.7 * SR) + 33
    x = np.zeros((1, N_30S), np.float32)
    x[0, :n] = _signal(np.random.default_rng(1), n)
    ref_call = _extractor(n_mels)(x[0, :n], sampling_rate=SR, return_tensors="np")["input_features"]
    ref = _reference(x, n_mels)
    # __call__ pads with zeros to 30 s; with torch installed it computes with torch's STFT, which
    # differs from the NumPy path by ~1e-5, so the two references agree to a tolerance, not exactly.
    np.testing.assert_allclose(ref, ref_call.transpose(0, 2, 1), rtol=0, atol=1e-4)
    out = np.asarray(_jit_log_mel(jnp.asarray(x), num_mel_bins=n_mels))
    assert np.abs(out - ref).max() <= 1e-4
    assert np.abs(out - ref_call.transpose(0, 2, 1)).max() <= 1e-4


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_unpadded_lengths(n_mels):
    """Lengths that are not multiples of the hop; frames = num_samples // hop (last STFT frame dropped)."""
    rng = np.random.default_rng(2)
    for n in (SR + 1, 2 * SR + 159, 5 * SR):
        x = _signal(rng, n)[None]
        out = np.asarray(log_mel_spectrogram(jnp.asarray(x), num_mel_bins=n_mels))
        ref = _reference(x, n_mels)
        assert out.shape == ref.shape == (1, num_frames(n), n_mels)
        assert np.abs(out - ref).max() <= 1e-4


def test_batch_is_per_example():
    """Two clips of different lengths and loudness: each row equals its single-example result, and the
    per-example max (not the batch max) sets the -8 clamp."""
    rng = np.random.default_rng(3)
    total = 8 * SR
    lens = [total, int(2.5 * SR) + 7]
    x = np.zeros((2, total), np.float32)
    x[0] = 1.0 * _signal(rng, lens[0])
    x[1, : lens[1]] = 1e-3 * _signal(rng, lens[1])  # 60 dB quieter: a shared max would clamp it away
    out = np.asarray(_jit_log_mel(jnp.asarray(x), num_mel_bins=80))
    ref = _reference(x, 80)
    assert np.abs(out - ref).max() <= 1e-4
    for b in range(2):
        single = np.asarray(_jit_log_mel(jnp.asarray(x[b : b + 1]), num_mel_bins=80))[0]
        np.testing.assert_allclose(out[b], single, rtol=0, atol=1e-6)
        assert out[b].max() == pytest.approx((ref[b].max()), abs=1e-4)
    # The quiet example keeps its own range; a batch-wide max would clamp it all to out[0].max() - 2.
    assert out[0].max() - out[1].max() > 1.0
    assert out[1].min() < out[0].max() - 2.0 - 0.5
    assert out[0].max() - out[0].min() <= 2.0 + 1e-5


def test_jit_no_retrace_and_static_shapes():
    traces = []

    def f(x):
        traces.append(x.shape)
        return log_mel_spectrogram(x, num_mel_bins=128)

    jf = jax.jit(f)
    rng = np.random.default_rng(4)
    a = jf(jnp.asarray(rng.standard_normal((3, 16000), dtype=np.float32)))
    b = jf(jnp.asarray(rng.standard_normal((3, 16000), dtype=np.float32)))
    assert a.shape == b.shape == (3, 100, 128) and a.dtype == jnp.float32
    assert len(traces) == 1
    assert bool(jnp.all(jnp.isfinite(a)))
    # bf16 input is computed in float32.
    assert log_mel_spectrogram(jnp.zeros((1, 800), jnp.bfloat16)).dtype == jnp.float32


def test_num_frames():
    assert num_frames(N_30S) == 3000
    assert num_frames(159) == 0 and num_frames(160) == 1 and num_frames(161) == 1
    np.testing.assert_array_equal(num_frames(jnp.array([0, 160, 479, 480])), [0, 1, 2, 3])


def _frame_mask_reference(lengths, total_frames, hop, downsample):
    """Direct definition: mel frame t covers samples [t*hop, (t+1)*hop) and is valid iff that overlaps
    [0, L); encoder frame j covers mel frames [j*d, (j+1)*d) and is valid iff any of them is."""
    n_out = math.ceil(total_frames / downsample)
    out = np.zeros((len(lengths), n_out), bool)
    for b, n in enumerate(lengths):
        mel_valid = [t < total_frames and t * hop < n for t in range(total_frames)]
        for j in range(n_out):
            out[b, j] = any(mel_valid[j * downsample : (j + 1) * downsample])
    return out


@pytest.mark.parametrize("downsample", [1, 2, 3])
@pytest.mark.parametrize("total_frames", [50, 51])
def test_frame_mask_matches_direct_computation(downsample, total_frames):
    hop = 160
    lengths = [
        0,
        1,
        159,
        160,
        161,
        319,
        320,
        321,
        2 * 160 * 7 + 5,
        total_frames * hop,
        total_frames * hop + 99,
    ]
    got = np.asarray(
        jax.jit(frame_mask, static_argnums=(1, 2, 3))(jnp.array(lengths), total_frames, hop, downsample)
    )
    ref = _frame_mask_reference(lengths, total_frames, hop, downsample)
    assert got.shape == ref.shape == (len(lengths), math.ceil(total_frames / downsample))
    np.testing.assert_array_equal(got, ref)


def test_frame_mask_matches_whisper_attention_mask():
    """Same rounding as WhisperFeatureExtractor's attention_mask (sample mask sampled every hop)."""
    fe = _extractor(80)
    lengths = [SR, SR + 1, 2 * SR + 159, 3 * SR + 160]
    clips = [np.zeros(n, np.float32) + 0.1 for n in lengths]
    am = fe(clips, sampling_rate=SR, return_attention_mask=True, return_tensors="np")["attention_mask"]
    got = np.asarray(frame_mask(jnp.array(lengths), 3000))
    np.testing.assert_array_equal(got, am.astype(bool))
    # Whisper encoder after the stride-2 conv: 1500 frames.
    enc = np.asarray(frame_mask(jnp.array(lengths), 3000, downsample=2))
    assert enc.shape == (4, 1500)
    np.testing.assert_array_equal(enc.sum(1), [math.ceil(math.ceil(n / 160) / 2) for n in lengths])
