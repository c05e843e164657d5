"""Sweeps: one `slit train` run per set of config overrides (launch/sweep.py is the command line).

A config file declares its sweep next to `get_config()`:

    def get_sweep() -> list[dict[str, object]]:
        return [{"qformer.num_queries": q, "seed": s} for q in (8, 16, 32) for s in (0, 1)]

Keys are the dotted names of `--config.a.b=value`. Each point gets the workdir `<root>/<name>`, its name
made from its index and overrides (`03_qformer.num_queries=16,seed=1`), and runs as

    <prefix...> python -m slit.cli train --config CONFIG --workdir <root>/<name> --config.k=v ... <extra>

Every point is checked against the config before any runs. `<root>/sweep.json` records the points (name,
workdir, overrides, command) and their status ("pending", "running", "finished", "failed (exit N)",
"interrupted") with start and end times; it is rewritten as points run. A re-run skips the points that
finished (the run logged its test evaluation at step == total_steps, or sweep.json says finished), so it
resumes the sweep. `slit report <root>` compares the points (`--report` writes `<root>/report` at the end).

Points that read cached encoder features (`features=cached`) need the cache first: before any point runs,
`slit cache-features` runs once per distinct encoder-and-data setting among them (their `audio_encoder.*`,
`data.*`, `features_dir` and `batch_size` overrides), its output in `<root>/cache-features.log`; an up-to-date
cache is kept, so a bridge or learning-rate sweep encodes the audio once.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from slit import config as config_lib
from slit import paths
from slit.errors import UserError
from slit.eval import compare

SWEEP_FILE = compare.SWEEP_FILE
LOG_FILE = "sweep.log"  # in each point's workdir: its output, as streamed to the terminal
MAX_NAME = 120  # characters of a point's directory name
FINISHED = "finished"
PENDING = "pending"

# (command, log file) -> exit code
Runner = Callable[[Sequence[str], pathlib.Path], int]


@dataclasses.dataclass
class Point:
    """One run of the sweep."""

    index: int
    name: str  # its directory under the sweep root
    overrides: dict[str, Any]  # dotted key -> value, as get_sweep() gave them
    workdir: pathlib.Path
    command: list[str]


# --- reading and expanding ---------------------------------------------------------------------------------


def load_sweep(config_path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The override sets of `config_path`'s get_sweep(); UserError when the file has none or it returns
    something other than a non-empty list of {dotted key: value} dicts."""
    path = pathlib.Path(config_path)
    module = config_lib.config_module(path)
    if not hasattr(module, "get_sweep"):
        raise UserError(
            f"{path} has no get_sweep(); add `def get_sweep() -> list[dict[str, object]]` returning override "
            'sets, e.g. [{"qformer.num_queries": q, "seed": s} for q in (8, 16) for s in (0, 1)]'
        )
    points = module.get_sweep()
    if not isinstance(points, list | tuple) or not points:
        raise UserError(f"{path}: get_sweep() must return a non-empty list of dicts, not {points!r}")
    for i, point in enumerate(points):
        if not isinstance(point, Mapping) or not all(isinstance(k, str) and k for k in point):
            raise UserError(f"{path}: get_sweep() point {i} is not a dict of dotted keys: {point!r}")
    return [dict(p) for p in points]


def format_value(value: Any) -> str:
    """The text of `--config.k=<text>` that slit.config parses back into `value` (bools as true/false,
    strings as they are, tuples and lists as Python literals)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float | str):
        return str(value)
    return repr(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """{"a.b": 1} -> ["--config.a.b=1"]."""
    return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def point_name(index: int, overrides: Mapping[str, Any], count: int) -> str:
    """`<index>_<k=v,...>`: the index zero-padded for `count` points; in keys and values, runs of
    characters other than letters, digits and `._+@-` become one `_`; at most MAX_NAME characters
    ("<index>_default" without overrides)."""

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._+@-]+", "_", text)

    digits = max(2, len(str(count - 1)))
    body = ",".join(f"{clean(k)}={clean(format_value(v))}" for k, v in overrides.items()) or "default"
    return f"{index:0{digits}d}_{body}"[:MAX_NAME]


def train_command(
    config_path: str | pathlib.Path,
    workdir: str | pathlib.Path,
    overrides: Mapping[str, Any],
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The argv that trains one point: `<prefix> python -m slit.cli train --config C --workdir W
    --config.k=v ... <extra>`."""
    return [
        *prefix,
        python,
        "-m",
        "slit.cli",
        "train",
        "--config",
        str(config_path),
        "--workdir",
        str(workdir),
        *override_args(overrides),
        *extra,
    ]


