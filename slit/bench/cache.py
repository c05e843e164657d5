"""`slit bench cache`: a stage-one epoch with and without the frozen-feature cache.

Three steps in this process, on the same config (`--config`, default configs/stage1_synthetic.py,
with `--set KEY=VALUE` overrides):

1. what `slit cache-features` does, into a fresh directory: the one-off cost of the cache (seconds,
   bytes, clips per second); or, with `--features-dir`, reusing an up-to-date cache there;
2. what `slit train --config.features=compute` does, for one epoch of steps (train clips // batch size; or
   `--steps`, and the epoch time extrapolated from their rate), evaluation and checkpoints off;
3. the same run with `--config.features=cached`.

Step throughput comes from each run's metrics.jsonl (`steps_per_second` per logging window; the first
window holds compilation and is left out), so the epoch time compared is epoch steps / steps_per_second;
each run's whole wall time (start-up, compilation, the final test-split evaluation) is reported too.
Then the speedup of an epoch and the number of epochs after which the cache has paid for itself.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import pathlib
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import ml_collections

HELP = "a stage-one epoch computing the frozen features vs reading them from the cache"
READS_CONFIG = True  # takes --config.a.b=value overrides of --config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/stage1_synthetic.py", help="a stage-one config file")
    parser.add_argument(
        "--features-dir",
        default=None,
        help="cache root to use (an up-to-date cache there is reused, not timed); default: a fresh temp dir",
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="steps per run (0: one epoch of the train split)"
    )


def _train(
    base: ml_collections.ConfigDict, steps: int, epoch: int, features: str, workdir: pathlib.Path
) -> dict:
    from slit import config as config_lib
    from slit.train import stage1

    config = copy.deepcopy(base)
    overrides = {
        "total_steps": steps,
        "log_every_steps": max(1, steps // 5),
        "eval_every_steps": 0,
        "checkpoint_every_steps": 0,
        "retrieval_rerank_k": 0,
        "optimizer.warmup_steps": min(steps, 10),
        "features": features,
    }
    config_lib.apply_overrides(config, [(k, str(v)) for k, v in overrides.items()])
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the run's tables; stdout is for the JSON result
        stage1.train(config, workdir)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "steps_per_second" in r]
    if len(windows) < 2:
        return {"error": f"only {len(windows)} logging windows; use more steps"}
    steps_in = [b["step"] - a["step"] for a, b in zip(windows[:-1], windows[1:], strict=True)]
    measured = sum(steps_in)
    rate = sum(w["steps_per_second"] * n for w, n in zip(windows[1:], steps_in, strict=True)) / measured
    wait = sum(w["data_wait_fraction"] * n for w, n in zip(windows[1:], steps_in, strict=True)) / measured
    return {
        "features": features,
        "overrides": overrides,
        "steps": steps,
        "steps_measured": measured,
        "steps_per_second": rate,
        "epoch_seconds": epoch / rate,
        "data_wait_fraction": wait,
        "run_seconds": seconds,
    }


def run(args: argparse.Namespace) -> dict:
    import jax

    from slit import config as config_lib
    from slit.data import sources
    from slit.train import feature_cache, stage1

    config = config_lib.load_config_file(args.config)
    config_lib.apply_overrides(config, args.config_overrides)  # --config.a.b=value, as slit train
    with config.unlocked():
        config.trainer = "stage1"
    stage1.validate(config, jax.device_count(), jax.process_count())
    epoch = len(sources.open_split(config.data.name, config.data.data_dir, "train")) // config.batch_size
    steps = args.steps or epoch
    result: dict = {"config": args.config, "overrides": dict(args.config_overrides), "steps_per_epoch": epoch}
    with tempfile.TemporaryDirectory(prefix="slit_bench_cache_") as tmp:
        root = args.features_dir or str(pathlib.Path(tmp) / "features")
        config_lib.apply_overrides(config, [("features_dir", root)])
        start = time.perf_counter()
        directory, summary = feature_cache.build(config, log=lambda line: print(line, file=sys.stderr))
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        clips = sum(len(np.load(d / "index.npz")["stored"]) for d in directory.iterdir() if d.is_dir())
        result["cache"] = {"written": summary["written"], "bytes": size, "clips": clips}
        if summary["written"]:  # the one-off cost; a reused cache was built earlier
            result["cache"].update(seconds=seconds, clips_per_second=clips / seconds)
        for mode in ("compute", "cached"):
            result[mode] = _train(config, steps, epoch, mode, pathlib.Path(tmp) / mode)
    compute, cached = result["compute"], result["cached"]
    if "error" not in compute and "error" not in cached:
        saved = compute["epoch_seconds"] - cached["epoch_seconds"]
        result["epoch_speedup"] = compute["epoch_seconds"] / cached["epoch_seconds"]
        if "seconds" in result["cache"]:
            result["epochs_to_pay_off_the_cache"] = result["cache"]["seconds"] / saved if saved > 0 else None
    return result
