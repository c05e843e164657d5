"""The demo's summary: every held-out metric next to its trivial baseline, from the runs' reports.

Baselines:
- retrieval R@k: chance, k / number of test clips;
- zero-shot classification: always the most common training label (majority class);
- captioning: the audio-blind constant caption (the training caption that scores best on other training
  clips, slit/eval/captioning.py) and the empty caption (CIDEr-D 0);
- question answering: each question type's most common training answer;
- speech ("what is said?"): the word error rate of that majority answer, and of the empty answer (100%).
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any

from slit.demo.recipe import DATA_NAME, Size

PROMPTS = ("describe the sound.", "what is said?", "which animal is this?", "which instrument is playing?")
"""What `slit generate` is asked about each held-out clip at the end of the demo."""
SHOWN_SOURCES = ("speech", "animals", "instruments", "events", "synthetic")


def read_manifest(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pick_clips(manifest: pathlib.Path) -> list[dict]:
    """One test clip per source (the first in manifest order), with its resolved `path`."""
    picked = {}
    for line in read_manifest(manifest):
        if line["split"] == "test" and line["source"] not in picked:
            audio = pathlib.Path(line["audio"])
            picked[line["source"]] = {
                **line,
                "path": audio if audio.is_absolute() else manifest.parent / audio,
            }
    return [picked[s] for s in SHOWN_SOURCES if s in picked]


def majority_label(lines: list[dict]) -> dict:
    """Accuracy on the test clips with labels of always answering the most common training label."""
    train = collections.Counter(
        label for x in lines if x["split"] == "train" for label in x.get("labels", [])
    )
    test = [x["labels"] for x in lines if x["split"] == "test" and x.get("labels")]
    if not train or not test:
        return {}
    label = train.most_common(1)[0][0]
    return {"label": label, "accuracy": sum(label in t for t in test) / len(test), "num_items": len(test)}


def _load(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(root: pathlib.Path, size: Size, clips: dict, seconds: float) -> dict[str, Any]:
    """The summary of a finished demo in `root` (see the module docstring for the baselines)."""
    lines = read_manifest(root / "data" / "manifest.jsonl")
    majority = majority_label(lines)
    rows: list[dict] = []

    def row(task: str, metric: str, value: float | None, baseline: float | None, baseline_name: str) -> None:
        if value is not None:
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "baseline": baseline,
                    "baseline_name": baseline_name,
                }
            )

    s1 = root / "stage1" / "eval"
    retrieval = _load(s1 / "retrieval.json")
    if retrieval:
        n = retrieval["num_audio"]
        for direction in ("text_to_audio", "audio_to_text"):
            for k in (1, 5, 10):
                row(
                    "retrieval",
                    f"{direction} R@{k}",
                    retrieval[direction][f"R@{k}"],
                    min(1.0, k / n),
                    "chance",
                )
    zero_shot = _load(s1 / f"classification-{DATA_NAME}-test.json")
    if zero_shot:
        m = zero_shot["metrics"]
        row(
            "zero-shot classification (stage one)",
            "accuracy",
            m["accuracy"],
            majority.get("accuracy"),
            "majority class",
        )

    s2 = root / "stage2" / "eval"
    captioning = _load(s2 / f"captioning-{DATA_NAME}-test.json")
    if captioning:
        m = captioning["metrics"]
        constant = (m.get("constant_baseline") or {}).get("CIDEr-D")
        row("captioning", "CIDEr-D", m.get("CIDEr-D"), constant, "audio-blind constant caption")
        row("captioning", "METEOR", m.get("METEOR"), None, "")
    aqa = _load(s2 / f"aqa-{DATA_NAME}-test.json")
    if aqa:
        m = aqa["metrics"]
        base = m.get("majority_baseline") or {}
        row(
            "question answering",
            "accuracy",
            m["accuracy"],
            base.get("per_question_type_accuracy"),
            "majority answer per type",
        )
        for qtype, by in sorted(m.get("by_type", {}).items()):
            row(
                f"  {qtype} ({by['num_items']})",
                "accuracy",
                by["accuracy"],
                base.get("by_type", {}).get(qtype),
                "majority answer",
            )
        for qtype, wer in sorted(m.get("wer_by_type", {}).items()):
            row(
                f"speech recognition ({qtype}, {wer['num_items']})",
                "word error rate",
                wer["wer"],
                wer.get("majority_answer_wer"),
                "majority answer (empty answer: 1.0)",
            )
    classification = _load(s2 / f"classification-{DATA_NAME}-test.json")
    if classification:
        m = classification["metrics"]
        row(
            "classification (stage two, LLM loss)",
            "accuracy",
            m["accuracy"],
            majority.get("accuracy"),
            "majority class",
        )

    answers = _load(root / "answers.json") or []
    reference = {str(c["path"]): c["captions"][0] for c in pick_clips(root / "data" / "manifest.jsonl")}
    for item in answers:
        item["reference"] = reference.get(item["audio"], "")
    return {
        "size": size.name,
        "seconds": round(seconds, 1),
        "clips": clips,
        "metrics": rows,
        "majority_class": majority,
        "answers": answers,
        "written": {
            "dataset": str(root / "tfds" / DATA_NAME),
            "stage_one_reports": str(s1),
            "stage_two_reports": str(s2),
            "bundle": str(root / "export"),
        },
    }


def _pct(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if metric in ("CIDEr-D", "METEOR") else f"{100 * value:.1f}%"


def table(summary: dict) -> str:
    """The printed summary: clips per source and split, held-out metrics against baselines, answers."""
    out = [
        f"\nslit demo ({summary['size']}): {summary['seconds'] / 60:.1f} min",
        "",
        "clips (train / validation / test):",
    ]
    for source, splits in summary["clips"].items():
        counts = " / ".join(f"{splits.get(split, 0):>5}" for split in ("train", "validation", "test"))
        out.append(f"  {source:<12} {counts}")
    out += ["", f"{'held-out (test split)':<44} {'metric':<22} {'slit':>8} {'baseline':>9}  baseline is"]
    for r in summary["metrics"]:
        better = ""
        if r["baseline"] is not None:
            lower_better = r["metric"] == "word error rate"
            wins = r["value"] < r["baseline"] if lower_better else r["value"] > r["baseline"]
            better = " +" if wins else " -"
        out.append(
            f"{r['task']:<44} {r['metric']:<22} {_pct(r['value'], r['metric']):>8} "
            f"{_pct(r['baseline'], r['metric']):>9}{better} {r['baseline_name']}"
        )
    out.append("(+: beats the baseline, -: does not)")
    if summary["answers"]:
        out += ["", "the exported bundle, asked about held-out clips:"]
        for item in summary["answers"]:
            out.append(f"  {pathlib.Path(item['audio']).name}  [{item.get('reference', '')}]")
            for prompt, answer in item["answers"].items():
                out.append(f"    {prompt:<30} -> {' / '.join(answer.split(chr(10)))}")
    return "\n".join(out)


def next_steps(root: pathlib.Path) -> str:
    return "\n".join(
        [
            "",
            f"everything is in {root}: summary.json, stage1/ and stage2/ (checkpoints, eval/ reports and",
            "plots), export/ (the bundle), tfds/ (the dataset), data/ (its manifest and audio). Next:",
            f"  slit generate --bundle {root / 'export'} --audio YOUR.wav --prompt 'describe the sound.'",
            f"  slit eval --workdir {root / 'stage2'} --data {DATA_NAME} --data-dir {root / 'tfds'}",
            f"  slit data inspect {DATA_NAME} --data-dir {root / 'tfds'}",
            "  your own data: a manifest (README: Data), `slit data build`, then the configs in configs/.",
        ]
    )
