"""`slit demo`: the whole recipe on real pretrained models and real sounds, end to end.

Phases, each a `slit` command a user can run alone (printed before it runs):
1. gather: the real sounds (slit/demo/sources.py, slit/demo/midi.py) into DIR/data/manifest.jsonl;
2. build: `slit data build` -> the TFDS dataset `slit_demo` in DIR/tfds (bad clips reported);
3. cache: `slit cache-features` -> the frozen Whisper tiny.en encoder's outputs, once;
4. stage one: `slit train --config configs/demo_stage1.py` (MiniLM-initialised Q-Former), and
   `slit eval --task classification` (zero-shot by contrastive similarity);
5. stage two: `slit train --config configs/demo_stage2.py` (frozen SmolLM2), evaluated on the test
   split: captioning, question answering (with word error rate on speech), classification;
6. export: `slit export --format bundle`;
7. generate: `slit generate --bundle` answering several instructions about held-out clips.
Then DIR/summary.json: every held-out metric next to its trivial baseline, and a printed table.

A second run reuses what the first built (the manifest, the dataset, the cache, finished training)
and resumes an interrupted training from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shlex
import time
from collections.abc import Callable, Sequence

from slit import config as config_lib
from slit.errors import UserError

DATA_NAME = "slit_demo"
SEED = 0


@dataclasses.dataclass(frozen=True)
class Size:
    """How much of everything a demo run makes and trains."""

    name: str
    speech: int | None  # recorded prompts (None: all that qualify)
    animal_variants: int  # per animal recording (10 recordings)
    event_variants: int  # per desktop event sound (35 sounds)
    instruments: int  # General MIDI phrases
    synthetic: int  # procedural clips
    stage1_steps: int
    stage2_steps: int
    eval_clips: int  # stage two's test evaluation: the first N test clips (0: all)
    validate: bool  # stage one validates half-way


DATA_FIELDS = ("speech", "animal_variants", "event_variants", "instruments", "synthetic")
"""The fields of a Size that decide the data: a manifest made for the same values is reused."""

FULL = Size("full", None, 24, 6, 400, 300, 100, 500, 0, True)
QUICK = Size("quick", 60, 3, 1, 40, 40, 10, 10, 24, False)


@dataclasses.dataclass
class Phase:
    number: int
    total: int
    title: str
    started: float = 0.0

    def __enter__(self) -> Phase:
        self.started = time.time()
        print(f"\n=== [{self.number}/{self.total}] {self.title}", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            print(
                f"=== [{self.number}/{self.total}] done in {_duration(time.time() - self.started)}",
                flush=True,
            )


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds >= 60 else f"{seconds:.0f} s"


def slit_command(argv: Sequence[str]) -> None:
    """Runs one `slit` command in this process, printing it first; a non-zero exit is an error."""
    from slit import cli

    print("$ slit " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = cli.main(list(argv))
    if code:
        raise UserError(f"`slit {' '.join(argv[:1])}` exited with {code}; its message is above")


def gather(data_dir: pathlib.Path, size: Size) -> dict:
    """Writes DIR/data/manifest.jsonl (+ the varied and rendered audio) unless the one there was made for
    the same size; returns {"clips": by source and split, "reused": bool}."""
    from slit.demo import sources

    manifest = data_dir / "manifest.jsonl"
    stamp = data_dir / "manifest.size.json"
    wanted = {k: v for k, v in dataclasses.asdict(size).items() if k in DATA_FIELDS}
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("size") == wanted:
        lines = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        return {"clips": _counts(lines), "reused": True}
    data_dir.mkdir(parents=True, exist_ok=True)
    lines: list[dict] = []
    steps: list[tuple[str, Callable[[], list[dict]]]] = [
        ("speech", lambda: sources.speech_clips(SEED, size.speech)),
        ("animals", lambda: sources.animal_clips(data_dir, size.animal_variants, SEED)),
        ("events", lambda: sources.event_clips(data_dir, size.event_variants, SEED)),
        ("instruments", lambda: _instruments(data_dir, size.instruments)),
        ("synthetic", lambda: sources.synthetic_clips(data_dir, size.synthetic, SEED)),
    ]
    for name, make in steps:
        started = time.time()
        made = make()
        lines += made
        print(f"  {name}: {len(made)} clips ({_duration(time.time() - started)})", flush=True)
    manifest.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    stamp.write_text(json.dumps({"size": wanted}) + "\n")
    return {"clips": _counts(lines), "reused": False}


def _instruments(data_dir: pathlib.Path, count: int) -> list[dict]:
    """The MIDI phrases, rendered with a progress bar (ETA): the slowest source to gather."""
    import tqdm

    from slit.demo import midi

    with tqdm.tqdm(total=count, desc="  rendering instruments", unit="clip", dynamic_ncols=True) as bar:
        return midi.make_instrument_clips(data_dir, count, SEED, progress=bar.update)


def _counts(lines: list[dict]) -> dict:
    table: dict[str, dict[str, int]] = {}
    for line in lines:
        table.setdefault(line["source"], {}).setdefault(line["split"], 0)
        table[line["source"]][line["split"]] += 1
    return table


def run(workdir: str | pathlib.Path, quick: bool = False, size: Size | None = None) -> dict:
    """Runs the demo into `workdir` (FULL, QUICK with `quick`, or the `size` given); returns (and writes
    to workdir/summary.json) the summary."""
    from slit.demo import summary as summary_lib

    size = size or (QUICK if quick else FULL)
    root = pathlib.Path(workdir)
    configs = config_lib.configs_dir("demo_stage1.py")
    data_dir, tfds_dir = root / "data", root / "tfds"
    stage1, stage2, export = root / "stage1", root / "stage2", root / "export"
    data = [f"--config.data.data_dir={tfds_dir}"]
    started = time.time()
    total = 7
    print(f"slit demo ({size.name}) into {root}", flush=True)

    with Phase(1, total, "gather real sounds: speech, animals, desktop events, instruments, procedural"):
        gathered = gather(data_dir, size)
        if gathered["reused"]:
            print(f"  reusing {data_dir / 'manifest.jsonl'}")
    with Phase(2, total, f"build the TFDS dataset {DATA_NAME}"):
        rebuild = [] if gathered["reused"] else ["--overwrite"]
        slit_command(
            ["data", "build", "--manifest", str(data_dir / "manifest.jsonl"), "--name", DATA_NAME]
            + ["--data-dir", str(tfds_dir), "--max-seconds", "8", "--truncate-long", *rebuild]
        )
    stage1_config = str(configs / "demo_stage1.py")
    with Phase(3, total, "cache the frozen Whisper tiny.en encoder's outputs"):
        slit_command(["cache-features", "--config", stage1_config, *data])
    with Phase(
        4, total, "stage one: the Q-Former against the frozen encoder (contrastive, matching, generation)"
    ):
        steps = _schedule(size.stage1_steps)
        steps += [f"--config.eval_every_steps={size.stage1_steps // 2 if size.validate else 0}"]
        if _finished(stage1, size.stage1_steps, "retrieval.json"):
            print(f"  reusing {stage1} (trained and evaluated to step {size.stage1_steps})")
        else:
            slit_command(["train", "--config", stage1_config, "--workdir", str(stage1), *data, *steps])
        if _finished(stage1, size.stage1_steps, f"classification-{DATA_NAME}-test.json"):
            print("  reusing its zero-shot classification report")
        else:
            slit_command(
                ["eval", "--workdir", str(stage1), "--task", "classification", "--data", DATA_NAME]
                + ["--data-dir", str(tfds_dir)]
            )
    with Phase(5, total, "stage two: the frozen SmolLM2 answers, instruction-tuned on the task mix"):
        steps = _schedule(size.stage2_steps) + [f"--config.eval.max_clips={size.eval_clips}"]
        if _finished(stage2, size.stage2_steps, f"aqa-{DATA_NAME}-test.json"):
            print(f"  reusing {stage2} (trained and evaluated to step {size.stage2_steps})")
        else:
            slit_command(
                ["train", "--config", str(configs / "demo_stage2.py"), "--workdir", str(stage2), *data]
                + [f"--config.init_from={stage1}", *steps]
            )
    with Phase(6, total, "export a bundle others can load"):
        if (export / "config.json").is_file() and _bundle_step(export) == _newest_step(stage2):
            print(f"  reusing {export} (step {_bundle_step(export)})")
        else:
            _clear(export)
            slit_command(["export", "--workdir", str(stage2), "--format", "bundle", "--out", str(export)])
    with Phase(7, total, "ask the exported model about held-out clips"):
        clips = summary_lib.pick_clips(data_dir / "manifest.jsonl")
        argv = ["generate", "--bundle", str(export), "--json", str(root / "answers.json")]
        for clip in clips:
            argv += ["--audio", str(clip["path"])]
        for prompt in summary_lib.PROMPTS:
            argv += ["--prompt", prompt]
        slit_command(argv)

    summary = summary_lib.collect(root, size, gathered["clips"], time.time() - started)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(summary_lib.table(summary))
    print(summary_lib.next_steps(root))
    return summary


def _schedule(steps: int) -> list[str]:
    """The step count's overrides: warmup a tenth of it, a checkpoint every 100 steps or at the end."""
    return [
        f"--config.total_steps={steps}",
        f"--config.optimizer.warmup_steps={max(1, steps // 10)}",
        f"--config.checkpoint_every_steps={min(100, steps)}",
    ]


def _finished(workdir: pathlib.Path, steps: int, report: str) -> bool:
    """Whether `workdir` trained to `steps` and wrote eval/`report` for that step."""
    path = workdir / "eval" / report
    if _newest_step(workdir) != steps or not path.is_file():
        return False
    written = json.loads(path.read_text())
    return written.get("checkpoint_step", written.get("step")) == steps


def _newest_step(workdir: pathlib.Path) -> int | None:
    from slit import runs

    if not (workdir / "checkpoints").is_dir():
        return None
    steps = runs.checkpoint_steps(workdir)
    return steps[-1] if steps else None


def _bundle_step(export: pathlib.Path) -> int | None:
    info = json.loads((export / "config.json").read_text())
    return info.get("step")


def _clear(directory: pathlib.Path) -> None:
    import shutil

    if directory.exists():
        shutil.rmtree(directory)
