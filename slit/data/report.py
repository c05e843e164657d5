"""The bad-input report of a dataset build: every skipped or repaired input, counted and listed.

Written into the dataset directory (next to the TFDS files) when a build ends:

- `bad_inputs.jsonl`: one JSON object per skipped or repaired input: `action` ("skipped" or
  "repaired"), `reason` (a short code), `message`, `split`, `origin` (the manifest or CSV file and
  line, e.g. "clips.jsonl:12"), `path` (the audio file, when there is one) and `id`;
- `build_report.json`: counts (kept, skipped and repaired, per reason and per split), kept audio
  hours, and the settings of the build.

A build fails (UserError) when the skipped fraction of all inputs is above `max_bad_fraction`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from typing import Any

from slit.errors import UserError

REPORT_FILE = "bad_inputs.jsonl"
SUMMARY_FILE = "build_report.json"


@dataclasses.dataclass
class Problem:
    """One skipped or repaired input."""

    action: str  # "skipped" or "repaired"
    reason: str
    message: str
    split: str = ""
    origin: str = ""
    path: str = ""
    id: str = ""


class BuildReport:
    """Collects what a build kept, skipped and repaired."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.kept: collections.Counter[str] = collections.Counter()
        self.kept_seconds: collections.Counter[str] = collections.Counter()
        self.settings: dict[str, Any] = {}

    def skip(self, reason: str, message: str, **where: str) -> None:
        """Records an input left out of the dataset (`where`: split, origin, path, id)."""
        self.problems.append(Problem("skipped", reason, message, **where))

    def repair(self, reason: str, message: str, **where: str) -> None:
        """Records an input that was kept after a documented repair."""
        self.problems.append(Problem("repaired", reason, message, **where))

    def keep(self, split: str, seconds: float) -> None:
        """Counts one example written to `split`."""
        self.kept[split] += 1
        self.kept_seconds[split] += seconds

    @property
    def num_skipped(self) -> int:
        return sum(p.action == "skipped" for p in self.problems)

    @property
    def num_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def bad_fraction(self) -> float:
        """Skipped inputs over all inputs (kept + skipped)."""
        total = self.num_kept + self.num_skipped
        return self.num_skipped / total if total else 0.0

    def counts(self, action: str) -> dict[str, int]:
        """Number of `action` ("skipped"/"repaired") problems per reason."""
        return dict(collections.Counter(p.reason for p in self.problems if p.action == action))

    def summary(self) -> dict[str, Any]:
        """The content of build_report.json."""
        return {
            "kept": self.num_kept,
            "skipped": self.num_skipped,
            "repaired": sum(p.action == "repaired" for p in self.problems),
            "bad_fraction": self.bad_fraction,
            "skipped_by_reason": self.counts("skipped"),
            "repaired_by_reason": self.counts("repaired"),
            "kept_by_split": dict(self.kept),
            "kept_hours_by_split": {k: v / 3600 for k, v in self.kept_seconds.items()},
            "settings": self.settings,
        }

    def write(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Writes bad_inputs.jsonl and build_report.json into `directory`; returns the first's path."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / REPORT_FILE
        with path.open("w", encoding="utf-8") as f:
            for p in self.problems:
                f.write(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n")
        (directory / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=2) + "\n")
        return path

    def terminal_summary(self, max_examples: int = 3) -> str:
        """A few lines for the terminal: counts per reason with an example of each."""
        lines = [
            f"kept {self.num_kept} clips ({sum(self.kept_seconds.values()) / 3600:.2f} h), "
            f"skipped {self.num_skipped} ({100 * self.bad_fraction:.1f}%), "
            f"repaired {sum(p.action == 'repaired' for p in self.problems)}"
        ]
        for action in ("skipped", "repaired"):
            for reason, count in sorted(self.counts(action).items(), key=lambda kv: -kv[1]):
                examples = [p for p in self.problems if p.action == action and p.reason == reason]
                lines.append(f"  {action} {count:6d}  {reason}")
                for p in examples[:max_examples]:
                    lines.append(f"      {p.origin or p.path}: {p.message}")
        return "\n".join(lines)

    def check_fraction(self, max_bad_fraction: float, report_path: pathlib.Path) -> None:
        """Raises UserError when more than `max_bad_fraction` of the inputs were skipped."""
        if self.bad_fraction > max_bad_fraction:
            worst = ", ".join(
                f"{r} {n}" for r, n in sorted(self.counts("skipped").items(), key=lambda kv: -kv[1])
            )
            raise UserError(
                f"{self.num_skipped} of {self.num_kept + self.num_skipped} inputs "
                f"({100 * self.bad_fraction:.1f}%) are bad ({worst}), more than max_bad_fraction="
                f"{max_bad_fraction:g}. Every one is listed in {report_path}. Fix the inputs, or raise "
                "--max-bad-fraction if this many losses are expected; the dataset was not written."
            )