def expand(
    config_path: str | pathlib.Path,
    root: str | pathlib.Path,
    sweep: Sequence[Mapping[str, Any]],
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
    python: str = sys.executable,
) -> list[Point]:
    """One Point per override set of `sweep`, its workdir `<root>/<point_name>`."""
    root = pathlib.Path(root)
    points = []
    for index, overrides in enumerate(sweep):
        name = point_name(index, overrides, len(sweep))
        workdir = root / name
        command = train_command(config_path, workdir, overrides, extra, prefix, python)
        points.append(Point(index, name, dict(overrides), workdir, command))
    return points


def validate(config_path: str | pathlib.Path, points: Sequence[Point], extra: Sequence[str] = ()) -> None:
    """Loads the config and applies each point's overrides, then `extra` (`--config.k=v` arguments for
    every point), with slit.config's own functions; UserError naming the point and the key at fault.
    `extra` may not set a key that the sweep varies (it would override every point's value)."""
    try:
        extra_overrides = config_lib.parse_override_args(extra)
    except config_lib.ConfigError as e:
        raise UserError(f"arguments after --: {e}") from None
    swept = {key for point in points for key in point.overrides}
    for key, _ in extra_overrides:
        if key in swept:
            raise UserError(
                f"--config.{key} after -- would override the value that the sweep varies; drop it or "
                "change get_sweep()"
            )
    for point in points:
        for key in point.overrides:
            if key.startswith("--") or key.startswith("config."):
                raise UserError(
                    f"{config_path}: get_sweep() point {point.index} ({point.name}): key {key!r}: write the "
                    "dotted name alone, e.g. 'qformer.num_queries'"
                )
        config = config_lib.load_config_file(config_path)
        texts = [(k, format_value(v)) for k, v in point.overrides.items()]
        try:
            config_lib.apply_overrides(config, texts)
        except config_lib.ConfigError as e:
            raise UserError(f"{config_path}: get_sweep() point {point.index} ({point.name}): {e}") from None
        try:
            config_lib.apply_overrides(config, extra_overrides)
        except config_lib.ConfigError as e:
            raise UserError(f"arguments after --: {e}") from None


CACHE_KEYS = ("audio_encoder.", "data.", "features_dir", "batch_size")  # what a feature cache depends on
CACHE_LOG = "cache-features.log"


def cache_commands(
    config_path: str | pathlib.Path,
    points: Sequence[Point],
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
    python: str = sys.executable,
) -> list[list[str]]:
    """One `slit cache-features` argv per distinct encoder-and-data setting among the points that read
    cached features (features=cached after their overrides and `extra`), in point order; [] when none."""
    extra_overrides = config_lib.parse_override_args(extra)
    commands: list[list[str]] = []
    for point in points:
        config = config_lib.load_config_file(config_path)
        config_lib.apply_overrides(config, [(k, format_value(v)) for k, v in point.overrides.items()])
        config_lib.apply_overrides(config, extra_overrides)
        if config.get("features", "compute") != "cached":
            continue
        keyed = {k: v for k, v in point.overrides.items() if k.startswith(CACHE_KEYS)}
        command = [*prefix, python, "-m", "slit.cli", "cache-features", "--config", str(config_path)]
        command += [*override_args(keyed), *extra]
        if command not in commands:
            commands.append(command)
    return commands


def parse_only(text: str, count: int) -> list[int]:
    """ "1,3,5-7" -> [1, 3, 5, 6, 7]; UserError for anything else or an index not in range(count)."""
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UserError(f"--only {text}: expected point indices like 0,2,4-6")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first or last >= count:
            raise UserError(f"--only {text}: {part} is not among the points 0-{count - 1}")
        indices += [i for i in range(first, last + 1) if i not in indices]
    return sorted(indices)


# --- the sweep file ----------------------------------------------------------------------------------------


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def read_state(root: str | pathlib.Path) -> dict[str, Any] | None:
    """`<root>/sweep.json`, or None when there is none."""
    path = pathlib.Path(root) / SWEEP_FILE
    return compare.read_sweep(root) if path.is_file() else None


