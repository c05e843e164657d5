"""The `slit` command: `slit <command> ...`; see `slit --help` and slit/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from slit.commands import COMMANDS
from slit.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slit", description="Audio-language models from frozen pretrained models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = modules[name] = importlib.import_module(module_name)
        module.add_arguments(subparsers.add_parser(name, help=module.HELP, description=module.HELP))
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(modules[args.command], "ACCEPTS_CONFIG_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return modules[args.command].run(args, extra)
    except (UserError, FileNotFoundError) as e:
        # Bad input the user can fix: the message names the file, key or value. No traceback.
        print(f"slit {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # A run that stopped on purpose after saving (preemption: 75; non-finite abort: 3).
        if hasattr(e, "exit_code"):
            print(f"slit {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
