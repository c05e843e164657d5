"""Sweeps (slit/sweep.py, launch/sweep.py): expansion, checks before anything runs, sweep.json, resuming.

No real training: the runner is injected, or a --prefix puts a tiny fake trainer in front of each command.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest

from slit import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.trainer = "stage1"
    c.seed = 0
    c.total_steps = 4
    c.label = "plain"
    c.flag = False
    c.model = ml_collections.ConfigDict()
    c.model.width = 8
    c.model.rate = 0.1
    return c

"""
GOOD_SWEEP = """
def get_sweep():
    grid = [{"model.width": w, "seed": s} for w in (8, 16) for s in (0, 1)]
    return grid + [{"label": "a b/c", "flag": True}]
"""
NAMES = [
    "00_model.width=8,seed=0",
    "01_model.width=8,seed=1",
    "02_model.width=16,seed=0",
    "03_model.width=16,seed=1",
    "04_label=a_b_c,flag=true",
]


def write_config(tmp_path: pathlib.Path, sweep_source: str = GOOD_SWEEP) -> pathlib.Path:
    path = tmp_path / "tiny_config.py"
    path.write_text(CONFIG + textwrap.dedent(sweep_source))
    return path


class FakeRunner:
    """Stands in for `slit train`: records each command; exits with `codes[point name]` (default 0) and,
    for exit 0, leaves what a finished run leaves (config.json, metrics.jsonl with the test line)."""

    def __init__(self, codes: dict[str, int] | None = None, total_steps: int = 4):
        self.codes = codes or {}
        self.total_steps = total_steps
        self.calls: list[list[str]] = []

    def __call__(self, command, log_path: pathlib.Path) -> int:
        self.calls.append(list(command))
        workdir = pathlib.Path(command[command.index("--workdir") + 1])
        assert log_path == workdir / sweep.LOG_FILE
        code = self.codes.get(workdir.name, 0)
        if code == 0:
            finish_run(workdir, self.total_steps)
        return code


