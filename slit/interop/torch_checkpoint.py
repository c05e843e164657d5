"""PyTorch checkpoints (`torch.save` pickles) -> safetensors, which is all slit reads.

`convert_torch_checkpoint(src, dst)` loads `src` with `torch.load(..., weights_only=True)`: torch's
restricted unpickler, which builds tensors, containers and plain numbers and refuses anything else, so no
code from the file ever runs. It then finds the state dict:

- `key` when given (e.g. "model_state");
- otherwise the top level when it holds tensors (a plain `torch.save(model.state_dict(), ...)`), else
  the dict under "model" (Pengi's releases, many training scripts) or "state_dict" (PyTorch Lightning);

drops a `module.` prefix that every name has (`nn.DataParallel` / DDP), and writes every tensor to
`dst` with `safetensors.torch.save_file`. Tensors that share storage (tied weights) or are not
contiguous are written as contiguous copies, each under its own name. Entries that are not tensors
(epochs, optimizer state, config dicts) are skipped and listed in the report. The safetensors header
records the source file name, its sha256, the key and prefix used and the tensor count.

torch is imported lazily: it is only needed here (`pip install 'slit[torch]'`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from slit.errors import UserError

__all__ = ["ConversionReport", "STATE_DICT_KEYS", "convert_torch_checkpoint", "sha256_of"]

STATE_DICT_KEYS = ("model", "state_dict")  # where a state dict is looked for when the top has no tensors
DATA_PARALLEL_PREFIX = "module."
INSTALL_HINT = "pip install 'slit[torch]'"


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What `convert_torch_checkpoint` wrote.

    `key`: where the state dict was ("" for the top level); `stripped_prefix`: the prefix removed from
    every name ("" for none); `tensors` / `bytes`: tensors written and their data size; `skipped`:
    entries that are not tensors, as "name (type)"; `metadata`: the safetensors header's metadata.
    """

    source: str
    destination: str
    source_sha256: str
    key: str
    stripped_prefix: str
    tensors: int
    bytes: int
    copied: tuple[str, ...]
    skipped: tuple[str, ...]
    metadata: dict[str, str]

    def summary(self) -> str:
        """A few lines for people: what was read, what was written, what was skipped."""
        where = f"under {self.key!r}" if self.key else "at the top level"
        lines = [
            f"{self.source}: state dict {where}"
            + (f", prefix {self.stripped_prefix!r} removed" if self.stripped_prefix else ""),
            f"wrote {self.destination}: {self.tensors} tensors, {self.bytes:,} bytes",
        ]
        if self.copied:
            lines.append(f"{len(self.copied)} shared or non-contiguous tensor(s) written as copies")
        if self.skipped:
            shown = ", ".join(self.skipped[:20]) + (
                f", ... ({len(self.skipped)} in all)" if len(self.skipped) > 20 else ""
            )
            entries = "entry" if len(self.skipped) == 1 else "entries"
            lines.append(f"skipped {len(self.skipped)} non-tensor {entries}: {shown}")
        return "\n".join(lines)


def sha256_of(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in `chunk`-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"converting a PyTorch checkpoint needs torch, which is not installed: {INSTALL_HINT}"
        ) from None
    return torch


def _type_name(value: Any) -> str:
    return type(value).__name__


