"""`slit eval --workdir DIR [--task T] --data NAME [--split test]`: evaluates a run's checkpoint.

Stage-one runs: `retrieval` (R@1/5/10 and mAP@10 both ways, by contrastive similarity and after BLIP-2's
re-ranking of the top k by the matching head) and `classification` (zero-shot by contrastive similarity
against one prompt per label). Stage-two runs: `captioning` and `aqa` by generation (resumable after
preemption), and `classification` zero-shot by the LLM's summed token loss of each class name; `all`
(the default for them) runs each of those the split can answer (captions, questions, labels) and names
the ones it skips, with why.
Each writes <workdir>/eval/<task>-<data>-<split>.{json,md,png}.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "evaluate a run's checkpoint on a dataset split; writes <workdir>/eval/<task>-<data>-<split>.*"
STAGE1_TASKS = ("retrieval", "classification")
STAGE2_TASKS = ("captioning", "aqa", "classification")  # classification: by the LLM's token loss
TASKS = ("retrieval", "captioning", "classification", "aqa", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="the run's directory")
    parser.add_argument(
        "--task",
        default=None,
        choices=TASKS,
        help="stage two: default all (every evaluation the split can answer); stage one: required",
    )
    parser.add_argument("--data", required=True, help="a built TFDS dataset name, e.g. slit_synthetic_sounds")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory (default: the run's)")
    parser.add_argument("--split", default="test", help="the split to evaluate")
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")
    parser.add_argument(
        "--rerank-k",
        type=int,
        default=128,
        help="retrieval: re-rank each query's top k by the matching head (default 128 as BLIP-2; 0: off)",
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
        help='classification: the prompt template (default "this is a sound of {label}")',
    )


def _trainer(workdir: str) -> str:
    from slit.train import checkpoint

    return checkpoint.run_config(workdir).get("trainer", "stage1")


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from slit.errors import UserError

    trainer = _trainer(args.workdir)
    if trainer == "stage2" and args.task in (None, "all"):
        from slit.eval import generative, reports

        results, skipped = generative.evaluate_stage2_tasks(
            args.workdir, args.data, args.split, args.data_dir, args.step, args.max_clips
        )
        for task, (metrics, paths) in results.items():
            print(reports.markdown(task, args.data, args.split, metrics))
            for kind, path in paths.items():
                print(f"{kind}: {path}")
        for task, why in skipped.items():
            print(f"skipped {task}: {why}")
        if not results:
            raise UserError(
                f"{args.data} ({args.split}): nothing to evaluate ({'; '.join(skipped.values())})"
            )
        return 0
    if args.task is None:
        raise UserError(f"--task is required for a {trainer} run: {' or '.join(STAGE1_TASKS)}")
    if trainer == "stage2":
        if args.task not in STAGE2_TASKS:
            raise UserError(f"--task {args.task} evaluates stage-one runs; {args.workdir} is a stage-two run")
        from slit.eval import generative, reports

        metrics, paths = generative.evaluate_stage2_run(
            args.workdir,
            args.task,
            args.data,
            args.split,
            args.data_dir,
            args.step,
            args.instruction,
            args.max_clips,
        )
        print(reports.markdown(args.task, args.data, args.split, metrics))
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0
    if args.task not in STAGE1_TASKS:
        raise UserError(
            f"--task {args.task} evaluates stage-two runs; {args.workdir} is a {trainer} run (use "
            f"{' or '.join(STAGE1_TASKS)})"
        )
    from slit.eval import classification, reports, retrieval, stage1

    if args.task == "retrieval":
        report, paths = stage1.evaluate_run(
            args.workdir, args.data, args.split, args.data_dir, args.rerank_k, args.step
        )
        print("by contrastive similarity:")
        print(retrieval.format_table(report["contrastive"]))
        if "reranked" in report:
            print(f"after re-ranking each query's top {report['rerank_k']} by the matching head:")
            print(retrieval.format_table(report["reranked"]))
            print(retrieval.describe_matching(report["matching"]))
    else:
        prompt = args.prompt or classification.DEFAULT_PROMPT
        report, paths = stage1.evaluate_classification_run(
            args.workdir, args.data, args.split, args.data_dir, prompt, args.step
        )
        print(reports.markdown("classification", args.data, args.split, report))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
