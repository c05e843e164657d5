"""AudioCaps (Kim et al. 2019): 10 s AudioSet clips from YouTube with human captions (1 per training
clip, 5 per validation and test clip).

Layout in the manual directory (github.com/cdjkim/audiocaps `dataset/`; the audio is not published:
each lab downloads the clips from YouTube, so file names vary and some videos are gone):

    train.csv  val.csv  test.csv     columns audiocap_id, youtube_id, start_time, caption
                                     (also found under dataset/)
    audio files anywhere below, one 10 s clip per (youtube_id, start_time), named one of
    {youtube_id}_{start_time}.*, Y{youtube_id}.*, {youtube_id}.*,
    Y{youtube_id}_{start:.3f}_{end:.3f}.*  (wav, flac, ogg or mp3)

Rows of the same clip are merged: one example per clip, with all its captions. Splits: train,
validation, test. A clip without an audio file is reported as missing; since every copy of AudioCaps
misses some deleted videos, this builder accepts up to 25% bad inputs by default.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from slit.data.builders import base
from slit.data.manifest import Record
from slit.errors import UserError

INSTRUCTIONS = __doc__.split("Layout in the manual directory", 1)[1]
SPLITS = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
CLIP_SECONDS = 10


def audio_names(youtube_id: str, start_time: str) -> tuple[str, ...]:
    """The file stems downloaders give the clip of (youtube_id, start_time)."""
    start = float(start_time)
    window = f"{start:.3f}_{start + CLIP_SECONDS:.3f}"
    return (
        f"{youtube_id}_{start_time}",
        f"{youtube_id}_{start:g}",
        f"Y{youtube_id}",
        youtube_id,
        f"Y{youtube_id}_{window}",
        f"{youtube_id}_{window}",
    )


class AudioCaps(base.AudioTextBuilder):
    """AudioCaps captioning / retrieval."""

    name = "audiocaps"
    DESCRIPTION = "AudioCaps: 10 s AudioSet clips with crowd-sourced captions."
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS
    DEFAULT_MAX_BAD_FRACTION = 0.25

    def _split_records(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Record]]:
        root = base.manual_dir(dl_manager, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        index = base.AudioIndex(root)
        out: dict[str, list[Record]] = {}
        for split, csv_name in SPLITS.items():
            table = next((p for p in (root / csv_name, root / "dataset" / csv_name) if p.is_file()), None)
            if table is None:
                continue
            clips: dict[str, Record | None] = {}
            for origin, row in base.read_csv(table, self.report, COLUMNS):
                youtube_id, start = row["youtube_id"].strip(), row["start_time"].strip()
                clip_id = f"{youtube_id}_{start}"
                try:
                    names = audio_names(youtube_id, start)
                except ValueError:
                    self.report.skip("bad_field", f"start_time {start!r} is not a number", origin=origin)
                    continue
                caption = row["caption"].strip()
                if clip_id not in clips:
                    path = index.find(*names, prefer=split)
                    if path is None:
                        base.missing_record(self.report, split, origin, clip_id, " or ".join(names[:3]), root)
                        clips[clip_id] = None
                        continue
                    clips[clip_id] = Record(
                        id=clip_id,
                        audio=path,
                        split=split,
                        origin=origin,
                        audio_name=index.relative(path),
                        metadata={"youtube_id": youtube_id, "start_time": float(start), "audiocap_ids": []},
                    )
                record = clips[clip_id]
                if record is None:
                    continue
                if not caption:
                    self.report.repair("empty_text", "an empty caption row was dropped", **record.where())
                    continue
                record.captions.append(caption)
                record.metadata["audiocap_ids"].append(row["audiocap_id"].strip())
            kept = []
            for record in clips.values():
                if record is None:
                    continue
                if not record.captions:
                    self.report.skip("empty_text", "every caption of the clip is empty", **record.where())
                    continue
                kept.append(record)
            out[split] = kept
        if not out:
            raise UserError(
                f"audiocaps: no train.csv, val.csv or test.csv in {root}; expected:\n{INSTRUCTIONS}"
            )
        return out
