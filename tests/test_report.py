"""`slit report` (slit/eval/compare.py): run tables, statuses, mean ± std over seeds, CSV, plot, errors.

The runs are fake workdirs written here: config.json, metrics.jsonl and checkpoints/<step>/ as `slit train`
leaves them, and a sweep.json as launch/sweep.py leaves it (one point failed, one never started).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import pathlib

import numpy as np
import pytest

from slit import cli
from slit.errors import UserError
from slit.eval import compare

TOTAL = 300
BASE_CONFIG = {
    "trainer": "stage2",
    "seed": 0,
    "total_steps": TOTAL,
    "data": {"name": "clotho", "max_seconds": 10.0},
    "qformer": {"num_queries": 8, "width": 128},
    "eval": {"tasks": ["captioning", "aqa"]},
    "optimizer": {"learning_rate": 1e-3},
    "audio_encoder": {"kind": "whisper"},
}
CIDER_BASELINE, QA_BASELINE = 0.4, 0.25
# (queries, seed) -> (CIDEr-D, qa_accuracy) of the finished runs
SCORES = {(8, 0): (0.50, 0.61), (8, 1): (0.56, 0.58), (16, 0): (0.61, 0.70), (16, 1): (0.66, 0.66)}
PNG = b"\x89PNG\r\n\x1a\n"


def loss_at(step: int, queries: int, seed: int) -> float:
    return 5.0 - step / 100 + 0.01 * seed + queries / 1000


def write_run(
    workdir: pathlib.Path,
    queries: int,
    seed: int,
    *,
    logged_to: int = TOTAL,
    checkpoints: tuple[int, ...] = (TOTAL,),
    scores: tuple[float, float] | None = None,
    test_step: int = TOTAL,
    **config_changes: object,
) -> list[float]:
    """A fake run; returns the logged losses, one per step, in step order."""
    config = copy.deepcopy(BASE_CONFIG)
    config["seed"] = seed
    config["qformer"]["num_queries"] = queries
    for key, value in config_changes.items():
        *parents, leaf = key.split("__")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    lines, losses = [], []
    for step in range(25, logged_to + 1, 25):
        loss = loss_at(step, queries, seed)
        losses.append(loss)
        lines.append({"step": step, "loss": loss, "grad_norm": 1.0, "learning_rate": 1e-3})
        if step % 100 == 0:
            lines.append({"step": step, "validation/loss": 9.0, "checkpoint_blocking_seconds": 0.1})
    if scores is not None:
        cider, qa = scores
        lines.append(
            {
                "step": test_step,
                "test/CIDEr-D": cider,
                "test/CIDEr-D_constant_baseline": CIDER_BASELINE,
                "test/qa_accuracy": qa,
                "test/qa_majority_baseline": QA_BASELINE,
            }
        )
        lines.append({"step": test_step, "checkpoint_wait_seconds_at_end": 0.5})
    with (workdir / "metrics.jsonl").open("w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
        f.write('{"step": 999, "loss": ')  # a line cut short by a kill: ignored
    for step in checkpoints:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    (workdir / "checkpoints" / "400.orbax-checkpoint-tmp-1").mkdir(parents=True)  # not a checkpoint
    return losses


POINTS = [  # (name, queries, seed, sweep.json status)
    ("00_qformer.num_queries=8,seed=0", 8, 0, "finished"),
    ("01_qformer.num_queries=8,seed=1", 8, 1, "finished"),
    ("02_qformer.num_queries=16,seed=0", 16, 0, "finished"),
    ("03_qformer.num_queries=16,seed=1", 16, 1, "finished"),
    ("04_qformer.num_queries=32,seed=0", 32, 0, "interrupted"),
    ("05_qformer.num_queries=32,seed=1", 32, 1, "failed (exit 3)"),
    ("06_qformer.num_queries=64,seed=0", 64, 0, "pending"),
]


@pytest.fixture
def sweep_root(tmp_path) -> tuple[pathlib.Path, dict[str, list[float]]]:
    """A sweep of 7 points: 4 finished, one unfinished (step 225, checkpoint 200), one failed (exit 3, at
    step 50), one never started; returns (root, {name: logged losses})."""
    root = tmp_path / "sweep"
    losses = {}
    for name, queries, seed, _ in POINTS[:4]:
        losses[name] = write_run(root / name, queries, seed, scores=SCORES[queries, seed])
    losses[POINTS[4][0]] = write_run(root / POINTS[4][0], 32, 0, logged_to=225, checkpoints=(100, 200))
    losses[POINTS[5][0]] = write_run(root / POINTS[5][0], 32, 1, logged_to=50, checkpoints=())
    points = [
        {
            "index": i,
            "name": name,
            "workdir": f"somewhere/else/{name}",  # the report goes by <root>/<name>
            "overrides": {"qformer.num_queries": queries, "seed": seed},
            "status": status,
        }
        for i, (name, queries, seed, status) in enumerate(POINTS)
    ]
    (root / "sweep.json").write_text(json.dumps({"config": "configs/x.py", "points": points}))
    return root, losses


def read_csv(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_runs_statuses_and_swept_columns(sweep_root, tmp_path):
    root, losses = sweep_root
    report = compare.build_report([root], tmp_path / "out")
    # Only the keys that differ; numbers sorted as numbers (16 after 8), seed last.
    assert report.swept == ["qformer.num_queries", "seed"]
    assert [r.name for r in report.runs] == [p[0] for p in POINTS]
    assert [r.status for r in report.runs] == ["finished"] * 4 + [
        "unfinished (step 225 of 300)",
        "failed (exit 3)",
        "not started",
    ]
    for run in report.runs:
        assert run.train_loss == (
            pytest.approx(np.mean(losses[run.name][-10:])) if run.name in losses else None
        )
    first = report.runs[0]
    assert first.metrics == {
        "CIDEr-D": 0.50,
        "CIDEr-D_constant_baseline": CIDER_BASELINE,
        "qa_accuracy": 0.61,
        "qa_majority_baseline": QA_BASELINE,
    }
    assert all(not r.metrics for r in report.runs[4:])
    assert report.runs[6].values == {"qformer.num_queries": 64, "seed": 0}  # from sweep.json


def test_csv_holds_every_row_with_raw_values(sweep_root, tmp_path):
    root, losses = sweep_root
    compare.build_report([root], tmp_path / "out")
    header, rows = read_csv(tmp_path / "out" / "report.csv")
    assert header == [
        "run",
        "qformer.num_queries",
        "seed",
        "status",
        "step",
        "total_steps",
        "train_loss",
        "trained_params",  # (empty: these fake runs logged no count)
        "CIDEr-D",
        "CIDEr-D_constant_baseline",
        "qa_accuracy",
        "qa_majority_baseline",
    ]
    assert [r["run"] for r in rows] == [p[0] for p in POINTS]
    assert [r["qformer.num_queries"] for r in rows] == ["8", "8", "16", "16", "32", "32", "64"]
    assert float(rows[3]["CIDEr-D"]) == 0.66 and float(rows[3]["qa_majority_baseline"]) == QA_BASELINE
    assert float(rows[1]["train_loss"]) == pytest.approx(
        np.mean(losses[POINTS[1][0]][-10:]), abs=0, rel=1e-15
    )
    assert rows[4]["status"] == "unfinished (step 225 of 300)" and rows[4]["step"] == "225"
    assert rows[4]["CIDEr-D"] == "" and rows[5]["status"] == "failed (exit 3)"
    assert rows[6] | {"run": ""} == dict.fromkeys(header, "") | {
        "qformer.num_queries": "64",
        "seed": "0",
        "status": "not started",
    }


def test_mean_and_sample_std_over_seeds(sweep_root, tmp_path):
    root, losses = sweep_root
    report = compare.build_report([root], tmp_path / "out")
    header, rows = read_csv(tmp_path / "out" / "report_by_setting.csv")
    assert [r["qformer.num_queries"] for r in rows] == ["8", "16", "32", "64"]
    assert [(r["runs"], r["finished"], r["unfinished/failed"]) for r in rows] == [
        ("2", "2", "0"),
        ("2", "2", "0"),
        ("2", "0", "2"),
        ("1", "0", "1"),
    ]
    for row, queries in zip(rows[:2], (8, 16), strict=True):
        for index, metric in enumerate(("CIDEr-D", "qa_accuracy")):
            values = np.array([SCORES[queries, seed][index] for seed in (0, 1)])
            assert float(row[f"{metric}_mean"]) == pytest.approx(values.mean())
            assert float(row[f"{metric}_std"]) == pytest.approx(values.std(ddof=1))
            assert row[f"{metric}_n"] == "2"
        loss = [np.mean(losses[name][-10:]) for name, q, _, _ in POINTS if q == queries]
        assert float(row["train_loss_mean"]) == pytest.approx(np.mean(loss))
    assert rows[2]["CIDEr-D_n"] == "0" and math.isnan(float(rows[2]["CIDEr-D_mean"]))
    # The unfinished runs' losses are not averaged in either.
    assert rows[2]["train_loss_n"] == "0"

    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown == report.markdown
    values = np.array([SCORES[16, seed][0] for seed in (0, 1)])
    by_setting = markdown.split("# By setting")[1]
    assert "| 16 | 2 | 0 | " in by_setting
    assert f"{values.mean():.4g} ± {values.std(ddof=1):.4g} (n=2)" in by_setting
    assert "| 32 | 2 | 2 |" in by_setting and "| 64 | 1 | 1 |" in by_setting


def test_markdown_marks_unfinished_runs_and_hides_identical_keys(sweep_root, tmp_path):
    root, _ = sweep_root
    markdown = compare.build_report([root], tmp_path / "out").markdown
    runs_table = markdown.split("# By setting")[0].strip().splitlines()
    assert runs_table[0] == "# Runs (7, 4 finished)"
    header = runs_table[2]
    assert header.startswith("| run | qformer.num_queries | seed | status | train_loss | CIDEr-D |")
    for hidden in ("total_steps", "data.name", "qformer.width", "trainer", "eval.tasks"):
        assert f"| {hidden} |" not in header
    rows = runs_table[4:]
    assert len(rows) == 7
    assert rows[0].startswith("| 00_qformer.num_queries=8,seed=0 | 8 | 0 | finished | ")
    assert "| 0.5 | 0.4 | 0.61 | 0.25 |" in rows[0]
    assert rows[4].startswith("| 04_qformer.num_queries=32,seed=0 | 32 | 0 | unfinished (step 225 of 300) |")
    assert "| failed (exit 3) |" in rows[5] and "| not started |" in rows[6]


def test_plot_shows_the_metric_against_the_swept_key_with_its_baseline(sweep_root, tmp_path):
    root, _ = sweep_root
    report = compare.build_report([root], tmp_path / "out")
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == PNG
    data = report.plot
    assert (data.metric, data.x, data.tick_labels, data.log_x) == (
        "CIDEr-D",
        "qformer.num_queries",
        None,
        False,
    )
    (series,) = data.series
    assert series.x == [8.0, 16.0]
    for at, mean, std in zip(series.x, series.mean, series.std, strict=True):
        values = np.array([SCORES[int(at), seed][0] for seed in (0, 1)])
        assert mean == pytest.approx(values.mean()) and std == pytest.approx(values.std(ddof=1))
    assert sorted(series.points) == sorted((float(q), c) for (q, _), (c, _) in SCORES.items())
    assert data.baseline == ("CIDEr-D_constant_baseline", [8.0, 16.0], [CIDER_BASELINE] * 2)

    qa = compare.build_report([root], tmp_path / "qa", metric="test/qa_accuracy", x="seed").plot
    assert (qa.metric, qa.x) == ("qa_accuracy", "seed")
    assert [s.label for s in qa.series] == ["qformer.num_queries=8", "qformer.num_queries=16"]
    assert qa.baseline[0] == "qa_majority_baseline"


def test_categorical_x_and_runs_given_one_by_one(tmp_path):
    kinds = {"b_whisper": "whisper", "a_wav2vec2": "wav2vec2", "c_random": "random"}
    for i, (name, kind) in enumerate(kinds.items()):
        write_run(tmp_path / "runs" / name, 16, 0, scores=(0.1 * (i + 1), 0.5), audio_encoder__kind=kind)
    report = compare.build_report(sorted((tmp_path / "runs").iterdir()), tmp_path / "out")
    assert report.swept == ["audio_encoder.kind"]
    assert [r.name for r in report.runs] == ["c_random", "a_wav2vec2", "b_whisper"]  # sorted by kind
    assert report.plot.tick_labels == ["random", "wav2vec2", "whisper"]
    assert report.plot.series[0].mean == pytest.approx([0.3, 0.2, 0.1])
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == PNG
    # No seeds repeat a setting: no second table (and no stale one from before).
    assert "By setting" not in report.markdown and not (tmp_path / "out" / "report_by_setting.csv").exists()


def test_numbers_sort_numerically_and_wide_ranges_plot_on_a_log_axis(tmp_path):
    for name, lr in (("x", 1e-2), ("y", 1e-4), ("z", 1e-3)):
        write_run(tmp_path / name, 8, 0, scores=(lr * 100, 0.5), optimizer__learning_rate=lr)
    report = compare.build_report([tmp_path / n for n in "xyz"], tmp_path / "out")
    assert [r.name for r in report.runs] == ["y", "z", "x"]
    assert report.plot.log_x and report.plot.series[0].x == [1e-4, 1e-3, 1e-2]


def test_a_run_of_a_sweep_given_by_itself_keeps_its_sweep_status(sweep_root, tmp_path):
    root, _ = sweep_root
    report = compare.build_report([root / POINTS[5][0], root / POINTS[0][0]], tmp_path / "out")
    assert [(r.name, r.status) for r in report.runs] == [
        (POINTS[0][0], "finished"),
        (POINTS[5][0], "failed (exit 3)"),
    ]


def test_a_test_line_before_total_steps_is_not_finished(tmp_path):
    write_run(tmp_path / "r", 8, 0, scores=(0.5, 0.5), test_step=200, logged_to=200, checkpoints=(200,))
    (run,) = compare.collect([tmp_path / "r"])
    assert run.status == "unfinished (step 200 of 300)" and run.metrics == {}
    assert not compare.is_finished(tmp_path / "r")


def test_unknown_metric_or_x_lists_the_choices(sweep_root, tmp_path):
    root, _ = sweep_root
    with pytest.raises(UserError) as error:
        compare.build_report([root], tmp_path / "out", metric="BLEU-4")
    assert str(error.value) == (
        "unknown --metric BLEU-4; the runs' metrics are: CIDEr-D, CIDEr-D_constant_baseline, qa_accuracy, "
        "qa_majority_baseline, train_loss"
    )
    with pytest.raises(UserError, match=r"unknown --x qformer\.width; .*: qformer\.num_queries, seed$"):
        compare.build_report([root], tmp_path / "out", x="qformer.width")


def test_paths_that_are_not_runs_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run directory .* nor a sweep root"):
        compare.collect([tmp_path / "empty"])
    with pytest.raises(UserError, match="no such directory"):
        compare.collect([tmp_path / "missing"])
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "sweep.json").write_text(json.dumps({"points": []}))
    with pytest.raises(UserError, match="no runs"):
        compare.collect([tmp_path / "nothing"])


def test_baselines_and_default_metric():
    names = ["BLEU-4", "CIDEr-D", "CIDEr-D_constant_baseline", "qa_accuracy", "qa_majority_baseline"]
    assert compare.baseline_of("CIDEr-D", names) == "CIDEr-D_constant_baseline"
    assert compare.baseline_of("qa_accuracy", names) == "qa_majority_baseline"
    assert (
        compare.baseline_of("clotho/qa_accuracy", ["clotho/qa_majority_baseline"])
        == "clotho/qa_majority_baseline"
    )
    assert compare.baseline_of("BLEU-4", names) is None
    assert compare.baseline_of("CIDEr-D_constant_baseline", names) is None
    assert compare.default_metric(names) == "CIDEr-D"
    assert compare.default_metric(["audio_to_text_R@1", "text_to_audio_R@1"]) == "text_to_audio_R@1"
    assert compare.default_metric(["x_baseline", "foo"]) == "foo"


def test_slit_report_end_to_end(sweep_root, tmp_path, capsys):
    root, _ = sweep_root
    out = tmp_path / "out"
    assert cli.main(["report", str(root), "--out", str(out), "--metric", "qa_accuracy"]) == 0
    printed = capsys.readouterr().out
    assert "| run | qformer.num_queries | seed | status |" in printed
    assert "| failed (exit 3) |" in printed
    for name in ("report.md", "report.csv", "report_by_setting.csv", "report.png"):
        assert f"wrote {out / name}" in printed
    assert (out / "report.png").read_bytes()[:8] == PNG

    assert cli.main(["report", str(root), "--out", str(out), "--x", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slit report: unknown --x nope;") and len(err.strip().splitlines()) == 1


def test_final_loss_counts_a_resumed_step_once_and_reads_non_finite_values(tmp_path):
    # Logged to step 40, resumed from the checkpoint at 20: steps 30 and 40 are logged again.
    lines = [{"step": s, "loss": float(s)} for s in (10, 20, 30, 40)] + [
        {"step": s, "loss": s + 0.5} for s in (30, 40, 50)
    ]
    assert compare.final_loss(lines, window=3) == pytest.approx(np.mean([30.5, 40.5, 50.5]))
    assert compare.final_loss([{"step": 1, "grad_norm": 2.0}]) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": "nan"}\n{"step": 6, "test/x": "inf"}\n')
    lines = compare.read_metrics(tmp_path)
    assert math.isnan(lines[0]["loss"]) and compare.final_test(lines) == (6, {"x": math.inf})


def test_a_key_an_older_run_lacks_counts_as_swept_and_shows_empty(tmp_path):
    write_run(tmp_path / "new", 8, 0, scores=SCORES[(8, 0)], optimizer__lr_multipliers="bridge/qformer=0.1")
    write_run(tmp_path / "old", 8, 0, scores=SCORES[(8, 1)])
    report = compare.build_report([tmp_path / "new", tmp_path / "old"], tmp_path / "out")
    assert report.swept == ["optimizer.lr_multipliers"]
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "out" / "report.csv").open())}
    assert [rows[n]["optimizer.lr_multipliers"] for n in sorted(rows)] == ["bridge/qformer=0.1", ""]


def test_a_run_without_a_test_split_is_finished_at_its_last_checkpoint(tmp_path):
    losses = write_run(tmp_path / "no_test", 8, 0)  # final checkpoint, no test scalars
    write_run(tmp_path / "half", 8, 1, logged_to=150, checkpoints=(150,))
    report = compare.build_report(
        [tmp_path / "no_test", tmp_path / "half"], tmp_path / "out", metric="train_loss"
    )
    status = {r.name.split("/")[-1]: r.status for r in report.runs}
    assert status == {"no_test": compare.NO_TEST, "half": "unfinished (step 150 of 300)"}
    finished = [r for r in report.runs if r.finished]
    assert [r.name.split("/")[-1] for r in finished] == ["no_test"]
    assert finished[0].train_loss == pytest.approx(np.mean(losses[-10:]))


def test_trained_parameters_logged_at_step_0_get_a_column(tmp_path):
    """Runs log their trained-weight count at step 0 (the trainers' metrics.jsonl); the report shows it
    beside the scores, empty for a run that did not log it (an older run)."""
    for name, kind, count in (("a", "random", 12_345), ("b", "wav2vec2", 678_901), ("c", "whisper", None)):
        write_run(tmp_path / name, 16, 0, scores=(0.2, 0.5), audio_encoder__kind=kind)
        if count is not None:
            text = (tmp_path / name / "metrics.jsonl").read_text()
            line = json.dumps({"step": 0, "trained_parameters": count, "frozen_parameters": 5})
            (tmp_path / name / "metrics.jsonl").write_text(line + "\n" + text)
    report = compare.build_report([tmp_path / n for n in "abc"], tmp_path / "out")
    assert [r.trained_parameters for r in report.runs] == [12_345, 678_901, None]
    header = report.markdown.splitlines()[2]
    assert "trained_params" in header
    rows = {line.split("|")[1].strip(): line for line in report.markdown.splitlines()[4:7]}
    assert "| 12345 |" in rows["a"] and "| 678901 |" in rows["b"]
    with (tmp_path / "out" / "report.csv").open() as f:
        assert [row["trained_params"] for row in csv.DictReader(f)] == ["12345", "678901", ""]


def test_a_key_the_x_value_decides_names_no_series(tmp_path):
    """A bridge ablation sets the query count for one bridge only: the count follows the bridge, so the plot
    keeps one series; a key that varies within an x value still splits the series."""
    for name, kind, queries in (("a", "random", 16), ("b", "wav2vec2", 2), ("c", "whisper", 16)):
        write_run(tmp_path / "runs" / name, queries, 0, scores=(0.2, 0.5), audio_encoder__kind=kind)
    report = compare.build_report(
        sorted((tmp_path / "runs").iterdir()), tmp_path / "out", x="audio_encoder.kind"
    )
    assert set(report.swept) == {"audio_encoder.kind", "qformer.num_queries"}
    assert [s.label for s in report.plot.series] == ["CIDEr-D"]
    write_run(tmp_path / "runs" / "d", 8, 0, scores=(0.3, 0.5), audio_encoder__kind="whisper")
    report = compare.build_report(
        sorted((tmp_path / "runs").iterdir()), tmp_path / "out", x="audio_encoder.kind"
    )
    assert len(report.plot.series) == 3  # whisper runs with 8 and 16 queries: the count is its own factor
