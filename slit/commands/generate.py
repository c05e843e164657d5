"""`slit generate --workdir DIR --audio FILE.wav --prompt "Describe the sound."`: a stage-two run answers.

Loads the run's newest checkpoint (or `--step`), or an exported bundle (`--bundle DIR`, from
`slit export --format bundle`), decodes the audio file as the data pipeline does (mono, resampled to
the run's sample rate, the first `data.max_seconds` seconds, zero-padded), and prints the model's answer
to the prompt on stdout. Several `--audio` files and several `--prompt`s are answered pair by pair with
one load (a block per file); `--json OUT` also writes them as [{"audio", "answers": {prompt: answer}}].
Decoding follows the run's `eval` settings; any of
`--max-new-tokens`, `--num-beams` (alias `--beams`), `--temperature`, `--top-k`, `--top-p`,
`--repetition-penalty`, `--length-penalty` overrides them (temperature / top-k / top-p turn sampling on;
`--seed` fixes its draws).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from slit.errors import UserError

if TYPE_CHECKING:
    from etils import epath

HELP = "answer a prompt about an audio file with a trained stage-two run"
JOINS_MULTI_PROCESS_RUNS = True  # one process per host (slit/train/distributed.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="the stage-two run's directory")
    model.add_argument("--bundle", help="a stage-two bundle directory (slit export --format bundle)")
    parser.add_argument(
        "--audio", required=True, action="append", help="an audio file (wav, flac, ogg, mp3...); repeatable"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help='the instruction or question (default "describe the sound."); repeatable',
    )
    parser.add_argument("--json", default=None, help="also write the answers to this JSON file")
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--num-beams", "--beams", dest="num_beams", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="> 0 turns sampling on; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=None, help="turns sampling on")
    parser.add_argument("--top-p", type=float, default=None, help="turns sampling on")
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--length-penalty", type=float, default=None, help="beam search only")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling draws")


def check_inputs(workdir: str, audio: str) -> tuple[epath.Path, pathlib.Path]:
    """Fails fast, before anything heavy loads, on a missing workdir (a local path or gs://...), config,
    checkpoint or audio file."""
    from slit import paths

    run, clip = paths.workdir_path(workdir), pathlib.Path(audio)
    if not run.is_dir():
        raise UserError(
            f"--workdir {run}: no such directory; give the workdir of a stage-two `slit train` run"
        )
    if not (run / "config.json").is_file():
        raise UserError(f"--workdir {run}: no config.json in it; is it a `slit train` workdir?")
    checkpoints = run / "checkpoints"
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        raise UserError(f"--workdir {run}: no checkpoint in {checkpoints} yet; train the run first")
    check_audio(clip)
    return run, clip


def check_audio(clip: pathlib.Path) -> None:
    if not clip.is_file():
        raise UserError(f"--audio {clip}: no such file")


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
    from slit.train import distributed

    with distributed.only_process_0_prints(stderr=True):  # every process generates alike; process 0 answers
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    prompts = args.prompt or ["describe the sound."]
    if any(not p.strip() for p in prompts):
        raise UserError("a --prompt is empty; ask something, e.g. --prompt 'describe the sound.'")
    clips = [pathlib.Path(a) for a in args.audio]
    if args.workdir:
        workdir, _ = check_inputs(args.workdir, args.audio[0])
    for clip in clips:
        check_audio(clip)

    import json

    import numpy as np

    from slit import export, runs
    from slit.generate.answerer import generation_config

    if args.workdir:
        trained, source = runs.load_trained(workdir, args.step), str(workdir)
    else:
        trained, source = export.load_bundle(args.bundle).model, str(args.bundle)
        if not isinstance(trained, runs.TrainedRun):
            raise UserError(f"--bundle {args.bundle} is a stage-one bundle; generate needs a stage-two one")
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
    results = []
    for clip in clips:
        audio, num_samples, seconds = read_audio(clip, spec.sample_rate, spec.max_samples)
        if seconds > spec.max_samples / spec.sample_rate:
            print(
                f"note: {clip} lasts {seconds:.1f} s; the run listens to its first "
                f"{spec.max_samples / spec.sample_rate:g} s (data.max_seconds)",
                file=sys.stderr,
            )
        batch = np.repeat(np.asarray(audio)[None], len(prompts), axis=0)
        answers = trained.answer(batch, np.full((len(prompts),), num_samples, np.int32), list(prompts), gen)
        results.append({"audio": str(clip), "answers": dict(zip(prompts, answers, strict=True))})
    print(f"(checkpoint step {trained.step} of {source})", file=sys.stderr)
    if len(clips) == 1 and len(prompts) == 1:
        print(results[0]["answers"][prompts[0]])
    else:
        for item in results:
            print(item["audio"])
            for prompt, answer in item["answers"].items():
                print(f"  {prompt} -> {answer}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0
