"""Stage-two evaluations after (and during) training: captioning, question answering and zero-shot
classification by the LLM's loss, each where the split holds its field (the others named as skipped);
the splits a run evaluates (`evaluation_sets`), the headline line, the scalars logged and the reports
written (`<workdir>/eval/{captioning,aqa,classification}-<data>-<split>.{json,md,png}`).
Nothing here imports a trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from tqdm import tqdm

from slit.data import pipeline, sources
from slit.data import tasks as tasks_lib
from slit.data.pipeline import example_texts
from slit.errors import UserError
from slit.eval.progress import clip_bar
from slit.generate.answerer import Answerer, generation_config


def _text(value: Any) -> str:  # noqa: ANN401
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def eval_tasks(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The evaluations the run asks for (`eval.tasks`; older configs: all of them)."""
    return tuple(config.eval.get("tasks", None) or tasks_lib.EVAL_TASKS.values())


def evaluate_split(
    config: ml_collections.ConfigDict,
    answerer: Answerer,
    params: dict,
    spec: pipeline.AudioSpec,
    split: str = "test",
    max_clips: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    dataset: tasks_lib.DatasetSpec | None = None,
) -> dict | None:
    """The evaluations the first `max_clips` clips of a split (0: all) can answer, of `dataset` (default:
    the config's single dataset).

    Captioning (when clips have captions): each such clip is captioned with the first captioning
    template; beside it, the audio-blind baseline (one training caption for every clip:
    slit.eval.captioning.constant_caption_baseline). AQA (when clips have questions): each such clip is
    asked one question (its questions in turn by clip index, so every type is asked), with the first QA
    template. Classification (when clips have labels, and eval.tasks asks for it): zero-shot by the LLM's
    loss of each label of the split (slit.eval.generative). Returns {"captioning": CaptionScorer metrics
    + "examples" + "constant_baseline", "aqa": aqa_accuracy + "majority_baseline" + "examples",
    "classification": ..., "skipped": {evaluation: why}} with only the evaluations that ran, or None if
    stopped for preemption.
    """
    from slit import runs
    from slit.eval import aqa, captioning, generative

    dataset = dataset or tasks_lib.datasets(config.data)[0]
    source = sources.open_split(dataset.name, dataset.data_dir, split)
    limit = min(max_clips or len(source), len(source))
    contents = tasks_lib.cached_contents(dataset.name, dataset.data_dir, split, source)
    if limit < len(source):
        contents = dataclasses.replace(
            contents,
            name=f"{contents.name} (first {limit} clips)",
            num_clips=limit,
            indices={k: tuple(i for i in v if i < limit) for k, v in contents.indices.items()},
        )
    run, skipped = tasks_lib.eval_plan(contents, eval_tasks(config))

    @functools.cache
    def open_train() -> Sequence[dict]:  # for the baselines; opened once, when one is needed
        return sources.open_split(dataset.name, dataset.data_dir, dataset.train_split)

    reports: dict[str, Any] = {"skipped": skipped}
    templates = tasks_lib.templates(config.tasks.get("templates"))
    caption_instruction, question_template = templates["caption"][0], templates["qa"][0]
    gen = generation_config(config)
    captions, references, qa_predictions, qa_references, qa_types, questions = {}, {}, {}, {}, {}, {}
    if "captioning" in run or "aqa" in run:
        bar = clip_bar(limit, "answering (captions, questions)")
        for batch in pipeline.eval_audio_batches(_FirstClips(source, limit), spec, config.eval.batch_size):
            if should_stop():
                bar.close()
                return None
            bar.update(int(batch["valid"].sum()))
            examples = [source[int(i)] for i in batch["index"]]
            asks_caption, instructions = [], []
            for i, valid, ex in zip(batch["index"], batch["valid"], examples, strict=True):
                qs, types, answers = (
                    example_texts(ex, "questions"),
                    example_texts(ex, "question_types"),
                    example_texts(ex, "answers"),
                )
                has_qa = "aqa" in run and tasks_lib.clip_holds(ex, "qa")
                asks_caption.append("captioning" in run and tasks_lib.clip_holds(ex, "caption"))
                k = int(i) % len(qs) if has_qa else 0  # one question per clip, the types in turn
                instructions.append(question_template.format(question=qs[k]) if has_qa else "")
                if valid and has_qa:
                    key = _text(ex["id"])
                    questions[key], qa_references[key] = qs[k], answers[k]
                    if k < len(types):
                        qa_types[key] = types[k]
                if valid and asks_caption[-1]:
                    references[_text(ex["id"])] = example_texts(ex, "captions")
            audio, num_samples = batch["audio"], batch["num_samples"]
            if any(asks_caption):
                predicted = answerer.answer(
                    params, audio, num_samples, [caption_instruction] * len(examples), gen
                )
                for n, (valid, ex) in enumerate(zip(batch["valid"], examples, strict=True)):
                    if valid and asks_caption[n]:
                        captions[_text(ex["id"])] = predicted[n]
            if any(instructions):
                filled = [x or caption_instruction for x in instructions]  # rows without a question
                answers = answerer.answer(params, audio, num_samples, filled, gen)
                for n, (valid, ex) in enumerate(zip(batch["valid"], examples, strict=True)):
                    if valid and instructions[n]:
                        qa_predictions[_text(ex["id"])] = answers[n]
        bar.close()
    if "captioning" in run:
        with captioning.CaptionScorer(metrics=tuple(config.eval.caption_metrics), tokenizer="auto") as scorer:
            caption_metrics = scorer.score(captions, references)
        caption_metrics["examples"] = {
            k: {"predicted": captions[k], "references": references[k]} for k in list(captions)[:10]
        }
        train = open_train()
        train_captions = _Texts(train, "captions")
        baseline = captioning.constant_caption_baseline(train_captions, references, scorer.tokenizer)
        if baseline:
            caption_metrics["constant_baseline"] = baseline
        reports["captioning"] = caption_metrics
    if "aqa" in run:
        types = qa_types if len(qa_types) == len(qa_references) else None
        reports["aqa"] = aqa.qa_report(qa_predictions, qa_references, questions, types, open_train())
    if "classification" in run:
        if should_stop():
            return None
        labelled = tasks_lib.Subset(source, contents.indices["classify"])
        reports["classification"] = generative.classify_by_llm_loss(
            runs.TrainedRun(config, params, answerer, 0, spec), labelled, templates["classify"][0]
        )
    return reports


