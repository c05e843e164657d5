"""`slit data build ...` and `slit data inspect NAME`: turn audio into a TFDS dataset, and look at one.

    slit data build --manifest clips.jsonl --name my_clips [--data-dir DIR]
    slit data build --source clotho --manual-dir DIR [--data-dir DIR]
    slit data inspect my_clips [--data-dir DIR]

The manifest format is in slit/data/manifest.py; the public sets' layouts in slit/data/builders/.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from slit.data.builders import SOURCES

HELP = "build a dataset from a manifest or a public set's files; inspect a built dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="build a TFDS dataset (array_record) with a bad-input report")
    what = build.add_mutually_exclusive_group(required=True)
    what.add_argument("--manifest", help="a JSON Lines manifest (README: Data)")
    what.add_argument(
        "--source", choices=sorted(SOURCES), help="a public set, from its files in --manual-dir"
    )
    build.add_argument("--name", help="the dataset's name (required with --manifest; default: the source's)")
    build.add_argument("--data-dir", default=None, help="TFDS data directory (default ~/tensorflow_datasets)")
    build.add_argument("--manual-dir", default=None, help="where the public set's downloaded files are")
    build.add_argument("--sample-rate", type=int, default=16000, help="audio is resampled to this rate (Hz)")
    build.add_argument("--min-seconds", type=float, default=0.1, help="shorter clips are skipped")
    build.add_argument("--max-seconds", type=float, default=600.0, help="longer clips are skipped (or cut)")
    build.add_argument("--truncate-long", action="store_true", help="cut clips longer than --max-seconds")
    build.add_argument(
        "--silence-dbfs", type=float, default=-80.0, help="clips peaking below this are skipped"
    )
    build.add_argument(
        "--max-bad-fraction",
        type=float,
        default=None,
        help="fail if more inputs than this are bad (default 0.05)",
    )
    build.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU count)")
    build.add_argument("--overwrite", action="store_true", help="rebuild a dataset that exists")

    inspect = actions.add_parser("inspect", help="print splits, counts, durations and a few examples")
    inspect.add_argument("name", help="a built dataset's name")
    inspect.add_argument(
        "--data-dir", default=None, help="TFDS data directory (default ~/tensorflow_datasets)"
    )
    inspect.add_argument("--examples", type=int, default=3, help="examples shown per split")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    del extra
    if args.action == "build":
        return _build(args)
    return _inspect(args)


def _build(args: argparse.Namespace) -> int:
    from slit.data import builders
    from slit.data.audio_io import AudioChecks
    from slit.errors import UserError

    try:
        checks = AudioChecks(
            sample_rate=args.sample_rate,
            min_seconds=args.min_seconds,
            max_seconds=args.max_seconds,
            too_long="truncate" if args.truncate_long else "skip",
            silence_dbfs=args.silence_dbfs,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.max_bad_fraction is not None and not 0 <= args.max_bad_fraction <= 1:
        raise UserError(f"--max-bad-fraction={args.max_bad_fraction} must be between 0 and 1")
    builders.build(
        source=args.source,
        manifest=args.manifest,
        name=args.name,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        checks=checks,
        max_bad_fraction=args.max_bad_fraction,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from slit.data import sources

    summary = sources.describe(args.name, args.data_dir, num_examples=args.examples)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    print(f"{summary['name']} at {summary['directory']} ({summary['sample_rate']} Hz)")
    for split, s in summary["splits"].items():
        note = "" if s["scanned"] == s["examples"] else f", durations from {s['scanned']} examples"
        print(
            f"  {split}: {s['examples']} clips, {s['hours']:.2f} h; seconds min {s['seconds_min']:.2f} "
            f"median {s['seconds_median']:.2f} max {s['seconds_max']:.2f}{note}"
        )
        for ex in s["first_examples"]:
            texts = "; ".join(
                f"{key}: {' | '.join(ex[key])}"
                for key in ("captions", "questions", "answers", "labels")
                if key in ex
            )
            print(f"    {ex['id']} ({ex['seconds']} s): {texts[:200]}")
    report = summary.get("build_report")
    if report:
        skipped = ", ".join(f"{k} {v}" for k, v in report["skipped_by_reason"].items()) or "none"
        repaired = ", ".join(f"{k} {v}" for k, v in report["repaired_by_reason"].items()) or "none"
        print(f"  build: kept {report['kept']}, skipped {report['skipped']} ({skipped}), repaired {repaired}")
    return 0
