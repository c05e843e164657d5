"""Stage-two tasks from what a built dataset holds: captions, question/answer pairs, labels.

A split is scanned once (`split_contents`): which clips have captions, which have questions with
answers, which have labels, and the label set. From that, `build_mixture` makes the instruction-tuning
tasks (`pipeline.Task`) each dataset can supply, each reading only the clips that have its field (a
`Subset` of the source: `pipeline.Task.texts` raises on a clip without it), and says in `notes` which
weighted tasks it left out and why. Classification offers the training split's sorted label set as
`{choices}`.

The config names the tasks (`TASK_KINDS`) and gives their weights by name, e.g.
`tasks.weights = {"caption": 0.2, "qa": 0.8, "classify": 0.0}` (`task_weights` also reads the older
3-tuple in that order), and their instruction templates (`tasks.templates`; `DEFAULT_TEMPLATES` fills
in what a config leaves out). Several datasets mix with `data.mixture`, a list of
`{"name", "data_dir", "weight", "train_split", "test_split", "validation_split", "tasks"}` (`datasets`):
a dataset's weight is its share of the training examples, split among the tasks it holds in the
proportions of `tasks.weights` (or of its own `tasks` entry).

Evaluations (`eval_plan`) run the tasks a split can answer and name the ones they skip, with why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from slit.data import pipeline
from slit.data.pipeline import example_texts

TASK_KINDS = ("caption", "qa", "classify")
EVAL_TASKS = {"caption": "captioning", "qa": "aqa", "classify": "classification"}
"""Training task kind -> the evaluation that scores it (slit eval --task)."""
HOLDS = {"caption": "captions", "qa": "questions with answers", "classify": "labels"}
"""What a clip must have for a task, in words."""

DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caption": (
        "describe the sound.",
        "what do you hear? describe it in a sentence.",
        "write a short caption for the clip.",
        "summarize the audio in one sentence.",
    ),
    "qa": ("{question}", "question: {question} answer in one word.", "listen and answer: {question}"),
    "classify": (
        "which kinds of sound does the clip contain? choose from {choices}.",
        "classify the sounds in the clip: {choices}.",
        "name the kinds of sound you hear, from {choices}.",
    ),
}
"""Instruction templates per task kind: `{question}` is one of the clip's questions, `{choices}` the class
names joined with ", ". (Equal to the synthetic sounds' templates, so their mixture is unchanged.)"""
PLACEHOLDERS = {"caption": None, "qa": "{question}", "classify": "{choices}"}


# --------------------------------------------------------------------------------------------------
# What a split holds
# --------------------------------------------------------------------------------------------------


def clip_holds(example: Mapping[str, Any], kind: str) -> bool:
    """Whether one example can serve task `kind` (QA: at least one question, as many answers)."""
    if kind == "caption":
        return bool(example_texts(example, "captions") or example_texts(example, "caption"))
    if kind == "qa":
        questions = example_texts(example, "questions")
        return bool(questions) and len(questions) == len(example_texts(example, "answers"))
    if kind == "classify":
        return bool(example_texts(example, "labels"))
    raise ValueError(f"task kind {kind!r}: use one of {', '.join(TASK_KINDS)}")


@dataclasses.dataclass(frozen=True)
class SplitContents:
    """What one split holds: `indices[kind]` are the clips (in split order) that can serve task `kind`;
    `labels` is the sorted set of labels; `question_types` whether questions carry types."""

    name: str  # "<dataset> (<split>)", for messages
    num_clips: int
    indices: dict[str, tuple[int, ...]]
    labels: tuple[str, ...]
    question_types: bool = False

    def count(self, kind: str) -> int:
        return len(self.indices[kind])

    def holds(self, kind: str) -> bool:
        return bool(self.indices[kind])

    def summary(self) -> str:
        """e.g. "120 clips: 120 with captions, 40 with questions with answers, 0 with labels"."""
        parts = [f"{self.count(k)} with {HOLDS[k]}" for k in TASK_KINDS]
        labels = f" ({len(self.labels)} distinct)" if self.labels else ""
        return f"{self.num_clips} clips: {', '.join(parts)}{labels}"

    def missing(self, kind: str) -> str:
        """Why task `kind` cannot be made from this split, in words."""
        return f"{self.name} has no {HOLDS[kind]}"


def split_contents(source: Sequence[Mapping[str, Any]], name: str = "") -> SplitContents:
    """Scans every example of a split once (reads its fields; O(len(source)))."""
    indices: dict[str, list[int]] = {k: [] for k in TASK_KINDS}
    labels: set[str] = set()
    typed = False
    for i in range(len(source)):
        example = source[i]
        for kind in TASK_KINDS:
            if clip_holds(example, kind):
                indices[kind].append(i)
        labels.update(example_texts(example, "labels"))
        typed = typed or bool(example_texts(example, "question_types"))
    return SplitContents(
        name or "the split",
        len(source),
        {k: tuple(v) for k, v in indices.items()},
        tuple(sorted(labels)),
        typed,
    )


class Subset(Sequence):
    """The examples `indices` of a source, as a random-access source (len, getitem) for grain."""

    def __init__(self, source: Sequence[Mapping[str, Any]], indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Mapping[str, Any]:  # type: ignore[override]
        return self.source[self.indices[i]]


def view(source: Sequence[Mapping[str, Any]], contents: SplitContents, kind: str) -> Sequence:
    """The clips of `source` that can serve `kind` (the source itself when all of them can, so that a
    dataset whose clips all hold every field reads exactly as before)."""
    indices = contents.indices[kind]
    if len(indices) == len(source):
        return source
    return Subset(source, indices)


# --------------------------------------------------------------------------------------------------
# The config's task groups: weights by name, templates, datasets
# --------------------------------------------------------------------------------------------------


def task_weights(value: Any) -> dict[str, float]:  # noqa: ANN401 (a ConfigDict, mapping or sequence)
    """`tasks.weights` as {kind: weight} for every kind in TASK_KINDS (missing ones 0).

    Reads a mapping by name ({"caption": 0.2, "qa": 0.8}) or, as older run configs hold it, a sequence
    of one weight per kind in TASK_KINDS order. Raises ValueError (saying what is wrong) otherwise."""
    if hasattr(value, "items"):
        weights = {str(k): v for k, v in value.items()}
        unknown = sorted(set(weights) - set(TASK_KINDS))
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASK_KINDS)}")
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(TASK_KINDS):
            raise ValueError(f"give one weight per task {TASK_KINDS} (or a mapping by name)")
        weights = dict(zip(TASK_KINDS, value, strict=True))
    else:
        raise ValueError("give a mapping of task name to weight, e.g. {'caption': 0.2, 'qa': 0.8}")
    out = {}
    for kind in TASK_KINDS:
        w = weights.get(kind, 0.0)
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise ValueError(f"the weight of {kind} must be a non-negative number, got {w!r}")
        out[kind] = float(w)
    if sum(out.values()) <= 0:
        raise ValueError("every weight is 0; give at least one task a positive weight")
    return out