class _Texts(Sequence):
    """One text field (a list of str) of each example of a source, read when indexed."""

    def __init__(self, source: Sequence[dict], field: str):
        self.source, self.field = source, field

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> list[str]:  # type: ignore[override]
        return example_texts(self.source[i], self.field)


class _FirstClips(Sequence):
    """The first `n` examples of a split, as a sequence."""

    def __init__(self, source: Sequence[dict], n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def evaluation_sets(
    config: ml_collections.ConfigDict,
    training_data: Sequence[tuple[tasks_lib.DatasetSpec, Sequence[dict], tasks_lib.SplitContents]],
) -> tuple[list[tuple[tasks_lib.DatasetSpec, str]], list[tuple[tasks_lib.DatasetSpec, str]], list[str]]:
    """(the (dataset, test split) pairs evaluated after the last step, the (dataset, validation split)
    pairs evaluated every eval_every_steps, notes). A dataset without its validation split is not
    validated (a note says so; eval_every_steps with no validation split at all turns periodic
    evaluation off): the test split is not used for choosing, and the training split would flatter."""
    tests, notes = [], []
    for spec, _, _ in training_data:
        try:
            sources.open_split(spec.name, spec.data_dir, spec.test_split)
        except (FileNotFoundError, UserError):
            notes.append(
                f"{spec.name} is not evaluated after the last step: it has no {spec.test_split!r} split; "
                "name one with "
                + ("data.test_split" if len(training_data) == 1 else "the mixture entry's test_split")
            )
            continue
        tests.append((spec, spec.test_split))
    validations = []
    if config.eval_every_steps:
        for spec, _ in tests:
            try:
                sources.open_split(spec.name, spec.data_dir, spec.validation_split)
            except (FileNotFoundError, UserError):
                notes.append(
                    f"{spec.name} has no {spec.validation_split!r} split, so it is not evaluated during "
                    f"training (eval_every_steps={config.eval_every_steps}); name one with "
                    + ("data.validation_split" if len(tests) == 1 else "the mixture entry's validation_split")
                )
                continue
            validations.append((spec, spec.validation_split))
        if not validations:
            notes.append(
                f"periodic evaluation (eval_every_steps={config.eval_every_steps}) is off: no validation "
                "split; the test split is still evaluated after the last step"
            )
    return tests, validations, notes


def headline(reports: dict, prefix: str = "") -> str:
    """One line of the headline numbers of `evaluate_split`'s reports, naming the skipped evaluations."""
    parts = []
    if "captioning" in reports:
        caption = reports["captioning"]
        text = f"{prefix}captioning CIDEr-D {caption['CIDEr-D']:.3f}"
        if caption.get("constant_baseline"):
            text += f" (one training caption for all: {caption['constant_baseline']['CIDEr-D']:.3f})"
        parts.append(text)
    if "aqa" in reports:
        qa = reports["aqa"]
        text = f"{prefix}QA accuracy {100 * qa['accuracy']:.1f}%"
        baseline = qa.get("majority_baseline")
        if baseline:
            text += (
                f" (majority answer per question type: {100 * baseline['per_question_type_accuracy']:.1f}%, "
                f"one answer for all: {100 * baseline['single_answer_accuracy']:.1f}%)"
            )
        parts.append(text)
    if "classification" in reports:
        c = reports["classification"]
        value = c.get("accuracy", c.get("mAP"))
        name = "accuracy" if "accuracy" in c else "mAP"
        parts.append(f"{prefix}classification {name} {100 * value:.1f}%" if value is not None else "")
    skipped = [f"{task} ({why})" for task, why in reports.get("skipped", {}).items()]
    if skipped:
        parts.append("skipped: " + "; ".join(skipped))
    return "; ".join(p for p in parts if p)


def scalars(prefix: str, reports: dict) -> dict[str, float]:
    """The evaluations' headline numbers as scalars; absent evaluations give none."""
    out = {}
    caption, qa = reports.get("captioning"), reports.get("aqa")
    if caption is not None:
        out |= {
            f"{prefix}/{k}": float(v) for k, v in caption.items() if k in _CAPTION_SCALARS and v is not None
        }
        if caption.get("constant_baseline"):
            out[f"{prefix}/CIDEr-D_constant_baseline"] = float(caption["constant_baseline"]["CIDEr-D"])
    if qa is not None:
        out[f"{prefix}/qa_accuracy"] = float(qa["accuracy"])
        if qa.get("majority_baseline"):
            out[f"{prefix}/qa_majority_baseline"] = float(
                qa["majority_baseline"]["per_question_type_accuracy"]
            )
    classification = reports.get("classification")
    if classification is not None:
        for key in ("accuracy", "mAP"):
            if classification.get(key) is not None:
                out[f"{prefix}/classification_{key}"] = float(classification[key])
    return out


_CAPTION_SCALARS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "SPIDEr")


def write_reports(
    workdir: pathlib.Path,
    config: ml_collections.ConfigDict,
    reports: dict,
    step: int,
    data: str | None = None,
    split: str = "test",
) -> dict:
    """Writes `<workdir>/eval/<task>-<data>-<split>.{json,md,png}` for each evaluation that ran and
    prints the headline numbers, naming the skipped evaluations and why."""
    from slit.eval import reports as reports_lib

    data = data or config.data.name
    paths = {
        task: reports_lib.write_report(workdir, task, data, split, reports[task], config, step)
        for task in tasks_lib.EVAL_TASKS.values()
        if task in reports
    }
    clips = max((reports[t].get("num_items", 0) for t in paths), default=0)
    tqdm.write(
        f"\n{data} {split} split ({clips} clips): {headline(reports)}. Reports in {workdir / 'eval'}",
        file=sys.stdout,
    )
    for key, example in list(reports.get("captioning", {}).get("examples", {}).items())[:3]:
        tqdm.write(
            f"  {key}: {example['predicted']!r} (reference: {example['references'][0]!r})", file=sys.stdout
        )
    return paths
