"""`slit export --workdir DIR --format {safetensors,bundle,hf-blip2} --out OUT [--step N]`, for a stage-one
or stage-two run (slit/export.py)."""

from __future__ import annotations

import argparse
import pathlib
import tempfile
from collections.abc import Sequence

HELP = "write a run's trained weights for others: safetensors + model card, a bundle, or HF BLIP-2"
JOINS_MULTI_PROCESS_RUNS = True  # one process per host (slit/train/distributed.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="the run's directory (its checkpoints/)")
    # Checked by slit.export.export (one line naming the formats), not by argparse (usage + error).
    parser.add_argument("--format", required=True, help="safetensors, bundle or hf-blip2")
    parser.add_argument(
        "--out", required=True, help="a new (or empty) directory to write (a local path or gs://...)"
    )
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import jax

    from slit import export, paths

    if jax.process_index() != 0:  # every process reads the checkpoint (orbax reads it together); process 0
        with tempfile.TemporaryDirectory() as scratch:  # writes the export, the others a copy they drop
            export.export(args.workdir, args.format, pathlib.Path(scratch) / "export", args.step)
        return 0
    out = export.export(args.workdir, args.format, args.out, args.step)
    print(f"wrote {args.format} export of {args.workdir} to {out}:")
    for path in paths.files_under(out):
        stat = path.stat()  # an os.stat_result, or epath's StatResult for a gs:// --out
        size = stat.st_size if hasattr(stat, "st_size") else stat.length
        print(f"  {path.relative_to(out)}  ({size / 1e6:.2f} MB)")
    return 0
