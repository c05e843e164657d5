"""grain input pipelines: TFDS array_record sources -> padded audio + tokenised text batches.

Training (`train_dataset`): one global order of the dataset, shuffled deterministically from the seed
(a new order every epoch); one caption per clip picked at random and long clips cropped at a random
offset, both seeded by the example's place in that order; short clips padded. Each process yields its
rows of every global batch (process p of P: rows p*B/P .. (p+1)*B/P - 1), so the global batch of every
step is the same whatever the number of processes, and a run resumes on another number of hosts in
the same data order. Text is tokenised with
padding and truncation to a fixed length. Reading runs on threads with a prefetch buffer, and
optionally in grain worker processes (`worker_count`; the transforms live in this importable module,
and the program's entry point needs a `__main__` guard). The iterator's state is checkpointable
(`get_state` / `set_state`), so a resumed run sees exactly the batches it would have seen.

Instruction tuning (`mixture_dataset`): several tasks (captioning, question answering,
classification), each over its own dataset, mixed with configurable weights (default: proportional
to the square root of each dataset's size, as InstructBLIP does), sharded and resumable the same way.

Evaluation (`eval_audio_batches`): every clip once, in order, cropped deterministically from its
start, or split into windows that cover long clips when asked.

Audio never reaches training non-finite: int16 PCM cannot hold NaN/Inf, and float sources are
sanitised here (builders already skip or repair such files, see slit.data.audio_io).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from slit.data import audio_io
from slit.data.tokenizer import TextTokenizer

INT16_SCALE = audio_io.INT16_SCALE


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """How clips are laid out in a batch: `max_samples` samples at `sample_rate`, zero-padded."""

    sample_rate: int
    max_samples: int


class TextEncoder(Protocol):
    """Anything that turns texts into a padded, truncated (len(texts), max_length) int32 array."""

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray: ...


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """Stored audio (int16 PCM, or float) -> finite float32 (n,)."""
    audio = np.asarray(pcm)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / INT16_SCALE
    return np.nan_to_num(audio.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def decode_audio(pcm: np.ndarray, spec: AudioSpec, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    """int16 PCM -> (float32 (max_samples,) zero-padded, true length).

    Clips longer than `max_samples` are cropped: at a random offset from `rng` for training, from the
    start when `rng` is None (evaluation). The mask of real samples is `arange(max_samples) < length`
    (slit.data.audio_io.crop_or_pad returns it explicitly).
    """
    audio, mask = audio_io.crop_or_pad(pcm_to_float(pcm), spec.max_samples, rng)
    return audio, int(mask.sum())


def example_texts(example: Mapping[str, Any], key: str) -> list[str]:
    """An example's text field as a list of str (absent: []; bytes decoded as UTF-8)."""
    values = example.get(key)
    if values is None:
        return []
    if isinstance(values, bytes | str):
        values = [values]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _captions(example: dict[str, Any]) -> list[str]:
    captions = example_texts(example, "captions") or example_texts(example, "caption")
    if not captions:
        clip = example_texts(example, "id")
        raise ValueError(
            f"example {clip[0] if clip else '?'} has no captions; this pipeline trains on captions "
            "(use mixture_dataset for question answering or labels)"
        )
    return captions


class TrainExample(grain.transforms.RandomMap):
    """Decodes audio (random crop) and tokenises one randomly chosen caption."""

    def __init__(self, tokenizer: TextTokenizer, spec: AudioSpec, max_text_length: int):
        self.tokenizer, self.spec, self.max_text_length = tokenizer, spec, max_text_length

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        audio, length = decode_audio(example["audio"], self.spec, rng)
        captions = _captions(example)
        caption = captions[int(rng.integers(len(captions)))]
        return {
            "audio": audio,
            "num_samples": np.int32(length),
            "text_ids": self.tokenizer.encode([caption], self.max_text_length)[0],
        }


class EvalAudio(grain.transforms.Map):
    """Decodes audio deterministically and keeps the clip's index in the split."""

    def __init__(self, spec: AudioSpec):
        self.spec = spec

    def map(self, indexed: tuple[int, dict[str, Any]]) -> dict[str, np.ndarray]:
        index, example = indexed
        audio, length = decode_audio(example["audio"], self.spec, None)
        return {"audio": audio, "num_samples": np.int32(length), "index": np.int32(index)}


# ---------------------------------------------------------------------------------------------------------
# Sharding, shuffling, batching, prefetch.


def global_order(source: Sequence[dict[str, Any]], seed: int) -> grain.MapDataset:
    """Every example of `source` in one order shuffled from `seed` (a new order every epoch), repeated
    forever: the same on every process."""
    if len(source) == 0:
        raise ValueError("the training split has no examples")
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)