def new_state(
    config_path: str | pathlib.Path,
    points: Sequence[Point],
    extra: Sequence[str],
    prefix: Sequence[str],
    previous: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The sweep.json of `points`, each point's status and times carried over from `previous` (the last
    sweep.json) where it lists the same name."""
    before = {p.get("name"): p for p in (previous or {}).get("points", []) if isinstance(p, dict)}
    entries = []
    for point in points:
        old = before.get(point.name, {})
        entries.append(
            {
                "index": point.index,
                "name": point.name,
                "workdir": str(point.workdir),
                "overrides": point.overrides,
                "command": point.command,
                "command_line": shlex.join(point.command),
                "status": old.get("status", PENDING),
                "started": old.get("started"),
                "ended": old.get("ended"),
            }
        )
    return {
        "config": str(config_path),
        "extra_args": list(extra),
        "prefix": list(prefix),
        "created": (previous or {}).get("created") or now(),
        "updated": now(),
        "points": entries,
    }


def write_state(root: str | pathlib.Path, state: dict[str, Any]) -> pathlib.Path:
    """Writes `<root>/sweep.json` (through a temporary file, so a reader never sees half of it)."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state["updated"] = now()
    path = root / SWEEP_FILE
    paths.write_whole(path, (json.dumps(state, indent=2, default=str) + "\n").encode())
    return path


def is_done(point: Point, entry: Mapping[str, Any]) -> bool:
    """Whether `point` finished: its run logged its test evaluation at step == total_steps, or sweep.json
    says finished (and its workdir is still there)."""
    try:
        if compare.is_finished(point.workdir):
            return True
    except UserError:  # a config.json cut short: run the point again, which rewrites it
        pass
    return entry.get("status") == FINISHED and point.workdir.is_dir()


# --- running -----------------------------------------------------------------------------------------------


