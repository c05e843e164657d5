"""`slit score --predictions P.json --references R.json`: captioning metrics of any system's captions.

P.json holds {id: caption}, R.json {id: [captions]}; the metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D,
SPICE, SPIDEr; see slit/eval/captioning.py) are printed as JSON. Metrics that cannot run here (no Java,
no CoreNLP jars for SPICE) are null, with the reason under "unavailable".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from slit.errors import UserError

HELP = "score captions ({id: caption}) against references ({id: [captions]}); prints JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, help="JSON file: {id: caption}")
    parser.add_argument("--references", required=True, help="JSON file: {id: [caption, ...]}")
    parser.add_argument(
        "--metrics",
        default="BLEU,METEOR,ROUGE-L,CIDEr-D,SPICE,SPIDEr",
        help="comma-separated subset of BLEU,METEOR,ROUGE-L,CIDEr-D,SPICE,SPIDEr (METEOR starts a JVM that "
        "loads its paraphrase table: seconds)",
    )
    parser.add_argument(
        "--tokenizer",
        choices=("auto", "java", "native"),
        default="auto",
        help="PTB tokenizer: java (Stanford's, as pycocoevalcap), native (Python), auto (java if available)",
    )
    parser.add_argument("--corenlp-dir", help="folder with the Stanford CoreNLP 3.6.0 jars that SPICE needs")
    parser.add_argument("--per-item", action="store_true", help="also print per-id CIDEr-D / SPICE / SPIDEr")
    parser.add_argument("--out", help="also write the JSON to this file")


def read_json(path: str) -> Any:
    """Reads a JSON file; errors name the file and say what is wrong."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 JSON"
        ) from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from slit.eval import captioning

    predictions, references = read_json(args.predictions), read_json(args.references)
    captioning.check_captions(predictions, references, args.predictions, args.references)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    report = captioning.score_captions(
        predictions, references, metrics=metrics, tokenizer=args.tokenizer, corenlp_dir=args.corenlp_dir
    )
    if not args.per_item:
        report.pop("per_item")
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
