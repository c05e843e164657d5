"""Audio in: decoding (wav, flac, ogg, mp3 through libsndfile), checks, repairs, resampling, mono
down-mix; and audio laid out for a batch: crop/pad with a mask, windows over long clips.

`read_clip` is what dataset builders call for every file. It either returns float32 mono audio at the
target rate, with a list of the repairs it made, or raises `BadAudio` with a reason code. What
happens to each kind of bad input (the `AudioChecks` defaults):

| input                                   | reason code        | action                                  |
|-----------------------------------------|--------------------|-----------------------------------------|
| file does not exist                     | missing_file       | skipped                                 |
| libsndfile cannot open or decode it     | unreadable         | skipped                                 |
| fewer samples than its header declares  | truncated          | skipped                                 |
| no samples at all                       | empty_audio        | skipped                                 |
| shorter than `min_seconds`              | too_short          | skipped                                 |
| longer than `max_seconds`               | too_long           | skipped (or cut, `too_long="truncate"`) |
| more than 2 channels                    | many_channels      | repaired: averaged to mono              |
| NaN/Inf in up to 1% of the samples      | nonfinite_repaired | repaired: those samples set to 0        |
| NaN/Inf in more than 1% of the samples  | nonfinite          | skipped                                 |
| float samples beyond +-1                | out_of_range       | repaired: scaled to a peak of 1         |
| peak below `silence_dbfs` (all silent)  | silent             | skipped                                 |
| start/end outside the file              | bad_segment        | skipped (end past the file: cut there)  |

Mono and stereo files are averaged to mono without comment (that is not a repair).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re

import numpy as np
import soundfile as sf
import soxr

INT16_SCALE = 32768.0
EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".oga", ".mp3")
"""Audio file extensions the builders look for (anything libsndfile reads is accepted in a manifest)."""

_COMPRESSED_TRUNCATION_RATIO = 0.95  # decoded < 95% of the frames an mp3/ogg header declares: truncated


class BadAudio(Exception):  # noqa: N818 (a verdict on a file, not a program error)
    """A clip that cannot be used; `reason` is a short code (see the module docstring)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class AudioChecks:
    """Build-time decoding settings: the target rate and the bounds that make a clip bad."""

    sample_rate: int = 16000
    min_seconds: float = 0.1
    max_seconds: float = 600.0
    too_long: str = "skip"  # or "truncate": keep the first max_seconds
    silence_dbfs: float = -80.0  # a clip whose peak is below this is silent
    max_nonfinite_fraction: float = 0.01  # up to this fraction of NaN/Inf samples are zeroed

    def __post_init__(self) -> None:
        if self.too_long not in ("skip", "truncate"):
            raise ValueError(f"too_long={self.too_long!r}: use 'skip' or 'truncate'")
        if self.sample_rate <= 0 or self.max_seconds <= self.min_seconds:
            raise ValueError(f"bad audio checks {self}: need sample_rate > 0 and max_seconds > min_seconds")


