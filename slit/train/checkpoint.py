"""Orbax checkpoints in `<workdir>/checkpoints`: trainable state, data-iterator state and metadata.

Frozen weights are never written; the metadata records the config and the slit version. Saving is
asynchronous; restore always goes into abstract arrays that carry the target shardings, so a
checkpoint restores onto whatever mesh the resumed run has.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

import slit


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` with the given shardings (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class Checkpointer:
    """Saves and restores one run's checkpoints."""

    def __init__(self, workdir: str | pathlib.Path, config: ml_collections.ConfigDict):
        self.config = config
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.checkpoints_to_keep, create=True, enable_async_checkpointing=True
            ),
        )

    def save(self, step: int, state: dict, data_iter: grain.DatasetIterator, force: bool = False) -> None:
        """Saves asynchronously (returns once arrays are off the devices); a step saved already is kept."""
        if step in self.manager.all_steps():
            return
        metadata = {"step": int(step), "slit_version": slit.__version__, "config": self.config.to_dict()}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                metadata=ocp.args.JsonSave(metadata),
            ),
            force=force,
        )

    def restore_latest(
        self, state: dict, shardings: dict, data_iter: grain.DatasetIterator
    ) -> tuple[dict, int]:
        """Restores the newest checkpoint into `state`'s shapes and `shardings`; returns (state, step)."""
        step = self.manager.latest_step()
        if step is None:
            return state, 0
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(state, shardings)),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        if jax.process_index() == 0:
            print(f"Resuming from {self.directory / str(step)} (step {step}).")
        return restored["state"], int(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
