"""Resumable evaluation: per-batch results kept on disk, so that an evaluation stopped by preemption
picks up where it stopped when the same command runs again.

An evaluation walks a fixed sequence of batches (the split in order, a fixed batch size). After each
batch it hands its host results (NumPy arrays, or JSON-able values such as generated captions) to
`BatchProgress.save(i, ...)`; before computing batch i it asks `BatchProgress.load(i)`. The results
live in `<workdir>/eval/partial/<key>/batch-<i>.npz`, written atomically (temporary name, then rename),
with the key naming the task, data, split, checkpoint step and whatever else changes the results
(e.g. the decoding settings). `clear()` removes them once the report is written.

Multi-process runs: outputs are replicated, so only process 0 writes; every process reads the same
files (a shared file system, as for checkpoints).
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from slit import paths

PARTIAL_DIR = "partial"


def progress_key(**fields: Any) -> str:  # noqa: ANN401
    """A directory name for an evaluation: readable fields plus a short hash of all of them."""
    text = json.dumps(fields, sort_keys=True, default=str)
    readable = "-".join(str(fields[k]) for k in ("task", "data", "split", "step") if k in fields)
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in readable)
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class BatchProgress:
    """Per-batch results of one evaluation, kept until `clear()`.

    Args:
      workdir: the run's directory.
      key: from `progress_key(...)`; a different key never reuses these results.
      write: whether this process writes (process 0 of a multi-process run).
    """

    def __init__(self, workdir: str | pathlib.Path, key: str, write: bool = True):
        self.directory = paths.workdir_path(workdir) / "eval" / PARTIAL_DIR / key
        self.write = write
        self.resumed = 0  # batches loaded instead of computed

    def _path(self, index: int, group: str) -> epath.Path:
        return self.directory / f"{group}-{index:06d}.npz"

    def load(self, index: int, group: str = "batch") -> dict[str, Any] | None:
        """Batch `index`'s saved results ({name: array or JSON value}); None if not saved or unreadable.

        `group` names a sequence of batches when an evaluation has several (e.g. "audio" embeddings,
        then "rerank" scores)."""
        path = self._path(index, group)
        if not path.is_file():
            return None
        try:
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
                out: dict[str, Any] = {}
                for name in data.files:
                    if name.startswith("json:"):
                        out[name[5:]] = json.loads(str(data[name]))
                    else:
                        out[name] = np.array(data[name])
        except (OSError, ValueError) as e:  # a torn or foreign file: compute the batch again
            print(f"warning: ignoring unreadable partial result {path} ({e})")
            return None
        self.resumed += 1
        return out

    def save(self, index: int, results: Mapping[str, Any], group: str = "batch") -> None:
        """Saves batch `index`'s results (of `group`): arrays as they are, anything else as JSON."""
        if not self.write:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name, value in results.items():
            if isinstance(value, np.ndarray):
                arrays[name] = value
            else:
                arrays[f"json:{name}"] = np.array(json.dumps(value))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        paths.write_whole(self._path(index, group), buffer.getvalue())

    def describe(self) -> str:
        """What is saved so far, for the preemption message: "N batches saved in DIR"."""
        saved = len(list(self.directory.glob("*.npz"))) if self.directory.is_dir() else 0
        return f"{saved} batches saved in {self.directory}"

    def clear(self) -> None:
        """Removes the saved results (call once the report is written)."""
        if self.write and self.directory.is_dir():
            if paths.is_remote(self.directory):
                self.directory.rmtree()
            else:
                shutil.rmtree(self.directory, ignore_errors=True)
            parent = self.directory.parent
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()


def load_or_compute(
    progress: BatchProgress | None,
    index: int,
    compute: Callable[[], dict[str, Any]],
    group: str = "batch",
) -> dict[str, Any]:
    """Batch `index`'s results: the saved ones if `progress` has them, else `compute()`'s (then saved)."""
    if progress is not None:
        saved = progress.load(index, group)
        if saved is not None:
            return saved
    results = compute()
    if progress is not None:
        progress.save(index, results, group)
    return results


def clip_bar(total: int, what: str) -> Any:  # noqa: ANN401 (a tqdm bar)
    """A progress bar with ETA over `total` clips, shown on the main process only."""
    import jax
    import tqdm

    return tqdm.tqdm(
        total=total, desc=what, unit="clip", dynamic_ncols=True, disable=jax.process_index() != 0
    )