@dataclasses.dataclass
class Clip:
    """Decoded audio: float32 mono `samples` (n,) at the target rate, and what was done to it."""

    samples: np.ndarray
    source_rate: int
    source_channels: int
    repairs: list[tuple[str, str]]  # (reason code, what was done)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resamples (n,) float audio with soxr (high quality, linear phase) -> float32 (m,), m ~ n*to/from."""
    audio = np.asarray(audio, np.float32)
    if from_rate == to_rate or len(audio) == 0:
        return audio
    return soxr.resample(audio, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(n,) or (n, channels) -> (n,): the mean over channels."""
    audio = np.asarray(audio)
    return audio if audio.ndim == 1 else audio.mean(axis=1, dtype=np.float32)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] (n,) -> int16 (n,): round(x * 32768) clipped to [-32768, 32767], the
    inverse of `from_pcm16` (libsndfile's scale), so a clip read from 16-bit PCM is stored bit-exactly."""
    scaled = np.round(np.asarray(audio, np.float64) * INT16_SCALE)
    return np.clip(scaled, -INT16_SCALE, INT16_SCALE - 1).astype(np.int16)


def from_pcm16(pcm: np.ndarray) -> np.ndarray:
    """int16 (n,) -> float32 (n,) in [-1, 1)."""
    return np.asarray(pcm).astype(np.float32) / INT16_SCALE


def _declared_wav_truncation(extra_info: str) -> str | None:
    """libsndfile's header log says `data : 64000 (should be 31978)` when a WAV's data is cut short."""
    match = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", extra_info, re.MULTILINE)
    if match is None:
        return None
    declared, actual = int(match.group(1)), int(match.group(2))
    if declared in (0, 0xFFFFFFFF) or declared <= actual:  # streamed WAVs write 0 or -1: not truncated
        return None
    return f"its header declares {declared} bytes of audio data but the file holds {actual}"


def read_clip(
    path: str | pathlib.Path, checks: AudioChecks, start_s: float | None = None, end_s: float | None = None
) -> Clip:
    """Decodes `path` (optionally the segment [start_s, end_s) seconds), checks and repairs it.

    Returns float32 mono audio at `checks.sample_rate`; raises `BadAudio` for the cases the module
    docstring lists as skipped.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise BadAudio("missing_file", f"no such file: {path}")
    try:
        with sf.SoundFile(str(path)) as f:
            rate, channels, declared_frames = f.samplerate, f.channels, f.frames
            truncation = _declared_wav_truncation(f.extra_info) if f.format in ("WAV", "WAVEX") else None
            if truncation:
                raise BadAudio("truncated", f"truncated WAV: {truncation}")
            compressed = f.format in ("MP3", "OGG")
            first = 0 if start_s is None else int(round(start_s * rate))
            last = declared_frames if end_s is None else min(int(round(end_s * rate)), declared_frames)
            if start_s is not None and (start_s < 0 or first >= declared_frames):
                raise BadAudio(
                    "bad_segment",
                    f"start={start_s} s is outside the file ({declared_frames / max(rate, 1):.2f} s long)",
                )
            if end_s is not None and end_s <= (start_s or 0.0):
                raise BadAudio("bad_segment", f"end={end_s} s is not after start={start_s or 0.0} s")
            wanted = last - first
            if wanted / rate > checks.max_seconds * 1.0001 and checks.too_long == "skip":
                raise BadAudio(
                    "too_long", f"{wanted / rate:.1f} s is longer than max_seconds={checks.max_seconds:g}"
                )
            truncate = wanted / rate > checks.max_seconds
            frames = min(wanted, int(checks.max_seconds * rate)) if truncate else wanted
            f.seek(first)
            audio = f.read(frames, dtype="float32", always_2d=True)
    except BadAudio:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise BadAudio("unreadable", f"libsndfile cannot decode it: {e}") from None

    repairs: list[tuple[str, str]] = []
    if compressed and len(audio) < _COMPRESSED_TRUNCATION_RATIO * frames:
        raise BadAudio("truncated", f"decoded {len(audio)} of the {frames} frames its header declares")
    if len(audio) == 0:
        raise BadAudio("empty_audio", "the file holds no samples")
    if truncate:
        repairs.append(("too_long", f"cut to the first max_seconds={checks.max_seconds:g} s"))
    if end_s is not None and end_s * rate > declared_frames + 1:
        repairs.append(("bad_segment", f"end={end_s} s is past the file's end; cut there"))

    bad = ~np.isfinite(audio)
    if bad.any():
        fraction = float(bad.mean())
        if fraction > checks.max_nonfinite_fraction:
            raise BadAudio("nonfinite", f"{100 * fraction:.2f}% of the samples are NaN or Inf")
        audio = np.where(bad, np.float32(0.0), audio)
        repairs.append(("nonfinite_repaired", f"{int(bad.sum())} NaN/Inf samples set to 0"))
    if channels > 2:
        repairs.append(("many_channels", f"{channels} channels averaged to mono"))
    mono = to_mono(audio)
    peak = float(np.abs(mono).max())
    if peak > 1.0:
        mono = mono / np.float32(peak)
        repairs.append(("out_of_range", f"peak {peak:.3f} > 1, scaled to 1"))
    mono = resample(mono, rate, checks.sample_rate)
    if np.abs(mono).max(initial=0.0) > 1.0:  # resampling can overshoot a full-scale signal slightly
        mono = np.clip(mono, -1.0, 1.0)
    seconds = len(mono) / checks.sample_rate
    if seconds < checks.min_seconds:
        raise BadAudio("too_short", f"{seconds:.3f} s is shorter than min_seconds={checks.min_seconds:g}")
    peak_dbfs = 20 * math.log10(max(float(np.abs(mono).max()), 1e-12))
    if peak_dbfs < checks.silence_dbfs:
        raise BadAudio(
            "silent", f"all silent: peak {peak_dbfs:.1f} dBFS is below silence_dbfs={checks.silence_dbfs:g}"
        )
    return Clip(mono, rate, channels, repairs)


# ---------------------------------------------------------------------------------------------------------
# Laying clips out for a batch.


def crop_or_pad(
    audio: np.ndarray, max_samples: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(n,) audio -> (max_samples,) float32 audio and its (max_samples,) bool mask of real samples.

    Longer clips are cropped: at a random offset drawn from `rng` (training), or from the start when
    `rng` is None (evaluation, deterministic). Shorter clips are zero-padded at the end.
    """
    audio = np.asarray(audio, np.float32)
    if len(audio) > max_samples:
        start = 0 if rng is None else int(rng.integers(0, len(audio) - max_samples + 1))
        audio = audio[start : start + max_samples]
    out = np.zeros(max_samples, np.float32)
    out[: len(audio)] = audio
    mask = np.zeros(max_samples, bool)
    mask[: len(audio)] = True
    return out, mask


def num_windows(length: int, window: int, hop: int) -> int:
    """How many windows of `window` samples, `hop` apart, cover `length` samples (at least 1)."""
    return 1 if length <= window else 1 + math.ceil((length - window) / hop)


def split_windows(audio: np.ndarray, window: int, hop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n,) audio -> (w, window) float32 windows starting every `hop` samples (default: `window`,
    no overlap) until the clip is covered, and (w,) int32 true lengths (the last one zero-padded)."""
    hop = hop or window
    audio = np.asarray(audio, np.float32)
    count = num_windows(len(audio), window, hop)
    windows = np.zeros((count, window), np.float32)
    lengths = np.zeros(count, np.int32)
    for i in range(count):
        piece = audio[i * hop : i * hop + window]
        windows[i, : len(piece)] = piece
        lengths[i] = len(piece)
    return windows, lengths
