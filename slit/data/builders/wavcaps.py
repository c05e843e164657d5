"""WavCaps (Mei et al. 2023): ~400k weakly-labelled clips with ChatGPT-written captions, from four
sources.

Layout (huggingface.co/datasets/cvssp/WavCaps, with the zip archives extracted into the manual
directory):

    json_files/AudioSet_SL/as_final.json
    json_files/BBC_Sound_Effects/bbc_final.json
    json_files/FreeSound/fsd_final.json
    json_files/SoundBible/sb_final.json
        {"num_captions_per_audio": 1, "data": [{"id": ..., "caption": ..., "duration": ..., ...}]}
    Audio/{AudioSet_SL,BBC_Sound_Effects,FreeSound,SoundBible}/{id}.flac
        (anywhere below is fine; AudioSet ids end in ".wav", their files in ".flac")

Every JSON present is built (leave one out to drop that source). One split, `train`; ids are
`{source}/{id}`; metadata: the source and every other field of the entry. WavCaps' AudioSet part
overlaps AudioCaps and its FreeSound part overlaps Clotho: leave those out when evaluating there.
"""

from __future__ import annotations

import json

import tensorflow_datasets as tfds

from slit.data.builders import base
from slit.data.manifest import Record
from slit.errors import UserError

INSTRUCTIONS = __doc__.split("Layout", 1)[1]
SOURCES = {
    "as_final.json": "AudioSet_SL",
    "bbc_final.json": "BBC_Sound_Effects",
    "fsd_final.json": "FreeSound",
    "sb_final.json": "SoundBible",
}


class WavCaps(base.AudioTextBuilder):
    """WavCaps captions (one per clip)."""

    name = "wavcaps"
    DESCRIPTION = (
        "WavCaps: weakly-labelled audio captions from AudioSet, BBC Sound Effects, FreeSound, SoundBible."
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _split_records(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Record]]:
        root = base.manual_dir(dl_manager, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        tables = sorted(p for p in root.rglob("*.json") if p.name in SOURCES)
        if not tables:
            raise UserError(f"wavcaps: none of {', '.join(SOURCES)} under {root}; expected:\n{INSTRUCTIONS}")
        index = base.AudioIndex(root)
        records = []
        for table in tables:
            source = SOURCES[table.name]
            try:
                entries = json.loads(table.read_text(encoding="utf-8"))["data"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f"wavcaps: {table} is not the published JSON ({type(e).__name__}: {e}); expected an "
                    'object with a "data" list. Download it again.'
                ) from None
            for number, entry in enumerate(entries):
                origin = f"{table.name}:data[{number}]"
                if not isinstance(entry, dict) or not isinstance(entry.get("id"), str | int):
                    self.report.skip("bad_field", "entry without an id", split="train", origin=origin)
                    continue
                stem = str(entry["id"]).removesuffix(".wav").removesuffix(".flac")
                clip_id = f"{source}/{stem}"
                caption = entry.get("caption")
                if not isinstance(caption, str) or not caption.strip():
                    self.report.skip(
                        "empty_text", "missing or empty caption", split="train", origin=origin, id=clip_id
                    )
                    continue
                path = index.find(stem, prefer=source)
                if path is None:
                    base.missing_record(self.report, "train", origin, clip_id, f"{source}/{stem}.flac", root)
                    continue
                metadata = {k: v for k, v in entry.items() if k not in ("id", "caption", "audio")}
                records.append(
                    Record(
                        id=clip_id,
                        audio=path,
                        split="train",
                        captions=[caption.strip()],
                        origin=origin,
                        audio_name=index.relative(path),
                        metadata={"source": source, **metadata},
                    )
                )
        return {"train": records}
