"""Eval reports: `<workdir>/eval/<task>-<data>-<split>.json` (metrics, config, checkpoint step), a
Markdown table next to it (`.md`), and where it helps reading a plot (`.png`): recall@k curves for
retrieval, a confusion matrix for classification, accuracy per question type for AQA, metric bars and the
per-clip CIDEr-D histogram for captioning.

The metrics dicts are those of slit.eval: retrieval.retrieval_report, captioning.CaptionScorer.score,
classification.classification_report (optionally with mean_average_precision's keys), aqa.aqa_accuracy.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from slit import paths as slit_paths

TASKS = ("retrieval", "captioning", "classification", "aqa")


def report_stem(task: str, data: str, split: str) -> str:
    """`<task>-<data>-<split>`, with characters other than letters, digits, '.', '_' and '-' in the data
    name (e.g. the '/' of "clotho/v2.1") replaced by '_'."""
    return "-".join(re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in (task, data, split))


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists, paths to str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def _config_dict(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return config.to_dict()
    return config


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _retrieval_lines(metrics: Mapping) -> list[str]:
    rankings = [r for r in ("contrastive", "reranked") if r in metrics] or [None]
    rows = []
    columns: list[str] = []
    for ranking in rankings:
        part = metrics[ranking] if ranking else metrics
        for direction in ("text_to_audio", "audio_to_text"):
            columns = columns or list(part[direction])
            name = ranking or ""
            if ranking == "reranked" and "rerank_k" in metrics:
                name = f"reranked (top {metrics['rerank_k']})"
            rows.append([name, direction.replace("_", " "), *(_pct(part[direction].get(c)) for c in columns)])
    first = metrics[rankings[0]] if rankings[0] else metrics
    lines = _table(["ranking", "direction", *(f"{c} (%)" for c in columns)], rows)
    lines += ["", f"{first['num_audio']} clips, {first['num_text']} captions."]
    if metrics.get("matching"):
        from slit.eval.retrieval import describe_matching

        text = describe_matching(metrics["matching"])
        lines.append(text[0].upper() + text[1:] + ".")
    return lines


def _captioning_lines(metrics: Mapping) -> list[str]:
    from slit.eval.captioning import CAPTION_TABLE_ORDER

    names = [n for n in CAPTION_TABLE_ORDER if n in metrics]
    lines = _table(names, [[_num(metrics[n]) for n in names]])
    lines += ["", f"{metrics.get('num_items', '?')} clips; tokenizer: {metrics.get('tokenizer', '?')}."]
    base = metrics.get("constant_baseline")
    if base:
        lines.append(
            "Audio-blind baseline (one training caption for every clip, the best of "
            f"{base['num_candidates']} "
            f"on {base['num_selection_clips']} training clips): CIDEr-D {_num(base['CIDEr-D'])}, "
            f'"{base["caption"]}".'
        )
    for name, reason in metrics.get("unavailable", {}).items():
        lines.append(f"- {name} unavailable: {reason}")
    return lines


def _classification_lines(metrics: Mapping) -> list[str]:
    header, row = (
        ["accuracy (%)", "items"],
        [_pct(metrics.get("accuracy")), str(metrics.get("num_items", "?"))],
    )
    if "mAP" in metrics:
        header.insert(1, "mAP (%)")
        row.insert(1, _pct(metrics["mAP"]))
    lines = _table(header, [row])
    if metrics.get("clips_without_labels"):
        lines += ["", f"{metrics['clips_without_labels']} clips of the split have no label and are left out."]
    per_class = metrics.get("per_class_accuracy")
    if per_class:
        lines += ["", *_table(["class", "accuracy (%)"], [[name, _pct(v)] for name, v in per_class.items()])]
    per_class_ap = metrics.get("per_class_ap")
    if isinstance(per_class_ap, Mapping):
        lines += ["", *_table(["class", "AP (%)"], [[name, _pct(v)] for name, v in per_class_ap.items()])]
    return lines


def _aqa_lines(metrics: Mapping) -> list[str]:
    """Accuracy overall and per question type, beside the majority baseline's when it was computed
    (always giving each type's most common training answer)."""
    base = metrics.get("majority_baseline") or {}
    base_by_type = base.get("by_type", {})
    rows = [["all", _pct(metrics["accuracy"]), str(metrics["num_items"])]]
    if base:
        rows[0].insert(2, _pct(base["per_question_type_accuracy"]))
    for kind, v in metrics.get("by_type", {}).items():
        row = [kind, _pct(v["accuracy"]), str(v["num_items"])]
        if base:
            row.insert(2, _pct(base_by_type[kind]) if kind in base_by_type else "-")
        rows.append(row)
    header = ["questions", "accuracy (%)", "items"]
    if base:
        header.insert(2, "majority answer (%)")
    lines = _table(header, rows)
    wer = metrics.get("wer_by_type") or {}
    if wer:
        wer_rows = [
            [kind, _pct(v["wer"]), _pct(v.get("majority_answer_wer")), str(v["num_items"])]
            for kind, v in wer.items()
        ]
        header = ["questions", "word error rate (%)", "majority answer's (%)", "items"]
        lines += ["", *_table(header, wer_rows), "(an empty answer's word error rate is 100%)"]
    return lines


def _scalar_lines(metrics: Mapping) -> list[str]:
    return _table(["metric", "value"], [[k, _num(v)] for k, v in scalar_metrics(metrics).items()])


def markdown(task: str, data: str, split: str, metrics: Mapping, step: int | None = None) -> str:
    """The Markdown report: a title line and the task's table."""
    title = f"# {task}: {data} ({split})" + (f", checkpoint step {step}" if step is not None else "")
    body = {
        "retrieval": _retrieval_lines,
        "captioning": _captioning_lines,
        "classification": _classification_lines,
        "aqa": _aqa_lines,
    }.get(task, _scalar_lines)(metrics)
    return "\n".join([title, "", *body]) + "\n"


def scalar_metrics(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """Flattens the numeric leaves of a metrics dict to {"a/b/c": value} for TensorBoard and metrics.jsonl;
    skips None, lists, per-item scores, confusion matrices and curves."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if key in ("per_item", "curves", "correct", "confusion_matrix", "per_class_ap", "unavailable"):
            continue
        if isinstance(value, Mapping):
            out.update(scalar_metrics(value, name))
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def plot(task: str, metrics: Mapping, path: str | pathlib.Path, title: str = "") -> pathlib.Path | None:
    """The task's plot, when its metrics hold what the plot needs; returns the path or None."""
    from slit.eval import plots

    if task == "retrieval" and metrics.get("curves"):
        return plots.recall_curves(metrics["curves"], path, title)
    if task == "classification" and metrics.get("confusion_matrix") and metrics.get("per_class_accuracy"):
        return plots.confusion_matrix(
            np.asarray(metrics["confusion_matrix"]), list(metrics["per_class_accuracy"]), path, title
        )
    if task == "aqa" and metrics.get("by_type"):
        return plots.accuracy_by_type(metrics["by_type"], path, title)
    if task == "captioning":
        return plots.caption_scores(metrics, path, title)
    return None


def write_report(
    workdir: str | pathlib.Path,
    task: str,
    data: str,
    split: str,
    metrics: Mapping,
    config: Any = None,
    step: int | None = None,
    with_plot: bool = True,
) -> dict[str, epath.Path]:
    """Writes `<workdir>/eval/<task>-<data>-<split>.{json,md}` and, where the task has one, `.png`
    (`workdir`: a local path or a URI such as gs://).

    The JSON holds {"task", "data", "split", "checkpoint_step", "metrics", "config"}; files are replaced
    atomically. Returns {"json": path, "markdown": path, "plot": path (if written)}.
    """
    directory = slit_paths.workdir_path(workdir) / "eval"
    directory.mkdir(parents=True, exist_ok=True)
    stem = report_stem(task, data, split)
    document = {
        "task": task,
        "data": data,
        "split": split,
        "checkpoint_step": step,
        "metrics": _plain(metrics),
        "config": _plain(_config_dict(config)),
    }
    paths = {"json": directory / f"{stem}.json", "markdown": directory / f"{stem}.md"}
    slit_paths.write_whole(paths["json"], (json.dumps(document, indent=2) + "\n").encode())
    slit_paths.write_whole(paths["markdown"], markdown(task, data, split, document["metrics"], step).encode())
    if with_plot:
        title = f"{task}: {data} ({split})" + (f", step {step}" if step is not None else "")
        written = plot(task, document["metrics"], directory / f"{stem}.png", title)
        if written is not None:
            paths["plot"] = written
    return paths
