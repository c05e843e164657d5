"""`slit demo [--quick] [--workdir DIR]`: the whole recipe on real pretrained models and real sounds.

Builds a dataset from real recordings, trains both stages on the frozen Whisper tiny.en and SmolLM2,
evaluates on held-out clips against trivial baselines, exports a bundle and asks it questions
(slit/demo/recipe.py). Writes DIR/summary.json; re-running reuses and resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "the real demo: real sounds, Whisper + Q-Former + SmolLM2, both stages, evaluation, export"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small subset and few steps (minutes; shows the path, not quality)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="where everything is written (default runs/demo, --quick: runs/demo-quick)",
    )


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    del extra
    from slit.demo import recipe

    workdir = args.workdir or ("runs/demo-quick" if args.quick else "runs/demo")
    recipe.run(workdir, quick=args.quick)
    return 0
