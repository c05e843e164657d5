"""The JSON Lines manifest: one clip per line, turned into `Record`s for a dataset build.

A line is a JSON object:

    {"audio": "clips/dog.wav", "captions": ["a dog barks twice", "barking"], "split": "train"}
    {"audio": "/data/rec7.flac", "question": "is it raining?", "answer": "yes", "id": "rec7"}
    {"audio": "long.mp3", "start": 12.5, "end": 22.5, "labels": ["speech", "music"]}
    {"audio": "rain.wav", "captions": ["rain"], "qa": [{"question": "is it raining?", "answer": "yes"}]}

- `audio` (required): a path relative to the manifest's directory, or absolute. Any format
  libsndfile reads (wav, flac, ogg, mp3, ...).
- Text, at least one of: `caption` (string), `captions` (list of strings), `question` + `answer`
  (strings; or `questions` + `answers`, lists of equal length), `qa` (a list of
  `{"question": "...", "answer": "..."}` objects, added after any `question(s)`; an item may add
  `"type": "..."`, the question's type, by which answers are scored and the majority baseline is
  taken), `label` / `labels` (string or number, or a list of them). Question types are kept when
  every question of the line has one.
- `id` (optional, string or number): unique in the manifest. Default: the `audio` value as written,
  plus `@start-end` when a segment is given.
- `split` (optional): letters, digits and `_`; default "train".
- `start` / `end` (optional): seconds; only [start, end) of the file is used.
- Any other key is kept, as JSON, in the example's `metadata`.

Blank lines are ignored. Bad lines are skipped and reported (see slit.data.report) with their line
number: not UTF-8 (`not_utf8`), not JSON or not an object (`invalid_json`), a missing or mistyped field
(`bad_field`), no non-empty text left (`empty_text`; an empty caption among good ones is dropped and
reported as repaired), or an id seen before (`duplicate_id`; the first one is kept).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Iterable
from typing import Any

from slit.data.report import BuildReport

SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
TEXT_KEYS = ("caption", "captions", "question", "answer", "questions", "answers", "qa", "label", "labels")
KNOWN_KEYS = ("audio", "id", "split", "start", "end", *TEXT_KEYS)


@dataclasses.dataclass
class Record:
    """One clip to build: its audio file (optionally a segment), its texts, and where it was listed."""

    id: str
    audio: pathlib.Path
    split: str = "train"
    captions: list[str] = dataclasses.field(default_factory=list)
    questions: list[str] = dataclasses.field(default_factory=list)
    answers: list[str] = dataclasses.field(default_factory=list)
    question_types: list[str] = dataclasses.field(default_factory=list)  # [] or one per question
    labels: list[str] = dataclasses.field(default_factory=list)
    start_s: float | None = None
    end_s: float | None = None
    origin: str = ""  # "file:line" of the listing, for the report
    audio_name: str = ""  # the audio path as listed (relative), stored with the example
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def where(self) -> dict[str, str]:
        """The fields that locate this record in a report."""
        return {"split": self.split, "origin": self.origin, "path": str(self.audio), "id": self.id}


class FieldError(ValueError):
    """A manifest field with the wrong type or value; `reason` is the report's code for it."""

    def __init__(self, message: str, reason: str = "bad_field"):
        super().__init__(message)
        self.reason = reason


def is_utf8_clean(text: str) -> bool:
    """False for strings that cannot be written as UTF-8 (lone surrogates from bad escapes or bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_texts(values: Iterable[str]) -> tuple[list[str], int]:
    """Strips whitespace and drops empty strings; returns (kept, number dropped)."""
    kept = [v.strip() for v in values]
    non_empty = [v for v in kept if v]
    return non_empty, len(kept) - len(non_empty)


def _strings(value: Any, key: str, allow_numbers: bool = False) -> list[str]:  # noqa: ANN401
    """A string or a list of strings (or numbers, for labels) -> a list of strings."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif allow_numbers and isinstance(item, int | float) and not isinstance(item, bool):
            out.append(str(item))
        else:
            kind = "strings or numbers" if allow_numbers else "strings"
            raise FieldError(f"`{key}` must hold {kind}, got {json.dumps(item)[:60]}")
    return out


def _qa_pairs(value: Any) -> tuple[list[str], list[str], list[str]]:  # noqa: ANN401
    """`qa`: a list of {"question": str, "answer": str[, "type": str]} objects -> (questions, answers,
    types; "" where an item has no type)."""
    example = '[{"question": "...", "answer": "..."}]'
    if not isinstance(value, list):
        raise FieldError(f"`qa` must be a list like {example}, got {json.dumps(value)[:60]}")
    questions, answers, types = [], [], []
    for n, item in enumerate(value):
        if not isinstance(item, dict):
            raise FieldError(
                f"`qa` item {n} must be an object like {example[1:-1]}, got {json.dumps(item)[:60]}"
            )
        unknown = sorted(set(item) - {"question", "answer", "type"})
        missing = [k for k in ("question", "answer") if k not in item]
        if unknown or missing:
            what = "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
            )
            raise FieldError(
                f"`qa` item {n}: {what} (each item has `question` and `answer`, and may have `type`)"
            )
        for key in ("question", "answer", "type"):
            if key in item and not isinstance(item[key], str):
                raise FieldError(f"`qa` item {n}: `{key}` must be a string, got {json.dumps(item[key])[:60]}")
        questions.append(item["question"])
        answers.append(item["answer"])
        types.append(item.get("type", "").strip())
    return questions, answers, types


