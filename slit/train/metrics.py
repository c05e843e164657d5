"""Metrics to `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
import pathlib
import tempfile
from collections.abc import Mapping

import jax
import numpy as np

from slit import paths


class MetricWriter:
    """Writes scalars with their step; only process 0 writes.

    In a workdir on an object store (gs://), which cannot append, the writer keeps metrics.jsonl's text and
    writes it whole at each logged step, and writes the TensorBoard events into a local temporary directory
    that it copies to `<workdir>/tensorboard/` at each flush (metrics and event files are small)."""

    def __init__(self, workdir: str | pathlib.Path):
        self.enabled = jax.process_index() == 0
        workdir = paths.workdir_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self._remote_text: str | None = None  # the whole of metrics.jsonl, for a workdir that cannot append
        self._tb = None
        self._tb_staging: tempfile.TemporaryDirectory | None = None
        self._tb_target = workdir / "tensorboard"
        if self.enabled:
            from tensorboardX import SummaryWriter

            if paths.is_remote(workdir):
                self._remote_text = self.path.read_text() if self.path.exists() else ""
                self._tb_staging = tempfile.TemporaryDirectory(prefix="slit-tensorboard-")
            self._tb = SummaryWriter(self._tb_staging.name if self._tb_staging else str(self._tb_target))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in scalars.items():
            value = float(np.asarray(v))
            clean[k] = value if math.isfinite(value) else str(value)
            self._tb.add_scalar(k, value, step)
        line = json.dumps({"step": int(step), **clean}) + "\n"
        if self._remote_text is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._remote_text += line
            self.path.write_text(self._remote_text)
        self._tb.flush()
        self._upload_events()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._upload_events()
        if self._tb_staging is not None:
            self._tb_staging.cleanup()
            self._tb_staging = None

    def _upload_events(self) -> None:
        """Copies the staged event files (this run's, whole) to the remote workdir's tensorboard/."""
        if self._tb_staging is not None:
            paths.copy(self._tb_staging.name, self._tb_target)
