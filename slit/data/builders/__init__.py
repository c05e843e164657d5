"""Dataset builders: a JSON Lines manifest, or a public set from its published layout.

    build(manifest="clips.jsonl", name="my_clips", data_dir=...)        # slit data build --manifest
    build(source="clotho", manual_dir="downloads/clotho", data_dir=...) # slit data build --source

Every builder writes the same example layout (slit.data.builders.base) and a bad-input report.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import shutil
import time
from typing import Any

SOURCES: dict[str, str] = {
    "audiocaps": "slit.data.builders.audiocaps:AudioCaps",
    "clotho": "slit.data.builders.clotho:Clotho",
    "clotho_aqa": "slit.data.builders.clotho_aqa:ClothoAqa",
    "esc50": "slit.data.builders.esc50:Esc50",
    "wavcaps": "slit.data.builders.wavcaps:WavCaps",
}
"""Public sets: name -> builder class ("module:Class")."""

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def builder_class(source: str) -> type:
    """The builder class of a public set (importing its module registers its TFDS name)."""
    from slit.errors import UserError

    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}, or use --manifest")
    module, cls = SOURCES[source].split(":")
    return getattr(importlib.import_module(module), cls)


def named(cls: type, name: str) -> type:
    """A subclass of builder `cls` that writes the dataset `name` (not registered with TFDS)."""
    from slit.errors import UserError

    if not NAME_PATTERN.match(name):
        raise UserError(f"dataset name {name!r}: use lowercase letters, digits and _, starting with a letter")
    return type(cls)(f"Named_{name}", (cls,), {"name": name}, skip_registration=True)


def build(
    *,
    source: str | None = None,
    manifest: str | pathlib.Path | None = None,
    name: str | None = None,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    checks: Any = None,  # noqa: ANN401 (slit.data.audio_io.AudioChecks)
    max_bad_fraction: float | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> Any:  # noqa: ANN401 (a tfds.core.DatasetBuilder)
    """Builds (or finds) a dataset; returns its TFDS builder. Raises UserError on bad input.

    Exactly one of `source` (a public set, read from `manual_dir`) and `manifest` is given. `name`
    defaults to the source's name; a manifest needs one.
    """
    import tensorflow_datasets as tfds

    from slit.data.builders.manifest_builder import ManifestBuilder
    from slit.errors import UserError

    if (source is None) == (manifest is None):
        raise UserError("give either --manifest FILE.jsonl or --source NAME (a public set)")
    if manifest is not None:
        if not name:
            raise UserError("a manifest build needs --name NAME (the dataset's name)")
        if not pathlib.Path(manifest).is_file():  # before TFDS starts (and creates folders)
            raise UserError(
                f"manifest {manifest} does not exist or is not a file; pass --manifest FILE.jsonl"
            )
        cls, kwargs = named(ManifestBuilder, name), {"manifest": manifest}
    else:
        cls, kwargs = builder_class(source), {}
        if name and name != cls.name:
            cls = named(cls, name)

    def make() -> Any:  # noqa: ANN401
        return cls(
            data_dir=data_dir, checks=checks, max_bad_fraction=max_bad_fraction, workers=workers, **kwargs
        )

    builder = make()
    if builder.is_prepared():
        if not overwrite:
            if verbose:
                print(f"{builder.name}: already built at {builder.data_dir} (--overwrite rebuilds it)")
            return builder
        shutil.rmtree(builder.data_dir)
        builder = make()
    builder.show_progress = verbose
    tfds.disable_progress_bar()  # one bar per split from the builder instead of TFDS's
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    start = time.perf_counter()
    root = pathlib.Path(builder.data_dir).parents[1]  # <data_dir>/<name>/<version> -> <data_dir>
    created = [p for p in (root / builder.name, root / "downloads") if not p.exists()]
    try:
        builder.download_and_prepare(download_config=config, file_format="array_record")
    except BaseException:
        _remove_all_but_the_failure_report(created)
        raise
    finally:
        if verbose and (builder.report.num_kept or builder.report.problems):
            print(builder.report.terminal_summary())
    if verbose:
        counts = ", ".join(f"{s} {info.num_examples}" for s, info in sorted(builder.info.splits.items()))
        print(
            f"{builder.name}: built in {time.perf_counter() - start:.1f} s at {builder.data_dir} ({counts}); "
            f"bad-input report: {pathlib.Path(builder.data_dir) / 'bad_inputs.jsonl'}"
        )
    return builder


def _remove_all_but_the_failure_report(created: list[pathlib.Path]) -> None:
    """After a failed build: removes the folders it created, except the failed build's bad-input report
    (`<data_dir>/<name>/failed_build/`), which the error message points to."""
    from slit.data.builders.base import FAILED_BUILD_DIR

    for path in created:
        if (path / FAILED_BUILD_DIR).is_dir():
            for child in path.iterdir():
                if child.name == FAILED_BUILD_DIR:
                    continue
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
