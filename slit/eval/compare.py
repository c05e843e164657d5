"""Comparing runs (`slit report`): one table row per run, mean ± std over seeds, one plot.

Reads only what `slit train` and launch/sweep.py leave on disk, so it works on runs that are still
going, never started or failed:

- a run's workdir: `config.json` (the resolved config), `metrics.jsonl` (one JSON object per logged step;
  the end-of-run test evaluation is logged at step `total_steps` with "test/..." keys) and
  `checkpoints/<step>/`;
- a sweep root (launch/sweep.py): `sweep.json`, whose points name their workdirs (`<root>/<name>`), their
  overrides and their status ("pending", "running", "finished", "failed (exit N)", "interrupted").

A run is "finished" when its metrics hold test scalars at step == total_steps ("finished, no test
evaluation" when it has its final checkpoint but logged none, e.g. a dataset without a test split). The
swept values of a run are the config keys (flattened with dots) whose values differ among the runs
compared.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from slit import paths as slit_paths
from slit.errors import UserError

SWEEP_FILE = "sweep.json"  # written by launch/sweep.py (slit/sweep.py)
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TEST_PREFIX = "test/"
TRAIN_LOSS = "train_loss"  # the report's column: mean of the last LOSS_WINDOW logged "loss" values
TRAINED = "trained_params"  # the report's column: the trainable weights, as the trainer logs at step 0
LOSS_WINDOW = 10
SEED = "seed"
NO_TEST = "finished, no test evaluation"  # the final checkpoint exists, no test scalars were logged
MAX_LABEL = 60  # characters of a plot legend entry
# Default plot metric: the first of these the runs have, else their first non-baseline test metric.
PREFERRED_METRICS = ("CIDEr-D", "SPIDEr", "text_to_audio_R@1", "qa_accuracy", "classification_accuracy")


# --- one run on disk -------------------------------------------------------------------------------------


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The JSON objects of `<workdir>/metrics.jsonl` in file order ([] when there is none). Lines that are
    not JSON objects with a "step" (a line cut short by a kill) are skipped; non-finite values, which the
    writer stores as the strings "nan"/"inf", are read back as floats."""
    path = slit_paths.workdir_path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            lines.append({k: _number(v) for k, v in record.items()})
    return lines


