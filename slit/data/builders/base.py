"""The TFDS builder every slit audio dataset shares: records in, checked audio out, a report beside it.

A concrete builder only lists its clips (`_split_records`: split -> `Record`s, from a manifest or from
a public set's CSV/JSON files in the TFDS manual directory). This class decodes each clip with
`slit.data.audio_io.read_clip` on a few threads (resampled to one rate, mono), skips or repairs bad
inputs, writes ArrayRecord files (no TensorFlow needed), and writes the bad-input report
(slit.data.report) into the dataset directory. If more than `max_bad_fraction` of the inputs are bad
the build fails and nothing is written but the report (in `<data_dir>/<name>/failed_build/`).

Each example:

- `audio`: int16 PCM (num_samples,), mono, at `info.metadata["sample_rate"]`;
- `num_samples`: int32;
- `id`: unique in the dataset;
- `captions`, `questions`, `answers` (aligned with questions), `labels`: lists of strings (maybe empty);
- `question_types`: one type per question, or empty (untyped questions);
- `audio_path`: the audio file as listed (relative to the manifest or the manual directory);
- `start_s`: where the stored audio starts in that file, seconds;
- `metadata`: JSON of anything else the source gives (folds, keywords, sources, licences...).
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import csv
import io
import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from slit.data import audio_io
from slit.data.manifest import Record, clean_texts
from slit.data.report import BuildReport
from slit.errors import UserError

FILE_FORMAT = "array_record"
FAILED_BUILD_DIR = "failed_build"
DEFAULT_MAX_BAD_FRACTION = 0.05


def features() -> tfds.features.FeaturesDict:
    """The example layout (see the module docstring)."""
    text_list = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict(
        {
            # tfds.features.Audio would need TensorFlow to encode; raw PCM needs nothing.
            "audio": tfds.features.Tensor(
                shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES
            ),
            "num_samples": tfds.features.Scalar(dtype=np.int32),
            "id": tfds.features.Text(),
            "captions": text_list,
            "questions": text_list,
            "answers": text_list,
            "question_types": text_list,
            "labels": text_list,
            "audio_path": tfds.features.Text(),
            "start_s": tfds.features.Scalar(dtype=np.float32),
            "metadata": tfds.features.Text(),
        }
    )


class AudioTextBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
    """Base of slit's dataset builders (abstract: subclasses implement `_split_records`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = "Audio clips with texts."
    DEFAULT_MAX_BAD_FRACTION = DEFAULT_MAX_BAD_FRACTION

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (TFDS's own lookup needs the importlib_resources backport for editable installs.)"""
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        checks: audio_io.AudioChecks | None = None,
        max_bad_fraction: float | None = None,
        workers: int | None = None,
        file_format: str | None = None,
        **kwargs: Any,  # noqa: ANN401 (TFDS's own builder arguments)
    ) -> None:
        self.checks = checks or audio_io.AudioChecks()
        self.max_bad_fraction = (
            self.DEFAULT_MAX_BAD_FRACTION if max_bad_fraction is None else max_bad_fraction
        )
        self.workers = workers or os.cpu_count() or 1
        self.report = BuildReport()
        self.show_progress = False
        super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=features(),
            supervised_keys=None,
            disable_shuffling=True,  # examples keep the order they are listed in
            metadata=tfds.core.MetadataDict(
                sample_rate=self.checks.sample_rate, checks=_jsonable(self.checks.__dict__)
            ),
        )

    @abc.abstractmethod
    def _split_records(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Record]]:
        """The clips of each split; problems found while listing go to `self.report`."""

    # -- generation ------------------------------------------------------------------------------------

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        records = self._split_records(dl_manager)
        records = drop_duplicate_ids(records, self.report)
        empty = [s for s, r in records.items() if not r]
        for split in empty:
            del records[split]
        if not records:
            raise UserError(f"{self.name}: nothing to build: every listed clip was bad or no clip was listed")
        return {split: self._generate_examples(split, recs) for split, recs in records.items()}

    def _generate_examples(self, split: str, records: list[Record]) -> Iterator[tuple[str, dict[str, Any]]]:
        outcomes = decode_in_order(records, self.checks, self.workers)
        progress = tqdm(
            outcomes,
            total=len(records),
            desc=f"{self.name} {split}",
            unit=" clips",
            disable=not self.show_progress,
        )
        for record, outcome in progress:
            if isinstance(outcome, audio_io.BadAudio):
                self.report.skip(outcome.reason, str(outcome), **record.where())
                continue
            for reason, message in outcome.repairs:
                self.report.repair(reason, message, **record.where())
            self.report.keep(split, len(outcome.samples) / self.checks.sample_rate)
            yield record.id, example_dict(record, outcome.samples)

    def _download_and_prepare(self, dl_manager: Any, download_config: Any) -> None:  # noqa: ANN401
        """TFDS's build (inside its temporary directory), then the report and the bad-fraction check."""
        self.report = BuildReport()
        self.report.settings = {
            "dataset": self.name,
            "checks": _jsonable(self.checks.__dict__),
            "max_bad_fraction": self.max_bad_fraction,
        }
        failed_dir = pathlib.Path(self.data_dir_root) / self.name / FAILED_BUILD_DIR
        try:
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        except UserError:
            self.report.write(failed_dir)
            raise
        except AssertionError as e:  # TFDS: a split whose every clip was bad ("No examples were yielded")
            if "No examples were yielded" not in str(e):
                raise
            self.report.write(failed_dir)
            raise UserError(
                f"{self.name}: {str(e).split(':')[0].replace('Failed to finalize writing of ', '')} has no "
                f"usable clip (every one was bad); the reasons are in {failed_dir / 'bad_inputs.jsonl'}"
            ) from None
        self.report.write(self.data_dir)  # the temporary directory, renamed to the final one on success
        try:
            self.report.check_fraction(self.max_bad_fraction, failed_dir / "bad_inputs.jsonl")
        except UserError:
            self.report.write(failed_dir)
            raise
        shutil.rmtree(failed_dir, ignore_errors=True)


