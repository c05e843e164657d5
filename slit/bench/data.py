"""`slit bench data`: how fast the input pipeline delivers audio, and how long training waits for it.

Two measurements, in one run:

1. The training pipeline alone (slit.data.pipeline.train_dataset on the synthetic sounds, the demo's
   batch layout: 10 s at 16 kHz, 24 text tokens): batches are pulled as fast as they come, after a
   warm-up. Reported: audio-seconds delivered per wall-clock second (the real audio in the batches,
   not the padding), the CPU seconds the process spent (all its threads, from getrusage; worker
   processes' too, when psutil is installed), and audio-seconds per CPU-second: the throughput one
   CPU core gives.
2. The fraction of step time spent waiting for data in the synthetic stage-one run: `slit train`
   on configs/stage1_synthetic.py for `--train-steps` steps (evaluation off). The trainer times
   every `next(batch)` against the wall clock and logs `data_wait_fraction` per logging window; the
   first window (compilation) is left out, the others are averaged, weighted by their steps.
   Goal: under 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

HELP = "input pipeline: audio-seconds/s per CPU core, and the step time spent waiting for data"
WAIT_FRACTION_GOAL = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="slit_synthetic_sounds", help="TFDS dataset (generated if synthetic)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="TFDS data directory (default ~/tensorflow_datasets)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (the demo's: 16)")
    parser.add_argument("--batches", type=int, default=100, help="batches timed per pipeline setting")
    parser.add_argument("--workers", default="0,2", help="grain worker processes to try, comma-separated")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="clip length in a batch")
    parser.add_argument("--config", default="configs/stage1_synthetic.py", help="the stage-one run's config")
    parser.add_argument(
        "--train-steps", type=int, default=200, help="steps of the stage-one run (0: skip it)"
    )


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its live worker processes (psutil, if present)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except ImportError:
        pass
    return total


def pipeline_throughput(args: argparse.Namespace, worker_count: int) -> dict:
    """Pulls `args.batches` training batches as fast as possible; returns throughput numbers."""
    import numpy as np

    from slit.data import pipeline, sources
    from slit.data.synthetic import CAPTION_VOCABULARY
    from slit.data.tokenizer import TextTokenizer, word_level_tokenizer

    source = sources.open_split(args.dataset, args.data_dir, "train")
    sample_rate = sources.dataset_sample_rate(source) or 16000
    spec = pipeline.AudioSpec(sample_rate, int(round(args.max_seconds * sample_rate)))
    tokenizer = TextTokenizer(word_level_tokenizer(CAPTION_VOCABULARY))
    dataset = pipeline.train_dataset(
        source,
        tokenizer,
        spec,
        max_text_length=24,
        global_batch_size=args.batch_size,
        seed=0,
        worker_count=worker_count,
    )
    iterator = iter(dataset)
    start_up = time.perf_counter()
    for _ in range(3):  # warm-up: worker start, first reads
        next(iterator)
    start_up = time.perf_counter() - start_up
    cpu0, t0, audio_seconds = _cpu_seconds(), time.perf_counter(), 0.0
    for _ in range(args.batches):
        batch = next(iterator)
        audio_seconds += float(np.sum(batch["num_samples"])) / sample_rate
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {
        "worker_processes": worker_count,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "warmup_seconds": start_up,
        "seconds": wall,
        "batches_per_second": args.batches / wall,
        "audio_seconds_per_second": audio_seconds / wall,
        "cpu_seconds": cpu,
        "audio_seconds_per_cpu_second": audio_seconds / cpu if cpu > 0 else None,
        "cpu_cores_busy": cpu / wall,
    }


def stage1_wait_fraction(args: argparse.Namespace) -> dict:
    """Runs `slit train` on the synthetic stage-one config and reads its data-wait fractions."""
    steps = args.train_steps
    log_every = max(1, steps // 5)
    with tempfile.TemporaryDirectory(prefix="slit_bench_data_") as workdir:
        command = [
            sys.executable,
            "-m",
            "slit.cli",
            "train",
            "--config",
            args.config,
            "--workdir",
            workdir,
            f"--config.total_steps={steps}",
            f"--config.log_every_steps={log_every}",
            "--config.eval_every_steps=0",
            "--config.checkpoint_every_steps=0",
            f"--config.data.name={args.dataset}",
            f"--config.batch_size={args.batch_size}",
        ]
        if args.data_dir:
            command.append(f"--config.data.data_dir={args.data_dir}")
        start = time.perf_counter()
        env = dict(os.environ, SLIT_COMPILATION_CACHE="0")  # its run time includes a real compile
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        metrics_path = pathlib.Path(workdir) / "metrics.jsonl"
        rows = (
            [json.loads(line) for line in metrics_path.read_text().splitlines()]
            if metrics_path.is_file()
            else []
        )
    windows = [r for r in rows if "data_wait_fraction" in r]
    if done.returncode != 0 or len(windows) < 2:
        return {
            "error": f"`{' '.join(command[2:])}` exited {done.returncode}",
            "stderr_tail": done.stderr[-2000:],
        }
    measured = windows[1:]  # the first window holds compilation
    steps_in = [b["step"] - a["step"] for a, b in zip(windows[:-1], windows[1:], strict=True)]
    total = sum(steps_in)
    fraction = sum(w["data_wait_fraction"] * n for w, n in zip(measured, steps_in, strict=True)) / total
    return {
        "command": " ".join(["slit", *command[3:]]),
        "steps_measured": total,
        "data_wait_fraction": fraction,
        "data_wait_fraction_per_window": [w["data_wait_fraction"] for w in measured],
        "steps_per_second": sum(w["steps_per_second"] * n for w, n in zip(measured, steps_in, strict=True))
        / total,
        "goal": f"< {WAIT_FRACTION_GOAL:.0%}",
        "goal_met": fraction < WAIT_FRACTION_GOAL,
        "run_seconds": seconds,
    }


def run(args: argparse.Namespace) -> dict:
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    result = {
        "dataset": args.dataset,
        "method": __doc__.split("Two measurements, in one run:", 1)[1].strip(),
        "pipeline": [pipeline_throughput(args, w) for w in workers],
    }
    if args.train_steps > 0:
        result["stage1_run"] = stage1_wait_fraction(args)
    return result
