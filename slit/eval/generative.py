"""`slit eval` for stage-two runs: captioning and audio question answering by generation, on any
built dataset and split, resumable after preemption.

Batches are the split's clips in order (`pipeline.eval_audio_batches`, the run's `eval.batch_size`);
each batch's generations are saved (slit.eval.progress) as soon as they exist, so that a re-run after
preemption generates only what is missing. The instruction is the first of the task's templates the
run was trained with (its `tasks.templates`, slit.data.tasks.DEFAULT_TEMPLATES for older runs) unless
one is given. `evaluate_stage2_tasks` runs every evaluation the split can answer (captioning when clips
have captions, aqa when they have questions, classification when they have labels) and names the
others as skipped, with why.

- captioning: one caption per clip that has captions (clips without are left out and counted),
  scored against the clip's captions with the run's `eval.caption_metrics` (pycocoevalcap-equal; see
  slit.eval.captioning).
- aqa: every question of every clip (question k of the clips that have one, batch by batch), accuracy
  with answer normalisation, by question type when the data has types, else yes/no and open.
- classification: zero-shot by the LLM (InstructBLIP / Pengi closed-set ranking): given the audio and
  the classification instruction, each class name is scored by the LLM's summed token loss of that
  name as the answer (its tokens and EOS); the lowest loss wins. Classes are the split's labels, sorted.
  Accuracy (and per-class accuracy, a confusion matrix) for single-label data, mAP for multi-label.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slit.data import pipeline, sources
from slit.data import tasks as tasks_lib
from slit.data.pipeline import example_texts
from slit.errors import UserError
from slit.eval import registry
from slit.eval.progress import BatchProgress, progress_key

GENERATIVE_TASKS = tuple(registry.evaluators("stage2"))  # captioning, aqa, classification


def _text(value: Any) -> str:  # noqa: ANN401
    return value.decode() if isinstance(value, bytes) else str(value)


def generate_over_split(
    source: Sequence[dict],
    spec: pipeline.AudioSpec,
    batch_size: int,
    instructions_for: Callable[[list[dict]], list[list[str]]],
    answer: Callable[[np.ndarray, np.ndarray, list[str]], list[str]],
    progress: BatchProgress,
    should_stop: Callable[[], bool],
) -> list[list[str]] | None:
    """Generations for every clip: `instructions_for(examples)` gives, per round, one instruction per
    row of the batch ("" for a row with nothing to ask in that round); returns, per clip, its answers
    in round order (rounds with "" skipped). None if `should_stop()` turned true (results so far stay
    saved in `progress`)."""
    out: list[list[str]] = []
    for number, batch in enumerate(pipeline.eval_audio_batches(source, spec, batch_size)):
        examples = [source[int(i)] for i in batch["index"]]
        saved = progress.load(number)
        if saved is None:
            if should_stop():
                return None
            rounds = instructions_for(examples)
            answers: list[list[str]] = [[] for _ in examples]
            for instructions in rounds:
                if not any(instructions):
                    continue
                generated = answer(batch["audio"], batch["num_samples"], [x or "." for x in instructions])
                for row, (asked, text) in enumerate(zip(instructions, generated, strict=True)):
                    if asked:
                        answers[row].append(text)
            saved = {"answers": answers}
            progress.save(number, saved)
        out += [a for a, valid in zip(saved["answers"], batch["valid"], strict=True) if valid]
    return out


def evaluate_stage2_run(
    workdir: str | pathlib.Path,
    task: str,
    data_name: str,
    split: str = "test",
    data_dir: str | None = None,
    step: int | None = None,
    instruction: str | None = None,
    max_clips: int = 0,
) -> tuple[dict, dict]:
    """Evaluates a stage-two run's checkpoint on a split by generation; writes the report.

    Returns (metrics, paths of the written files). Raises UserError when the split holds nothing for the
    task (no captions, questions or labels), Preempted (exit 75) when stopped; the same command then
    resumes."""
    if task not in GENERATIVE_TASKS:
        raise UserError(f"--task {task}: stage-two runs are evaluated on {', '.join(GENERATIVE_TASKS)}")
    run, source, contents, data_dir = _open(workdir, step, data_name, data_dir, split, max_clips)
    _, skipped = tasks_lib.eval_plan(contents, (task,))
    if task in skipped:
        raise UserError(f"--task {task}: {skipped[task]}; `--task all` runs what the split can answer")
    return _evaluate(run, workdir, task, source, contents, data_name, split, data_dir, instruction)


def evaluate_stage2_tasks(
    workdir: str | pathlib.Path,
    data_name: str,
    split: str = "test",
    data_dir: str | None = None,
    step: int | None = None,
    max_clips: int = 0,
) -> tuple[dict[str, tuple[dict, dict]], dict[str, str]]:
    """Every evaluation of GENERATIVE_TASKS the split can answer, on one loaded checkpoint: returns
    ({task: (metrics, paths)}, {skipped task: why}) (e.g. {"aqa": "the test split of X has no questions
    with answers"})."""
    run, source, contents, data_dir = _open(workdir, step, data_name, data_dir, split, max_clips)
    tasks, skipped = tasks_lib.eval_plan(contents, GENERATIVE_TASKS)
    results = {
        task: _evaluate(run, workdir, task, source, contents, data_name, split, data_dir, None)
        for task in tasks
    }
    return results, skipped


def _open(
    workdir: str | pathlib.Path,
    step: int | None,
    data_name: str,
    data_dir: str | None,
    split: str,
    max_clips: int,
) -> tuple[Any, Sequence[dict], tasks_lib.SplitContents, str]:  # noqa: ANN401
    """(the loaded run, the split's first max_clips clips (0: all), what they hold, the data_dir)."""
    from slit import runs

    run = runs.load_trained(workdir, step)
    data_dir = run.config.data.data_dir if data_dir is None else data_dir
    source = sources.open_split(data_name, data_dir, split)
    if max_clips:
        source = [source[i] for i in range(min(max_clips, len(source)))]
    contents = tasks_lib.split_contents(source, f"the {split} split of {data_name}")
    return run, source, contents, data_dir


def _evaluate(
    run: Any,  # noqa: ANN401 (slit.runs.TrainedRun)
    workdir: str | pathlib.Path,
    task: str,
    source: Sequence[dict],
    contents: tasks_lib.SplitContents,
    data_name: str,
    split: str,
    data_dir: str,
    instruction: str | None,
) -> tuple[dict, dict]:
    from slit.eval import aqa, captioning, reports
    from slit.generate.answerer import generation_config
    from slit.train.preemption import Preempted, PreemptionWatcher

    config = run.config
    templates = tasks_lib.templates(config.get("tasks", {}).get("templates"))
    if task == "classification":
        labelled = tasks_lib.view(source, contents, "classify")
        metrics = classify_by_llm_loss(run, labelled, instruction or templates["classify"][0])
        metrics["clips_without_labels"] = len(source) - len(labelled)
        paths = {}
        if jax.process_index() == 0:
            paths = reports.write_report(workdir, task, data_name, split, metrics, config, step=run.step)
        return metrics, paths
    gen = generation_config(config)
    template = instruction or templates["caption" if task == "captioning" else "qa"][0]
    if task == "aqa" and "{question}" not in template:
        raise UserError(f"--instruction {template!r}: a question-answering instruction needs {{question}}")
    key = progress_key(
        task=task,
        data=data_name,
        split=split,
        step=run.step,
        template=template,
        clips=len(source),
        gen=repr(gen),
    )
    progress = BatchProgress(workdir, key, write=jax.process_index() == 0)
    left_out = 0
    if task == "captioning":
        captioned = tasks_lib.view(source, contents, "caption")
        left_out, source = len(source) - len(captioned), captioned

        def instructions_for(examples: list[dict]) -> list[list[str]]:
            return [[template] * len(examples)]
    else:

        def instructions_for(examples: list[dict]) -> list[list[str]]:
            per_clip = [example_texts(ex, "questions") for ex in examples]
            rounds = max(len(q) for q in per_clip)
            return [
                [template.format(question=q[k]) if k < len(q) else "" for q in per_clip]
                for k in range(rounds)
            ]

    answer = functools.partial(run.answer, gen=gen)
    with PreemptionWatcher() as watcher:
        generated = generate_over_split(
            source,
            run.spec,
            config.eval.batch_size,
            instructions_for,
            lambda audio, n, instructions: answer(audio, n, instructions),
            progress,
            functools.partial(watcher.should_stop, run.step),
        )
    if generated is None:
        raise Preempted(run.step, "", progress.describe())

    ids = [_text(source[i].get("id", i)) for i in range(len(source))]
    if task == "captioning":
        predictions = {k: g[0] for k, g in zip(ids, generated, strict=True)}
        references = {k: example_texts(source[i], "captions") for i, k in enumerate(ids)}
        with captioning.CaptionScorer(metrics=tuple(config.eval.caption_metrics), tokenizer="auto") as scorer:
            metrics = scorer.score(predictions, references)
        metrics["examples"] = {
            k: {"predicted": predictions[k], "references": references[k]} for k in ids[:10]
        }
        metrics["predictions"] = predictions
        metrics["clips_without_captions"] = left_out
    else:
        predictions, references, types, questions = {}, {}, {}, {}
        for i, (k, answers) in enumerate(zip(ids, generated, strict=True)):
            example = source[i]
            qtypes = example_texts(example, "question_types")
            for n, (question, reference) in enumerate(
                zip(example_texts(example, "questions"), example_texts(example, "answers"), strict=True)
            ):
                item = f"{k}#{n}"
                predictions[item], references[item], questions[item] = answers[n], reference, question
                if qtypes:
                    types[item] = qtypes[n]
        types = types if len(types) == len(references) else {}
        metrics = aqa.qa_report(
            predictions, references, questions, types, _train_split(data_name, data_dir, split)
        )
        metrics["predictions"] = predictions
    metrics.update(instruction=template, resumed_batches=progress.resumed)
    paths = {}
    if jax.process_index() == 0:
        paths = reports.write_report(workdir, task, data_name, split, metrics, config, step=run.step)
        progress.clear()
    return metrics, paths


def _train_split(data_name: str, data_dir: str, split: str) -> Sequence[dict] | None:
    """The dataset's train split, for the majority baseline; None when the split being evaluated is the
    train split itself, or there is no train split."""
    if split == "train":
        return None
    try:
        return sources.open_split(data_name, data_dir, "train")
    except (UserError, ValueError, OSError):
        return None


def class_names_and_labels(source: Sequence[dict]) -> tuple[list[str], list[list[str]], list[int]]:
    """(the split's labels sorted, the labels of each labelled clip, the indices of those clips). Clips
    without labels are left out (the caller reports how many); UserError if no clip has one."""
    every = [
        example_texts(source[i], "labels") or example_texts(source[i], "label") for i in range(len(source))
    ]
    indices = [i for i, item in enumerate(every) if item]
    if not indices:
        raise UserError(
            f"none of the {len(every)} clips has a label: classification needs `labels` in the data "
            "(README: Data)"
        )
    labels = [every[i] for i in indices]
    return sorted({name for item in labels for name in item}), labels, indices


def llm_class_losses(
    run: Any, source: Sequence[dict], instruction: str, classes: Sequence[str]
) -> np.ndarray:  # noqa: ANN401
    """(N, C) summed answer-token losses (-log p of the class name's tokens and EOS) of each class name
    as the answer to `instruction` about each clip, in jitted batches of the run's eval.batch_size: the
    audio, Q-Former and prompt once per batch, then the LLM once per class (on the device)."""
    from flax import nnx

    from slit.eval.progress import clip_bar
    from slit.models.stage2 import Stage2Batch

    answerer, d = run.answerer, run.config.data
    graphdef, frozen = answerer.graphdef, answerer.frozen

    @jax.jit
    def class_losses(params: dict, frozen: dict, batch: Stage2Batch, answers: jax.Array) -> jax.Array:
        # The frozen weights are an argument, not constants folded into the program (a 135M LLM
        # closed over took minutes of constant folding to compile). answers: (C, B, La) -> (B, C).
        model = nnx.merge(graphdef, params, frozen)
        soft = model.soft_prompt(batch.audio, batch.num_samples, batch.qformer_ids, None)
        prompt_embeds, prompt_mask, _ = model.prompt(soft, batch.instruction_ids)

        def one(answer_ids: jax.Array) -> jax.Array:
            logits = model.logits_after_prompt(prompt_embeds, prompt_mask, answer_ids).astype(jnp.float32)
            log_p = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(log_p, jnp.maximum(answer_ids, 0)[..., None], axis=-1)[..., 0]
            return -(picked * (answer_ids >= 0)).sum(axis=-1)

        return jax.lax.map(one, answers).T

    out = []
    bar = clip_bar(len(source), f"classifying ({len(classes)} classes)")
    names = [name.replace("_", " ") for name in classes]
    for batch in pipeline.eval_audio_batches(source, run.spec, run.config.eval.batch_size):
        rows = len(batch["index"])
        inputs = Stage2Batch(
            qformer_ids=answerer.encoders.qformer.encode([instruction] * rows),
            instruction_ids=answerer.encoders.instruction.encode(
                [instruction] * rows, d.max_instruction_length
            ),
            answer_ids=None,
            audio=batch["audio"],
            num_samples=batch["num_samples"],
        )
        answers = np.stack([answerer.encoders.answer.encode([n] * rows, d.max_answer_length) for n in names])
        # Right padding past the longest class name changes no loss (causal attention): cut it.
        answers = answers[..., : max(1, int((answers >= 0).sum(axis=-1).max()))]
        losses = np.asarray(class_losses(run.params, frozen, inputs, answers), dtype=np.float64)
        out.append(losses[batch["valid"]])
        bar.update(int(batch["valid"].sum()))
    bar.close()
    return np.concatenate(out)


def classify_by_llm_loss(run: Any, source: Sequence[dict], template: str) -> dict:  # noqa: ANN401
    """Zero-shot classification by the LLM's loss; see the module docstring."""
    from slit.data.tasks import Subset
    from slit.eval import classification

    classes, labels, indices = class_names_and_labels(source)
    instruction = template.format(choices=", ".join(c.replace("_", " ") for c in classes))
    labelled = source if len(indices) == len(source) else Subset(source, indices)
    losses = llm_class_losses(run, labelled, instruction, classes)
    metrics = classification.zero_shot_report(-losses, labels, classes)
    metrics.update(method="zero-shot by LLM summed token loss", instruction=instruction, classes=classes)
    metrics["clips_without_labels"] = len(source) - len(indices)
    return metrics