def example_dict(record: Record, samples: np.ndarray) -> dict[str, Any]:
    """A decoded record in the builder's feature layout."""
    return {
        "audio": audio_io.to_pcm16(samples),
        "num_samples": len(samples),
        "id": record.id,
        "captions": record.captions,
        "questions": record.questions,
        "answers": record.answers,
        "question_types": record.question_types,
        "labels": record.labels,
        "audio_path": record.audio_name or record.audio.name,
        "start_s": float(record.start_s or 0.0),
        "metadata": json.dumps(record.metadata, ensure_ascii=False, sort_keys=True),
    }


def decode_in_order(
    records: list[Record], checks: audio_io.AudioChecks, workers: int
) -> Iterator[tuple[Record, audio_io.Clip | audio_io.BadAudio]]:
    """Decodes records on `workers` threads (libsndfile and soxr release the GIL), yielding results in
    the records' order with at most 4 * workers clips in flight."""

    def decode(record: Record) -> audio_io.Clip | audio_io.BadAudio:
        try:
            return audio_io.read_clip(record.audio, checks, record.start_s, record.end_s)
        except audio_io.BadAudio as bad:
            return bad
        except (OSError, MemoryError) as e:  # one bad file never aborts a build
            return audio_io.BadAudio("unreadable", f"{type(e).__name__}: {e}")

    if workers <= 1:
        for record in records:
            yield record, decode(record)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for record in records:
            pending.append((record, pool.submit(decode, record)))
            if len(pending) >= 4 * workers:
                done_record, future = pending.popleft()
                yield done_record, future.result()
        while pending:
            done_record, future = pending.popleft()
            yield done_record, future.result()


def drop_duplicate_ids(records: dict[str, list[Record]], report: BuildReport) -> dict[str, list[Record]]:
    """Keeps the first record of each id across all splits; the others are reported and left out."""
    seen: dict[str, Record] = {}
    out: dict[str, list[Record]] = {}
    for split, recs in records.items():
        out[split] = []
        for record in recs:
            if record.id in seen:
                first = seen[record.id]
                report.skip(
                    "duplicate_id",
                    f"id {record.id!r} is already used by {first.origin or first.audio} ({first.split})",
                    **record.where(),
                )
                continue
            seen[record.id] = record
            out[split].append(record)
    return out


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


