"""CLAP's log-mel frontend (transformers' `ClapFeatureExtractor`, non-fusion input) in JAX.

For each clip (its first `num_samples` samples of a zero-padded batch):

1. **Fit to `max_length_s` seconds** (`max_samples = max_length_s * sample_rate`, 480 000 at the defaults),
   as the extractor's `padding` mode does for a clip shorter than that: `"repeatpad"` (its default) tiles the
   clip `max_samples // num_samples` whole times and zero-pads the rest; `"repeat"` tiles it and cuts it to
   `max_samples`; `"pad"` zero-pads. A clip of exactly `max_samples` is taken as is. Longer clips are not
   taken (the extractor crops them at random); the tower refuses a batch longer than `max_samples`, and
   slit's config checks keep `data.max_seconds` (or `audio_encoder.window_seconds`) within `max_length_s`.
2. **STFT**: periodic Hann window of `n_fft` (1024), centred frames (reflect padding of `n_fft // 2`)
   every `hop_length` (480) samples: `max_samples // hop_length + 1` frames (1001), power spectrum. The
   DFT is a float32 matmul with a float64-built basis, not an FFT (closer to transformers' float64).
3. **Mel**: the extractor's filter bank, chosen as it chooses by its `truncation` mode. `"fusion"` (the
   extractor's default): HTK mel scale, no normalisation (torchaudio's default filters); `"rand_trunc"`:
   Slaney mel scale with Slaney area normalisation (librosa's default filters). Either with `num_mel_bins`
   (64) filters between `fmin` (0 Hz) and `fmax` (14 kHz), FFT bins at `linspace(0, sample_rate // 2)`
   (`mel_sample_rate`, when set, designs the filters for that rate instead: a torchlibrosa extractor built
   for one rate and fed audio at another, as Pengi's HTSAT may be, applies such a bank).
4. **dB**: `10 * log10(max(mel, 1e-10))`; no `top_db` clipping (the extractor never applies it).

Output (B, frames, num_mel_bins) float32, time-major: `input_features[:, 0]` of the extractor's output.
(With `truncation="fusion"` the extractor stacks four identical copies of this mel for a clip that is not
longer than `max_length_s`: a fusion model's input; slit's non-fusion HTSAT reads one.) transformers
computes in float64; this runs in float32 (the mel matmul at HIGHEST precision): within 1e-4 dB of it
where a mel value is within 60 dB of its frame's loudest, while deeper spectral notches carry float32
rounding of the loud bins (up to ~2e-4 dB seen; tests/test_parity_htsat.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from slit.models.audio.frontend import _hz_to_mel_slaney, _mel_to_hz_slaney, _periodic_hann

__all__ = [
    "PADDING_MODES",
    "TRUNCATION_MODES",
    "ClapFrontendConfig",
    "clap_log_mel",
    "clap_mel_filters",
    "fit",
]

PADDING_MODES = ("repeatpad", "repeat", "pad")
TRUNCATION_MODES = ("fusion", "rand_trunc")  # which filter bank (see the module docstring)
_FLOOR = 1e-10  # mel floor and dB floor of transformers' `spectrogram` / `power_to_db`


@dataclasses.dataclass(frozen=True)
class ClapFrontendConfig:
    """The `ClapFeatureExtractor` settings that shape the mel. Defaults are the extractor's (laion CLAP)."""

    sample_rate: int = 48000  # `sampling_rate`
    n_fft: int = 1024  # `fft_window_size`
    hop_length: int = 480
    num_mel_bins: int = 64  # `feature_size`
    fmin: float = 0.0  # `frequency_min`
    fmax: float = 14000.0  # `frequency_max`
    max_length_s: int = 10
    truncation: str = "fusion"  # picks the filter bank: "fusion" HTK, "rand_trunc" Slaney
    padding: str = "repeatpad"  # how a shorter clip is fitted to max_length_s
    # The rate the mel filters are designed for (0: sample_rate). slit's own key in preprocessor_config.json
    # (`slit_mel_sample_rate`; transformers' extractor does not read it).
    mel_sample_rate: int = 0

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation {self.truncation!r} is not one of {list(TRUNCATION_MODES)}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding {self.padding!r} is not one of {list(PADDING_MODES)}")
        if self.mel_sample_rate < 0:
            raise ValueError(
                f"mel_sample_rate {self.mel_sample_rate} must be 0 (sample_rate) or a rate in Hz"
            )
        if self.max_samples <= self.n_fft // 2:
            raise ValueError(
                f"max_length_s {self.max_length_s} at {self.sample_rate} Hz is shorter than half the FFT "
                f"window ({self.n_fft} samples)"
            )

    @property
    def max_samples(self) -> int:
        """Samples every clip is fitted to (`nb_max_samples`)."""
        return int(self.max_length_s * self.sample_rate)

    @property
    def num_frames(self) -> int:
        """Mel frames of a fitted clip: `max_samples // hop_length + 1` (1001 at the defaults)."""
        return self.max_samples // self.hop_length + 1


