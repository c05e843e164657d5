"""Opening TFDS datasets (array_record) as random-access sources for grain, and describing them."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from slit.errors import UserError

SYNTHETIC_NAME = "slit_synthetic_sounds"


def _split_name(name: str) -> tuple[str, str]:
    base, _, config = name.partition("/")
    return base, config or "default"


def open_split(
    name: str, data_dir: str | None, split: str, sample_rate: int | None = None
) -> Sequence[dict[str, Any]]:
    """A random-access source over one split of the TFDS dataset `name` (e.g. `slit_synthetic_sounds/tiny`).

    `split` may combine splits ("fold1+fold2") or slice them ("train[:90%]"). The built-in synthetic
    dataset is generated on first use (it needs nothing downloaded). With `sample_rate`, a dataset
    stored at another rate is refused (UserError).
    """
    data_dir = data_dir or None
    base, config = _split_name(name)
    if base == SYNTHETIC_NAME:
        from slit.data import synthetic_builder

        synthetic_builder.prepare(data_dir, config)
    try:
        source = tfds.data_source(
            name, data_dir=data_dir, split=split, builder_kwargs={"file_format": "array_record"}
        )
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"dataset {name!r} is not a known TFDS dataset; build it first (README: Data) or fix data.name"
        ) from None
    except (FileNotFoundError, AssertionError, ValueError) as e:
        where = data_dir or str(pathlib.Path("~/tensorflow_datasets").expanduser())
        raise FileNotFoundError(
            f"could not open split {split!r} of dataset {name!r} in {where}: {e}. "
            "Check data.name, data.data_dir and the split name, or build the dataset first."
        ) from e
    stored_rate = dataset_sample_rate(source)
    if sample_rate is not None and stored_rate is not None and stored_rate != sample_rate:
        raise UserError(
            f"dataset {name!r} stores audio at {stored_rate} Hz but the config asks for {sample_rate} Hz; "
            f"set data.sample_rate={stored_rate} or rebuild it with --sample-rate {sample_rate}"
        )
    return source


def dataset_sample_rate(source: Any) -> int | None:  # noqa: ANN401 (a TFDS data source)
    """The sample rate recorded in a source's dataset metadata, if any."""
    info = getattr(source, "dataset_info", None)
    metadata = getattr(info, "metadata", None) or {}
    rate = metadata.get("sample_rate")
    return int(rate) if rate else None


def _text(value: Any) -> str:  # noqa: ANN401
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def describe(
    name: str, data_dir: str | None, max_scanned: int = 1000, num_examples: int = 3
) -> dict[str, Any]:
    """Splits, counts, durations and a few examples of a built dataset (what `slit data inspect` prints).

    Durations are computed from up to `max_scanned` examples per split (evenly spaced), exactly when
    the split is no larger.
    """
    data_dir = data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"dataset {name!r} is not built in {data_dir or '~/tensorflow_datasets'}"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"dataset {name!r} is not built in {data_dir or '~/tensorflow_datasets'}; run `slit data build`"
        )
    rate = int(builder.info.metadata.get("sample_rate", 16000)) if builder.info.metadata else 16000
    out: dict[str, Any] = {
        "name": name,
        "directory": str(builder.data_dir),
        "sample_rate": rate,
        "splits": {},
    }
    report = pathlib.Path(builder.data_dir) / "build_report.json"
    if report.is_file():
        out["build_report"] = json.loads(report.read_text())
    for split in sorted(builder.info.splits):
        source = builder.as_data_source(split)
        count = len(source)
        picks = (
            np.unique(np.linspace(0, count - 1, min(count, max_scanned)).round().astype(int)) if count else []
        )
        seconds = np.array([int(source[int(i)]["num_samples"]) / rate for i in picks])
        examples = []
        for i in picks[:num_examples]:
            ex = source[int(i)]
            examples.append(
                {
                    "id": _text(ex["id"]),
                    "seconds": round(int(ex["num_samples"]) / rate, 2),
                    "audio_path": _text(ex.get("audio_path", b"")),
                    **{
                        key: [_text(t) for t in ex[key]]
                        for key in ("captions", "questions", "answers", "labels")
                        if key in ex and len(ex[key])
                    },
                }
            )
        out["splits"][split] = {
            "examples": count,
            "scanned": len(picks),
            "hours": float(seconds.mean() * count / 3600) if len(seconds) else 0.0,
            "seconds_min": float(seconds.min()) if len(seconds) else 0.0,
            "seconds_median": float(np.median(seconds)) if len(seconds) else 0.0,
            "seconds_max": float(seconds.max()) if len(seconds) else 0.0,
            "first_examples": examples,
        }
    return out
