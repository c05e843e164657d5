"""The frozen-feature cache on disk: a frozen audio encoder's outputs and frame masks for every clip of a
dataset split, written once (`slit cache-features`) and read by stage-one training
(`--config.features=cached`) in place of running the encoder.

Layout under a cache root (`features_dir`; default `<TFDS data_dir>/slit_features`):

    <root>/<dataset name, "/" as "__">/<key>/
        manifest.json                 identity (encoder fingerprint + frontend settings), data (dataset
                                      version, split sizes), format, when it was written
        <split>/index.npz             per clip: shard (N,) int32, start (N,) int64 and stored (N,) int32
                                      (its rows in the shard), frame_mask (N, F) bool, num_samples (N,)
        <split>/features-00000.npy    (rows, D) float32: each clip's frames up to its last real one
                                      (frames after it are masked and read back as zeros)

`key` is a hash of the identity alone, so caches of different encoders or frontend settings live side
by side; the data part is checked when the cache is opened (a rebuilt dataset makes a cache stale). A
cache is written into `<key>.partial` and renamed when complete, so an interrupted write never looks
like a cache.

Reading fits the grain pipelines of slit.data.pipeline: `CachedFeatures` is a picklable random-access
source (shards are memory-mapped lazily, in each worker), `cached_train_dataset` mirrors
`pipeline.train_dataset` (same sharding, shuffling, caption draws; checkpointable iterator), and
`eval_feature_batches` mirrors `pipeline.eval_audio_batches`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import pathlib
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from slit.data import pipeline
from slit.data.tokenizer import TextTokenizer
from slit.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npz"


class StaleCacheError(UserError):
    """No usable cache for the config: missing, incomplete, or built for something else."""


def identity_key(identity: dict) -> str:
    """16 hex digits naming a cache: a hash of what the features depend on (encoder and frontend)."""
    text = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dataset_directory(root: str | pathlib.Path, dataset: str) -> pathlib.Path:
    return pathlib.Path(root).expanduser() / dataset.replace("/", "__")


def cache_directory(root: str | pathlib.Path, dataset: str, identity: dict) -> pathlib.Path:
    """Where the cache of `dataset` for `identity` lives (whether or not it exists)."""
    return dataset_directory(root, dataset) / identity_key(identity)


# ---------------------------------------------------------------------------------------------------------
# Writing.


class SplitWriter:
    """Appends encoded clips of one split, in order, into shards of about `shard_rows` frames."""

    def __init__(self, directory: pathlib.Path, num_clips: int, shard_rows: int = 1 << 18):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.num_clips, self.shard_rows = num_clips, shard_rows
        self.shard, self.start, self.stored, self.masks, self.num_samples = [], [], [], [], []
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._shard_index = 0

    def add(self, features_bfd: np.ndarray, mask_bf: np.ndarray, num_samples_b: np.ndarray) -> None:
        """Adds a batch of clips (only real rows: the caller drops padding rows)."""
        for features, mask, n in zip(features_bfd, mask_bf, num_samples_b, strict=True):
            real = np.flatnonzero(mask)
            rows = int(real[-1]) + 1 if len(real) else 0
            self.shard.append(self._shard_index)
            self.start.append(self._pending_rows)
            self.stored.append(rows)
            self.masks.append(np.asarray(mask, bool))
            self.num_samples.append(int(n))
            self._pending.append(np.asarray(features[:rows], np.float32))
            self._pending_rows += rows
            if self._pending_rows >= self.shard_rows:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        width = self._pending[0].shape[1]
        shard = np.concatenate(self._pending) if self._pending_rows else np.zeros((0, width), np.float32)
        np.save(self.directory / f"features-{self._shard_index:05d}.npy", shard)
        self._pending, self._pending_rows = [], 0
        self._shard_index += 1

    def close(self) -> None:
        """Writes the last shard and the index; raises if fewer or more clips came than announced."""
        if len(self.stored) != self.num_clips:
            raise RuntimeError(
                f"{self.directory.name}: {len(self.stored)} clips written, {self.num_clips} expected"
            )
        self._flush()
        np.savez(
            self.directory / INDEX,
            shard=np.asarray(self.shard, np.int32),
            start=np.asarray(self.start, np.int64),
            stored=np.asarray(self.stored, np.int32),
            frame_mask=np.stack(self.masks),
            num_samples=np.asarray(self.num_samples, np.int32),
        )


def write_cache(
    directory: pathlib.Path, manifest: dict, splits: dict[str, tuple[int, Iterable[tuple]]]
) -> pathlib.Path:
    """Writes a complete cache into `directory` (replacing one that is there).

    splits: name -> (number of clips, iterable of (features (b, F, D), frame_mask (b, F), num_samples (b,))
    batches of real clips in the split's order). Written into `<directory>.partial`, renamed at the end.
    """
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    for name, (count, batches) in splits.items():
        writer = SplitWriter(partial / name, count)
        for features, mask, num_samples in batches:
            writer.add(features, mask, num_samples)
        writer.close()
    return finish_cache(partial, directory, manifest)


def write_split_part(directory: pathlib.Path, count: int, batches: Iterable[tuple]) -> None:
    """One process's part of a split written by several processes: `count` clips, a contiguous range of
    the split in order, as `write_cache` writes a split (`merge_split_parts` joins the parts)."""
    writer = SplitWriter(directory, count)
    for features, mask, num_samples in batches:
        writer.add(features, mask, num_samples)
    if count:
        writer.close()


def merge_split_parts(split_dir: pathlib.Path, parts: Sequence[pathlib.Path]) -> None:
    """Joins the parts of one split (`write_split_part`, given in the split's order) into the layout one
    writer gives: the shards renumbered in order into `split_dir` and one index over every clip."""
    fields = ("shard", "start", "stored", "frame_mask", "num_samples")
    joined: dict[str, list[np.ndarray]] = {k: [] for k in fields}
    offset = 0
    split_dir.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if not (part / INDEX).is_file():  # a process with no clips of this split
            shutil.rmtree(part, ignore_errors=True)
            continue
        with np.load(part / INDEX) as index:
            for k in fields:
                joined[k].append(index[k] + offset if k == "shard" else index[k])
        shards = sorted(part.glob("features-*.npy"))
        for k, shard in enumerate(shards):
            shard.rename(split_dir / f"features-{offset + k:05d}.npy")
        offset += len(shards)
        shutil.rmtree(part)
    np.savez(split_dir / INDEX, **{k: np.concatenate(v) for k, v in joined.items()})


def finish_cache(partial: pathlib.Path, directory: pathlib.Path, manifest: dict) -> pathlib.Path:
    """Writes the manifest into a complete `partial` cache and renames it to `directory`."""
    manifest = dict(
        manifest, format=FORMAT_VERSION, written=datetime.datetime.now().isoformat(timespec="seconds")
    )
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    return directory


# ---------------------------------------------------------------------------------------------------------
# Opening, with the staleness checks.


def _differences(expected: Any, found: Any, prefix: str = "") -> list[str]:  # noqa: ANN401
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for key in sorted(set(expected) | set(found)):
            out += _differences(expected.get(key), found.get(key), f"{prefix}{key}.")
        return out
    if expected != found:
        return [f"{prefix.rstrip('.')}: cache has {found!r}, this config needs {expected!r}"]
    return []


def open_cache(
    root: str | pathlib.Path, dataset: str, identity: dict, data: dict, rebuild: str
) -> pathlib.Path:
    """The directory of the cache of `dataset` for `identity` whose data part matches `data`.

    identity: what the features depend on (encoder fingerprint and source, frontend settings).
    data: what they were computed from ({"dataset", "version", "splits": {name: size}}).
    rebuild: the command that (re)builds this cache, quoted in every refusal.

    Raises:
      StaleCacheError: no cache, an incomplete one, or one built for other data or another
        encoder/frontend (the message lists what differs and gives `rebuild`).
    """
    directory = cache_directory(root, dataset, identity)
    manifest_path = directory / MANIFEST
    todo = f"\nBuild it with:\n  {rebuild}"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        differences = _differences(data, manifest.get("data"))
        if differences:
            raise StaleCacheError(
                f"the feature cache {directory} is stale: it was written for other data:\n  - "
                + "\n  - ".join(differences)
                + "\nRebuild it (it is replaced) with:\n  "
                + rebuild
            )
        return directory
    if directory.with_name(directory.name + ".partial").exists():
        raise StaleCacheError(
            f"the feature cache {directory} was never completed (an interrupted write).{todo}"
        )
    others = sorted(
        dataset_directory(root, dataset).glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if not others:
        raise StaleCacheError(
            f"no feature cache of {dataset} in {pathlib.Path(root).expanduser()} (features=cached).{todo}"
        )
    lines = []
    for path in others[:3]:
        found = json.loads(path.read_text())
        differences = _differences(identity, found.get("identity"))
        lines.append(
            f"{path.parent}:\n    - " + "\n    - ".join(differences or ["(format or hashing changed)"])
        )
    raise StaleCacheError(
        f"no feature cache of {dataset} matches this config's frozen encoder and frontend (key "
        f"{directory.name}); the caches there differ:\n  " + "\n  ".join(lines) + todo
    )


# ---------------------------------------------------------------------------------------------------------
# Reading.


class CachedFeatures:
    """Random access to one split of a cache: `[i]` -> (features (F, D) float32, frame_mask (F,) bool).

    Picklable (grain workers): shards are memory-mapped on first use in each process.
    """

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        with np.load(self.directory / INDEX) as index:
            self.shard, self.start, self.stored = index["shard"], index["start"], index["stored"]
            self.frame_mask, self.num_samples = index["frame_mask"], index["num_samples"]
        self._shards: dict[int, np.ndarray] = {}
        first = np.load(self.directory / "features-00000.npy", mmap_mode="r")
        self.width = int(first.shape[1])

    def __len__(self) -> int:
        return len(self.stored)

    @property
    def frames(self) -> int:
        return int(self.frame_mask.shape[1])

    def _shard_array(self, k: int) -> np.ndarray:
        if k not in self._shards:
            self._shards[k] = np.load(self.directory / f"features-{k:05d}.npy", mmap_mode="r")
        return self._shards[k]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        rows, start = int(self.stored[i]), int(self.start[i])
        features = np.zeros((self.frames, self.width), np.float32)
        features[:rows] = self._shard_array(int(self.shard[i]))[start : start + rows]
        return features, self.frame_mask[i]

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _shards={})


class WithFeatures(Sequence):
    """A split's examples with each clip's cached features (`features`, `frame_mask`) added."""

    def __init__(self, source: Sequence[dict[str, Any]], features: CachedFeatures):
        if len(source) != len(features):
            raise StaleCacheError(
                f"the feature cache {features.directory} has {len(features)} clips, the split {len(source)}"
            )
        self.source, self.features = source, features

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        example = dict(self.source[i])
        example["features"], example["frame_mask"] = self.features[i]
        return example


def _captions(example: dict[str, Any]) -> list[str]:
    values = example.get("captions", example.get("caption"))
    values = [values] if isinstance(values, bytes | str) else list(values if values is not None else [])
    if not values:
        raise ValueError(f"example {example.get('id')!r} has no captions")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class CachedTrainExample(grain.transforms.RandomMap):
    """`pipeline.TrainExample` with cached features in place of the audio.

    The random draws are the same as `TrainExample`'s (a crop offset for clips longer than the batch's
    `max_samples`, then the caption), so both modes pick the same captions. The features are of the
    clip's start (cached once), so long clips are not randomly cropped here.
    """

    def __init__(self, tokenizer: TextTokenizer, spec: pipeline.AudioSpec, max_text_length: int):
        self.tokenizer, self.spec, self.max_text_length = tokenizer, spec, max_text_length

    def random_map(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        length = len(example["audio"])
        if length > self.spec.max_samples:
            rng.integers(0, length - self.spec.max_samples + 1)  # TrainExample's crop draw
        captions = _captions(example)
        caption = captions[int(rng.integers(len(captions)))]
        return {
            "features": example["features"],
            "frame_mask": example["frame_mask"],
            "text_ids": self.tokenizer.encode([caption], self.max_text_length)[0],
        }


def cached_train_dataset(
    source: Sequence[dict[str, Any]],
    features: CachedFeatures,
    tokenizer: TextTokenizer,
    spec: pipeline.AudioSpec,
    *,
    max_text_length: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 4,
) -> grain.IterDataset:
    """`pipeline.train_dataset` over cached features: the same examples in the same order, batches of
    features (b, F, D) float32, frame_mask (b, F) bool and text_ids (b, max_text_length) int32."""
    ds = pipeline.global_order(WithFeatures(source, features), seed)
    ds = ds.random_map(CachedTrainExample(tokenizer, spec, max_text_length), seed=seed + 1)
    ds = pipeline.process_batches(ds, global_batch_size, process_index, process_count)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=8))
    if worker_count > 0:
        pipeline.allow_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def eval_feature_batches(features: CachedFeatures, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every clip once, in order, in batches of `batch_size` (the last one padded by repeating its last
    row): features (b, F, D), frame_mask (b, F), index (b,), valid (b,) bool marking real rows."""
    count = len(features)
    for start in range(0, count, batch_size):
        picks = [min(i, count - 1) for i in range(start, start + batch_size)]
        rows = [features[i] for i in picks]
        yield {
            "features": np.stack([f for f, _ in rows]),
            "frame_mask": np.stack([m for _, m in rows]),
            "index": np.asarray(picks, np.int32),
            "valid": np.arange(start, start + batch_size) < count,
        }


@dataclasses.dataclass
class OpenedCache:
    """An opened cache: its directory and one `CachedFeatures` per split."""

    directory: pathlib.Path
    splits: dict[str, CachedFeatures]
