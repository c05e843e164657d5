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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True)
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        sub = benches.add_parser(name, help=module.HELP, description=module.HELP)
        sub.add_argument("--out", help="also write the JSON result to this file")
        module.add_arguments(sub)


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from slit.bench import common

    module = importlib.import_module(BENCHES[args.bench])
    result = {"bench": args.bench, **module.run(args), "machine": common.machine()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