# ---------------------------------------------------------------------------------------------------------
# Helpers for builders of published layouts.


def read_csv(
    path: pathlib.Path,
    report: BuildReport,
    required: tuple[str, ...],
    fallback_encoding: str | None = "cp1252",
) -> list[tuple[str, dict[str, str]]]:
    """Rows of a CSV file as (origin "file:line", {column: value}).

    Text must be UTF-8; a field that is not is decoded as `fallback_encoding` (Windows-1252 by default:
    the published Clotho/ClothoAQA CSVs have such rows) and reported as repaired, or, without a
    fallback, its row is skipped and reported. Raises UserError if a `required` column is missing.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(
            f"{path}: columns {missing} are missing (found {reader.fieldnames}); is this the published file?"
        )
    rows = []
    for row in reader:
        origin = f"{path.name}:{reader.line_num}"
        bad = [k for k, v in row.items() if isinstance(v, str) and not _utf8_clean(v)]
        if bad:
            if fallback_encoding is None:
                report.skip("not_utf8", f"columns {bad} are not UTF-8", origin=origin)
                continue
            for key in bad:
                row[key] = row[key].encode("utf-8", "surrogateescape").decode(fallback_encoding, "replace")
            report.repair(
                "not_utf8", f"columns {bad} were not UTF-8; read as {fallback_encoding}", origin=origin
            )
        rows.append((origin, {k: (v or "") for k, v in row.items() if k is not None}))
    return rows


def _utf8_clean(text: str) -> bool:
    return not any("\udc80" <= ch <= "\udcff" for ch in text)


def texts_or_report(values: list[str], record_where: dict[str, str], report: BuildReport) -> list[str]:
    """Drops empty texts, reporting how many were dropped (repaired)."""
    kept, dropped = clean_texts(values)
    if dropped and kept:
        report.repair("empty_text", f"{dropped} empty text(s) dropped", **record_where)
    return kept


class AudioIndex:
    """Every audio file under a directory, found by file name or by stem (name without extension)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.by_name: dict[str, list[pathlib.Path]] = collections.defaultdict(list)
        self.by_stem: dict[str, list[pathlib.Path]] = collections.defaultdict(list)
        for directory, _, files in os.walk(root):
            for name in files:
                if name.lower().endswith(audio_io.EXTENSIONS):
                    path = pathlib.Path(directory) / name
                    self.by_name[name].append(path)
                    self.by_stem[path.stem].append(path)

    def find(self, *keys: str, prefer: str = "") -> pathlib.Path | None:
        """The first file whose name or stem is one of `keys`; among several, the one whose path contains
        the folder `prefer`."""
        for key in keys:
            found = self.by_name.get(key) or self.by_stem.get(key)
            if found:
                preferred = [p for p in found if prefer and prefer in p.relative_to(self.root).parts]
                return (preferred or sorted(found))[0]
        return None

    def relative(self, path: pathlib.Path) -> str:
        return str(path.relative_to(self.root))


def manual_dir(
    dl_manager: tfds.download.DownloadManager, builder_name: str, instructions: str
) -> pathlib.Path:
    """The TFDS manual directory, or a UserError saying what to put there."""
    directory = pathlib.Path(str(dl_manager._manual_dir or ""))  # noqa: SLF001 (TFDS's accessor asserts)
    if not directory.is_dir() or not any(directory.iterdir()):
        raise UserError(
            f"{builder_name}: the manual directory {directory} is missing or empty. Pass --manual-dir DIR "
            f"holding the published files:\n{instructions}"
        )
    return directory


def missing_record(
    report: BuildReport, split: str, origin: str, clip_id: str, expected: str, root: pathlib.Path
) -> None:
    """Reports a listed clip whose audio file is not in the manual directory."""
    report.skip(
        "missing_file",
        f"no audio file for {clip_id!r} under {root} (looked for {expected})",
        split=split,
        origin=origin,
        id=clip_id,
    )