def _number(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return value


def final_test(lines: Sequence[Mapping[str, Any]]) -> tuple[int | None, dict[str, float]]:
    """(step, {name: value}) of the last test evaluation in `lines` (read_metrics): the "test/..." scalars
    of every line at the largest step that has any (a run on several test sets logs one line each), names
    without the "test/" prefix, the last value winning; (None, {}) when there is none."""
    steps = [line["step"] for line in lines if any(k.startswith(TEST_PREFIX) for k in line)]
    if not steps:
        return None, {}
    step = max(steps)
    scalars: dict[str, float] = {}
    for line in lines:
        if line["step"] == step:
            for key, value in line.items():
                if (
                    key.startswith(TEST_PREFIX)
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                ):
                    scalars[key[len(TEST_PREFIX) :]] = float(value)
    return step, scalars


def final_loss(lines: Sequence[Mapping[str, Any]], window: int = LOSS_WINDOW) -> float | None:
    """Mean of the last `window` logged training "loss" values (one per step: where a resumed run logged a
    step twice, the later line counts); None when nothing was logged."""
    by_step = {}
    for line in lines:
        value = line.get("loss")
        if isinstance(value, int | float) and not isinstance(value, bool):
            by_step[line["step"]] = float(value)
    if not by_step:
        return None
    last = [by_step[s] for s in sorted(by_step)[-window:]]
    return float(np.mean(last))


def trained_parameters(lines: Sequence[Mapping[str, Any]]) -> int | None:
    """The number of trained weights the run logged at its start ("trained_parameters"); None if it did
    not (a run from before slit logged it)."""
    counts = [line["trained_parameters"] for line in lines if _is_number(line.get("trained_parameters"))]
    return int(counts[-1]) if counts else None


def checkpoint_steps(workdir: str | pathlib.Path) -> list[int]:
    """The steps of `<workdir>/checkpoints/<step>/` (sorted; [] when there are none)."""
    directory = slit_paths.workdir_path(workdir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def read_config(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """`<workdir>/config.json` as a dict; None when there is none. UserError when it is not JSON."""
    path = slit_paths.workdir_path(workdir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON config ({e}); it is written by `slit train`") from e
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object; it is written by `slit train`")
    return config


def is_finished(workdir: str | pathlib.Path) -> bool:
    """Whether the run in `workdir` has its test evaluation at step == total_steps (its config.json)."""
    config = read_config(workdir)
    if config is None or not isinstance(config.get("total_steps"), int):
        return False
    step, scalars = final_test(read_metrics(workdir))
    return bool(scalars) and step == config["total_steps"]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other leaves stay values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- collecting the runs -----------------------------------------------------------------------------------


@dataclasses.dataclass
class RunRecord:
    """What the report says about one run."""

    workdir: pathlib.Path
    name: str  # the workdir relative to the runs' common parent
    values: dict[str, Any]  # flattened config (only the sweep's overrides for a run never started)
    status: str  # "finished", NO_TEST, "unfinished (step N of T)", "not started" or "failed (exit N)"
    step: int | None  # the newest step logged or checkpointed (None: nothing yet)
    total_steps: int | None
    train_loss: float | None
    metrics: dict[str, float]  # the final test scalars, without "test/" (empty unless finished)
    trained_parameters: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("finished", NO_TEST)


@dataclasses.dataclass
class _Source:
    workdir: pathlib.Path
    overrides: dict[str, Any]  # from sweep.json (empty for a run given by itself outside a sweep)
    sweep_status: str | None


def read_sweep(root: str | pathlib.Path) -> dict[str, Any]:
    """`<root>/sweep.json` (written by launch/sweep.py); UserError when it cannot be read."""
    path = slit_paths.workdir_path(root) / SWEEP_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as a sweep file ({e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("points"), list):
        raise UserError(f"{path}: not a sweep file (no list of points); it is written by launch/sweep.py")
    return state


def _sweep_sources(root: pathlib.Path) -> list[_Source]:
    sources = []
    for point in read_sweep(root)["points"]:
        if not isinstance(point, dict) or not isinstance(point.get("name"), str):
            raise UserError(f"{root / SWEEP_FILE}: a point without a name: {point!r}")
        overrides = point.get("overrides") if isinstance(point.get("overrides"), dict) else {}
        sources.append(_Source(root / point["name"], overrides, point.get("status")))
    return sources


def _run_source(workdir: pathlib.Path) -> _Source:
    """A run given by itself; when it is a point of the sweep in its parent, that point's record."""
    parent = workdir.parent
    if (parent / SWEEP_FILE).is_file():
        try:
            for source in _sweep_sources(parent):
                if source.workdir.name == workdir.name:
                    return _Source(workdir, source.overrides, source.sweep_status)
        except UserError:
            pass  # the run is still readable by itself
    return _Source(workdir, {}, None)


def expand_paths(paths: Iterable[str | pathlib.Path]) -> list[_Source]:
    """The runs named by `paths`: each a run directory (config.json) or a sweep root (sweep.json: all its
    points, started or not); a run named twice counts once. UserError for any other path."""
    sources: list[_Source] = []
    for given in paths:
        path = slit_paths.workdir_path(given)
        if not path.is_dir():
            raise UserError(f"{given}: no such directory; give run workdirs (config.json) or sweep roots")
        if (path / SWEEP_FILE).is_file():
            sources += _sweep_sources(path)
        elif (path / CONFIG_FILE).is_file():
            sources.append(_run_source(path))
        else:
            raise UserError(
                f"{given}: neither a run directory (no {CONFIG_FILE}) nor a sweep root (no {SWEEP_FILE})"
            )
    seen, unique = set(), []
    for source in sources:
        key = _absolute(source.workdir)
        if key not in seen:
            seen.add(key)
            unique.append(source)
    return unique


def _status(
    config: dict | None, lines: list[dict], steps: list[int], sweep_status: str | None
) -> tuple[str, int | None, int | None]:
    """(status, newest step, total_steps) of a run."""
    total = config.get("total_steps") if config else None
    total = total if isinstance(total, int) else None
    test_step, scalars = final_test(lines)
    if scalars and total is not None and test_step == total:
        return "finished", total, total
    if total is not None and total in steps and not (sweep_status or "").startswith("failed"):
        return NO_TEST, total, total  # (a dataset without a test split: the run ends at its checkpoint)
    logged = [line["step"] for line in lines]
    step = max(logged + steps) if logged or steps else None
    if sweep_status and sweep_status.startswith("failed"):
        return sweep_status, step, total
    if config is None and step is None:
        return "not started", None, total
    of = "?" if total is None else str(total)
    return f"unfinished (step {step or 0} of {of})", step, total


def _absolute(path: pathlib.Path) -> str:
    """An absolute local path; a URI as epath holds it (gs://bucket/runs/a -> /gs/bucket/runs/a), so that
    runs in a bucket are named from their common folder there."""
    if slit_paths.is_remote(path):
        return str(pathlib.PurePosixPath(*path.parts))
    return os.path.abspath(path)


def _common_parent(workdirs: Sequence[pathlib.Path]) -> pathlib.Path:
    parents = [_absolute(w.parent) for w in workdirs]
    return pathlib.Path(os.path.commonpath(parents))


def _name(workdir: pathlib.Path, parent: pathlib.Path) -> str:
    """A run's name: its path from the current directory when it is below it, else from `parent` (the
    runs' common parent)."""
    here = os.path.relpath(_absolute(workdir))
    return here if not here.startswith("..") else os.path.relpath(_absolute(workdir), parent)


def collect(paths: Iterable[str | pathlib.Path]) -> list[RunRecord]:
    """A RunRecord per run named by `paths` (expand_paths), in the order given; UserError when none."""
    sources = expand_paths(paths)
    if not sources:
        raise UserError("no runs to report: the sweep roots given list no points")
    parent = _common_parent([s.workdir for s in sources])
    records = []
    for source in sources:
        config = read_config(source.workdir) if source.workdir.is_dir() else None
        lines = read_metrics(source.workdir)
        status, step, total = _status(config, lines, checkpoint_steps(source.workdir), source.sweep_status)
        values = flatten(config) if config is not None else dict(source.overrides)
        records.append(
            RunRecord(
                workdir=source.workdir,
                name=_name(source.workdir, parent),
                values=values,
                status=status,
                step=step,
                total_steps=total,
                train_loss=final_loss(lines),
                trained_parameters=trained_parameters(lines),
                metrics=final_test(lines)[1] if status == "finished" else {},
            )
        )
    return records


# --- comparing them --------------------------------------------------------------------------------------


def _canonical(value: Any) -> tuple:
    """A hashable, comparable stand-in for a config value: numbers compare as numbers (8 == 8.0)."""
    if value is None:
        return (3, "")
    if isinstance(value, bool):
        return (1, str(value))
    if isinstance(value, int | float):
        return (0, float(value))
    if isinstance(value, str):
        return (1, value)
    return (2, json.dumps(value, sort_keys=True, default=str))


def swept_keys(runs: Sequence[RunRecord]) -> list[str]:
    """The config keys whose values differ among the runs (or that some runs lack); seed last, the others
    in the order the runs list them."""
    order: dict[str, None] = {}
    for run in runs:
        order.update(dict.fromkeys(run.values))

    # A key that some runs' configs lack (an older slit's) differs too: those runs show it empty. (A sweep
    # point not started has its overrides only, and lacks nothing.)
    def value(run: RunRecord, key: str) -> tuple | None:
        return _canonical(run.values[key]) if key in run.values else None

    full = [r for r in runs if "total_steps" in r.values]
    keys = [
        k
        for k in order
        if len({value(r, k) for r in runs if k in r.values} | {value(r, k) for r in full}) > 1
    ]
    return [k for k in keys if k != SEED] + [k for k in keys if k == SEED]


def _sort_key(run: RunRecord, keys: Sequence[str]) -> tuple:
    return tuple((0, _canonical(run.values[k])) if k in run.values else (1, (0, 0.0)) for k in keys) + (
        run.name,
    )


def sort_runs(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[RunRecord]:
    """The runs sorted by their values of `keys` (numbers numerically; missing values last), then name."""
    return sorted(runs, key=lambda r: _sort_key(r, keys))


def metric_names(runs: Sequence[RunRecord]) -> list[str]:
    """The test metrics of the runs, in the order they were logged."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.metrics))
    return list(names)


def is_baseline(metric: str) -> bool:
    return metric.endswith("_baseline")


def baseline_of(metric: str, available: Sequence[str]) -> str | None:
    """The baseline column that goes with `metric`: `<metric>_constant_baseline` (CIDEr-D),
    `<metric>_majority_baseline`, `<metric>_baseline`, or for `x_accuracy` `x_majority_baseline`
    (qa_accuracy -> qa_majority_baseline); None when there is none."""
    if is_baseline(metric):
        return None
    stem = metric.rsplit("_", 1)[0] if "_" in metric.rsplit("/", 1)[-1] else None
    candidates = [f"{metric}_constant_baseline", f"{metric}_majority_baseline", f"{metric}_baseline"]
    if stem:
        candidates += [f"{stem}_majority_baseline", f"{stem}_constant_baseline"]
    return next((c for c in candidates if c in available), None)


def default_metric(metrics: Sequence[str]) -> str | None:
    """The plot's metric when none is asked for (PREFERRED_METRICS, else the first non-baseline)."""
    for preferred in PREFERRED_METRICS:
        for name in metrics:
            if name == preferred or name.endswith("/" + preferred):
                return name
    return next((m for m in metrics if not is_baseline(m)), None)


def _value(run: RunRecord, column: str) -> float | None:
    if column == TRAIN_LOSS:
        return run.train_loss
    return run.metrics.get(column)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def fmt(value: Any) -> str:
    """A table cell: numbers to 4 significant digits, None empty, lists as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def _raw(value: Any) -> str:
    """A CSV cell: the value itself (repr of floats: no digits lost), lists as JSON, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float | str):
        return str(value) if not isinstance(value, float) else repr(value)
    return json.dumps(value, default=str)


def run_table(runs: Sequence[RunRecord], keys: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """One dict per run (keys: run, the swept keys, status, step, total_steps, train_loss, trained_params,
    the metrics),
    values raw (None where there is none)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name}
        row.update({k: run.values.get(k) for k in keys})
        row.update(status=run.status, step=run.step, total_steps=run.total_steps, train_loss=run.train_loss)
        row[TRAINED] = run.trained_parameters
        row.update({m: run.metrics.get(m) for m in metrics})
        rows.append(row)
    return rows


@dataclasses.dataclass
class Setting:
    """The runs of one setting (all swept values but the seed)."""

    values: dict[str, Any]
    runs: list[RunRecord]

    def stats(self, column: str) -> tuple[float, float, int]:
        """(mean, sample std (ddof=1; nan for n < 2), n) of `column` over the finished runs that have it
        (finite values only); (nan, nan, 0) when none has."""
        values = [_value(r, column) for r in self.runs if r.finished]
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return math.nan, math.nan, 0
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return float(np.mean(values)), std, len(values)

    @property
    def not_finished(self) -> int:
        return sum(not r.finished for r in self.runs)


def by_setting(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[Setting] | None:
    """The runs grouped by their values of `keys` other than seed, in the runs' order; None unless the
    seed is swept and some setting has several runs (nothing to average)."""
    if SEED not in keys:
        return None
    setting_keys = [k for k in keys if k != SEED]
    groups: dict[tuple, Setting] = {}
    for run in runs:
        values = {k: run.values.get(k) for k in setting_keys}
        key = tuple(_canonical(v) for v in values.values())
        groups.setdefault(key, Setting(values, [])).runs.append(run)
    if all(len(g.runs) < 2 for g in groups.values()):
        return None
    return list(groups.values())


def setting_table(settings: Sequence[Setting], columns: Sequence[str]) -> list[dict]:
    """One dict per setting: its values, runs, finished, unfinished/failed, and per column the raw
    `<column>_mean`, `<column>_std`, `<column>_n`."""
    rows = []
    for setting in settings:
        row: dict[str, Any] = dict(setting.values)
        row.update(runs=len(setting.runs), finished=len(setting.runs) - setting.not_finished)
        row["unfinished/failed"] = setting.not_finished
        for column in columns:
            mean, std, n = setting.stats(column)
            row.update({f"{column}_mean": mean, f"{column}_std": std, f"{column}_n": n})
        rows.append(row)
    return rows


def _mean_std_cell(mean: float, std: float, n: int) -> str:
    if n == 0:
        return ""
    if n == 1:
        return f"{fmt(mean)} (n=1)"
    return f"{fmt(mean)} ± {fmt(std)} (n={n})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table ("|" in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def write_csv(path: pathlib.Path, rows: Sequence[Mapping[str, Any]]) -> pathlib.Path:
    """Writes `rows` (dicts with the same keys) as CSV with a header row, raw values."""
    header = list(rows[0]) if rows else []
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_raw(row[h]) for h in header])
    return path


# --- the plot ----------------------------------------------------------------------------------------------


def _x_positions(values: Sequence[Any]) -> tuple[dict[tuple, float], list[str] | None, bool]:
    """({canonical x: position}, tick labels for categorical x else None, log scale?)."""
    distinct = sorted({_canonical(v): v for v in values}.items())
    if all(_is_number(v) for _, v in distinct):
        numbers = [float(v) for _, v in distinct]
        log = min(numbers) > 0 and max(numbers) / min(numbers) >= 20
        return {c: float(v) for c, v in distinct}, None, log
    return {c: float(i) for i, (c, _) in enumerate(distinct)}, [fmt(v) for _, v in distinct], False


@dataclasses.dataclass
class Series:
    """One line of the plot: the runs of one setting of the swept keys other than x and seed."""

    label: str
    points: list[tuple[float, float]]  # (x position, value) of each finished run
    x: list[float]  # the distinct x positions, ascending
    mean: list[float]  # per x: the mean over the runs (seeds)
    std: list[float]  # per x: the sample std (0 for a single run)


@dataclasses.dataclass
class PlotData:
    """What report.png shows: `metric` against `x`."""

    metric: str
    x: str
    series: list[Series]
    tick_labels: list[str] | None  # categorical x: the labels of positions 0, 1, ...; None: numeric x
    log_x: bool
    baseline: tuple[str, list[float], list[float]] | None  # (column, x positions, mean value per x)


def plot_data(runs: Sequence[RunRecord], metric: str, x: str, keys: Sequence[str]) -> PlotData | None:
    """`metric` against the swept key `x` (or "run": the run names) over the finished runs that have a
    finite value: one Series per setting of the other swept keys (seed aside, and keys whose value the x
    value decides, e.g. the query count a sweep sets for one bridge kind only), per x value the mean and
    sample std over its runs; the matching baseline (baseline_of) averaged per x. Numeric x values keep
    their values (log scale when they span a factor of 20 or more), others are categories in sorted
    order. None when no finished run has the metric."""

    def x_of(run: RunRecord) -> Any:
        return run.name if x == "run" else run.values.get(x)

    found = [(r, _value(r, metric)) for r in runs if r.finished]
    found = [(r, v) for r, v in found if v is not None and math.isfinite(v)]
    if not found:
        return None
    positions, labels, log = _x_positions([x_of(r) for r, _ in found])
    others = [k for k in keys if k not in (x, SEED) and not _decided_by(k, x_of, [r for r, _ in found])]
    grouped: dict[tuple, list[tuple[float, float]]] = {}
    names: dict[tuple, str] = {}
    for run, value in found:
        key = tuple(_canonical(run.values.get(k)) for k in others)
        label = ", ".join(f"{k}={fmt(run.values.get(k))}" for k in others) or metric
        names[key] = label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 3] + "..."
        grouped.setdefault(key, []).append((positions[_canonical(x_of(run))], value))
    series = []
    for key in sorted(grouped):
        per_x: dict[float, list[float]] = {}
        for position, value in grouped[key]:
            per_x.setdefault(position, []).append(value)
        at = sorted(per_x)
        means = [float(np.mean(per_x[p])) for p in at]
        stds = [float(np.std(per_x[p], ddof=1)) if len(per_x[p]) > 1 else 0.0 for p in at]
        series.append(Series(names[key], grouped[key], at, means, stds))
    baseline = None
    column = baseline_of(metric, metric_names(runs))
    if column:
        by_x: dict[float, list[float]] = {}
        for run, _ in found:
            value = run.metrics.get(column)
            if value is not None and math.isfinite(value):
                by_x.setdefault(positions[_canonical(x_of(run))], []).append(value)
        at = sorted(by_x)
        baseline = (column, at, [float(np.mean(by_x[p])) for p in at]) if at else None
    return PlotData(metric, x, series, labels, log, baseline)


def _decided_by(key: str, x_of: Any, runs: Sequence[RunRecord]) -> bool:  # noqa: ANN401
    """Whether every x value's runs share one value of `key` (it then names no series of its own)."""
    seen: dict[tuple, tuple] = {}
    for run in runs:
        value = _canonical(run.values.get(key))
        if seen.setdefault(_canonical(x_of(run)), value) != value:
            return False
    return True


def plot(data: PlotData, path: str | pathlib.Path) -> pathlib.Path:
    """Draws `data` into the PNG `path`: one faint point per run, the means with std error bars (joined per
    series along a numeric x), the baseline dashed; the axes named after the metric and the key."""
    import matplotlib

    from slit.eval import plots

    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    figure = plots.new_figure(6.4, 4.2)
    ax = figure.subplots()
    for i, series in enumerate(data.series):
        colour = colours[i % len(colours)]
        xs, ys = np.array(series.points).T
        ax.scatter(xs, ys, color=colour, alpha=0.35, s=18)
        ax.errorbar(  # categories are not joined: there is nothing between them
            series.x,
            series.mean,
            yerr=series.std,
            color=colour,
            marker="o",
            capsize=3,
            label=series.label,
            linestyle="none" if data.tick_labels is not None else "-",
        )
    if data.baseline:
        column, at, values = data.baseline
        ax.plot(at, values, "--", marker="x", color="gray", label=column)
    if data.log_x:
        ax.set_xscale("log")
    if data.tick_labels is not None:
        rotation = 30 if max(map(len, data.tick_labels)) > 6 else 0
        ax.set_xticks(range(len(data.tick_labels)), data.tick_labels, rotation=rotation)
    elif len(at := sorted({p for s in data.series for p in s.x})) <= 8:  # a tick at each swept value
        ax.set_xticks(at, [fmt(p) for p in at], minor=False)
        ax.set_xticks([], minor=True)
    seeds = any(len(s.points) > len(s.x) for s in data.series)
    title = f"{data.metric} by {data.x}" + (" (mean ± std over seeds)" if seeds else "")
    ax.set(xlabel=data.x, ylabel=data.metric, title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save_figure(figure, path)


# --- the report ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """What build_report wrote."""

    markdown: str  # report.md's text
    written: list[pathlib.Path]  # the files, report.md first
    notes: list[str]  # e.g. why there is no plot
    runs: list[RunRecord]  # in the table's order
    swept: list[str]  # the swept keys
    plot: PlotData | None  # what report.png shows (None: no plot)


def _check_choice(given: str | None, available: Sequence[str], option: str, what: str) -> None:
    if given is not None and given not in available:
        listed = ", ".join(available) if available else "none"
        raise UserError(f"unknown {option} {given}; {what}: {listed}")


def build_report(
    paths: Sequence[str | pathlib.Path],
    out: str | pathlib.Path,
    metric: str | None = None,
    x: str | None = None,
) -> Report:
    """Reads the runs of `paths` (collect) and writes into `out`: report.md (the runs table and, when seeds
    repeat a setting, the mean ± std table), report.csv, report_by_setting.csv (with seeds) and report.png
    (`metric` against `x`, when a finished run has the metric). UserError for no runs, an unknown metric
    (the available ones listed) or an unknown x (the swept keys listed). `paths` and `out` may be URIs
    (gs://): a report for one is written locally first, then copied there."""
    if slit_paths.is_remote(out):
        target = slit_paths.workdir_path(out)
        with tempfile.TemporaryDirectory(prefix="slit-report-") as scratch:
            report = build_report(paths, scratch, metric, x)
            for name in ("report_by_setting.csv", "report.png"):  # an earlier report's, not written now
                if not (pathlib.Path(scratch) / name).exists() and (target / name).exists():
                    (target / name).unlink()
            slit_paths.copy(scratch, target)
        return dataclasses.replace(report, written=[target / p.name for p in report.written])
    runs = collect(paths)
    keys = swept_keys(runs)
    runs = sort_runs(runs, keys)
    metrics = metric_names(runs)
    if metric is not None and metric.startswith(TEST_PREFIX):
        metric = metric[len(TEST_PREFIX) :]
    _check_choice(metric, [*metrics, TRAIN_LOSS], "--metric", "the runs' metrics are")
    _check_choice(x, keys, "--x", "the swept keys (config values that differ among the runs) are")
    metric = metric or default_metric(metrics)
    x = x or next((k for k in keys if k != SEED), keys[0] if keys else "run")

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes, written = [], []
    table = run_table(runs, keys, metrics)
    sized = [TRAINED] if any(r.trained_parameters is not None for r in runs) else []
    shown = ["run", *keys, "status", *sized, TRAIN_LOSS, *metrics]
    sections = [
        f"# Runs ({len(runs)}, {sum(r.finished for r in runs)} finished)",
        "",
        markdown_table(shown, [[fmt(row[c]) for c in shown] for row in table]),
    ]
    written.append(write_csv(out / "report.csv", table))
    settings = by_setting(runs, keys)
    if settings is not None:
        columns = [TRAIN_LOSS, *metrics]
        setting_rows = setting_table(settings, columns)
        setting_keys = [k for k in keys if k != SEED]
        header = [*setting_keys, "runs", "unfinished/failed", *columns]
        cells = [
            [fmt(row[k]) for k in setting_keys]
            + [str(row["runs"]), str(row["unfinished/failed"])]
            + [_mean_std_cell(row[f"{c}_mean"], row[f"{c}_std"], row[f"{c}_n"]) for c in columns]
            for row in setting_rows
        ]
        sections += [
            "",
            "# By setting: mean ± sample std over the finished seeds",
            "",
            markdown_table(header, cells),
        ]
        written.append(write_csv(out / "report_by_setting.csv", setting_rows))
    else:
        (out / "report_by_setting.csv").unlink(missing_ok=True)  # an earlier report's
    markdown = "\n".join(sections) + "\n"
    (out / "report.md").write_text(markdown, encoding="utf-8")
    written.insert(0, out / "report.md")
    data = plot_data(runs, metric, x, keys) if metric else None
    if data is not None:
        written.append(plot(data, out / "report.png"))
    else:
        (out / "report.png").unlink(missing_ok=True)  # an earlier report's
        notes.append(f"no plot: no finished run has {metric or 'test metrics'} yet")
    return Report(markdown, written, notes, runs, keys, data)
