"""`slit eval --workdir DIR [--task T] --data NAME [--split test]`: evaluates a run's checkpoint.

The evaluations of each stage are the table of slit.eval.registry (stage one: `retrieval`,
`classification` by contrastive similarity; stage two: `captioning`, `aqa` by generation, resumable
after preemption, and `classification` by the LLM's loss of each class name). `--task all`, the
default, runs each evaluation of the run's stage that the split can answer (captions, questions,
labels) and names the ones it skips, with why. Each writes <workdir>/eval/<task>-<data>-<split>.*.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slit.eval.registry import Result

HELP = "evaluate a run's checkpoint on a dataset split; writes <workdir>/eval/<task>-<data>-<split>.*"
JOINS_MULTI_PROCESS_RUNS = True  # one process per host (slit/train/distributed.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slit.eval import registry

    parser.description = "Evaluations (--task, by the run's stage):\n" + registry.describe()
    parser.add_argument("--workdir", required=True, help="the run's directory")
    parser.add_argument(
        "--task",
        default="all",
        choices=(*registry.task_names(), "all"),
        help="default all: every evaluation of the run's stage that the split can answer",
    )
    parser.add_argument("--data", required=True, help="a built TFDS dataset name, e.g. slit_synthetic_sounds")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory (default: the run's)")
    parser.add_argument("--split", default="test", help="the split to evaluate")
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")
    parser.add_argument(
        "--rerank-k",
        type=int,
        default=None,
        help="retrieval: re-rank each query's top k by the matching head (0: off; default: the run's "
        "retrieval_rerank_k, 128 as BLIP-2)",
    )
    parser.add_argument(
        "--instruction",
        default=None,
        help="captioning/aqa: the instruction (aqa: with {question}); default: the run's first",
    )
    parser.add_argument(
        "--max-clips", type=int, default=0, help="captioning/aqa: only the first N clips (0: all)"
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help='stage-one classification: the prompt template (default "this is a sound of {label}")',
    )


def _print(result: Result) -> None:
    print(result.text)
    for kind, path in result.paths.items():
        print(f"{kind}: {path}")


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from slit.train import distributed

    with distributed.only_process_0_prints():  # every process evaluates; process 0 writes and reports
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from slit.errors import UserError
    from slit.eval import registry
    from slit.train import checkpoint

    run_config = checkpoint.run_config(args.workdir)
    trainer = run_config.get("trainer", "stage1")
    request = registry.Request(
        workdir=args.workdir,
        data=args.data,
        split=args.split,
        data_dir=args.data_dir,
        step=args.step,
        rerank_k=args.rerank_k,
        instruction=args.instruction,
        max_clips=args.max_clips,
        prompt=args.prompt,
    )
    if args.task != "all":
        _print(registry.find(trainer, args.task, args.workdir).evaluate(request))
        return 0
    if trainer == "stage2":  # one loaded checkpoint for all of them
        from slit.eval import generative, reports

        results, skipped = generative.evaluate_stage2_tasks(
            args.workdir, args.data, args.split, args.data_dir, args.step, args.max_clips
        )
        for task, (metrics, paths) in results.items():
            _print(registry.Result(metrics, paths, reports.markdown(task, args.data, args.split, metrics)))
    else:
        from slit.data import sources
        from slit.data import tasks as tasks_lib

        data_dir = args.data_dir
        if data_dir is None:
            data_dir = run_config.get("data", {}).get("data_dir", "")
        source = sources.open_split(args.data, data_dir, args.split)
        contents = tasks_lib.split_contents(source, f"the {args.split} split of {args.data}")
        evaluations = registry.needs(trainer)
        names, skipped = tasks_lib.eval_plan(contents, tuple(evaluations), evaluations)
        results = {}
        for task in names:
            results[task] = registry.find(trainer, task).evaluate(request)
            _print(results[task])
    for task, why in skipped.items():
        print(f"skipped {task}: {why}")
    if not results:
        raise UserError(f"{args.data} ({args.split}): nothing to evaluate ({'; '.join(skipped.values())})")
    return 0
