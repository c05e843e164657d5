"""`slit convert-torch SRC.pt DST.safetensors [--key K]`: a PyTorch checkpoint's weights as safetensors.

slit reads weights from safetensors only; released checkpoints such as Pengi's are `torch.save` pickles.
This loads one with torch's weights-only unpickler (no code from the file runs), finds its state dict
and writes it (see slit/interop/torch_checkpoint.py). Needs torch: `pip install 'slit[torch]'`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "convert a PyTorch checkpoint (.pt/.pth/.bin, weights only) to safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the torch.save file (a state dict, or a dict holding one)")
    parser.add_argument("dst", help="the .safetensors file to write (replaced if it exists)")
    parser.add_argument(
        "--key",
        help="top-level key that holds the state dict (default: the top level when it holds tensors, "
        "else 'model', else 'state_dict')",
    )


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from slit.interop.torch_checkpoint import convert_torch_checkpoint

    print(convert_torch_checkpoint(args.src, args.dst, key=args.key).summary())
    return 0