def finish_run(workdir: pathlib.Path, total_steps: int, test_step: int | None = None) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps({"total_steps": total_steps, "trainer": "stage1"}))
    lines = [{"step": 2, "loss": 1.5}, {"step": test_step or total_steps, "test/text_to_audio_R@1": 0.25}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def expected_command(config: pathlib.Path, workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "slit.cli",
        "train",
        "--config",
        str(config),
        "--workdir",
        str(workdir),
        *overrides,
    ]


def test_expansion_names_and_exact_commands(tmp_path):
    config = write_config(tmp_path)
    root = tmp_path / "sweep"
    points = sweep.expand(config, root, sweep.load_sweep(config), extra=["--config.total_steps=2"])
    assert [p.name for p in points] == NAMES
    assert [p.workdir for p in points] == [root / n for n in NAMES]
    assert points[3].overrides == {"model.width": 16, "seed": 1}
    assert points[3].command == expected_command(
        config, root / NAMES[3], "--config.model.width=16", "--config.seed=1", "--config.total_steps=2"
    )
    # A string with a space and a slash stays one argument (only the directory name is sanitised);
    # a bool is written so that slit.config parses it back.
    assert points[4].command[-3:] == ["--config.label=a b/c", "--config.flag=true", "--config.total_steps=2"]
    sweep.validate(config, points, ["--config.total_steps=2"])  # every point is a valid config

    prefixed = sweep.expand(config, root, [{"seed": 1}], prefix=["srun", "-G1"])
    assert prefixed[0].command[:3] == ["srun", "-G1", sys.executable]


def test_point_names_are_padded_sanitised_and_bounded():
    assert sweep.point_name(3, {"a.b": 1, "c": "x  y,z=1"}, 4) == "03_a.b=1,c=x_y_z_1"
    assert sweep.point_name(7, {"lr": 0.0003}, 120) == "007_lr=0.0003"
    assert sweep.point_name(0, {}, 1) == "00_default"
    long_name = sweep.point_name(1, {"k": "v" * 500}, 2)
    assert len(long_name) == sweep.MAX_NAME and long_name.startswith("01_k=vvv")
    assert sweep.point_name(0, {"rules": (("batch", None),)}, 1) == "00_rules=_batch_None_"


def test_override_values_round_trip_through_slit_config(tmp_path):
    from slit import config as config_lib

    values = {"flag": True, "model.rate": 1e-05, "model.width": 32, "label": "x=1, y"}
    config = config_lib.load_config_file(write_config(tmp_path))
    config_lib.apply_overrides(config, config_lib.parse_override_args(sweep.override_args(values)))
    assert (config.flag, config.model.rate, config.model.width, config.label) == (True, 1e-05, 32, "x=1, y")


def test_print_commands_writes_sweep_json_and_runs_nothing(tmp_path, capsys):
    config = write_config(tmp_path)
    root = tmp_path / "sweep"
    runner = FakeRunner()
    code = sweep.main(
        [str(config), "--root", str(root), "--print-commands", "--", "--config.total_steps=2"], runner
    )
    assert code == 0 and runner.calls == []
    out = capsys.readouterr().out.splitlines()
    assert out == [
        shlex.join(expected_command(config, root / n, *sweep.override_args(o), "--config.total_steps=2"))
        for n, o in zip(NAMES, sweep.load_sweep(config), strict=True)
    ]
    state = json.loads((root / "sweep.json").read_text())
    assert state["config"] == str(config)
    assert state["extra_args"] == ["--config.total_steps=2"]
    assert [p["name"] for p in state["points"]] == NAMES
    assert [p["workdir"] for p in state["points"]] == [str(root / n) for n in NAMES]
    assert state["points"][1]["overrides"] == {"model.width": 8, "seed": 1}
    assert [shlex.split(p["command_line"]) for p in state["points"]] == [
        p["command"] for p in state["points"]
    ]
    assert all(p["status"] == "pending" and p["started"] is None for p in state["points"])


def test_dry_run_writes_and_runs_nothing(tmp_path, capsys):
    config = write_config(tmp_path)
    runner = FakeRunner()
    assert sweep.main([str(config), "--root", str(tmp_path / "s"), "--dry-run"], runner) == 0
    assert runner.calls == [] and not (tmp_path / "s").exists()
    captured = capsys.readouterr()
    assert "5 points, 0 already finished, 5 to run" in captured.err
    assert captured.out.count("run ") == 5 and NAMES[4] in captured.out


@pytest.mark.parametrize(
    ("point", "named"),
    [
        ({"model.widht": 16}, ["point 2", "model.widht", "did you mean --config.model.width"]),
        ({"model.width": "wide"}, ["point 2", "model.width=wide", "expected an integer"]),
        ({"model": 3}, ["point 2", "group of fields"]),
        ({"--config.seed": 3}, ["point 2", "--config.seed", "dotted name alone"]),
    ],
)
def test_a_bad_point_fails_before_anything_runs(tmp_path, capsys, point, named):
    sweep_source = f"def get_sweep():\n    return [{{'seed': 0}}, {{'seed': 1}}, {point!r}]\n"
    config = write_config(tmp_path, sweep_source)
    runner = FakeRunner()
    assert sweep.main([str(config), "--root", str(tmp_path / "s")], runner) == 2
    assert runner.calls == [] and not (tmp_path / "s").exists()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for text in named:
        assert text in err
    assert str(config) in err


def test_extra_arguments_are_checked_too(tmp_path, capsys):
    config = write_config(tmp_path)
    runner = FakeRunner()
    assert (
        sweep.main([str(config), "--root", str(tmp_path / "s"), "--", "--config.total_step=3"], runner) == 2
    )
    assert "arguments after --" in capsys.readouterr().err
    # Setting a swept key for every point would silently undo the sweep.
    assert sweep.main([str(config), "--root", str(tmp_path / "s"), "--", "--config.seed=3"], runner) == 2
    assert "--config.seed after --" in capsys.readouterr().err
    assert runner.calls == []


def test_config_without_get_sweep_says_what_to_add(tmp_path, capsys):
    path = tmp_path / "no_sweep.py"
    path.write_text(CONFIG)
    assert sweep.main([str(path), "--root", str(tmp_path / "s")], FakeRunner()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err and "get_sweep()" in err and "def get_sweep()" in err


def test_a_failed_point_does_not_stop_the_others_and_a_rerun_resumes(tmp_path, capsys):
    config = write_config(tmp_path)
    root = tmp_path / "sweep"
    runner = FakeRunner(codes={NAMES[1]: 3})
    assert sweep.main([str(config), "--root", str(root)], runner) == 1
    assert [pathlib.Path(c[c.index("--workdir") + 1]).name for c in runner.calls] == NAMES
    state = json.loads((root / "sweep.json").read_text())
    statuses = [p["status"] for p in state["points"]]
    assert statuses == ["finished", "failed (exit 3)", "finished", "finished", "finished"]
    assert all(p["started"] and p["ended"] and p["started"] <= p["ended"] for p in state["points"])
    err = capsys.readouterr().err
    assert f"  {NAMES[1]}: failed (exit 3)" in err and f"  {NAMES[0]}: finished" in err
    assert "1 of 5 points run failed" in err

    # The re-run starts only the failed point; the others are finished (their test line).
    runner = FakeRunner()
    assert sweep.main([str(config), "--root", str(root)], runner) == 0
    assert [c[c.index("--workdir") + 1] for c in runner.calls] == [str(root / NAMES[1])]
    err = capsys.readouterr().err
    assert "5 points, 4 already finished, 1 to run" in err
    assert f"  {NAMES[0]}: finished (skipped: already finished)" in err
    state = json.loads((root / "sweep.json").read_text())
    assert all(p["status"] == "finished" for p in state["points"])


def test_what_counts_as_finished(tmp_path):
    config = write_config(tmp_path)
    root = tmp_path / "sweep"
    points = sweep.expand(config, root, sweep.load_sweep(config))
    finish_run(points[0].workdir, total_steps=4)  # test line at total_steps: finished
    finish_run(points[1].workdir, total_steps=8, test_step=4)  # total_steps raised since: not finished
    points[2].workdir.mkdir(parents=True)  # sweep.json says finished, workdir there: finished
    # points[3]: sweep.json says finished but its workdir was deleted: run again.
    (root / "sweep.json").write_text(
        json.dumps({"points": [{"name": NAMES[i], "status": "finished"} for i in (2, 3)]})
    )
    runner = FakeRunner()
    assert sweep.main([str(config), "--root", str(root)], runner) == 0
    ran = [pathlib.Path(c[c.index("--workdir") + 1]).name for c in runner.calls]
    assert ran == [NAMES[1], NAMES[3], NAMES[4]]


def test_only_runs_the_chosen_points(tmp_path):
    config = write_config(tmp_path)
    runner = FakeRunner()
    assert sweep.main([str(config), "--root", str(tmp_path / "s"), "--only", "1,3-4"], runner) == 0
    assert [pathlib.Path(c[c.index("--workdir") + 1]).name for c in runner.calls] == [
        NAMES[i] for i in (1, 3, 4)
    ]
    state = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == [
        "pending",
        "finished",
        "pending",
        "finished",
        "finished",
    ]
    assert sweep.parse_only("0, 2-3,2", 5) == [0, 2, 3]
    for bad in ("5", "3-1", "x", "1-"):
        with pytest.raises(sweep.UserError):
            sweep.parse_only(bad, 5)


FAKE_TRAIN = """
import json, pathlib, sys
args = sys.argv[1:]
assert args[1:4] == ["-m", "slit.cli", "train"], args
workdir = pathlib.Path(args[args.index("--workdir") + 1])
overrides = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
print(f"fake training {workdir.name} seed={overrides['seed']}")
print("to stderr too", file=sys.stderr)
if overrides["seed"] == "1":
    sys.exit(7)
workdir.mkdir(parents=True, exist_ok=True)
(workdir / "config.json").write_text(json.dumps({"total_steps": 4}))
(workdir / "metrics.jsonl").write_text(json.dumps({"step": 4, "test/qa_accuracy": 0.5}) + "\\n")
"""


def test_prefix_runs_each_command_streaming_to_the_terminal_and_the_log(tmp_path, capfd):
    config = write_config(tmp_path, "def get_sweep():\n    return [{'seed': 0}, {'seed': 1}]\n")
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    root = tmp_path / "sweep"
    code = sweep.main([str(config), "--root", str(root), "--prefix", shlex.join([sys.executable, str(fake)])])
    assert code == 1
    out = capfd.readouterr().out
    assert "fake training 00_seed=0 seed=0" in out and "fake training 01_seed=1 seed=1" in out
    log = (root / "01_seed=1" / sweep.LOG_FILE).read_text()
    assert "fake training 01_seed=1 seed=1" in log and "to stderr too" in log
    command = [sys.executable, str(fake), *expected_command(config, root / "01_seed=1", "--config.seed=1")]
    assert log.splitlines()[0].endswith("$ " + shlex.join(command))
    state = json.loads((root / "sweep.json").read_text())
    assert [p["status"] for p in state["points"]] == ["finished", "failed (exit 7)"]
    assert state["prefix"] == [sys.executable, str(fake)]


def test_a_command_that_cannot_start_is_a_failed_point(tmp_path):
    assert sweep.run_streamed(["/nonexistent/launcher", "x"], tmp_path / "w" / "sweep.log") == 127
    assert "cannot start" in (tmp_path / "w" / "sweep.log").read_text()


def test_launch_script_runs_as_a_program(tmp_path):
    config = write_config(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "sweep.py"),
            str(config),
            "--root",
            str(tmp_path / "s"),
            "--print-commands",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 5 and (tmp_path / "s" / "sweep.json").is_file()


def test_the_shipped_stage1_synthetic_sweep_expands_and_validates(tmp_path):
    config = ROOT / "configs" / "stage1_synthetic.py"
    overrides = sweep.load_sweep(config)
    points = sweep.expand(config, tmp_path, overrides)
    sweep.validate(config, points)
    assert len(points) == len({p.name for p in points}) >= 4
    assert {k for o in overrides for k in o} == {"qformer.num_queries", "seed"}
    assert len({o["seed"] for o in overrides}) >= 2  # repeats each setting: mean ± std in slit report


CACHED_CONFIG = """
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.trainer = "stage2"
    c.seed = 0
    c.total_steps = 4
    c.batch_size = 8
    c.features = "cached"
    c.audio_encoder = ml_collections.ConfigDict({"width": 8})
    c.bridge = ml_collections.ConfigDict({"kind": "qformer"})
    return c


def get_sweep():
    points = [{"bridge.kind": k, "seed": 0} for k in ("qformer", "linear")]
    points.append({"bridge.kind": "linear", "audio_encoder.width": 16})
    points.append({"bridge.kind": "pengi", "features": "compute"})
    return points
"""


class CachingRunner(FakeRunner):
    """FakeRunner that also takes `slit cache-features` commands (logged under the sweep root)."""

    def __init__(self, cache_code: int = 0):
        super().__init__()
        self.cache_code = cache_code

    def __call__(self, command, log_path: pathlib.Path) -> int:
        if "cache-features" in command:
            self.calls.append(list(command))
            assert log_path.name == sweep.CACHE_LOG
            return self.cache_code
        return super().__call__(command, log_path)


def test_points_reading_cached_features_build_each_cache_once_first(tmp_path, capsys):
    config = tmp_path / "cached_config.py"
    config.write_text(textwrap.dedent(CACHED_CONFIG))
    root = tmp_path / "sweep"
    runner = CachingRunner()
    assert sweep.main([str(config), "--root", str(root), "--", "--config.batch_size=4"], runner) == 0
    caches = [c for c in runner.calls if "cache-features" in c]
    # Two encoder settings among the three cached points (the fourth computes its features); the
    # bridge and seed do not key a cache; the arguments after -- go to the cache command too.
    assert caches == [
        [
            sys.executable,
            "-m",
            "slit.cli",
            "cache-features",
            "--config",
            str(config),
            "--config.batch_size=4",
        ],
        [
            *[sys.executable, "-m", "slit.cli", "cache-features", "--config", str(config)],
            *["--config.audio_encoder.width=16", "--config.batch_size=4"],
        ],
    ]
    assert runner.calls[:2] == caches and len(runner.calls) == 6  # the caches, then the four points
    assert "feature cache 1/2" in capsys.readouterr().err

    # A failed cache stops the sweep before any point runs.
    runner = CachingRunner(cache_code=2)
    assert sweep.main([str(config), "--root", str(tmp_path / "other")], runner) == 1
    assert len(runner.calls) == 1 and "no point was run" in capsys.readouterr().err


def test_report_is_written_when_the_points_have_run(tmp_path, capsys):
    config = write_config(tmp_path)
    root = tmp_path / "sweep"
    assert sweep.main([str(config), "--root", str(root), "--report"], FakeRunner()) == 0
    out = capsys.readouterr().out
    assert "# Runs (5, 5 finished)" in out
    assert {"report.md", "report.csv", "report.png"} <= {p.name for p in (root / "report").iterdir()}
