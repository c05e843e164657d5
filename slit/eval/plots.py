"""PNG plots for eval reports: recall@k curves, confusion matrices, accuracy per question type, caption
scores. matplotlib's object API with the Agg canvas: no pyplot, no global backend, no display needed.
"""

from __future__ import annotations

import io
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from slit import paths


def new_figure(width: float, height: float) -> object:
    """A matplotlib Figure (width x height inches, 100 dpi) drawn off-screen (Agg), without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: object, path: str | pathlib.Path) -> pathlib.Path | epath.Path:
    """Writes `figure` as a PNG at `path` (parent folders created; a URI such as gs:// too); returns the
    path."""
    path = paths.workdir_path(path) if paths.is_remote(path) else pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    paths.write_whole(path, buffer.getvalue())
    return path


def recall_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | pathlib.Path, title: str = ""
) -> pathlib.Path:
    """Recall@k against k: one panel per direction, one line per ranking.

    curves: {ranking ("contrastive", "reranked"): {direction: [R@1, R@2, ...]}} (retrieval_report's "curves").
    """
    directions = sorted({d for per_ranking in curves.values() for d in per_ranking})
    figure = new_figure(4.5 * len(directions), 3.6)
    axes = figure.subplots(1, len(directions), squeeze=False)[0]
    for ax, direction in zip(axes, directions, strict=True):
        for ranking, per_direction in curves.items():
            values = per_direction.get(direction)
            if values:
                ax.plot(np.arange(1, len(values) + 1), 100 * np.asarray(values), label=ranking, marker=".")
        ax.set(
            xlabel="k", ylabel="recall@k (%)", title=direction.replace("_", " "), ylim=(0, 100), xscale="log"
        )
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)


def confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | pathlib.Path, title: str = ""
) -> pathlib.Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts written in the cells
    when there are at most 20 classes."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.35 * len(class_names) + 2.5)
    figure = new_figure(size + 1, size)
    ax = figure.subplots()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, label="fraction of the true class")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    if len(class_names) <= 20:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                color = "white" if rows[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=7, color=color)
    return save_figure(figure, path)


def accuracy_by_type(
    by_type: Mapping[str, Mapping[str, float]], path: str | pathlib.Path, title: str = ""
) -> pathlib.Path:
    """Bar chart of accuracy per question type; by_type: {type: {"accuracy", "num_items"}}."""
    names = list(by_type)
    figure = new_figure(max(4.0, 1.2 * len(names) + 2), 3.6)
    ax = figure.subplots()
    values = [100 * by_type[n]["accuracy"] for n in names]
    bars = ax.bar(names, values, color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        ax.annotate(
            f"{bar.get_height():.1f}%\n(n={by_type[name]['num_items']})",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(ylabel="accuracy (%)", ylim=(0, 115), title=title or "accuracy by question type")
    return save_figure(figure, path)


def caption_scores(report: Mapping, path: str | pathlib.Path, title: str = "") -> pathlib.Path:
    """Corpus caption metrics as bars (unavailable ones marked n/a), and the per-item CIDEr-D histogram
    when the report has per-item scores."""
    from slit.eval.captioning import CAPTION_TABLE_ORDER

    names = [n for n in CAPTION_TABLE_ORDER if n in report]
    per_item = report.get("per_item", {}).get("CIDEr-D")
    figure = new_figure(9 if per_item else 5.5, 3.6)
    axes = figure.subplots(1, 2 if per_item else 1, squeeze=False)[0]
    values = [report[n] if report[n] is not None else 0.0 for n in names]
    bars = axes[0].bar(
        names, values, color=["tab:blue" if report[n] is not None else "lightgray" for n in names]
    )
    for bar, name in zip(bars, names, strict=True):
        label = "n/a" if report[name] is None else f"{report[name]:.3f}"
        axes[0].annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    axes[0].tick_params(axis="x", rotation=45)
    axes[0].set(title=title or "caption metrics", ylim=(0, max([1.0, *values]) * 1.15))
    if per_item:
        scores = np.asarray(list(per_item.values()), dtype=np.float64)
        axes[1].hist(scores, bins=max(5, min(40, int(math.sqrt(len(scores))) + 1)), color="tab:orange")
        axes[1].set(xlabel="CIDEr-D per clip", ylabel="clips", title=f"CIDEr-D over {len(scores)} clips")
    return save_figure(figure, path)
