"""`slit plan --config FILE --devices N [--memory-per-device GiB] [--search] [--out FILE.json]
[--config.a.b=value ...]`: will the train step fit, before anyone books the chips.

The step is compiled ahead of time for N simulated CPU devices from abstract weights only
(slit/train/plan.py); the per-device table prints, with a verdict against `--memory-per-device`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ml_collections

HELP = "compile the train step ahead of time on N simulated devices: memory and FLOPs per device"
ACCEPTS_CONFIG_OVERRIDES = True  # --config.a.b=value
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a config file in configs/ (either trainer)")
    parser.add_argument("--devices", type=int, required=True, help="how many chips to plan for")
    parser.add_argument(
        "--memory-per-device",
        type=float,
        default=None,
        metavar="GIB",
        help="each chip's memory in GiB (e.g. 16): say whether the step fits, and what to change if not",
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="try the meshes that factor N (data x fsdp x tensor) and recommend one",
    )
    parser.add_argument(
        "--compile-limit",
        type=int,
        default=3,
        help="with --search: compile this many of the meshes the shardings rank best (0: every one)",
    )
    parser.add_argument("--out", help="also write the plan as JSON to this file")


def _argv(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    out = ["plan", "--config", args.config, "--devices", str(args.devices)]
    if args.memory_per_device is not None:
        out += ["--memory-per-device", str(args.memory_per_device)]
    if args.search:
        out += ["--search", "--compile-limit", str(args.compile_limit)]
    if args.out:
        out += ["--out", args.out]
    return out + list(extra)


def _with_device_flag(flags: str, n: int) -> str:
    flags = re.sub(rf"{DEVICE_FLAG}=\d+", "", flags).strip()
    return f"{flags} {DEVICE_FLAG}={n}".strip()


def simulated_devices(n: int) -> bool:
    """Makes this process's JAX see `n` CPU devices if its backends have not started yet (the XLA flag and
    jax_num_cpu_devices, CPU only); True when it has at least `n` CPU devices now, False when JAX had
    already started with fewer (then the plan runs in a child process)."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        if n > 1:  # (the flag and the config option say the same; the flag reaches older jax too)
            os.environ["XLA_FLAGS"] = _with_device_flag(os.environ.get("XLA_FLAGS", ""), n)
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    return len(jax.devices("cpu")) >= n


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from slit import config as config_lib
    from slit.errors import UserError

    if args.devices < 1:
        raise UserError(f"--devices={args.devices} must be at least 1")
    config = config_lib.load_config_file(args.config)
    config_lib.apply_overrides(config, config_lib.parse_override_args(extra))
    from slit.train import plan as plan_lib

    # Before any device is touched: a clear error, fast (with --search, each mesh is checked in turn).
    plan_lib.validate(config, None if args.search else args.devices)
    if not simulated_devices(args.devices):
        env = dict(os.environ, XLA_FLAGS=_with_device_flag(os.environ.get("XLA_FLAGS", ""), args.devices))
        env["JAX_PLATFORMS"] = "cpu"
        return subprocess.call([sys.executable, "-m", "slit.cli", *_argv(args, extra)], env=env)
    import jax

    # Compile times are part of the plan: measured, not loaded from the persistent compilation cache (turned
    # back on afterwards for a caller in the same process, e.g. tests).
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _plan(args, extra, config, jax.devices("cpu")[: args.devices])
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)


def _plan(
    args: argparse.Namespace, extra: Sequence[str], config: ml_collections.ConfigDict, devices: list
) -> int:
    """The plan of `config` on `devices` (N CPU devices): prints the table (and the search, the verdict),
    writes --out; returns 1 when --memory-per-device is given and the step does not fit, else 0."""
    from slit.errors import UserError
    from slit.train import plan as plan_lib

    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"slit plan: {plan_lib.describe_config(config)}; {args.devices} simulated devices")
    started = time.perf_counter()
    refused: list = []
    candidates: list = []
    if args.search:
        candidates, refused = plan_lib.search(config, devices, args.compile_limit, progress=say)
        compiled = [p for p in candidates if p.argument_bytes and not p.error]
        if not compiled:
            raise UserError(
                "no mesh of the search compiled:\n"
                + plan_lib.candidates_table(candidates, args.memory_per_device)
            )
        fitting = [
            p
            for p in compiled
            if args.memory_per_device is None or p.total_bytes <= args.memory_per_device * plan_lib.GIB
        ]
        chosen = (fitting or compiled)[0]
    else:
        say("compiling the train step ...")
        chosen = plan_lib.plan_mesh(config, devices)
    wall = time.perf_counter() - started

    print(plan_lib.table(chosen))
    if args.search:
        print(
            "\nmeshes tried (the compiled ones by XLA's total, then the others by the rough estimate "
            "from their shardings):\n"
        )
        print(plan_lib.candidates_table(candidates, args.memory_per_device))
        for mesh, why in refused:
            print(f"- {mesh['data']} x {mesh['fsdp']} x {mesh['tensor']}: refused: {why}")
        print(
            f"\nrecommended mesh: --config.mesh.data={chosen.mesh['data']} "
            f"--config.mesh.fsdp={chosen.mesh['fsdp']} --config.mesh.tensor={chosen.mesh['tensor']}"
        )
    fits, words = None, ""
    if args.memory_per_device is not None:
        fits, words = plan_lib.verdict(chosen, config, args.memory_per_device)
        print("\n" + words)
    print(f"\nplanned in {wall:.0f} s (XLA's CPU compiler; its temporaries are an estimate for GPU/TPU)")
    if args.out:
        result = {
            "config": args.config,
            "overrides": list(extra),
            "devices": args.devices,
            "architecture": plan_lib.describe_config(config),
            "plan": chosen.to_json(),
            "memory_per_device_gib": args.memory_per_device,
            "fits": fits,
            "verdict": words,
            "wall_seconds": wall,
        }
        if args.search:
            result["candidates"] = [p.to_json() for p in candidates]
            result["refused"] = [{"mesh": m, "why": why} for m, why in refused]
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        say(f"wrote {args.out}")
    return 0 if fits is not False else 1
