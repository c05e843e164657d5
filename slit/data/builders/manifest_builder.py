"""Builds a TFDS dataset from a JSON Lines manifest (format: slit.data.manifest).

    slit data build --manifest clips.jsonl --name my_clips [--data-dir DIR]

The dataset is named by the user, so its builder class is made at build time (`named`) and never
registered; reading it back needs no code (`tfds.data_source("my_clips", data_dir=DIR)` reads the
files).
"""

from __future__ import annotations

import collections
import pathlib
from typing import Any

import tensorflow_datasets as tfds

from slit.data.builders.base import AudioTextBuilder
from slit.data.manifest import Record, read_manifest
from slit.errors import UserError


class ManifestBuilder(AudioTextBuilder, skip_registration=True):
    """Clips listed in a JSON Lines manifest; splits come from each line's `split` (default "train")."""

    DESCRIPTION = "Audio clips with texts listed in a JSON Lines manifest (built by `slit data build`)."

    def __init__(self, *, manifest: str | pathlib.Path | None = None, **kwargs: Any) -> None:  # noqa: ANN401
        self.manifest = None if manifest is None else pathlib.Path(manifest)
        super().__init__(**kwargs)

    def _split_records(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Record]]:
        del dl_manager  # the manifest names the files
        if self.manifest is None:
            raise UserError(f"{self.name}: building from a manifest needs --manifest FILE.jsonl")
        by_split: dict[str, list[Record]] = collections.defaultdict(list)
        for record in read_manifest(self.manifest, self.report):
            by_split[record.split].append(record)
        self.report.settings["manifest"] = str(self.manifest.resolve())
        return dict(sorted(by_split.items()))