def run_streamed(command: Sequence[str], log_path: pathlib.Path) -> int:
    """Runs `command`, its output (stdout and stderr) going both to this process's stdout and to
    `log_path` (appended); returns its exit code (127 when it cannot be started)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = getattr(sys.stdout, "buffer", None)
    with log_path.open("ab") as log:
        log.write(f"[{now()}] $ {shlex.join(command)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                list(command),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as e:
            message = f"cannot start {command[0]}: {e}\n"
            log.write(message.encode())
            print(message, end="", file=sys.stderr)
            return 127
        with process:
            while chunk := process.stdout.read1(1 << 16):
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stdout.write(chunk.decode(errors="replace"))
                log.write(chunk)
                log.flush()
            return process.wait()


def run_points(
    root: str | pathlib.Path,
    state: dict[str, Any],
    points: Sequence[Point],
    todo: Sequence[int],
    runner: Runner = run_streamed,
) -> dict[int, str]:
    """Runs the points whose index is in `todo`, one after another, recording each one's status and times
    in `state` and writing sweep.json before and after each; a failed point does not stop the others.
    Returns {index: status} of the points run. On Ctrl-C the running point is marked "interrupted"."""
    results = {}
    for point in points:
        if point.index not in todo:
            continue
        entry = state["points"][point.index]
        entry.update(status="running", started=now(), ended=None)
        write_state(root, state)
        say(f"[{point.index + 1}/{len(points)}] {point.name}: {shlex.join(point.command)}")
        try:
            code = runner(point.command, point.workdir / LOG_FILE)
        except KeyboardInterrupt:
            entry.update(status="interrupted", ended=now())
            write_state(root, state)
            raise
        entry.update(status=FINISHED if code == 0 else f"failed (exit {code})", ended=now())
        write_state(root, state)
        results[point.index] = entry["status"]
        say(f"[{point.index + 1}/{len(points)}] {point.name}: {entry['status']}")
    return results


def say(message: str) -> None:
    print(f"sweep: {message}", file=sys.stderr, flush=True)


# --- the command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, the arguments after `--`, passed to every `slit train`)."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py",
        description="Runs a config file's get_sweep(): one `slit train` per point, one after another, "
        "each in its own workdir under --root; re-running resumes (finished points are skipped).",
        epilog="Arguments after -- go to every `slit train`, e.g. -- --config.total_steps=300. "
        "Compare the points with: slit report ROOT --out ROOT/report",
    )
    parser.add_argument("config", help="a config file with get_config() and get_sweep()")
    parser.add_argument(
        "--root", required=True, help="the sweep's directory: one workdir per point, sweep.json"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    parser.add_argument(
        "--print-commands",
        action="store_true",
        help="only print the commands of the points still to run, one per line (for a cluster's job "
        "array), and write sweep.json",
    )
    parser.add_argument(
        "--prefix", default="", help='a launcher put in front of each command, e.g. "srun -G1"'
    )
    parser.add_argument("--only", help="run only these point indices, e.g. 0,2,4-5")
    parser.add_argument(
        "--report",
        action="store_true",
        help="when the points have run, write the comparison (slit report) to ROOT/report: report.md, "
        "report.csv, report.png",
    )
    parser.add_argument("--metric", help="with --report: the metric to plot (see slit report --help)")
    parser.add_argument("--x", help="with --report: the swept key on the plot's x axis")
    return parser.parse_args(argv), extra


def main(argv: Sequence[str] | None = None, runner: Runner = run_streamed) -> int:
    """launch/sweep.py: expands, checks, records and runs a sweep; the exit code (0; 1 when a point failed;
    2 for bad input, said in one line)."""
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args, extra, runner)
    except UserError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        say("interrupted; run the same command again to resume")
        return 130


def _main(args: argparse.Namespace, extra: list[str], runner: Runner) -> int:
    root = pathlib.Path(args.root)
    prefix = shlex.split(args.prefix)
    points = expand(args.config, root, load_sweep(args.config), extra, prefix)
    validate(args.config, points, extra)
    selected = parse_only(args.only, len(points)) if args.only else [p.index for p in points]
    previous = read_state(root)
    if previous and previous.get("config") != str(args.config):
        say(f"note: {root / SWEEP_FILE} was written for {previous.get('config')}; now {args.config}")
    state = new_state(args.config, points, extra, prefix, previous)
    done = set()
    for point, entry in zip(points, state["points"], strict=True):
        if is_done(point, entry):
            entry["status"] = FINISHED
            done.add(point.index)
        elif entry["status"] == FINISHED:  # its workdir is gone
            entry["status"] = PENDING
    todo = [i for i in selected if i not in done]

    if args.print_commands:
        write_state(root, state)
        for index in todo:
            print(shlex.join(points[index].command))
        say(f"{len(todo)} commands ({len(done)} of {len(points)} points already finished); state in {root}")
        return 0
    only = f"; --only {args.only}: {len(selected)} selected" if args.only else ""
    say(
        f"{args.config}: {len(points)} points, {len(done)} already finished{only}, {len(todo)} to run; "
        f"workdirs {root}/<point>/ (output also in <workdir>/{LOG_FILE}), status in {root / SWEEP_FILE}"
    )
    if args.dry_run:
        for point, entry in zip(points, state["points"], strict=True):
            mark = "run " if point.index in todo else "skip"
            print(f"{mark} {point.name}  [{entry['status']}]\n     {shlex.join(point.command)}")
        return 0
    write_state(root, state)
    if todo:
        caches = cache_commands(args.config, [points[i] for i in todo], extra, prefix)
        for i, command in enumerate(caches):
            say(
                f"feature cache {i + 1}/{len(caches)} (once for the points reading it): {shlex.join(command)}"
            )
            code = runner(command, root / CACHE_LOG)
            if code != 0:
                say(f"slit cache-features failed (exit {code}; output: {root / CACHE_LOG}); no point was run")
                return 1
    results = run_points(root, state, points, todo, runner)
    code = summarize(state, points, selected, done, results)
    if args.report:
        report_to(root, args.metric, args.x)
    return code


def report_to(root: pathlib.Path, metric: str | None, x: str | None) -> None:
    """Writes `slit report ROOT --out ROOT/report` and prints its table and files."""
    report = compare.build_report([root], root / "report", metric=metric, x=x)
    print(report.markdown, end="")
    for note in report.notes:
        say(f"note: {note}")
    say("report: " + ", ".join(str(path) for path in report.written))


def summarize(
    state: Mapping[str, Any],
    points: Sequence[Point],
    selected: Sequence[int],
    done: set[int],
    results: Mapping[int, str],
) -> int:
    """Prints one line per selected point and what to do next; 1 when a point failed, else 0."""
    lines = []
    for index in selected:
        status = state["points"][index]["status"]
        note = " (skipped: already finished)" if index in done else ""
        lines.append(f"  {points[index].name}: {status}{note}")
    failed = [i for i, status in results.items() if status != FINISHED]
    say("summary:\n" + "\n".join(lines))
    root = points[0].workdir.parent
    if failed:
        say(
            f"{len(failed)} of {len(results)} points run failed (their output: <workdir>/{LOG_FILE}); the "
            "others ran. Run the same command again to retry them (finished points are skipped)."
        )
        return 1
    say(f"done; compare the points with: slit report {root} --out {root / 'report'} (or --report here)")
    return 0
