"""`slit bench NAME [options] [--out FILE.json]`: runs a benchmark and prints its JSON result."""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
from collections.abc import Sequence

from slit.bench import BENCHES

HELP = "measure speed or memory against a reference, in the same run; prints JSON"
ACCEPTS_CONFIG_OVERRIDES = True  # --config.a.b=value, for the benchmarks that read a config file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True)
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        sub = benches.add_parser(name, help=module.HELP, description=module.HELP)
        sub.add_argument("--out", help="also write the JSON result to this file")
        module.add_arguments(sub)


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import jax

    from slit import config as config_lib
    from slit.bench import common

    # Compile times are part of every benchmark's result: measured, not loaded from the `slit` command's
    # persistent compilation cache (slit/train/compile_cache.py).
    jax.config.update("jax_enable_compilation_cache", False)
    module = importlib.import_module(BENCHES[args.bench])
    if extra and not getattr(module, "READS_CONFIG", False):
        raise config_lib.ConfigError(
            f"slit bench {args.bench} reads no config file: {' '.join(extra)} not used"
        )
    args.config_overrides = config_lib.parse_override_args(extra)
    result = {"bench": args.bench, **module.run(args), "machine": common.machine()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if hasattr(module, "table"):  # the readable summary, after the JSON
        print("\n" + module.table(result, args.out or "not written (--out FILE)"), file=sys.stderr)
    return 0
