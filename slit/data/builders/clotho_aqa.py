"""ClothoAQA (Lipping et al. 2022): audio question answering on 1991 Clotho clips, 6 questions per
clip, each answered by 3 annotators.

Layout (zenodo.org/record/6473207, extracted into the manual directory):

    clotho_aqa_train.csv   clotho_aqa_val.csv   clotho_aqa_test.csv
                           columns file_name, QuestionText, answer, confidence
    audio_files/*.wav

One example per clip and split, holding all its (question, answer) rows in order: `questions[i]` is
answered by `answers[i]`; the annotators' `confidence` is in the metadata. Splits: train,
validation, test. Rows that are not UTF-8 are read as Windows-1252 and reported.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from slit.data.builders import base
from slit.data.manifest import Record
from slit.errors import UserError

INSTRUCTIONS = __doc__.split("Layout", 1)[1]
SPLITS = {"train": "clotho_aqa_train.csv", "validation": "clotho_aqa_val.csv", "test": "clotho_aqa_test.csv"}
COLUMNS = ("file_name", "QuestionText", "answer")


class ClothoAqa(base.AudioTextBuilder):
    """ClothoAQA audio question answering (yes/no and single-word answers)."""

    name = "clotho_aqa"
    DESCRIPTION = "ClothoAQA: questions about Clotho clips, each answered by 3 annotators."
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _split_records(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Record]]:
        root = base.manual_dir(dl_manager, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        index = base.AudioIndex(root)
        out: dict[str, list[Record]] = {}
        for split, csv_name in SPLITS.items():
            table = root / csv_name
            if not table.is_file():
                continue
            by_clip: dict[str, Record] = {}
            for origin, row in base.read_csv(table, self.report, COLUMNS):
                name = row["file_name"].strip()
                question, answer = row["QuestionText"].strip(), row["answer"].strip()
                if not question or not answer:
                    self.report.skip(
                        "empty_text", "empty question or answer", split=split, origin=origin, id=name
                    )
                    continue
                if name not in by_clip:
                    path = index.find(name, prefer="audio_files")
                    if path is None:
                        base.missing_record(self.report, split, origin, name, f"audio_files/{name}", root)
                        by_clip[name] = None
                        continue
                    by_clip[name] = Record(
                        id=name,
                        audio=path,
                        split=split,
                        origin=origin,
                        audio_name=index.relative(path),
                        metadata={"confidence": []},
                    )
                record = by_clip[name]
                if record is None:  # its audio is missing (reported once)
                    continue
                record.questions.append(question)
                record.answers.append(answer)
                record.metadata["confidence"].append(row.get("confidence", "").strip())
            out[split] = [r for r in by_clip.values() if r is not None]
        if not out:
            raise UserError(f"clotho_aqa: no clotho_aqa_*.csv in {root}; expected:\n{INSTRUCTIONS}")
        return out
