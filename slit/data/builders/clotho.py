"""Clotho v2.1 (Drossos et al. 2020): 15-30 s Freesound clips, 5 captions each.

Layout (zenodo.org/record/4783391; the .7z archives extracted into the manual directory):

    clotho_captions_development.csv   columns file_name, caption_1 ... caption_5
    clotho_captions_validation.csv
    clotho_captions_evaluation.csv
    clotho_metadata_{development,validation,evaluation}.csv   (optional: keywords, sound_id, ...)
    development/*.wav   validation/*.wav   evaluation/*.wav   (44.1 kHz mono)

Splits: train (development), validation, test (evaluation); a split whose captions CSV is absent is
left out. The metadata CSVs are not all UTF-8: such fields are read as Windows-1252 and reported.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from slit.data.builders import base
from slit.data.manifest import Record
from slit.errors import UserError

INSTRUCTIONS = __doc__.split("Layout", 1)[1]
SPLITS = {"train": "development", "validation": "validation", "test": "evaluation"}
CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))
METADATA_COLUMNS = ("keywords", "sound_id", "sound_link", "start_end_samples", "manufacturer", "license")


class Clotho(base.AudioTextBuilder):
    """Clotho v2.1 audio captioning / retrieval: 5 captions per clip."""

    name = "clotho"
    DESCRIPTION = "Clotho v2.1: 15-30 s Freesound clips with 5 crowd-sourced captions each."
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _split_records(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Record]]:
        root = base.manual_dir(dl_manager, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        index = base.AudioIndex(root)
        out: dict[str, list[Record]] = {}
        for split, published in SPLITS.items():
            captions_csv = root / f"clotho_captions_{published}.csv"
            if not captions_csv.is_file():
                continue
            metadata = self._metadata(root / f"clotho_metadata_{published}.csv")
            out[split] = []
            for origin, row in base.read_csv(captions_csv, self.report, ("file_name", *CAPTION_COLUMNS)):
                name = row["file_name"].strip()
                path = index.find(name, prefer=published) or index.find(
                    name, prefer=f"clotho_audio_{published}"
                )
                if path is None:
                    base.missing_record(self.report, split, origin, name, f"{published}/{name}", root)
                    continue
                where = {"split": split, "origin": origin, "path": str(path), "id": name}
                captions = base.texts_or_report([row[c] for c in CAPTION_COLUMNS], where, self.report)
                if not captions:
                    self.report.skip("empty_text", "all 5 captions are empty", **where)
                    continue
                out[split].append(
                    Record(
                        id=name,
                        audio=path,
                        split=split,
                        captions=captions,
                        origin=origin,
                        audio_name=index.relative(path),
                        metadata=metadata.get(name, {}),
                    )
                )
        if not out:
            raise UserError(f"clotho: no clotho_captions_*.csv in {root}; expected:\n{INSTRUCTIONS}")
        return out

    def _metadata(self, path: base.pathlib.Path) -> dict[str, dict]:
        if not path.is_file():
            return {}
        rows = base.read_csv(path, self.report, ("file_name",))
        return {
            row["file_name"].strip(): {k: row[k] for k in METADATA_COLUMNS if row.get(k)} for _, row in rows
        }