def process_batches(
    ds: grain.MapDataset, global_batch_size: int, process_index: int, process_count: int
) -> grain.MapDataset:
    """This process's rows of each global batch of `ds` (examples in global order): batch k of the
    result holds rows [process_index * b, (process_index + 1) * b) of global batch k, b =
    global_batch_size // process_count. Batch k is index k of the result whatever the process count,
    so a data position saved by P processes means the same step to P' processes."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    local = _per_process_batch(global_batch_size, process_count)
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def allow_grain_workers() -> None:
    """grain's worker processes read absl flags, which plain scripts never parse (grain issue #1355):
    mark them parsed (with their defaults) unless an absl app already did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _per_process_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    return global_batch_size // process_count


def _iterate(ds: grain.MapDataset, worker_count: int, read_threads: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=8))
    if worker_count > 0:
        allow_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def train_dataset(
    source: Sequence[dict[str, Any]],
    tokenizer: TextTokenizer,
    spec: AudioSpec,
    *,
    max_text_length: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 4,
) -> grain.IterDataset:
    """An endless, shuffled, batched training stream for this process.

    Each process yields its rows of every global batch (`process_batches`): batches of
    `global_batch_size // process_count` rows, dicts with audio (b, max_samples) float32, num_samples
    (b,) int32 and text_ids (b, max_text_length) int32.
    """
    ds = global_order(source, seed).random_map(TrainExample(tokenizer, spec, max_text_length), seed=seed + 1)
    return _iterate(
        process_batches(ds, global_batch_size, process_index, process_count), worker_count, read_threads
    )


# ---------------------------------------------------------------------------------------------------------
# Multi-task mixtures (instruction tuning).


@dataclasses.dataclass(frozen=True)
class Task:
    """How examples of one dataset become (instruction, target) texts.

    kind: "caption" (target: a random caption), "qa" (a random question, formatted into the
    instruction as {question}; target: its answer) or "classify" (target: the labels joined with
    ", "; {choices} in the instruction lists `choices`).
    instructions: templates, one drawn at random per example.
    """

    name: str
    kind: str
    instructions: tuple[str, ...]
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("caption", "qa", "classify"):
            raise ValueError(f"task {self.name}: kind={self.kind!r}; use 'caption', 'qa' or 'classify'")
        if not self.instructions:
            raise ValueError(f"task {self.name}: give at least one instruction template")

    def texts(self, example: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
        """(instruction, target) for one example."""
        template = self.instructions[int(rng.integers(len(self.instructions)))]
        if self.kind == "caption":
            captions = _captions(example)
            return template, captions[int(rng.integers(len(captions)))]
        if self.kind == "qa":
            questions, answers = example_texts(example, "questions"), example_texts(example, "answers")
            if not questions or len(questions) != len(answers):
                raise ValueError(
                    f"task {self.name}: example {example_texts(example, 'id')} has no question/answer pairs"
                )
            i = int(rng.integers(len(questions)))
            return template.format(question=questions[i]), answers[i]
        labels = example_texts(example, "labels")
        if not labels:
            raise ValueError(f"task {self.name}: example {example_texts(example, 'id')} has no labels")
        return template.format(choices=", ".join(self.choices)), ", ".join(labels)


class InstructionExample(grain.transforms.RandomMap):
    """Decodes audio (random crop) and tokenises one (instruction, target) pair of a task. An example
    that brings its cached frozen features passes them on (features (F, D), frame_mask (F,)) instead
    of the audio, with the same random draws."""

    def __init__(
        self,
        task: Task,
        task_id: int,
        tokenizer: TextEncoder,
        target_tokenizer: TextEncoder,
        spec: AudioSpec,
        max_instruction_length: int,
        max_target_length: int,
    ):
        self.task, self.task_id, self.spec = task, task_id, spec
        self.tokenizer, self.target_tokenizer = tokenizer, target_tokenizer
        self.max_instruction_length, self.max_target_length = max_instruction_length, max_target_length

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if "features" in example:  # a feature cache (slit.data.feature_cache.WithFeatures): the clip's
            length = len(example["audio"])  # start, cached once; the crop draw keeps the texts' draws
            if length > self.spec.max_samples:
                rng.integers(0, length - self.spec.max_samples + 1)
            inputs = {"features": example["features"], "frame_mask": example["frame_mask"]}
        else:
            audio, length = decode_audio(example["audio"], self.spec, rng)
            inputs = {"audio": audio, "num_samples": np.int32(length)}
        instruction, target = self.task.texts(example, rng)
        return inputs | {
            "instruction_ids": self.tokenizer.encode([instruction], self.max_instruction_length)[0],
            "target_ids": self.target_tokenizer.encode([target], self.max_target_length)[0],
            "task_id": np.int32(self.task_id),
        }


def sqrt_size_weights(sizes: Sequence[int]) -> list[float]:
    """Mixing weights proportional to the square root of each dataset's size (InstructBLIP), summing to 1."""
    roots = [math.sqrt(s) for s in sizes]
    return [r / sum(roots) for r in roots]


def mixture_dataset(
    tasks: Sequence[Task],
    sources: Sequence[Sequence[dict[str, Any]]],
    tokenizer: TextEncoder,
    spec: AudioSpec,
    *,
    max_instruction_length: int,
    max_target_length: int,
    global_batch_size: int,
    seed: int,
    weights: Sequence[float] | None = None,
    target_tokenizer: TextEncoder | None = None,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 4,
) -> grain.IterDataset:
    """An endless stream mixing `tasks` (task i reads `sources[i]`) with `weights` (default: sqrt of size).

    Each task's dataset is shuffled on its own (seed + 1000 * i); grain's mixture interleaves them so
    that every batch holds the tasks in the weights' proportions, and each process yields its rows of
    every global batch (`process_batches`). Batches of
    `global_batch_size // process_count` rows: audio (b, max_samples) float32, num_samples (b,) int32,
    instruction_ids (b, max_instruction_length) int32, target_ids (b, max_target_length) int32 (from
    `target_tokenizer`, default `tokenizer`), task_id (b,) int32.
    """
    if len(tasks) != len(sources) or not tasks:
        raise ValueError(f"{len(tasks)} tasks but {len(sources)} sources: give one source per task")
    weights = list(weights) if weights is not None else sqrt_size_weights([len(s) for s in sources])
    if len(weights) != len(tasks) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"weights {weights}: need one non-negative weight per task, not all zero")
    parts = []
    for i, (task, source) in enumerate(zip(tasks, sources, strict=True)):
        ds = global_order(source, seed + 1000 * i)
        transform = InstructionExample(
            task, i, tokenizer, target_tokenizer or tokenizer, spec, max_instruction_length, max_target_length
        )
        parts.append(ds.random_map(transform, seed=seed + 1000 * i + 1))
    mixed = grain.MapDataset.mix(parts, weights)
    batches = process_batches(mixed, global_batch_size, process_index, process_count)
    return _iterate(batches, worker_count, read_threads)


