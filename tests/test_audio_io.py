"""Audio input: decoding wav/flac/ogg/mp3 with libsndfile, resampling, down-mix, segments, crop/pad
with a mask, windows. References: sines written from their definition, scipy's polyphase resampler."""

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from slit.data import audio_io

CHECKS = audio_io.AudioChecks(sample_rate=16000)


def sine(freq, rate, seconds, amplitude=0.5, phase=0.0):
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def dominant_hz(x, rate):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()]


def test_resample_matches_the_analytic_sine_and_scipy():
    for src_rate in (44100, 48000, 22050, 8000):
        x = sine(440.0, src_rate, 1.0)
        y = audio_io.resample(x, src_rate, 16000)
        assert abs(len(y) - 16000) <= 1
        want = sine(440.0, 16000, 1.0)
        mid = slice(800, 15200)  # away from the filters' edge transients
        np.testing.assert_allclose(y[mid], want[mid], atol=2e-3)
        up, down = 16000, src_rate
        g = np.gcd(up, down)
        reference = signal.resample_poly(x.astype(np.float64), up // g, down // g)
        np.testing.assert_allclose(y[mid], reference[mid], atol=2e-3)
    same = sine(440.0, 16000, 0.5)
    np.testing.assert_array_equal(audio_io.resample(same, 16000, 16000), same)


@pytest.mark.parametrize(
    "fmt,subtype,lossless",
    [
        ("wav", "PCM_16", True),
        ("flac", "PCM_16", True),
        ("ogg", "VORBIS", False),
        ("mp3", "MPEG_LAYER_III", False),
    ],
)
def test_decodes_each_format_to_mono_at_the_target_rate(tmp_path, fmt, subtype, lossless):
    rate = 44100
    left, right = sine(440.0, rate, 1.0, 0.6), sine(440.0, rate, 1.0, 0.2)
    path = tmp_path / f"tone.{fmt}"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype=subtype)
    clip = audio_io.read_clip(path, CHECKS)
    assert clip.source_rate == rate and clip.source_channels == 2 and clip.repairs == []
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert abs(len(clip.samples) - 16000) <= (1 if lossless else 1600)  # mp3 frames pad the end
    want = sine(440.0, 16000, 1.0, 0.4)  # the mean of the two channels
    if lossless:
        np.testing.assert_allclose(clip.samples[800:15200], want[800:15200], atol=2e-3)
    else:
        assert abs(dominant_hz(clip.samples[:16000], 16000) - 440.0) < 3.0
        rms = np.sqrt(np.mean(clip.samples[2000:14000] ** 2))
        assert abs(rms - 0.4 / np.sqrt(2)) < 0.03


def test_segment_start_and_end_are_read_exactly(tmp_path):
    ramp = (np.arange(16000 * 3) % 30000 - 15000).astype(np.int16)  # sample i holds a known value
    path = tmp_path / "ramp.wav"
    sf.write(path, ramp, 16000, subtype="PCM_16")
    clip = audio_io.read_clip(path, CHECKS, start_s=0.5, end_s=1.25)
    np.testing.assert_array_equal(audio_io.to_pcm16(clip.samples), ramp[8000:20000])  # bit-exact
    tail = audio_io.read_clip(path, CHECKS, start_s=2.0, end_s=9.0)  # end past the file: cut there
    assert len(tail.samples) == 16000 and [r for r, _ in tail.repairs] == ["bad_segment"]
    with pytest.raises(audio_io.BadAudio) as bad:
        audio_io.read_clip(path, CHECKS, start_s=5.0)
    assert bad.value.reason == "bad_segment"


def test_pcm16_round_trip():
    x = np.array([-1.0, -0.5, 0.0, 0.25, 1.0, 1.5], np.float32)
    pcm = audio_io.to_pcm16(x)
    assert pcm.dtype == np.int16 and list(pcm[[0, 4, 5]]) == [-32768, 32767, 32767]
    np.testing.assert_array_equal(audio_io.from_pcm16(pcm)[:4], x[:4])  # one scale both ways: exact
    every_value = np.arange(-32768, 32768).astype(np.int16)
    np.testing.assert_array_equal(audio_io.to_pcm16(audio_io.from_pcm16(every_value)), every_value)


def test_crop_or_pad_with_mask_deterministic_for_eval_seeded_for_training():
    audio = np.arange(100, dtype=np.float32)
    short, mask = audio_io.crop_or_pad(audio[:30], 50)
    assert short.shape == (50,) and mask.tolist() == [True] * 30 + [False] * 20
    np.testing.assert_array_equal(short[:30], audio[:30])
    assert not short[30:].any()
    first, mask = audio_io.crop_or_pad(audio, 50)  # evaluation: from the start
    np.testing.assert_array_equal(first, audio[:50])
    assert mask.all()
    crops = []
    for seed in range(30):
        a, _ = audio_io.crop_or_pad(audio, 50, np.random.default_rng(seed))
        b, _ = audio_io.crop_or_pad(audio, 50, np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)  # same seed, same crop
        start = int(a[0])
        np.testing.assert_array_equal(a, audio[start : start + 50])  # a contiguous piece of the clip
        crops.append(start)
    assert len(set(crops)) > 10 and min(crops) >= 0 and max(crops) <= 50


def test_windows_cover_long_clips():
    audio = np.arange(250, dtype=np.float32) + 1
    windows, lengths = audio_io.split_windows(audio, 100)
    assert windows.shape == (3, 100) and lengths.tolist() == [100, 100, 50]
    np.testing.assert_array_equal(
        np.concatenate([w[:n] for w, n in zip(windows, lengths, strict=True)]), audio
    )
    assert not windows[2, 50:].any()
    overlapped, lengths = audio_io.split_windows(audio, 100, hop=50)
    assert len(overlapped) == audio_io.num_windows(250, 100, 50) == 4
    for k, (w, n) in enumerate(zip(overlapped, lengths, strict=True)):
        np.testing.assert_array_equal(w[:n], audio[50 * k : 50 * k + n])
    assert overlapped[-1, lengths[-1] - 1] == audio[-1]  # the end is covered
    single, lengths = audio_io.split_windows(audio[:40], 100)
    assert single.shape == (1, 100) and lengths.tolist() == [40]
