"""`slit generate --workdir DIR --audio FILE.wav --prompt "Describe the sound."`: a stage-two run answers.

Loads the run's newest checkpoint (or `--step`), decodes the audio file as the data pipeline does
(mono, resampled to the run's sample rate, the first `data.max_seconds` seconds, zero-padded), and
prints the model's answer to the prompt on stdout. Decoding follows the run's `eval` settings; any of
`--max-new-tokens`, `--num-beams` (alias `--beams`), `--temperature`, `--top-k`, `--top-p`,
`--repetition-penalty`, `--length-penalty` overrides them (temperature / top-k / top-p turn sampling on;
`--seed` fixes its draws).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from slit.errors import UserError

HELP = "answer a prompt about an audio file with a trained stage-two run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="the stage-two run's directory")
    parser.add_argument("--audio", required=True, help="an audio file (wav, flac, ogg, mp3...)")
    parser.add_argument("--prompt", default="describe the sound.", help="the instruction or question")
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--num-beams", "--beams", dest="num_beams", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="> 0 turns sampling on; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=None, help="turns sampling on")
    parser.add_argument("--top-p", type=float, default=None, help="turns sampling on")
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--length-penalty", type=float, default=None, help="beam search only")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling draws")


def check_inputs(workdir: str, audio: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Fails fast, before anything heavy loads, on a missing workdir, config, checkpoint or audio file."""
    run, clip = pathlib.Path(workdir), pathlib.Path(audio)
    if not run.is_dir():
        raise UserError(
            f"--workdir {run}: no such directory; give the workdir of a stage-two `slit train` run"
        )
    if not (run / "config.json").is_file():
        raise UserError(f"--workdir {run}: no config.json in it; is it a `slit train` workdir?")
    checkpoints = run / "checkpoints"
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise UserError(f"--workdir {run}: no checkpoint in {checkpoints} yet; train the run first")
    if not clip.is_file():
        raise UserError(f"--audio {clip}: no such file")
    return run, clip


def read_audio(path: pathlib.Path, sample_rate: int, max_samples: int) -> tuple[object, int, float]:
    """(float32 (max_samples,) zero-padded audio, real samples, the file's length in seconds)."""
    from slit.data import audio_io

    try:
        clip = audio_io.read_clip(
            path, audio_io.AudioChecks(sample_rate=sample_rate, max_seconds=1e9, silence_dbfs=-1e9)
        )
    except audio_io.BadAudio as e:
        raise UserError(f"--audio {path}: {e}") from None
    audio, mask = audio_io.crop_or_pad(clip.samples, max_samples)
    return audio, int(mask.sum()), len(clip.samples) / sample_rate


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    workdir, audio_path = check_inputs(args.workdir, args.audio)
    if not args.prompt.strip():
        raise UserError("--prompt is empty; ask something, e.g. --prompt 'describe the sound.'")

    import numpy as np

    from slit import runs
    from slit.generate.answerer import generation_config

    trained = runs.load_trained(workdir, args.step)
    spec = trained.spec
    gen = generation_config(
        trained.config,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        length_penalty=args.length_penalty,
        seed=args.seed,
    )
    audio, num_samples, seconds = read_audio(audio_path, spec.sample_rate, spec.max_samples)
    if seconds > spec.max_samples / spec.sample_rate:
        print(
            f"note: {audio_path} lasts {seconds:.1f} s; the run listens to its first "
            f"{spec.max_samples / spec.sample_rate:g} s (data.max_seconds)",
            file=sys.stderr,
        )
    answers = trained.answer(np.asarray(audio)[None], np.asarray([num_samples], np.int32), [args.prompt], gen)
    print(f"(checkpoint step {trained.step} of {workdir})", file=sys.stderr)
    print(answers[0])
    return 0
