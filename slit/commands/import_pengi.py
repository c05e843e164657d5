"""`slit import-pengi SRC.safetensors --out DIR [--clip-tokenizer DIR] [--gpt2-tokenizer DIR]`: Pengi's
released weights as the parts slit loads (slit/interop/pengi.py): a CLAP (HTSAT) directory, a CLIP text
directory, a GPT-2 directory and the bridge's weights, with the `slit train` overrides that use them.

SRC is the safetensors file `slit convert-torch base.pth SRC.safetensors` writes from Pengi's checkpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "import Pengi's released weights (converted to safetensors) as CLAP, CLIP, GPT-2 and bridge parts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Pengi's state dict as safetensors (slit convert-torch base.pth SRC)")
    parser.add_argument("--out", required=True, help="the directory to write (created; files replaced)")
    parser.add_argument(
        "--clip-tokenizer",
        help="a directory with openai/clip-vit-base-patch16's tokenizer.json (copied into OUT/clip)",
    )
    parser.add_argument(
        "--gpt2-tokenizer", help="a directory with gpt2's tokenizer.json (copied into OUT/gpt2)"
    )


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from slit.interop.pengi import import_pengi

    import_pengi(args.src, args.out, args.clip_tokenizer, args.gpt2_tokenizer, log=print)
    return 0
