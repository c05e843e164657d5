"""`slit report WORKDIR... --out DIR [--metric NAME] [--x KEY]`: compares runs (an ablation, a sweep).

Each WORKDIR is a run directory (config.json) or a sweep root of launch/sweep.py (sweep.json: all its
points, started or not). Writes DIR/report.md (a table of the runs: swept values, status, final training
loss, test metrics; with seeds, mean ± std per setting too), DIR/report.csv (and report_by_setting.csv)
and DIR/report.png (a metric against a swept value); see slit/eval/compare.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "compare runs or sweeps: a table of swept values and test metrics, mean ± std over seeds, a plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "workdirs",
        nargs="+",
        metavar="WORKDIR",
        help="run directories (config.json) or sweep roots (sweep.json)",
    )
    parser.add_argument("--out", required=True, help="folder for report.md, report.csv and report.png")
    parser.add_argument(
        "--metric",
        help="the test metric to plot, e.g. CIDEr-D, text_to_audio_R@1 or train_loss (default: CIDEr-D, "
        "SPIDEr, text_to_audio_R@1, qa_accuracy, classification_accuracy, the first the runs have)",
    )
    parser.add_argument(
        "--x",
        help="the swept config key on the plot's x axis, e.g. qformer.num_queries (default: the first "
        "swept key other than seed)",
    )


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from slit.eval import compare

    report = compare.build_report(args.workdirs, args.out, metric=args.metric, x=args.x)
    print(report.markdown, end="")
    for note in report.notes:
        print(f"note: {note}")
    for path in report.written:
        print(f"wrote {path}")
    return 0
