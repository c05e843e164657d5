"""Run directories as `etils.epath.Path`: a workdir may be a local path or any URI epath and orbax accept.

`slit train --workdir gs://bucket/run` writes the same files as a local workdir (config.json, the
tokenizers, metrics.jsonl, tensorboard/, checkpoints/, eval/), through epath (gs:// goes through fsspec's
gcsfs) and orbax (tensorstore's gcs driver). `workdir_path` is where a workdir (or a features_dir) enters
the code; local paths behave as the `pathlib.Path`s they were before.

The few things that need a file on this machine (a tokenizer library loading from a directory) use
`local_copy`, which copies a remote file or directory into a temporary one.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URI path (`gs://bucket/...`, `s3://...`): one that is not on this machine's filesystem."""
    return "://" in os.fspath(path)


def workdir_path(path: PathLike, *, absolute: bool = False) -> epath.Path:
    """`path` (a local path or a URI such as `gs://bucket/run`) as an `epath.Path`.

    `absolute`: a local path made absolute as `pathlib.Path.absolute` does (symlinks kept); URIs are
    absolute already."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(pathlib.Path(path).absolute() if absolute else path)


@contextlib.contextmanager
def local_copy(path: PathLike, only: Sequence[str] | None = None) -> Iterator[pathlib.Path]:
    """A local path holding `path`'s contents: `path` itself when local, else a temporary copy of the
    file or directory (removed on exit); `only`: of a directory, copy just these entries (those there)."""
    if not is_remote(path):
        yield pathlib.Path(path)
        return
    source = epath.Path(os.fspath(path))
    with tempfile.TemporaryDirectory(prefix="slit-") as scratch:
        target = pathlib.Path(scratch) / source.name
        if only is None:
            _copy_tree(source, epath.Path(target))
        else:
            target.mkdir()
            for name in only:
                if (source / name).exists():
                    _copy_tree(source / name, epath.Path(target / name))
        yield target


def copy(source: PathLike, target: PathLike) -> None:
    """Copies a file or directory to `target`, either of them a local path or a URI; files already at
    `target` are replaced (local to local: `shutil.copy` / `shutil.copytree`)."""
    if not is_remote(source) and not is_remote(target):
        if pathlib.Path(source).is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy(source, target)
        return
    _copy_tree(workdir_path(source), workdir_path(target))


def write_whole(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` whole or not at all: a local file through a temporary sibling and a rename
    (a reader never sees half of it), a URI as one object (an object store's writes are whole)."""
    if is_remote(path):
        epath.Path(os.fspath(path)).write_bytes(data)
        return
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def move(source: PathLike, target: PathLike) -> None:
    """Moves a file or directory to `target` on the same filesystem (`shutil.move` for local paths; a copy
    then a delete for URIs, where directories are only name prefixes)."""
    if not is_remote(source):
        shutil.move(os.fspath(source), os.fspath(target))
        return
    source = epath.Path(os.fspath(source))
    _copy_tree(source, epath.Path(os.fspath(target)))
    if source.is_dir():
        source.rmtree()
    else:
        source.unlink()


def files_under(directory: PathLike) -> list[pathlib.Path] | list[epath.Path]:
    """Every file under `directory`, sorted (for a URI: listed level by level, as epath refuses `**`)."""
    if not is_remote(directory):
        return sorted(p for p in pathlib.Path(directory).rglob("*") if p.is_file())
    out, pending = [], [workdir_path(directory)]
    while pending:
        for child in pending.pop().iterdir():
            (pending if child.is_dir() else out).append(child)
    return sorted(out)


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    if not source.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        return
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        _copy_tree(child, target / child.name)
