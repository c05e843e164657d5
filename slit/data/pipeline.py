"""grain input pipelines: TFDS array_record sources -> padded audio + tokenised text batches.

Training: each process reads its own slice of the dataset, shuffles it deterministically from the
seed (a new order every epoch), picks one caption per clip at random (seeded), crops long clips at a
seeded random offset, and yields its share of the global batch. The iterator's state is
checkpointable (`get_state` / `set_state`), so a resumed run sees exactly the batches it would have.

Evaluation: every clip once, in order, cropped deterministically from its start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from slit.data.tokenizer import TextTokenizer

INT16_SCALE = 32768.0


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """How clips are laid out in a batch: `max_samples` samples at `sample_rate`, zero-padded."""

    sample_rate: int
    max_samples: int


def decode_audio(pcm: np.ndarray, spec: AudioSpec, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    """int16 PCM -> (float32 (max_samples,) zero-padded, true length).

    Clips longer than `max_samples` are cropped: at a random offset from `rng` for training, from the
    start when `rng` is None (evaluation). Non-finite samples cannot come out of int16 PCM.
    """
    audio = np.asarray(pcm)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / INT16_SCALE
    else:
        audio = np.nan_to_num(audio.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if len(audio) > spec.max_samples:
        start = 0 if rng is None else int(rng.integers(0, len(audio) - spec.max_samples + 1))
        audio = audio[start : start + spec.max_samples]
    length = len(audio)
    out = np.zeros(spec.max_samples, np.float32)
    out[:length] = audio
    return out, length


def _captions(example: dict[str, Any]) -> list[str]:
    captions = example.get("captions")
    if captions is None:
        captions = [example["caption"]]
    return [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]


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

    Each process reads the examples `process_index::process_count` and yields batches of
    `global_batch_size // process_count` rows: dicts with audio (b, max_samples) float32, num_samples
    (b,) int32 and text_ids (b, max_text_length) int32.
    """
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds.slice(slice(process_index, None, process_count))
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.random_map(TrainExample(tokenizer, spec, max_text_length), seed=seed + 1)
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=8))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def eval_audio_batches(source: Sequence[dict[str, Any]], spec: AudioSpec, batch_size: int) -> Iterator[dict]:
    """Every clip of a split once, in order, in batches of `batch_size` (the last one padded).

    Each batch has audio, num_samples, index, and `valid` (b,) bool marking real (not padding) rows.
    """
    ds = grain.MapDataset.source(source)
    ds = grain.MapDataset.range(len(source)).map(lambda i: (i, source[i])) if len(source) else ds
    ds = ds.map(EvalAudio(spec)).batch(batch_size, drop_remainder=False)
    for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)):
        n = len(batch["index"])
        valid = np.zeros(batch_size, bool)
        valid[:n] = True
        if n < batch_size:
            batch = {
                k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in batch.items()
            }
        batch["valid"] = valid
        yield batch


def split_captions(source: Sequence[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    """All captions of a split, flattened, with the index of each caption's clip."""
    texts, owners = [], []
    for i in range(len(source)):
        for caption in _captions(source[i]):
            texts.append(caption)
            owners.append(i)
    return texts, np.asarray(owners, np.int64)
