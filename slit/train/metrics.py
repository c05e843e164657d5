"""Metrics to `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping

import jax
import numpy as np


class MetricWriter:
    """Writes scalars with their step; only process 0 writes."""

    def __init__(self, workdir: str | pathlib.Path):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in scalars.items():
            value = float(np.asarray(v))
            clean[k] = value if math.isfinite(value) else str(value)
            self._tb.add_scalar(k, value, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
