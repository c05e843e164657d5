"""Whisper's log-mel spectrogram frontend in JAX.

Everything here is a pure function with static shapes, so the frontend can run on device inside a jitted
train step instead of in the data loader. The recipe reproduces OpenAI Whisper's ``log_mel_spectrogram``
(and ``transformers.WhisperFeatureExtractor``) exactly:

1. periodic Hann window of length ``n_fft``;
2. centred STFT: reflect-pad ``n_fft // 2`` samples on both sides, frames of ``n_fft`` every ``hop_length``;
3. power spectrum ``|X|^2``; the last STFT frame is dropped, so ``frames = num_samples // hop_length``;
4. projection onto a Slaney mel filterbank (librosa's default, i.e. Whisper's ``mel_filters.npz``);
5. ``log10(max(mel, 1e-10))``, clamped per example to ``max - 8``, then ``(x + 4) / 4``.

Padding convention: a batch of shorter clips is zero-padded on the right to a common length. Frame values
on the real audio then equal what Whisper computes for the clip zero-padded to 30 s, as long as each clip is
followed by at least ``n_fft // 2`` zeros (or the batch length is the clip length, which is what Whisper's
own 30 s chunks look like); the per-example max in step 5 is unaffected by the padded frames, which sit at
the floor, unless the clip is silent.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["frame_mask", "log_mel_spectrogram", "mel_filter_bank", "num_frames"]

_LOG_FLOOR = 1e-10  # floor on mel power before log10
_DYNAMIC_RANGE = 8.0  # per-example clamp, in log10 units (80 dB)


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mel / 200 Hz), logarithmic above (27 mel per factor 6.4)."""
    freq = np.asarray(freq, dtype=np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, math.log(6.4) / 27.0
    mels = 3.0 * freq / 200.0
    log_region = freq >= min_log_hz
    return np.where(
        log_region, min_log_mel + np.log(np.maximum(freq, min_log_hz) / min_log_hz) / logstep, mels
    )


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_mel_slaney`."""
    mels = np.asarray(mels, dtype=np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, math.log(6.4) / 27.0
    freqs = 200.0 * mels / 3.0
    log_region = mels >= min_log_mel
    return np.where(log_region, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


def mel_filter_bank(
    num_mel_bins: int, sample_rate: int = 16000, n_fft: int = 400, dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """Slaney-style mel filterbank with Slaney area normalisation, fmin 0 Hz, fmax ``sample_rate / 2``.

    Identical to ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=num_mel_bins)`` (``htk=False``,
    ``norm="slaney"``) transposed, which is the content of Whisper's ``mel_filters.npz``. Triangles are
    built in float64, cast to ``dtype``, then scaled by ``2 / (f[m + 2] - f[m])``, in librosa's order, so the
    float32 result is bit-exact with librosa.

    Returns:
        ``(n_fft // 2 + 1, num_mel_bins)`` array: ``mel = power_spectrum @ filters``.
    """
    return _mel_filter_bank_cached(int(num_mel_bins), int(sample_rate), int(n_fft), np.dtype(dtype)).copy()


@functools.lru_cache(maxsize=32)
def _mel_filter_bank_cached(num_mel_bins: int, sample_rate: int, n_fft: int, dtype: np.dtype) -> np.ndarray:
    num_freqs = n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, num_freqs)  # (F,)
    mel_max = _hz_to_mel_slaney(np.float64(sample_rate / 2.0))
    filter_freqs = _mel_to_hz_slaney(np.linspace(0.0, mel_max, num_mel_bins + 2))  # (M + 2,) band edges, Hz
    fdiff = np.diff(filter_freqs)  # (M + 1,)
    ramps = filter_freqs[None, :] - fft_freqs[:, None]  # (F, M + 2)
    lower = -ramps[:, :-2] / fdiff[:-1]  # rising edge of filter m, (F, M)
    upper = ramps[:, 2:] / fdiff[1:]  # falling edge of filter m, (F, M)
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(dtype)
    enorm = 2.0 / (filter_freqs[2:] - filter_freqs[:-2])  # (M,) area normalisation
    weights *= enorm[None, :]
    weights.flags.writeable = False
    return weights


def _periodic_hann(n: int) -> np.ndarray:
    """Periodic Hann window of length ``n`` (``torch.hann_window(n)``, ``np.hanning(n + 1)[:-1]``)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n, dtype=np.float64) / n)


def num_frames(num_samples: int | jax.Array, hop_length: int = 160) -> int | jax.Array:
    """Number of log-mel frames :func:`log_mel_spectrogram` returns for ``num_samples`` samples.

    ``num_samples // hop_length`` (the centred STFT gives one more frame, which Whisper drops). Works on a
    Python int or elementwise on an integer array.
    """
    return num_samples // hop_length


def frame_mask(
    num_samples_b: jax.Array, total_frames: int, hop_length: int = 160, downsample: int = 1
) -> jax.Array:
    """Which frames of a zero-padded batch contain real audio.

    Rounding rule. Mel frame ``t`` is centred on sample ``t * hop_length`` and stands for the hop cell
    ``[t * hop_length, (t + 1) * hop_length)``; it is valid iff that cell overlaps the real audio
    ``[0, L)``, i.e. iff ``t * hop_length < L``, so ``ceil(L / hop_length)`` leading mel frames are valid
    (the same rule as ``WhisperFeatureExtractor``'s ``attention_mask[:, ::hop_length]``). Note this is one
    more than ``num_frames(L)`` when ``hop_length`` does not divide ``L``: on a zero-padded input the frame
    centred at ``(L // hop_length) * hop_length < L`` still covers real audio.

    With ``downsample = d`` (a stride-``d`` conv over time, e.g. Whisper's stride-2 encoder conv, kernel 3,
    padding 1), output frame ``j`` stands for mel frames ``[j * d, (j + 1) * d)`` and is valid iff any of them
    is, so ``ceil(ceil(L / hop_length) / d) = ceil(L / (hop_length * d))`` frames are valid. The output has
    ``ceil(total_frames / d)`` frames, the length of that conv's output (``total_frames // d`` when ``d``
    divides ``total_frames``, e.g. 3000 -> 1500).

    Args:
        num_samples_b: ``(batch,)`` integer true lengths of the clips, in samples.
        total_frames: static number of mel frames of the padded batch (``num_frames(padded_samples)``).
        hop_length: samples per mel frame.
        downsample: static time stride applied after the frontend (1 = mel frames themselves).

    Returns:
        ``(batch, ceil(total_frames / downsample))`` bool, True on frames that overlap real audio.
    """
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    num_samples_b = jnp.asarray(num_samples_b)
    step = hop_length * downsample
    n_valid_b = (num_samples_b.astype(jnp.int32) + (step - 1)) // step  # ceil(L / (hop * d)), (batch,)
    n_out = -(-total_frames // downsample)
    return jnp.arange(n_out, dtype=jnp.int32)[None, :] < n_valid_b[:, None]


def log_mel_spectrogram(
    waveform_bs: jax.Array,
    num_mel_bins: int = 80,
    n_fft: int = 400,
    hop_length: int = 160,
    sample_rate: int = 16000,
) -> jax.Array:
    """Whisper log-mel spectrogram of a batch of waveforms, jit-friendly (all shapes static).

    Args:
        waveform_bs: ``(batch, num_samples)`` float waveform at ``sample_rate``, shorter clips zero-padded on
            the right (see the module docstring). Computed in float32 whatever the input dtype.
        num_mel_bins: number of mel bins (80 for Whisper up to v2, 128 for v3).
        n_fft: STFT window and FFT size.
        hop_length: STFT hop in samples.
        sample_rate: sample rate in Hz (sets the filterbank).

    Returns:
        ``(batch, num_samples // hop_length, num_mel_bins)`` float32, time-major, normalised as in Whisper
        (values in ``[(max - 8 + 4) / 4, (max + 4) / 4]`` per example).
    """
    if waveform_bs.ndim != 2:
        raise ValueError(f"waveform_bs must be (batch, num_samples), got shape {waveform_bs.shape}")
    num_samples = waveform_bs.shape[1]
    n_frames = num_frames(num_samples, hop_length)
    if n_frames < 1:
        raise ValueError(f"need at least hop_length={hop_length} samples, got {num_samples}")
    pad = n_fft // 2
    if num_samples <= pad:
        raise ValueError(f"reflect padding needs num_samples > n_fft // 2 = {pad}, got {num_samples}")

    x = jnp.asarray(waveform_bs, jnp.float32)
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")  # (B, S + 2 * pad)

    # Framing without a gather: cut the padded signal into hop-sized chunks; frame t is the concatenation of
    # chunks t, t + 1, ..., t + k - 1 truncated to n_fft samples (k = ceil(n_fft / hop)). The loop is over
    # the k chunk offsets, not over frames. Needed samples: (n_frames + k - 1) * hop <= S + n_fft - 1.
    k = -(-n_fft // hop_length)
    n_chunks = n_frames + k - 1
    chunks = x[:, : n_chunks * hop_length].reshape(x.shape[0], n_chunks, hop_length)  # (B, C, hop)
    frames = jnp.concatenate([chunks[:, i : i + n_frames] for i in range(k)], axis=-1)[
        ..., :n_fft
    ]  # (B, T, N)

    window = jnp.asarray(_periodic_hann(n_fft), jnp.float32)
    spec = jnp.fft.rfft(frames * window, n=n_fft, axis=-1)  # (B, T, n_fft // 2 + 1) complex64
    power = jnp.square(spec.real) + jnp.square(spec.imag)

    filters = jnp.asarray(_mel_filter_bank_cached(num_mel_bins, sample_rate, n_fft, np.dtype(np.float32)))
    # HIGHEST: keep a true float32 matmul on accelerators (default TPU/TF32 precision breaks the 1e-4 match).
    mel = jnp.matmul(power, filters, precision=jax.lax.Precision.HIGHEST)  # (B, T, M)

    log_spec = jnp.log10(jnp.maximum(mel, _LOG_FLOOR))
    log_spec = jnp.maximum(log_spec, jnp.max(log_spec, axis=(1, 2), keepdims=True) - _DYNAMIC_RANGE)
    return (log_spec + 4.0) / 4.0
