"""ESC-50 (Piczak 2015): 2000 five-second clips in 50 classes, in 5 cross-validation folds.

Layout (github.com/karolpiczak/ESC-50, the repository's archive `ESC-50-master.zip`, extracted into
the manual directory; the `ESC-50-master/` level is optional):

    meta/esc50.csv   columns filename, fold, target, category, esc10, src_file, take
    audio/*.wav      {FOLD}-{CLIP_ID}-{TAKE}-{TARGET}.wav, 44.1 kHz mono

Splits `fold1` ... `fold5` (evaluate on one, train on the others: split "fold1+fold2+fold3+fold4").
Labels: the `category` (e.g. "dog", "crying_baby"); metadata: fold, target, esc10, src_file, take.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from slit.data.builders import base
from slit.data.manifest import Record
from slit.errors import UserError

INSTRUCTIONS = __doc__.split("Layout", 1)[1]
COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
NUM_FOLDS = 5


class Esc50(base.AudioTextBuilder):
    """ESC-50 environmental sound classification, by fold."""

    name = "esc50"
    DESCRIPTION = "ESC-50: 2000 environmental recordings, 50 classes, 5 folds (labels: the category)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _split_records(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Record]]:
        root = base.manual_dir(dl_manager, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        tables = sorted(root.rglob("esc50.csv"))
        if not tables:
            raise UserError(f"esc50: no meta/esc50.csv under {root}; extract ESC-50-master.zip there")
        table = tables[0]
        audio_dir = table.parent.parent / "audio"
        index = base.AudioIndex(audio_dir if audio_dir.is_dir() else root)
        splits: dict[str, list[Record]] = {f"fold{i}": [] for i in range(1, NUM_FOLDS + 1)}
        for origin, row in base.read_csv(table, self.report, COLUMNS):
            split = f"fold{row['fold'].strip()}"
            clip_id = pathlib.Path(row["filename"]).stem
            if split not in splits:
                self.report.skip(
                    "bad_field", f"fold {row['fold']!r} is not 1-{NUM_FOLDS}", origin=origin, id=clip_id
                )
                continue
            path = index.find(row["filename"])
            if path is None:
                base.missing_record(self.report, split, origin, clip_id, row["filename"], index.root)
                continue
            where = {"split": split, "origin": origin, "path": str(path), "id": clip_id}
            labels = base.texts_or_report([row["category"]], where, self.report)
            if not labels:
                self.report.skip("empty_text", "the category is empty", **where)
                continue
            splits[split].append(
                Record(
                    id=clip_id,
                    audio=path,
                    split=split,
                    labels=labels,
                    origin=origin,
                    audio_name=index.relative(path),
                    metadata={
                        "fold": int(row["fold"]),
                        "target": int(row["target"]) if row["target"].strip().isdigit() else row["target"],
                        "esc10": row["esc10"].strip().lower() == "true",
                        "src_file": row["src_file"],
                        "take": row["take"],
                    },
                )
            )
        return splits
