"""`slit bench frontend`: Whisper log-mel throughput, slit's JAX frontend vs transformers'
`WhisperFeatureExtractor`, on the same audio in the same run.

For each batch size (default 1 and 16) a batch of `--seconds`-long clips (tones, chirps and noise at
16 kHz) is turned into `--mel-bins` log-mel features:

- slit: `slit.models.audio.frontend.log_mel_spectrogram`, jitted, on the default JAX device. Timed on
  device-resident input (as it runs inside the train step); the host-to-device copy is timed apart.
  The first call's extra time over the median is reported as compile time.
- transformers: `WhisperFeatureExtractor(...)(clips, sampling_rate=16000, padding="longest")` (the
  clips' own length, like slit's; 30 s is Whisper's chunk either way), which uses PyTorch's STFT
  when torch is installed (its default; PyTorch's thread count is left as is) and NumPy otherwise; the
  NumPy path is also timed on one clip.

Reported per side: seconds per call (best, median, all), audio-seconds per second (batch * seconds /
best), and the speedup (transformers' best / slit's best). Goal: 10x. The outputs are compared too
(max abs difference over the batch: float32 rounding, ~1e-4 on 30 s clips).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

HELP = "Whisper log-mel throughput: slit's JAX frontend vs transformers WhisperFeatureExtractor (goal 10x)"
SPEEDUP_GOAL = 10.0
SAMPLE_RATE = 16000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length (Whisper's window: 30)")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--mel-bins", type=int, default=80, choices=(80, 128))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side and batch size")


def test_audio(batch: int, seconds: float, seed: int = 0) -> np.ndarray:
    """(batch, seconds * 16 kHz) float32: a tone, a chirp and noise at different levels per clip."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    clips = []
    for _ in range(batch):
        f0, f1 = rng.uniform(100, 2000, 2)
        chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-3))))
        tone = np.sin(2 * np.pi * rng.uniform(50, 4000) * t)
        clips.append(0.3 * chirp + 0.1 * tone + rng.uniform(0.001, 0.05) * rng.standard_normal(t.size))
    return np.asarray(clips, np.float32)


def run(args: argparse.Namespace) -> dict:
    import jax
    import transformers
    from transformers.utils import is_torch_available

    from slit.bench import common
    from slit.models.audio import frontend

    extractor = transformers.WhisperFeatureExtractor(feature_size=args.mel_bins)
    log_mel = jax.jit(lambda x: frontend.log_mel_spectrogram(x, num_mel_bins=args.mel_bins))
    results = []
    for batch in [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]:
        audio = test_audio(batch, args.seconds)
        clips = list(audio)
        device_audio = jax.device_put(audio)
        start = time.perf_counter()
        ours = np.asarray(log_mel(device_audio).block_until_ready())
        first_call = time.perf_counter() - start
        slit_times = common.time_call(lambda x=device_audio: log_mel(x).block_until_ready(), args.repeats)
        transfer = common.time_call(lambda x=audio: jax.device_put(x).block_until_ready(), args.repeats)

        def reference(clips: list[np.ndarray] = clips) -> np.ndarray:
            return extractor(
                clips, sampling_rate=SAMPLE_RATE, padding="longest", truncation=False, return_tensors="np"
            ).input_features

        theirs = reference()
        hf_times = common.time_call(reference, args.repeats)
        frames = min(ours.shape[1], theirs.shape[2])
        audio_seconds = batch * args.seconds
        results.append(
            {
                "batch_size": batch,
                "audio_seconds": audio_seconds,
                "slit": dict(
                    slit_times,
                    audio_seconds_per_second=audio_seconds / slit_times["best_s"],
                    compile_s=max(first_call - slit_times["median_s"], 0.0),
                    host_to_device_best_s=transfer["best_s"],
                ),
                "transformers": dict(hf_times, audio_seconds_per_second=audio_seconds / hf_times["best_s"]),
                "speedup_best": hf_times["best_s"] / slit_times["best_s"],
                "speedup_median": hf_times["median_s"] / slit_times["median_s"],
                "speedup_with_transfer": hf_times["best_s"] / (slit_times["best_s"] + transfer["best_s"]),
                "max_abs_diff": float(
                    np.abs(ours[:, :frames] - np.transpose(theirs, (0, 2, 1))[:, :frames]).max()
                ),
            }
        )
    one = test_audio(1, args.seconds)
    numpy_times = common.time_call(
        lambda: extractor._np_extract_fbank_features(one, "cpu"), max(1, args.repeats // 2)
    )
    best = max(r["speedup_best"] for r in results)
    return {
        "method": __doc__.split("\n\n", 1)[1].strip(),
        "seconds_per_clip": args.seconds,
        "mel_bins": args.mel_bins,
        "transformers_backend": "torch" if is_torch_available() else "numpy",
        "transformers_version": transformers.__version__,
        "results": results,
        "transformers_numpy_one_clip": dict(
            numpy_times, audio_seconds_per_second=args.seconds / numpy_times["best_s"]
        ),
        "goal": f">= {SPEEDUP_GOAL:g}x",
        "best_speedup": best,
        "goal_met": best >= SPEEDUP_GOAL,
    }
