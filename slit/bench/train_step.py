"""What `slit bench stage1` and `slit bench stage2` share: random batches in slit's conventions, slit's
jitted train step built as `slit train` builds it, the timing of slit and the PyTorch reference
in turns, utilisation against the measured matmul peak, and memory.

Timing: slit's step is compiled ahead of time (`compile_s`) and its first step timed apart; the
reference's first step is timed with each PyTorch thread count (a count over twice as slow as the best
is dropped). Then the two sides take turns in blocks of steps (`time_in_turns`: two rounds, each block
after one untimed step), so that both see the same conditions on a shared machine without one side's
memory traffic landing in the other's step. Each step ends by reading its loss on the host (the sync
point on both sides). Utilisation (MFU) divides the model FLOPs
(slit/bench/flops.py: the useful work) by a step's seconds and by the best f32 matmul rate measured in
the same run (before and after the timings; the higher is used), for the best and the median step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from slit.bench.shapes import SIZES, Stage1Shape, Stage2Shape


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="base",
        help="base: BERT-base Q-Former, batch 8; 1b: an accelerator's size, batch 32 (stage two through a "
        "~1B random Llama); tiny: tests",
    )
    parser.add_argument("--batch", type=int, default=0, help="clips per step (0: the size's)")
    parser.add_argument("--frames", type=int, default=0, help="encoder frames per clip (0: the size's)")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per side (in two rounds)")
    parser.add_argument(
        "--dropout", type=float, default=0.1, help="Q-Former dropout on both sides (BLIP-2: 0.1)"
    )
    parser.add_argument(
        "--torch-threads",
        default="",
        help="comma-separated PyTorch thread counts to time, the fastest reported (default: 1 and all cores)",
    )
    parser.add_argument(
        "--skip-reference", action="store_true", help="time slit only (no PyTorch reference, no speedup)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="matmul inputs on both sides (bfloat16: slit's compute_dtype, torch.autocast; float32 master "
        "weights, optimizer state and losses either way); the peak is measured in it",
    )


def resized(shape: Any, args: argparse.Namespace) -> Any:  # noqa: ANN401 (a Stage1Shape or Stage2Shape)
    """The shape with --batch and --frames applied."""
    changes = {k: v for k, v in (("batch", args.batch), ("frames", args.frames)) if v}
    if any(v < 1 for v in changes.values()):
        from slit.errors import UserError

        raise UserError(f"--batch and --frames must be >= 1 (got {changes})")
    return dataclasses.replace(shape, **changes)


# --- batches -----------------------------------------------------------------------------------------


def _features(rng: np.random.Generator, batch: int, frames: int, width: int) -> dict[str, np.ndarray]:
    """Frozen-encoder features (B, F, E) and a frame mask (B, F): clips of 60% to 100% of `frames`."""
    lengths = rng.integers(int(0.6 * frames) + 1, frames + 1, batch)
    lengths[0] = frames
    return {
        "features": rng.standard_normal((batch, frames, width)).astype(np.float32),
        "frame_mask": np.arange(frames)[None] < lengths[:, None],
    }


def _padded(rng: np.random.Generator, batch: int, length: int, low: int, high: int, left: bool) -> np.ndarray:
    """Token ids (B, length) in [low, high), lengths from half to all of `length`, padded with -1."""
    ids = np.full((batch, length), -1, np.int32)
    for row, n in enumerate(rng.integers(max(length // 2, 1), length + 1, batch)):
        tokens = rng.integers(low, high, n)
        if left:
            ids[row, length - n :] = tokens
        else:
            ids[row, :n] = tokens
    return ids


def stage1_batch(
    shape: Stage1Shape, pad_id: int = 0, cls_id: int = 3, seed: int = 0
) -> dict[str, np.ndarray]:
    """A stage-one batch: features, frame_mask, text_ids (B, T) starting with [CLS], padded with
    `pad_id`; word ids from 6 up (past the special tokens of slit's word-level tokenizer)."""
    rng = np.random.default_rng(seed)
    text = _padded(rng, shape.batch, shape.text_length, 6, shape.qformer.vocab_size - 1, left=False)
    text[:, 0] = cls_id
    text[text < 0] = pad_id
    return {**_features(rng, shape.batch, shape.frames, shape.encoder_width), "text_ids": text}


def stage2_batch(shape: Stage2Shape, pad_id: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """A stage-two batch: features, frame_mask; qformer_ids (padded with `pad_id`), instruction_ids
    (left-padded with -1), answer_ids (right-padded with -1)."""
    rng = np.random.default_rng(seed)
    qformer = _padded(rng, shape.batch, shape.qformer_text_length, 6, shape.qformer.vocab_size, left=False)
    qformer[qformer < 0] = pad_id
    vocab = shape.llm.vocab_size
    return {
        **_features(rng, shape.batch, shape.frames, shape.encoder_width),
        "qformer_ids": qformer,
        "instruction_ids": _padded(rng, shape.batch, shape.instruction_length, 1, vocab, left=True),
        "answer_ids": _padded(rng, shape.batch, shape.answer_length, 1, vocab, left=False),
    }


# --- slit's step -------------------------------------------------------------------------------------


def sized_config(
    file: str,
    shape: Any,  # noqa: ANN401 (a Stage1Shape or Stage2Shape)
    dropout: float,
    own: dict[str, Any],
    overrides: list[tuple[str, str]],
    dtype: str = "float32",
) -> Any:  # noqa: ANN401 (an ml_collections.ConfigDict)
    """The config file of configs/ (`file`) resized to `shape` (the Q-Former, batch, the width of the
    cached features), training from cached features, BERT's init std, `dropout`, `dtype` as the compute
    dtype, the benchmark's `own` settings; then the user's `--config.a.b=value` overrides, which may not
    change any of those (the reference and the FLOP counts follow the shape, not the config: a UserError
    says to use --size, --batch, --frames, --dropout or --dtype)."""
    from slit import config as config_lib
    from slit.errors import UserError

    config = config_lib.load_config_file(config_lib.configs_dir(file) / file)
    q = shape.qformer
    sized = {
        "features": "cached",
        "batch_size": shape.batch,
        "total_steps": 1000,
        "optimizer.warmup_steps": 10,
        "audio_encoder.width": shape.encoder_width,  # (a random tower; cached features bypass it)
        "qformer.num_queries": q.num_queries,
        "qformer.layers": q.num_layers,
        "qformer.width": q.width,
        "qformer.heads": q.num_heads,
        "qformer.mlp_dim": q.mlp_dim,
        "qformer.cross_attention_freq": q.cross_attention_freq,
        "qformer.max_text_positions": q.max_text_positions,
        "qformer.dropout": dropout,
        "qformer.initializer_range": 0.02,
        "compute_dtype": dtype,
    }
    sized |= own
    fixed = sorted(k for k, _ in overrides if k in sized)
    if fixed:
        raise UserError(
            f"--config.{fixed[0]}: the benchmark sets {', '.join(fixed)} from its shape, so that the "
            "PyTorch reference and the FLOP counts match slit's step; use --size, --batch, --frames, "
            "--dropout or --dtype"
        )
    config_lib.apply_overrides(config, [(k, str(v)) for k, v in sized.items()] + list(overrides))
    return config


@dataclasses.dataclass
class SlitStep:
    """slit's compiled train step on a fixed batch: `step()` runs one and returns its loss."""

    step: Callable[[], float]  # updates the TrainingSetup's state
    compile_s: float  # lowering and compiling the step, ahead of time
    xla_flops: float | None  # XLA's own count of the compiled step's FLOPs (cost analysis)
    xla_memory: dict[
        str, int
    ]  # XLA's memory analysis of the compiled step (bytes a device; what slit plan reads)


def slit_step(setup: Any, batch: dict[str, np.ndarray], mesh: Any) -> SlitStep:  # noqa: ANN401
    """A TrainingSetup's jitted step compiled ahead of time for `batch` (placed once in the batch
    shardings)."""
    import jax

    placed = {k: jax.device_put(batch[k], setup.batch_shardings[k]) for k in setup.batch_shardings}
    key = jax.random.key(0)
    frozen = setup.parts.frozen
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = setup.step_fn.lower(setup.state, frozen, placed, key).compile()
    compile_s = time.perf_counter() - start

    def step() -> float:
        setup.state, metrics = compiled(setup.state, frozen, placed, key)
        return float(metrics["loss"])

    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 (a backend without cost analysis)
        xla_flops = None
    return SlitStep(step, compile_s, xla_flops, xla_memory(compiled))


def xla_memory(compiled: Any) -> dict[str, int]:  # noqa: ANN401 (a jax.stages.Compiled)
    """XLA's memory analysis of a compiled step, bytes a device ({} where the backend has none):
    arguments, outputs, outputs aliased to (donated) arguments, temporaries, and their total as
    `slit plan` adds them (arguments + outputs - aliased + temporaries)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (a backend without memory analysis)
        return {}
    if m is None:
        return {}
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "alias", "temp", "generated_code")
        if hasattr(m, f"{k}_size_in_bytes")
    }
    if {"argument", "output", "alias", "temp"} <= set(out):
        out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _nbytes(tree: Any) -> int:  # noqa: ANN401
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def state_memory(setup: Any) -> dict:  # noqa: ANN401
    """What the train state holds: trainable params, optimizer state (and how much of it is beyond
    Adam's two moments of the params: step counters and the like), frozen weights and their dtypes."""
    import jax

    params, opt = _nbytes(setup.state["params"]), _nbytes(setup.state["opt_state"])
    frozen = setup.parts.frozen
    return {
        "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(setup.state["params"]))),
        "params_bytes": params,
        "opt_state_bytes": opt,
        "opt_state_beyond_adam_moments_bytes": opt - 2 * params,
        "frozen_bytes": _nbytes(frozen),
        "frozen_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(frozen)}),
        "frozen_parameters": int(sum(x.size for x in jax.tree.leaves(frozen))),
    }


# --- timing ------------------------------------------------------------------------------------------


def require_torch(
    why: str = "the PyTorch reference needs torch and transformers",
    instead: str = ", or run slit alone with --skip-reference",
) -> None:
    """Raises a UserError saying how to get torch (for `why`) when it is not installed."""
    import importlib.util

    from slit.errors import UserError

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise UserError(f"{why}: pip install -e '.[parity]' (torch==2.13.0){instead}")


def torch_device() -> str:
    """Where the PyTorch reference runs: the GPU when torch sees one (as JAX would), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_threads(requested: str) -> list[int]:
    """The PyTorch thread counts to try: --torch-threads, or 1 and all cores (0: leave torch's, on GPU)."""
    require_torch()
    import torch

    from slit.errors import UserError

    if torch.cuda.is_available():
        return [0]
    if not requested:
        return sorted({1, os.cpu_count() or 1})
    try:
        threads = [int(t) for t in requested.split(",")]
    except ValueError:
        threads = [0]
    if min(threads) < 1:
        raise UserError(f"--torch-threads {requested!r}: expected comma-separated integers >= 1")
    return threads


def _timed(call: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    loss = call()
    return loss, time.perf_counter() - start


@dataclasses.dataclass
class Timings:
    slit: list[float]
    slit_first_s: float
    slit_losses: list[float]
    reference: dict[int, list[float]]  # torch threads -> seconds per step
    reference_warmup_s: dict[int, float]
    reference_losses: list[float]
    peak_rss_bytes: dict[str, int]  # after slit's first step (before the reference exists), at the end


def time_in_turns(
    slit: Callable[[], float],
    make_reference: Callable[[], Callable[[], float]] | None,
    threads: list[int],
    repeats: int,
    log: Callable[[str], None],
    rounds: int = 2,
) -> Timings:
    """slit's first step; then the reference is made (`make_reference()` -> its step) and warmed up,
    one step per thread count (a count over twice as slow as the fastest is not timed, nor, after the
    first round, one over 1.2x the fastest's median); then `rounds` rounds, each a block of slit's
    steps and a block of the reference's per thread count, `repeats` timed steps per side in all. Each
    block starts with one untimed step: on a shared or virtual machine, the first step after the other
    side ran pays for memory the other side took. The peak host memory is read after slit's first step
    (before the reference exists), so that figure is slit's."""
    loss, first = _timed(slit)
    rss = {"after_slit_first_step": peak_rss_bytes()}
    log(f"slit: first step {first:.2f} s, loss {loss:.3f}")
    slit_losses = [loss]
    reference = make_reference() if make_reference is not None else None
    ref_losses: list[float] = []
    warmup: dict[int, float] = {}
    times: dict[int, list[float]] = {}
    initial = 0
    if reference is not None:
        import torch

        initial = torch.get_num_threads()
        for t in threads:
            if t:
                torch.set_num_threads(t)
            loss, warmup[t] = _timed(reference)
            ref_losses.append(loss)
            log(f"reference: first step with {t or 'default'} torch threads {warmup[t]:.2f} s")
        times = {t: [] for t in threads if warmup[t] <= 2 * min(warmup.values())}
    slit_times: list[float] = []
    every_timed = dict(times)  # the lists are shared: a count dropped from `times` keeps its timings

    def block(step: Callable[[], float], n: int, losses: list[float], timed: list[float]) -> list[float]:
        losses.append(step())  # the untimed first step of the block
        for _ in range(n):
            loss, seconds = _timed(step)
            losses.append(loss)
            timed.append(seconds)
        return timed[-n:]

    try:
        for i in range(rounds):
            n = repeats // rounds + (i < repeats % rounds)
            if not n:
                continue
            line = f"round {i + 1}/{rounds}: slit " + ", ".join(
                f"{x:.2f}" for x in block(slit, n, slit_losses, slit_times)
            )
            for t, ts in times.items():
                if t:
                    torch.set_num_threads(t)
                got = block(reference, n, ref_losses, ts)
                line += f" s; reference ({t or 'default'} threads) " + ", ".join(f"{x:.2f}" for x in got)
            log(line + " s")
            if len(times) > 1:  # after a round, only the thread counts within 20% of the fastest go on
                medians = {t: float(np.median(ts)) for t, ts in times.items()}
                times = {t: ts for t, ts in times.items() if medians[t] <= 1.2 * min(medians.values())}
    finally:
        if reference is not None:
            torch.set_num_threads(initial)
    rss["end"] = peak_rss_bytes()
    return Timings(slit_times, first, slit_losses, every_timed, warmup, ref_losses, rss)


def summary(times: list[float], model_flops: float, peak: float) -> dict:
    """Seconds per step (best, median, spread) and the utilisation they give."""
    best, median = min(times), float(np.median(times))
    return {
        "best_s": best,
        "median_s": median,
        "spread_s": max(times) - best,
        "times_s": times,
        "model_tflops_per_s_median": model_flops / median / 1e12,
        "mfu_best": model_flops / best / peak,
        "mfu_median": model_flops / median / peak,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory() -> dict:
    """Peak device memory of JAX's first device, where the backend reports it (GPU, TPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def peak_flops(dtype: str) -> float:
    """The matmul peak of the default device in `dtype`, measured now: 2048-square products on a CPU,
    8192-square ones on an accelerator (smaller ones leave a GPU's tensor cores idle)."""
    import jax

    from slit.bench import common

    size = 2048 if jax.default_backend() == "cpu" else 8192
    return common.matmul_peak_flops(size=size, dtype=dtype)


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare(
    name: str,
    timings: Timings,
    flops: Any,  # noqa: ANN401 (slit.bench.flops.StepFlops: the useful work)
    reference_flops: Any,  # noqa: ANN401 (the same, counted the way the reference computes)
    peaks: list[float],
) -> dict:
    """The result's timing part: slit's and the reference's summaries, the speedups, and the MFU."""
    peak = max(peaks)
    slit = summary(timings.slit, flops.total, peak)
    slit["first_step_s"] = timings.slit_first_s
    result: dict[str, Any] = {
        "peak_flops": peak,
        "peak_flops_measured": peaks,
        "model_flops_per_step": flops.as_dict(),
        "mfu": slit["mfu_median"],
        "slit": slit,
        "slit_losses": timings.slit_losses,
    }
    if timings.reference:
        by_threads = {t: summary(ts, flops.total, peak) for t, ts in timings.reference.items()}
        best_threads = min(by_threads, key=lambda t: by_threads[t]["median_s"])
        ref = by_threads[best_threads]
        ref["reference_flops_per_step"] = reference_flops.as_dict()
        ref["hardware_utilisation_median"] = reference_flops.total / ref["median_s"] / peak
        result |= {
            "reference": {
                "name": name,
                **ref,
                "torch_threads": best_threads or None,
                "by_torch_threads": {str(t): v for t, v in by_threads.items()},
                "warmup_s_by_torch_threads": {str(t): v for t, v in timings.reference_warmup_s.items()},
            },
            "reference_losses": timings.reference_losses,
            "speedup": ref["median_s"] / slit["median_s"],
            "speedup_best": ref["best_s"] / slit["best_s"],
        }
    return result


def measure(
    args: Any,  # noqa: ANN401 (the benchmark's argparse.Namespace: repeats, torch_threads, skip_reference)
    setup: Any,  # noqa: ANN401 (slit's TrainingSetup)
    batch: dict[str, np.ndarray],
    mesh: Any,  # noqa: ANN401
    make_reference: Callable[[], Any],
    reference_name: str,
    model_flops: Any,  # noqa: ANN401 (flops.StepFlops: the useful work)
    reference_flops: Any,  # noqa: ANN401 (flops.StepFlops: counted the way the reference computes)
) -> dict:
    """What both training-step benchmarks do once their sides are built: the matmul peak, slit's step
    compiled on `batch`, the reference made by `make_reference()` (a torch_reference.ReferenceStep;
    not with --skip-reference), the two timed in turns, the peak again; returns the result's timing,
    FLOP, compile and memory parts."""
    peaks = [peak_flops(args.dtype)]
    slit = slit_step(setup, batch, mesh)
    log_to_stderr(f"slit: step compiled in {slit.compile_s:.1f} s")
    memory: dict[str, Any] = {"slit_state": state_memory(setup), "slit_xla": slit.xla_memory}
    made = {}

    def reference_step() -> Callable[[], float]:
        made["ref"] = make_reference()
        return made["ref"].step

    threads = [] if args.skip_reference else torch_threads(args.torch_threads)
    timings = time_in_turns(
        slit.step, None if args.skip_reference else reference_step, threads, args.repeats, log_to_stderr
    )
    peaks.append(peak_flops(args.dtype))
    result = compare(reference_name, timings, model_flops, reference_flops, peaks)
    result["dtype"] = args.dtype
    memory |= {"peak_host_rss_bytes": timings.peak_rss_bytes, "device": device_memory()}
    if "ref" in made:
        memory["reference_trainable_parameters"] = made["ref"].trainable_parameters
    return {
        **result,
        "slit_compile_s": slit.compile_s,
        "xla_flops_per_step": slit.xla_flops,
        "reference_description": made["ref"].description if "ref" in made else None,
        "memory": memory,
    }