def _seconds(value: Any, key: str) -> float | None:  # noqa: ANN401
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise FieldError(f"`{key}` must be a non-negative number of seconds, got {json.dumps(value)[:60]}")
    return float(value)


def _seconds_text(value: float | None) -> str:
    return "end" if value is None else f"{value:g}"


def parse_line(obj: Any, base_dir: pathlib.Path) -> tuple[Record, int]:  # noqa: ANN401
    """One manifest object -> (Record, number of empty texts dropped). Raises FieldError."""
    if not isinstance(obj, dict):
        raise FieldError(f"a line must be a JSON object, got {type(obj).__name__}")
    audio = obj.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        raise FieldError("`audio` (the audio file's path) is missing or not a non-empty string")
    if not any(k in obj for k in TEXT_KEYS):
        raise FieldError("no text: give at least one of caption(s), question(s) + answer(s), qa, label(s)")
    captions = _strings(obj.get("caption", []), "caption") + _strings(obj.get("captions", []), "captions")
    questions = _strings(obj.get("question", []), "question") + _strings(
        obj.get("questions", []), "questions"
    )
    answers = _strings(obj.get("answer", []), "answer") + _strings(obj.get("answers", []), "answers")
    if len(questions) != len(answers):
        raise FieldError(f"{len(questions)} question(s) but {len(answers)} answer(s): give one answer each")
    types = [""] * len(questions)
    if "qa" in obj:
        qa_questions, qa_answers, qa_types = _qa_pairs(obj["qa"])
        questions, answers, types = questions + qa_questions, answers + qa_answers, types + qa_types
    labels = _strings(obj.get("label", []), "label", True) + _strings(obj.get("labels", []), "labels", True)
    if len(questions) != len(answers):
        raise FieldError(f"{len(questions)} question(s) but {len(answers)} answer(s): give one answer each")
    for text in (*captions, *questions, *answers, *labels, audio):
        if not is_utf8_clean(text):
            raise FieldError(
                "a string is not valid Unicode (a lone surrogate escape such as \\ud800)", "not_utf8"
            )

    captions, dropped = clean_texts(captions)
    labels, dropped_labels = clean_texts(labels)
    pairs = [(q.strip(), a.strip(), t) for q, a, t in zip(questions, answers, types, strict=True)]
    good_pairs = [(q, a, t) for q, a, t in pairs if q and a]
    dropped += dropped_labels + len(pairs) - len(good_pairs)

    split = obj.get("split", "train")
    if not isinstance(split, str) or not SPLIT_PATTERN.match(split):
        raise FieldError(f"`split` must be letters, digits and _, got {json.dumps(split)[:60]}")
    start_s, end_s = _seconds(obj.get("start"), "start"), _seconds(obj.get("end"), "end")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise FieldError(f"`end` ({end_s}) must be after `start` ({start_s})")
    clip_id = obj.get("id")
    if clip_id is None:
        clip_id = (
            audio if start_s is None and end_s is None else f"{audio}@{start_s or 0:g}-{_seconds_text(end_s)}"
        )
    elif isinstance(clip_id, bool) or not isinstance(clip_id, str | int):
        raise FieldError(f"`id` must be a string or an integer, got {json.dumps(clip_id)[:60]}")
    clip_id = str(clip_id)
    if not clip_id.strip() or not is_utf8_clean(clip_id):
        raise FieldError(
            "`id` is empty or not valid Unicode", "bad_field" if is_utf8_clean(clip_id) else "not_utf8"
        )

    path = pathlib.Path(audio).expanduser()
    record = Record(
        id=clip_id,
        audio=path if path.is_absolute() else base_dir / path,
        split=split,
        captions=captions,
        questions=[q for q, _, _ in good_pairs],
        answers=[a for _, a, _ in good_pairs],
        question_types=[t for _, _, t in good_pairs] if all(t for _, _, t in good_pairs) else [],
        labels=labels,
        start_s=start_s,
        end_s=end_s,
        audio_name=audio,
        metadata={k: v for k, v in obj.items() if k not in KNOWN_KEYS},
    )
    return record, dropped


def has_text(record: Record) -> bool:
    return bool(record.captions or record.questions or record.labels)


def read_manifest(path: str | pathlib.Path, report: BuildReport) -> list[Record]:
    """Reads a JSON Lines manifest; bad lines are recorded in `report` and left out.

    Raises FileNotFoundError if the manifest itself is missing.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist; pass --manifest FILE.jsonl")
    records: list[Record] = []
    first_line_of: dict[str, int] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            origin = f"{path.name}:{number}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.skip(
                    "not_utf8", f"the line is not UTF-8 ({e.reason} at byte {e.start})", origin=origin
                )
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                report.skip("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}", origin=origin)
                continue
            try:
                record, dropped = parse_line(obj, path.absolute().parent)
            except FieldError as e:
                report.skip(e.reason, str(e), origin=origin)
                continue
            record.origin = origin
            if not has_text(record):
                report.skip("empty_text", "every text of the line is empty", **record.where())
                continue
            if dropped:
                report.repair("empty_text", f"{dropped} empty text(s) dropped", **record.where())
            if record.id in first_line_of:
                report.skip(
                    "duplicate_id",
                    f"id {record.id!r} was already used on line {first_line_of[record.id]}; this line is "
                    "left out (give each clip one line, with a `captions` list for several captions)",
                    **record.where(),
                )
                continue
            first_line_of[record.id] = number
            records.append(record)
    return records