def templates(value: Any = None) -> dict[str, tuple[str, ...]]:  # noqa: ANN401 (a ConfigDict or mapping)
    """`tasks.templates` with DEFAULT_TEMPLATES for the kinds it leaves out. Raises ValueError for an
    unknown kind, an empty list, a QA template without {question}, a classification one without
    {choices}, or any other {placeholder}."""
    given = dict(value.items()) if value is not None and hasattr(value, "items") else {}
    unknown = sorted(set(given) - set(TASK_KINDS))
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASK_KINDS)}")
    out = {}
    for kind in TASK_KINDS:
        group = given.get(kind, DEFAULT_TEMPLATES[kind])
        group = (group,) if isinstance(group, str) else tuple(group)
        if not group or not all(isinstance(t, str) and t.strip() for t in group):
            raise ValueError(f"{kind}: give at least one non-empty template")
        for template in group:
            needed = PLACEHOLDERS[kind]
            if needed and needed not in template:
                raise ValueError(f"{kind} template {template!r} lacks {needed}")
            try:
                template.format(question="q", choices="c")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"{kind} template {template!r}: only {{question}} (qa) and {{choices}} (classify) are "
                    f"filled in ({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}"
                ) from None
        out[kind] = group
    return out


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the training mixture and the splits stage two reads from it."""

    name: str
    data_dir: str = ""
    weight: float = 1.0
    train_split: str = "train"
    test_split: str = "test"
    validation_split: str = "validation"
    task_weights: dict[str, float] | None = None  # None: the config's tasks.weights


MIXTURE_KEYS = ("name", "data_dir", "weight", "train_split", "test_split", "validation_split", "tasks")


def datasets(data: Any) -> list[DatasetSpec]:  # noqa: ANN401 (the config's data group)
    """The datasets stage two trains on: `data.mixture` when it lists any, else the one dataset
    `data.name` / `data.data_dir` (with `data.train_split` etc. when the config has them). Raises
    ValueError for a malformed mixture entry."""
    mixture = list(data.get("mixture", None) or [])
    if not mixture:
        return [
            DatasetSpec(
                data.name,
                data.get("data_dir", "") or "",
                1.0,
                data.get("train_split", "train"),
                data.get("test_split", "test"),
                data.get("validation_split", "validation"),
            )
        ]
    out = []
    for n, entry in enumerate(mixture):
        if not hasattr(entry, "items"):
            raise ValueError(
                f"data.mixture[{n}]: give a dict like {{'name': ..., 'weight': ...}}, got {entry!r}"
            )
        entry = dict(entry.items())
        unknown = sorted(set(entry) - set(MIXTURE_KEYS))
        if unknown:
            raise ValueError(
                f"data.mixture[{n}]: unknown key(s) {', '.join(unknown)}; use {', '.join(MIXTURE_KEYS)}"
            )
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"data.mixture[{n}]: `name` (a built dataset's name) is missing")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"data.mixture[{n}] ({entry['name']}): weight={weight!r} must be a number >= 0")
        try:
            own = task_weights(entry["tasks"]) if entry.get("tasks") is not None else None
        except ValueError as e:
            raise ValueError(f"data.mixture[{n}] ({entry['name']}) tasks: {e}") from None
        splits = {}
        for key, default in (
            ("train_split", "train"),
            ("test_split", "test"),
            ("validation_split", "validation"),
        ):
            value = entry.get(key, default)
            if not isinstance(value, str):
                raise ValueError(f"data.mixture[{n}] ({entry['name']}): {key}={value!r} must be a split name")
            splits[key] = value
        out.append(
            DatasetSpec(
                entry["name"], str(entry.get("data_dir") or ""), float(weight), task_weights=own, **splits
            )
        )
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ValueError(f"data.mixture names a dataset twice ({', '.join(names)}); list each dataset once")
    if sum(d.weight for d in out) <= 0:
        raise ValueError("data.mixture: every dataset's weight is 0")
    return out


# --------------------------------------------------------------------------------------------------
# The training mixture
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixturePart:
    """One task over one dataset: its examples (only clips that have the task's field) and weight."""

    dataset: str
    task: pipeline.Task
    source: Sequence[Mapping[str, Any]]
    weight: float


@dataclasses.dataclass(frozen=True)
class Mixture:
    parts: list[MixturePart]
    notes: list[str]  # weighted tasks left out, and why

    @property
    def tasks(self) -> list[pipeline.Task]:
        return [p.task for p in self.parts]

    @property
    def sources(self) -> list[Sequence[Mapping[str, Any]]]:
        return [p.source for p in self.parts]

    @property
    def weights(self) -> list[float]:
        return [p.weight for p in self.parts]

    def describe(self) -> str:
        """One line per task: "  caption on NAME: 64 clips, weight 0.200"."""
        return "\n".join(
            f"  {p.task.kind} on {p.dataset}: {len(p.source)} clips, weight {p.weight:.3f}"
            for p in self.parts
        )


def build_mixture(
    splits: Sequence[tuple[DatasetSpec, Sequence[Mapping[str, Any]], SplitContents]],
    weights: Mapping[str, float],
    instruction_templates: Mapping[str, Sequence[str]],
) -> Mixture:
    """The training tasks the datasets can supply, from (dataset, its training source, its contents).

    Dataset i's task k gets weight w_i * t_ik / sum(t_i over the tasks dataset i holds), t_i being the
    dataset's own task weights or `weights`; with one dataset the weight is t_k itself. A task with a
    positive weight that a dataset cannot supply is left out with a note; datasets of weight 0 and tasks
    of weight 0 are left out silently. Task names are the kinds (one dataset) or "<dataset>:<kind>".
    Raises ValueError when nothing is left to train.
    """
    parts, notes = [], []
    single = len(splits) == 1
    for spec, source, contents in splits:
        if spec.weight <= 0:
            continue
        own = spec.task_weights or dict(weights)
        held = [k for k in TASK_KINDS if own.get(k, 0) > 0 and contents.holds(k)]
        for kind in TASK_KINDS:
            if own.get(kind, 0) > 0 and not contents.holds(kind):
                notes.append(
                    f"task {kind} (weight {own[kind]:g}) is left out for {spec.name}: "
                    f"{contents.missing(kind)}"
                )
        total = sum(own[k] for k in held)
        for kind in held:
            choices = contents.labels if kind == "classify" else ()
            name = kind if single else f"{spec.name}:{kind}"
            task = pipeline.Task(name, kind, tuple(instruction_templates[kind]), choices=choices)
            weight = own[kind] if single else spec.weight * own[kind] / total
            parts.append(MixturePart(spec.name, task, view(source, contents, kind), weight))
    if not parts:
        raise ValueError(
            "no task to train: "
            + ("; ".join(notes) if notes else "every dataset or task has weight 0")
            + ". Give a positive weight (tasks.weights) to a task the data holds, or use another dataset."
        )
    return Mixture(parts, notes)


# --------------------------------------------------------------------------------------------------
# Evaluations
# --------------------------------------------------------------------------------------------------


def eval_plan(
    contents: SplitContents,
    wanted: Sequence[str] = tuple(EVAL_TASKS.values()),
    evaluations: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(the evaluations among `wanted` that the split can answer, {skipped evaluation: why}), in the
    order of `evaluations` ({evaluation: the task kind its clips hold}; default stage two's: captioning,
    aqa, classification; slit.eval.registry.needs(trainer) for any trainer's)."""
    if evaluations is None:
        evaluations = {task: kind for kind, task in EVAL_TASKS.items()}
    run, skipped = [], {}
    for task, kind in evaluations.items():
        if task not in wanted:
            skipped[task] = "not asked for (eval.tasks)"
        elif not contents.holds(kind):
            skipped[task] = contents.missing(kind)
        else:
            run.append(task)
    return run, skipped


_CONTENTS: dict[tuple[str, str, str], SplitContents] = {}


def cached_contents(
    name: str, data_dir: str, split: str, source: Sequence[Mapping[str, Any]]
) -> SplitContents:
    """`split_contents` of a built split, scanned once per process (periodic evaluations reuse it)."""
    key = (name, data_dir or "", split)
    if key not in _CONTENTS or _CONTENTS[key].num_clips != len(source):
        _CONTENTS[key] = split_contents(source, f"the {split} split of {name}")
    return _CONTENTS[key]


def _shown(value: Any) -> str:  # noqa: ANN401
    if hasattr(value, "items"):
        return repr(dict(value.items()))
    return repr(tuple(value)) if isinstance(value, list | tuple) else repr(value)


def config_problems(config: Any) -> list[str]:  # noqa: ANN401 (a stage-two ConfigDict)
    """What is wrong with a config's task groups (tasks.weights, tasks.templates, data.mixture,
    eval.tasks), one message per problem; [] when nothing is."""
    problems = []
    try:
        task_weights(config.tasks.weights)
    except ValueError as e:
        problems.append(f"tasks.weights={_shown(config.tasks.weights)}: {e}")
    try:
        templates(config.tasks.get("templates"))
    except ValueError as e:
        problems.append(f"tasks.templates: {e}")
    try:
        datasets(config.data)
    except ValueError as e:
        problems.append(str(e))
    wanted = config.eval.get("tasks", None)
    if wanted is not None:
        unknown = sorted(set(wanted) - set(EVAL_TASKS.values()))
        if unknown or isinstance(wanted, str):
            problems.append(
                f"eval.tasks={_shown(wanted)}: give a tuple of {', '.join(EVAL_TASKS.values())} (unknown: "
                f"{', '.join(unknown) or wanted})"
            )
    return problems


def unknown_token_note(
    tokenizer: Any,  # noqa: ANN401 (slit.data.tokenizer.TextTokenizer)
    splits: Sequence[tuple[DatasetSpec, Sequence[Mapping[str, Any]], SplitContents]],
    max_clips: int = 200,
    threshold: float = 0.1,
) -> str | None:
    """A note when more than `threshold` of the words of the training texts (captions, questions,
    answers, labels of up to `max_clips` clips per dataset) are unknown to the Q-Former's tokenizer:
    its [UNK] tokens carry nothing of the instruction. None otherwise."""
    from slit.data.tokenizer import UNK

    unk = tokenizer.tokenizer.token_to_id(UNK)
    if unk is None:
        return None
    words = unknown = 0
    for _, source, _ in splits:
        for i in range(min(len(source), max_clips)):
            example = source[i]
            texts = [
                t
                for key in ("captions", "questions", "answers", "labels")
                for t in example_texts(example, key)
            ]
            if not texts:
                continue
            ids = tokenizer.encode(texts, 64)
            special = np.isin(ids, [tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id])
            words += int((~special).sum())
            unknown += int((ids == unk).sum())
    if words and unknown / words > threshold:
        return (
            f"{100 * unknown / words:.0f}% of the training texts' tokens are unknown to the Q-Former's "
            "tokenizer ([UNK]); use one that knows the data's words (tokenizer.kind=directory, e.g. the "
            "packaged MiniLM WordPiece)"
        )
    return None