# ---------------------------------------------------------------------------------------------------------
# Evaluation.


class EvalWindows(grain.transforms.Map):
    """Splits a clip into windows of `max_samples` samples, `hop` apart, covering all of it."""

    def __init__(self, spec: AudioSpec, hop: int):
        self.spec, self.hop = spec, hop

    def map(self, indexed: tuple[int, dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        index, example = indexed
        windows, lengths = audio_io.split_windows(
            pcm_to_float(example["audio"]), self.spec.max_samples, self.hop
        )
        return [
            {"audio": w, "num_samples": np.int32(n), "index": np.int32(index), "window": np.int32(k)}
            for k, (w, n) in enumerate(zip(windows, lengths, strict=True))
        ]


def _pad_batch(rows: list[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """Stacks rows into a batch, repeating the last row up to `batch_size`; `valid` marks real rows."""
    padded = rows + [rows[-1]] * (batch_size - len(rows))
    batch = {k: np.stack([r[k] for r in padded]) for k in rows[0]}
    batch["valid"] = np.arange(batch_size) < len(rows)
    return batch


def eval_audio_batches(
    source: Sequence[dict[str, Any]],
    spec: AudioSpec,
    batch_size: int,
    windows: bool = False,
    hop_samples: int | None = None,
) -> Iterator[dict]:
    """Every clip of a split once, in order, in batches of `batch_size` (the last one padded).

    Each batch has audio, num_samples, index, and `valid` (b,) bool marking real (not padding) rows.
    With `windows`, a clip longer than `max_samples` gives several rows, windows starting every
    `hop_samples` (default `max_samples`: no overlap) until the clip is covered; rows then also carry
    `window`, the window's number within its clip (pool over rows with the same `index`).
    """
    indexed = grain.MapDataset.range(len(source)).map(lambda i: (i, source[i]))
    options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)
    if not windows:
        ds = indexed.map(EvalAudio(spec)).batch(batch_size, drop_remainder=False)
        for batch in ds.to_iter_dataset(options):
            rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["index"]))]
            yield _pad_batch(rows, batch_size)
        return
    rows: list[dict[str, np.ndarray]] = []
    for clip_rows in indexed.map(EvalWindows(spec, hop_samples or spec.max_samples)).to_iter_dataset(options):
        rows.extend(clip_rows)
        while len(rows) >= batch_size:
            yield _pad_batch(rows[:batch_size], batch_size)
            rows = rows[batch_size:]
    if rows:
        yield _pad_batch(rows, batch_size)


def split_captions(source: Sequence[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """All captions of a split, flattened, with the index of each caption's clip."""
    texts, owners = [], []
    for i in range(len(source)):
        for caption in _captions(source[i]):
            texts.append(caption)
            owners.append(i)
    return texts, np.asarray(owners, np.int64)
