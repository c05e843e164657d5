"""The evaluators, one table: what `slit eval --task NAME` runs on a run of each stage.

Each `Evaluator` names its task (the `--task` and `eval.tasks` name), the trainer whose runs it
evaluates, what a clip must hold for it (a task kind of slit.data.tasks: "caption", "qa" or "classify",
i.e. captions, questions with answers, labels), and the function that evaluates a run's checkpoint on a
split and writes its report. Adding an evaluation is one function plus one entry in `EVALUATORS`; the
command line, its help (`describe`) and the checks of a task name read the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from slit.errors import UserError

TRAINERS = ("stage1", "stage2")


@dataclasses.dataclass(frozen=True)
class Request:
    """One `slit eval` call: the run, the split, and the options some evaluators read."""

    workdir: str
    data: str
    split: str = "test"
    data_dir: str | None = None
    step: int | None = None
    rerank_k: int | None = None  # retrieval: re-rank each query's top k by the matching head (0: off;
    # None: the run's retrieval_rerank_k)
    instruction: str | None = None  # captioning / aqa: the instruction (default: the run's first)
    max_clips: int = 0  # captioning / aqa: only the first N clips (0: all)
    prompt: str | None = None  # stage-one classification: the prompt template (default: its own)


@dataclasses.dataclass(frozen=True)
class Result:
    """What an evaluator returns: the report (metrics), the files it wrote, the text to print."""

    report: dict
    paths: dict[str, str]
    text: str


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """task: its name; trainer: whose runs it evaluates; needs: the task kind a clip must hold for it
    (slit.data.tasks.TASK_KINDS); what: one line; evaluate: Request -> Result."""

    task: str
    trainer: str
    needs: str
    what: str
    evaluate: Callable[[Request], Result]


def _retrieval(request: Request) -> Result:
    from slit.eval import retrieval, stage1

    report, paths = stage1.evaluate_run(
        request.workdir, request.data, request.split, request.data_dir, request.rerank_k, request.step
    )
    lines = ["by contrastive similarity:", retrieval.format_table(report["contrastive"])]
    if "reranked" in report:
        lines += [
            f"after re-ranking each query's top {report['rerank_k']} by the matching head:",
            retrieval.format_table(report["reranked"]),
            retrieval.describe_matching(report["matching"]),
        ]
    return Result(report, paths, "\n".join(lines))


def _contrastive_classification(request: Request) -> Result:
    from slit.eval import classification, reports, stage1

    report, paths = stage1.evaluate_classification_run(
        request.workdir,
        request.data,
        request.split,
        request.data_dir,
        request.prompt or classification.DEFAULT_PROMPT,
        request.step,
    )
    return Result(report, paths, reports.markdown("classification", request.data, request.split, report))


def _generative(task: str) -> Callable[[Request], Result]:
    def evaluate(request: Request) -> Result:
        from slit.eval import generative, reports

        metrics, paths = generative.evaluate_stage2_run(
            request.workdir,
            task,
            request.data,
            request.split,
            request.data_dir,
            request.step,
            request.instruction,
            request.max_clips,
        )
        return Result(metrics, paths, reports.markdown(task, request.data, request.split, metrics))

    return evaluate


EVALUATORS: tuple[Evaluator, ...] = (
    Evaluator(
        "retrieval",
        "stage1",
        "caption",
        "text<->audio R@1/5/10 and mAP@10, by contrastive similarity and after re-ranking by matching",
        _retrieval,
    ),
    Evaluator(
        "classification",
        "stage1",
        "classify",
        "zero-shot: each clip's label by contrastive similarity to a prompt per label",
        _contrastive_classification,
    ),
    Evaluator(
        "captioning",
        "stage2",
        "caption",
        "generated captions, BLEU/METEOR/ROUGE-L/CIDEr-D (SPICE where Java runs) vs the references",
        _generative("captioning"),
    ),
    Evaluator(
        "aqa",
        "stage2",
        "qa",
        "generated answers to every question, accuracy (and WER) by question type vs the majority",
        _generative("aqa"),
    ),
    Evaluator(
        "classification",
        "stage2",
        "classify",
        "zero-shot: each clip's label by the LLM's loss of each class name as the answer",
        _generative("classification"),
    ),
)


def evaluators(trainer: str) -> dict[str, Evaluator]:
    """{task: evaluator} for runs of `trainer`, in the table's order."""
    return {e.task: e for e in EVALUATORS if e.trainer == trainer}


def needs(trainer: str) -> dict[str, str]:
    """{task: the task kind its clips must hold} for runs of `trainer` (slit.data.tasks.eval_plan)."""
    return {e.task: e.needs for e in EVALUATORS if e.trainer == trainer}


def task_names() -> tuple[str, ...]:
    """Every task name any trainer's runs take (for the command line's choices)."""
    return tuple(dict.fromkeys(e.task for e in EVALUATORS))


def find(trainer: str, task: str, workdir: str = "") -> Evaluator:
    """The evaluator of `task` for a run of `trainer`; a UserError naming the tasks there are when none."""
    own = evaluators(trainer)
    if task in own:
        return own[task]
    where = f"{workdir} is a {trainer} run" if workdir else f"{trainer} runs"
    others = [e.trainer for e in EVALUATORS if e.task == task]
    why = f"--task {task} evaluates {' and '.join(others)} runs" if others else f"--task {task} is unknown"
    raise UserError(f"{why}; {where}: use {' or '.join(own)}")


def describe() -> str:
    """The table as lines for `slit eval --help`."""
    stage = {"stage1": "stage one", "stage2": "stage two"}
    return "\n".join(f"  {e.task:<15} {stage[e.trainer]:<10} {e.what}" for e in EVALUATORS)
