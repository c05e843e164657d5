"""The `slit` command: `slit <command> ...`; see `slit --help` and slit/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Sequence

from slit.commands import COMMANDS
from slit.errors import UserError
from slit.train import compile_cache, distributed, host_memory

OVERRIDES_HELP = textwrap.fill(
    "Any field of the config file can be overridden with --config.a.b=value, e.g. --config.batch_size=64 "
    "--config.optimizer.learning_rate=3e-4 (README: Training). With --config FILE, --help lists every "
    "field with its value.",
    width=100,
)


def config_fields(argv: Sequence[str]) -> str:
    """The fields of the config file named in `argv` (--config FILE) with their values, one per line as
    `--config.a.b=value`; "" when there is none or it cannot be read."""
    from slit import config as config_lib

    args = list(argv)
    path = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if path is None and "--config" in args[:-1]:
        path = args[args.index("--config") + 1]
    if not path:
        return ""
    try:
        config = config_lib.load_config_file(path)
    except Exception:  # noqa: BLE001 (help still prints without the fields)
        return ""

    def walk(node: object, prefix: str) -> list[str]:
        if hasattr(node, "items"):
            return [line for k, v in node.items() for line in walk(v, f"{prefix}.{k}")]
        return [f"  {prefix}={node!r}"]

    return f"fields of {path} (their defaults):\n" + "\n".join(walk(config, "--config"))


def main(argv: Sequence[str] | None = None) -> int:
    """`slit ARGS...`. Run as the process itself (argv None: the `slit` command), it first sets the
    process's malloc so that each step's freed temporaries stay in the process rather than being faulted
    in again page by page (slit/train/host_memory.py); called with `argv` from another program (tests),
    it leaves that program's allocator alone. As the process, it also turns on JAX's persistent
    compilation cache (slit/train/compile_cache.py: a rerun or a sweep point with the same shapes loads
    its compiled steps instead of compiling them)."""
    if argv is None:
        host_memory.keep_freed_memory()  # before JAX starts its threads
        compile_cache.enable_compilation_cache()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="slit", description="Audio-language models from frozen pretrained models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    asks_help = "-h" in argv or "--help" in argv
    for name, module_name in COMMANDS.items():
        module = modules[name] = importlib.import_module(module_name)
        epilog = None
        if getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):
            fields = config_fields(argv) if asks_help and argv[:1] == [name] else ""
            epilog = OVERRIDES_HELP + ("\n\n" + fields if fields else "")
        module.add_arguments(
            subparsers.add_parser(
                name,
                help=module.HELP,
                description=module.HELP,
                epilog=epilog,
                formatter_class=_Formatter,
            )
        )
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(modules[args.command], "ACCEPTS_CONFIG_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    module = modules[args.command]
    if getattr(module, "JOINS_MULTI_PROCESS_RUNS", False):
        # joins a multi-process run as SLIT_COORDINATOR / SLIT_DISTRIBUTED say (README: GPUs, TPUs and
        # several hosts)
        distributed.initialize()
    try:
        code = module.run(args, extra)
        distributed.finished()
        return code
    except (UserError, FileNotFoundError) as e:
        # Bad input the user can fix: the message names the file, key or value. No traceback.
        print(f"slit {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # A run that stopped on purpose after saving (preemption: 75; non-finite abort: 3).
        if hasattr(e, "exit_code"):
            distributed.finished()  # every process stopped here together
            print(f"slit {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        distributed.wait_for_lost_peer(e)  # names a lost peer instead of a collective's traceback
        raise


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (when it has one), and the epilog's lines as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (
            action.default is None
            or action.default == []
            or action.required
            or "default" in (action.help or "")
        ):
            return action.help or ""
        return super()._get_help_string(action)


if __name__ == "__main__":
    sys.exit(main())