def _reason(error: Exception) -> str:
    """The informative part of torch's load error, on one line: what the weights-only unpickler refused
    (torch's own advice, to load with weights_only=False, is left out)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    match = re.search(
        r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global| Please use|\n\n|$)", text, re.S
    )
    reason = " ".join((match.group(1) if match else text).split())
    return f"{type(error).__name__}: " + (reason[:160] + "..." if len(reason) > 160 else reason)


def _load(torch: Any, src: pathlib.Path) -> Any:
    import pickle

    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        reason = _reason(e)
        raise UserError(
            f"{src} is not a weights-only loadable PyTorch checkpoint ({reason}); "
            "slit loads weights only and never unpickles code: re-save it where it was made as a plain "
            "state dict, torch.save(model.state_dict(), path)"
        ) from None


def _find_state_dict(
    torch: Any, obj: Any, key: str | None, src: pathlib.Path
) -> tuple[str, Mapping, list[str]]:
    """(key used, the state dict, skipped top-level entries as "name (type)")."""

    def has_tensors(value: Any) -> bool:
        return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())

    if not isinstance(obj, Mapping):
        raise UserError(
            f"{src} holds a {_type_name(obj)}, not a dict of tensors: slit converts state dicts "
            "(torch.save(model.state_dict(), path), or a dict holding one)"
        )
    top = [str(k) for k in obj]
    if key is not None:
        if key not in obj:
            raise UserError(f"{src} has no key {key!r}; its top-level keys: {top}")
        if not isinstance(obj[key], Mapping):
            raise UserError(
                f"{src}: {key!r} holds a {_type_name(obj[key])}, not a state dict; top-level keys: {top}"
            )
        chosen = key
    elif has_tensors(obj):
        return "", obj, []
    else:
        chosen = next((k for k in STATE_DICT_KEYS if has_tensors(obj.get(k))), None)
        if chosen is None:
            raise UserError(
                f"{src} holds no tensors at its top level nor under {list(STATE_DICT_KEYS)}; top-level keys: "
                f"{top}; name the state dict's key with --key"
            )
    skipped = [f"{k} ({_type_name(v)})" for k, v in obj.items() if k != chosen]
    return chosen, obj[chosen], skipped


def convert_torch_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], key: str | None = None
) -> ConversionReport:
    """Converts the PyTorch checkpoint `src` (a `torch.save` file) to the safetensors file `dst`.

    Args:
      src: a `.pt` / `.pth` / `.bin` file written by `torch.save`.
      dst: the safetensors file to write (replaced if it exists; its folder is created).
      key: the top-level key that holds the state dict; None looks at the top level, then "model",
        then "state_dict".

    Returns:
      a `ConversionReport` (`.summary()` for people).

    Raises:
      UserError: torch is not installed; `src` is missing, is not loadable with weights_only=True (it
        needs code to unpickle), is not a dict, has no `key`, or holds no tensors.
    """
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not src.is_file():
        raise UserError(f"PyTorch checkpoint {str(src)!r} does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UserError(f"{dst} is the source checkpoint itself; name another output file")
    torch = _import_torch()
    from safetensors.torch import save_file

    digest = sha256_of(src)
    chosen, state_dict, skipped = _find_state_dict(torch, _load(torch, src), key, src)
    tensors = {str(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    skipped += [
        f"{'.'.join(filter(None, (chosen, str(k))))} ({_type_name(v)})"
        for k, v in state_dict.items()
        if not isinstance(v, torch.Tensor)
    ]
    unsupported = sorted(k for k, v in tensors.items() if v.layout != torch.strided)
    skipped += [
        f"{'.'.join(filter(None, (chosen, k)))} ({tensors.pop(k).layout} tensor)" for k in unsupported
    ]
    if not tensors:
        where = f"under {chosen!r}" if chosen else "at its top level"
        raise UserError(f"{src} holds no tensors {where} (entries: {skipped[:10]}); nothing to convert")
    prefix = ""
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in tensors):
        prefix = DATA_PARALLEL_PREFIX
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}

    # safetensors refuses tensors that share memory (tied weights) and non-contiguous views: copy those.
    storages: dict[int, int] = {}
    for v in tensors.values():
        ptr = v.untyped_storage().data_ptr()
        storages[ptr] = storages.get(ptr, 0) + 1
    copied = []
    out = {}
    for name, v in tensors.items():
        v = v.detach()
        shared = storages[v.untyped_storage().data_ptr()] > 1 or v.untyped_storage().nbytes() != v.nbytes
        if shared or not v.is_contiguous():
            copied.append(name)
            v = v.contiguous().clone()
        out[name] = v
    metadata = {
        "format": "pt",
        "source": src.name,
        "source_sha256": digest,
        "state_dict_key": chosen,
        "stripped_prefix": prefix,
        "tensor_count": str(len(out)),
        "converted_by": "slit convert-torch",
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    save_file(out, str(partial), metadata=metadata)
    partial.replace(dst)
    return ConversionReport(
        source=str(src),
        destination=str(dst),
        source_sha256=digest,
        key=chosen,
        stripped_prefix=prefix,
        tensors=len(out),
        bytes=sum(v.nbytes for v in out.values()),
        copied=tuple(sorted(copied)),
        skipped=tuple(skipped),
        metadata=metadata,
    )
