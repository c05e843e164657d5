"""BENCHMARKS.md from the JSON results of `slit bench stage1` and `slit bench stage2`.

    make benchmarks    # runs both benchmarks into runs/bench/, then this
    python -m slit.bench.tables runs/bench/stage1.json runs/bench/stage2.json --out BENCHMARKS.md

Each benchmark gets a table of slit against its PyTorch reference (seconds per step, utilisation,
speedup), its FLOPs by kind, its memory and the goals of the issue next to what was reached. The date
is the JSON files' (their modification day), the machine the one recorded in them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
from collections.abc import Sequence

GOALS = {  # bench -> (MFU goal, speedup goal over the PyTorch reference on the same CPU)
    "stage1": (0.75, 1.2),
    "stage2": (0.75, 1.5),
}
TITLES = {
    "stage1": "Stage one: the Q-Former train step (BLIP-2's three losses)",
    "stage2": "Stage two: the soft-prompt train step through the frozen LLM",
}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _side(name: str, s: dict, speedup: str) -> str:
    return (
        f"| {name} | {s['median_s']:.2f} | {s['best_s']:.2f} | {s['spread_s']:.2f} | "
        f"{s['model_tflops_per_s_median'] * 1e3:.0f} | {100 * s['mfu_median']:.1f}% | {speedup} |"
    )


def _dtype_name(result: dict) -> str:
    return {"float32": "f32", "bfloat16": "bf16"}.get(result.get("dtype", "float32"), result.get("dtype"))


def bench_section(result: dict, source: str) -> str:
    """The markdown section of one benchmark's JSON result (`source`: where the JSON lies)."""
    name = result["bench"]
    shape = result["shape"]
    q = shape["qformer"]
    lines = [f"## {TITLES.get(name, name)}", ""]
    what = (
        f"{result['step']}. Q-Former {q['num_layers']} layers x {q['width']}, {q['num_queries']} queries; "
        f"batch {shape['batch']}, {shape['frames']} frames x {shape['encoder_width']} of cached features"
    )
    if "llm" in result:
        what += f"; frozen LLM {result['llm']}, held in {result.get('llm_param_dtype', 'float32')}"
    lines += [what + f"; dropout {result['dropout']}.", ""]
    lines += [
        "| side | median s/step | best s/step | spread s | model GFLOP/s | MFU | speedup |",
        "|---|---|---|---|---|---|---|",
        _side("slit (JAX)", result["slit"], f"{result['speedup']:.2f}x" if "speedup" in result else "-"),
    ]
    ref = result.get("reference")
    if ref:
        threads = f", {ref['torch_threads']} torch threads" if ref.get("torch_threads") else ""
        lines.append(_side(f"PyTorch reference{threads}", ref, "1.00x"))
    flops = result["model_flops_per_step"]
    lines += [
        "",
        f"Measured {_dtype_name(result)} matmul peak in the run: {result['peak_flops'] / 1e9:.0f} GFLOP/s "
        "(MFU is against it). "
        f"Model FLOPs per step: {flops['total'] / 1e12:.3f} T (trainable forward "
        f"{flops['trainable_forward'] / 1e9:.0f} G + backward {flops['trainable_backward'] / 1e9:.0f} G; "
        f"frozen forward {flops['frozen_forward'] / 1e9:.0f} G + backward to the inputs "
        f"{flops['frozen_backward'] / 1e9:.0f} G).",
    ]
    if result.get("xla_flops_per_step"):
        lines[-1] += f" XLA counts {result['xla_flops_per_step'] / 1e12:.3f} T in slit's compiled step."
    if ref:
        own = ref["reference_flops_per_step"]["total"]
        lines[-1] += (
            f" The reference computes {own / 1e12:.3f} T its way (torch's FlopCounterMode agrees), "
            f"{100 * ref['hardware_utilisation_median']:.0f}% of the peak."
        )
    lines[-1] += f" slit compiles its step in {result['slit_compile_s']:.0f} s."
    m = result["memory"]
    state = m["slit_state"]
    rss = m["peak_host_rss_bytes"]
    lines += [
        "",
        f"Memory: {state['trainable_parameters'] / 1e6:.1f} M trainable parameters "
        f"({_gb(state['params_bytes'])}); optimizer state {_gb(state['opt_state_bytes'])} = "
        "Adam's two moments + "
        f"{state['opt_state_beyond_adam_moments_bytes']} bytes of counters; frozen weights "
        f"{_gb(state['frozen_bytes'])} ({', '.join(state['frozen_dtypes'])}), stored once. Peak host RSS "
        f"after slit's first step {_gb(rss['after_slit_first_step'])}, at the end (both sides loaded) "
        f"{_gb(rss['end'])}.",
    ]
    if m.get("device"):
        device = m["device"]
        lines[-1] += (
            f" Device memory: peak {_gb(device['peak_bytes_in_use'])} in use of {_gb(device['bytes_limit'])}."
            if {"peak_bytes_in_use", "bytes_limit"} <= set(device)
            else f" Device: {device}."
        )
    xla = m.get("slit_xla") or {}
    if "total" in xla:
        lines[-1] += (
            f" XLA's memory analysis of slit's step (what `slit plan` reads): arguments "
            f"{_gb(xla['argument'])}, temporaries {_gb(xla['temp'])}, total {_gb(xla['total'])}."
        )
    goal_mfu, goal_speedup = GOALS.get(name, (None, None))
    if goal_mfu:
        reached = f"MFU {100 * result['mfu']:.0f}% (goal {100 * goal_mfu:.0f}%)"
        if "speedup" in result:
            reached += f", {result['speedup']:.2f}x the reference (goal {goal_speedup}x)"
        lines += ["", f"Reached: {reached}."]
    lines += ["", f"Result: `{source}`.", ""]
    return "\n".join(lines)


def render(paths: Sequence[pathlib.Path], commands: Sequence[str]) -> str:
    """BENCHMARKS.md for the JSON results at `paths`."""
    results = [json.loads(p.read_text()) for p in paths]
    day = max(datetime.date.fromtimestamp(p.stat().st_mtime) for p in paths).isoformat()
    machine = results[0]["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {day}: {machine['cpu_count']} CPU cores ({machine['platform']}), JAX "
        f"{machine['jax_version']} on {machine['jax_backend']}. Timings are medians of steps "
        "taken in turns (blocks of slit's steps, then of the PyTorch reference's, twice, in one process); "
        f"utilisation is against the {' / '.join(sorted({_dtype_name(r) for r in results}))} "
        "matmul peak measured in the same run. How each number is taken: `slit/bench/train_step.py`; "
        "what the FLOPs count: `slit/bench/flops.py`.",
        "",
        "Regenerate (about 15 minutes on 2 cores):",
        "",
        "```",
        *commands,
        "```",
        "",
    ]
    lines += [bench_section(r, str(p)) for r, p in zip(results, paths, strict=True)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", nargs="+", type=pathlib.Path, help="JSON files of slit bench stage1/stage2"
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("BENCHMARKS.md"))
    args = parser.parse_args(argv)
    commands = ["make benchmarks"]
    args.out.write_text(render(args.results, commands))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
