"""`slit cache-features --config FILE [--config.a.b=value ...] [--out DIR]`: writes the frozen audio
encoder's outputs (and frame masks) for the train, validation and test splits once, so that stage-one
(and stage-two) runs with `--config.features=cached` read them instead of running the encoder
(slit.train.feature_cache). Either stage's config builds the same cache: only its `audio_encoder` and
`data` groups (and batch_size) matter.

The cache lands in `--out` (default: the config's `features_dir`, else `<data_dir>/slit_features`),
under the dataset's name and a key of the encoder's fingerprint and the frontend settings; an up-to-date
cache is kept unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence

from slit import config as config_lib

HELP = "cache the frozen audio encoder's outputs for training either stage (--config.features=cached)"
JOINS_MULTI_PROCESS_RUNS = True  # one process per host (slit/train/distributed.py)
ACCEPTS_CONFIG_OVERRIDES = True  # --config.a.b=value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a stage-one or stage-two config file in configs/")
    parser.add_argument(
        "--out", default=None, help="cache root (default: features_dir, or <data_dir>/slit_features)"
    )
    parser.add_argument("--force", action="store_true", help="rewrite the cache even if it is up to date")


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import jax

    from slit.train import feature_cache

    config = config_lib.load_config_file(args.config)
    config_lib.apply_overrides(config, config_lib.parse_override_args(extra))
    trainer = config.get("trainer")
    if trainer == "stage1":
        config_lib.validate_stage1(config, jax.device_count(), jax.process_count())
    elif trainer == "stage2":  # the same audio_encoder and data groups: only those need to be right
        from slit.train import pretrained

        problems = pretrained.audio_problems(config)
        if problems:
            raise config_lib.ConfigError("; ".join(problems))
    else:
        raise config_lib.ConfigError(
            f"{args.config}: trainer={trainer!r}; the cache is for stage1 and stage2 configs"
        )
    directory, summary = feature_cache.build(config, args.out, force=args.force)
    if jax.process_index() != 0:  # every process wrote its share; process 0 reports
        return 0
    print(json.dumps(summary, indent=2))
    overrides = [a for a in extra if not a.startswith(("--config.features=", "--config.features_dir="))]
    root = args.out or config.get("features_dir", "")
    train = [
        "slit",
        "train",
        "--config",
        args.config,
        "--workdir",
        "WORKDIR",
        *overrides,
        "--config.features=cached",
    ]
    if root:
        train.append(f"--config.features_dir={root}")
    print(f"train from it with:\n  {shlex.join(train)}")
    return 0
