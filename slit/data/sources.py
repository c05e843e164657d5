"""Opening TFDS datasets (array_record) as random-access sources for grain."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

SYNTHETIC_NAME = "slit_synthetic_sounds"


def _split_name(name: str) -> tuple[str, str]:
    base, _, config = name.partition("/")
    return base, config or "default"


def open_split(name: str, data_dir: str | None, split: str) -> Sequence[dict[str, Any]]:
    """A random-access source over one split of the TFDS dataset `name` (e.g. `slit_synthetic_sounds/tiny`).

    The built-in synthetic dataset is generated on first use (it needs nothing downloaded).
    """
    data_dir = data_dir or None
    base, config = _split_name(name)
    if base == SYNTHETIC_NAME:
        from slit.data import synthetic_builder

        synthetic_builder.prepare(data_dir, config)
    try:
        return tfds.data_source(
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