def _hz_to_mel(freq: np.ndarray, scale: str) -> np.ndarray:
    """HTK's mel scale, or Slaney's (the Whisper frontend's)."""
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + np.asarray(freq, np.float64) / 700.0)
    return _hz_to_mel_slaney(freq)


def _mel_to_hz(mels: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (np.power(10.0, np.asarray(mels, np.float64) / 2595.0) - 1.0)
    return _mel_to_hz_slaney(mels)


@functools.lru_cache(maxsize=8)
def _filters_cached(config: ClapFrontendConfig) -> np.ndarray:
    scale = "htk" if config.truncation == "fusion" else "slaney"
    num_bins = config.n_fft // 2 + 1
    mels = np.linspace(
        _hz_to_mel(config.fmin, scale), _hz_to_mel(config.fmax, scale), config.num_mel_bins + 2
    )
    edges = _mel_to_hz(mels, scale)  # (M + 2,) Hz
    design_rate = config.mel_sample_rate or config.sample_rate
    fft_freqs = np.linspace(0, design_rate // 2, num_bins)  # (K,) the bins' frequencies as designed
    diff = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # (K, M + 2)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))  # (K, M)
    if scale == "slaney":
        filters = filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]
    filters.flags.writeable = False
    return filters


def clap_mel_filters(config: ClapFrontendConfig) -> np.ndarray:
    """(n_fft // 2 + 1, num_mel_bins) float64: transformers' `mel_filter_bank` as `ClapFeatureExtractor`
    builds it for `config.truncation` (`mel = power @ filters`)."""
    return _filters_cached(config).copy()


@functools.lru_cache(maxsize=8)
def _dft_cached(n_fft: int) -> np.ndarray:
    """(n_fft, 2K) float32: the periodic Hann window times the real and imaginary rfft bases, built in
    float64. A float32 matmul with it is closer to transformers' float64 STFT than XLA's float32 FFT (whose
    error, relative to a frame's loudest bin, reaches 1e-4 dB in quiet mel bins)."""
    n = np.arange(n_fft)
    window = _periodic_hann(n_fft)
    angle = 2.0 * np.pi * np.outer(n, np.arange(n_fft // 2 + 1)) / n_fft
    basis = np.concatenate([window[:, None] * np.cos(angle), -window[:, None] * np.sin(angle)], axis=1)
    basis = basis.astype(np.float32)
    basis.flags.writeable = False
    return basis


def fit(waveform_bs: jax.Array, num_samples_b: jax.Array, length: int, padding: str) -> jax.Array:
    """Each clip's first `num_samples` samples fitted to `length` samples by `padding` (module docstring,
    step 1). (B, S) with S <= length, (B,) int -> (B, length) float32; a clip of 0 samples gives zeros."""
    batch, samples = waveform_bs.shape
    if samples > length:
        raise ValueError(f"clips of {samples} samples are longer than the frontend's {length}")
    x = jnp.pad(waveform_bs.astype(jnp.float32), ((0, 0), (0, length - samples)))
    n = jnp.clip(num_samples_b.astype(jnp.int32), 0, samples)[:, None]  # (B, 1)
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]
    safe = jnp.maximum(n, 1)
    if padding == "pad":
        source, keep = jnp.broadcast_to(idx, (batch, length)), idx < n
    elif padding == "repeat":
        source, keep = idx % safe, n > 0
    elif padding == "repeatpad":
        source, keep = idx % safe, idx < (length // safe) * n
    else:
        raise ValueError(f"padding {padding!r} is not one of {list(PADDING_MODES)}")
    return jnp.where(keep, jnp.take_along_axis(x, source, axis=1), 0.0)


def clap_log_mel(waveform_bs: jax.Array, num_samples_b: jax.Array, config: ClapFrontendConfig) -> jax.Array:
    """CLAP log-mel (dB) of a zero-padded batch, jit-friendly (all shapes static).

    Args:
      waveform_bs: (B, S) float at `config.sample_rate`, S <= `config.max_samples`, zero-padded after
        each clip.
      num_samples_b: (B,) int, each clip's length in samples.
      config: the extractor's settings.

    Returns:
      (B, config.num_frames, config.num_mel_bins) float32, as `ClapFeatureExtractor` computes for the
      clip `waveform_bs[b, :num_samples_b[b]]` (module docstring).
    """
    x = fit(waveform_bs, num_samples_b, config.max_samples, config.padding)  # (B, L)
    pad = config.n_fft // 2
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    starts = np.arange(config.num_frames) * config.hop_length
    frames = x[:, starts[:, None] + np.arange(config.n_fft)[None, :]]  # (B, T, n_fft)
    spec = jnp.matmul(frames, jnp.asarray(_dft_cached(config.n_fft)), precision=jax.lax.Precision.HIGHEST)
    num_bins = config.n_fft // 2 + 1
    power = jnp.square(spec[..., :num_bins]) + jnp.square(spec[..., num_bins:])  # (B, T, K)
    filters = jnp.asarray(_filters_cached(config), jnp.float32)
    mel = jnp.matmul(power, filters, precision=jax.lax.Precision.HIGHEST)  # (B, T, M)
    return 10.0 * jnp.log10(jnp.maximum(mel, _FLOOR))
