"""`slit train --config FILE --workdir DIR [--config.a.b=value ...]`: trains from a config file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from slit import config as config_lib
from slit import paths

HELP = "train a model from a config file"
ACCEPTS_CONFIG_OVERRIDES = True  # --config.a.b=value
JOINS_MULTI_PROCESS_RUNS = True  # one process per host (slit/train/distributed.py)
# config.trainer -> the module with validate(config, num_devices, num_processes) and train(config, workdir)
TRAINERS = {"stage1": "slit.train.stage1", "stage2": "slit.train.stage2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a config file in configs/")
    parser.add_argument(
        "--workdir",
        required=True,
        help="the run's directory (a local path or gs://...); re-running resumes it",
    )


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import importlib

    import jax

    config = config_lib.load_config_file(args.config)
    config_lib.apply_overrides(config, config_lib.parse_override_args(extra))
    if config.trainer not in TRAINERS:
        raise config_lib.ConfigError(
            f"trainer={config.trainer!r} is not known; choose one of {', '.join(sorted(TRAINERS))}"
        )
    trainer = importlib.import_module(TRAINERS[config.trainer])
    trainer.validate(config, jax.device_count(), jax.process_count())
    workdir = paths.workdir_path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = config_lib.to_json(config)
    previous = workdir / "config.json"
    if previous.is_file() and json.loads(previous.read_text()) != json.loads(resolved):
        changed = config_diff(json.loads(previous.read_text()), json.loads(resolved))
        print(f"note: the config differs from the one in {previous}: {', '.join(changed)}", file=sys.stderr)
    if jax.process_index() == 0:
        previous.write_text(resolved + "\n")

    trainer.train(config, workdir)
    return 0


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Lists `key: old -> new` for every leaf that differs between two resolved configs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
