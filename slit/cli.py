"""The `slit` command.

slit train --config configs/stage1_synthetic.py --workdir DIR [--config.a.b=value ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from slit import config as config_lib


def _initialize_distributed() -> None:
    """Joins a multi-process run when one is configured (env SLIT_COORDINATOR, SLIT_NUM_PROCESSES,
    SLIT_PROCESS_ID; see launch/local_multiprocess.sh). TPU pods and SLURM are auto-detected by JAX
    when SLIT_DISTRIBUTED=auto."""
    import os

    import jax

    if os.environ.get("SLIT_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=os.environ["SLIT_COORDINATOR"],
            num_processes=int(os.environ["SLIT_NUM_PROCESSES"]),
            process_id=int(os.environ["SLIT_PROCESS_ID"]),
        )
    elif os.environ.get("SLIT_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def _train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import jax

    _initialize_distributed()
    config = config_lib.load_config_file(args.config)
    config_lib.apply_overrides(config, config_lib.parse_override_args(extra))
    if config.trainer != "stage1":
        raise config_lib.ConfigError(f"trainer={config.trainer!r} is not known; this version trains 'stage1'")
    config_lib.validate_stage1(config, jax.device_count(), jax.process_count())
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = config_lib.to_json(config)
    previous = workdir / "config.json"
    if previous.is_file() and json.loads(previous.read_text()) != json.loads(resolved):
        old, new = json.loads(previous.read_text()), json.loads(resolved)
        changed = sorted(_diff(old, new))
        print(f"note: the config differs from the one in {previous}: {', '.join(changed)}", file=sys.stderr)
    if jax.process_index() == 0:
        previous.write_text(resolved + "\n")

    from slit.train import stage1

    stage1.train(config, workdir)
    return 0


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slit", description="Audio-language models from frozen pretrained models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a config file")
    train.add_argument("--config", required=True, help="a config file in configs/")
    train.add_argument("--workdir", required=True, help="the run's directory; re-running resumes it")
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            return _train(args, extra)
    except config_lib.ConfigError as e:
        print(f"slit: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"slit: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
