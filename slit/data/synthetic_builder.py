"""TFDS builder for the procedurally generated sound dataset ``slit_synthetic_sounds`` (nothing downloaded).

The clips come from ``slit.data.synthetic``; see there for what they contain. Written as ArrayRecord, so it
is read by random access (``data_source``) without TensorFlow. Importing this module registers the builder,
so ``tfds.data_source("slit_synthetic_sounds/tiny", data_dir=...)`` finds it by name.

Each example:

- ``audio``: int16 PCM, shape ``(num_samples,)``, mono at ``SAMPLE_RATE`` (16 kHz; also in
  ``info.metadata["sample_rate"]``). ``slit.data.audio_io.from_pcm16`` turns it into float32.
- ``captions``: ``NUM_CAPTIONS`` distinct captions (read back as a list of bytes).
- ``id``: e.g. ``"train-000042"``; example ``i`` of a split has id ``f"{split}-{i:06d}"`` (kept in order).
- ``attributes``: JSON of ``SyntheticClip.attributes`` (events with kind, quality, count, loudness, ...).
- ``num_samples``: int32, the audio length.
- ``questions``, ``answers``, ``question_types``: parallel lists of question / one-word answer / type
  (e.g. ``repeat_count``), derived from the clip's generating parameters (version 1.1.0 and up).
- ``labels``: the kinds of sound present, in order of appearance (version 1.1.0 and up).

Version 1.1.0 added the questions and labels: TFDS keeps each version in its own directory, so a dataset
built by an older slit is regenerated rather than read without them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from slit.data.synthetic import NUM_CAPTIONS, SAMPLE_RATE, generate_split, to_pcm16

NAME = "slit_synthetic_sounds"
FILE_FORMAT = "array_record"
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_SEEDS: dict[str, int] = {"train": 20_240_001, "validation": 20_240_002, "test": 20_240_003}
"""Fixed per-split seeds, independent of the config: ``tiny``'s splits are prefixes of ``default``'s."""

_DESCRIPTION = f"""\
Procedurally generated sound clips with captions, slit's built-in dataset (nothing is downloaded).
Each 0.5-10 s mono {SAMPLE_RATE} Hz clip holds one or two events, one after the other: beeps (low, medium or
high pitch), three-tone chords (low or high register), chirps sweeping up or down, bursts of white, pink or
brown noise, or slow or fast click trains; each repeated one to four times, fast or slow, quiet or loud.
Every clip has {NUM_CAPTIONS} captions that describe only what is audible (for audio-text retrieval) and a
JSON description of its events, questions with one-word answers derived from it, and class labels.
"""


@dataclasses.dataclass
class SlitSyntheticSoundsConfig(tfds.core.BuilderConfig):
    """A config: the number of clips in each split."""

    num_train: int = 0
    num_validation: int = 0
    num_test: int = 0

    def num_clips(self, split: str) -> int:
        """Number of clips in ``split`` ("train", "validation" or "test")."""
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[split]


class SlitSyntheticSounds(tfds.core.GeneratorBasedBuilder):
    """Procedurally generated sound clips with captions and structured attributes."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Questions, answers, question types and class labels per clip.",
    }
    BUILDER_CONFIGS = [
        SlitSyntheticSoundsConfig(
            name="default",
            description="3000 train, 200 validation, 250 test clips.",
            num_train=3000,
            num_validation=200,
            num_test=250,
        ),
        SlitSyntheticSoundsConfig(
            name="tiny",
            description="64 train, 16 validation, 16 test clips (for tests).",
            num_train=64,
            num_validation=16,
            num_test=16,
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (TFDS's own lookup needs the ``importlib_resources`` backport for editable installs.)"""
        return epath.Path(__file__)

    def __init__(self, *, file_format: str | None = None, **kwargs: Any) -> None:  # noqa: ANN401
        """As ``tfds.core.GeneratorBasedBuilder``, with ``file_format`` defaulting to ArrayRecord."""
        super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    # tfds.features.Audio would need TensorFlow to encode; raw PCM needs nothing.
                    "audio": tfds.features.Tensor(
                        shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES
                    ),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "id": tfds.features.Text(),
                    "attributes": tfds.features.Text(),
                    "num_samples": tfds.features.Scalar(dtype=np.int32),
                    "questions": tfds.features.Sequence(tfds.features.Text()),
                    "answers": tfds.features.Sequence(tfds.features.Text()),
                    "question_types": tfds.features.Sequence(tfds.features.Text()),
                    "labels": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
            supervised_keys=None,
            homepage=None,
            disable_shuffling=True,  # example i of a split is clip i (id f"{split}-{i:06d}")
            metadata=tfds.core.MetadataDict(sample_rate=SAMPLE_RATE),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for clip_id, clip in generate_split(SPLIT_SEEDS[split], self.builder_config.num_clips(split), split):
            yield (
                clip_id,
                {
                    "audio": to_pcm16(clip.audio),
                    "captions": clip.captions,
                    "id": clip_id,
                    "attributes": json.dumps(clip.attributes, sort_keys=True),
                    "num_samples": len(clip.audio),
                    "questions": clip.questions,
                    "answers": clip.answers,
                    "question_types": clip.question_types,
                    "labels": clip.labels,
                },
            )


def prepare(data_dir: str | None, config: str = "default", verbose: bool = True) -> tfds.core.DatasetBuilder:
    """Returns the ``slit_synthetic_sounds/{config}`` builder, generating the dataset first if missing.

    Args:
      data_dir: TFDS data directory (None: TFDS's default, ``~/tensorflow_datasets``).
      config: "default" or "tiny".
      verbose: print a one-line note (generated, with time, or found).
    """
    builder = SlitSyntheticSounds(config=config, data_dir=data_dir)
    if builder.is_prepared():
        note = "found"
    else:
        start = time.perf_counter()
        builder.download_and_prepare(file_format=FILE_FORMAT)
        note = f"generated in {time.perf_counter() - start:.1f} s"
    if verbose:
        counts = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in SPLITS)
        print(f"{NAME}/{config} ({counts} clips) {note} at {builder.data_dir}")
    return builder


def data_source(data_dir: str | None, config: str = "default", split: str = "train") -> Sequence[dict]:
    """A random-access source over one split (generated first if missing); ``len()`` and ``[i]`` give dicts
    of NumPy arrays / bytes, example ``i`` being clip ``f"{split}-{i:06d}"``."""
    return prepare(data_dir, config, verbose=False).as_data_source(split)
