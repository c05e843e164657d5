"""Orbax checkpoints in `<workdir>/checkpoints`: trainable state, data-iterator state and metadata.

Each checkpoint holds three items:
- `state`: {step, params, opt_state}; frozen weights are never written;
- `data`: the grain iterator state, so a resumed run sees exactly the batches it would have seen (each
  process writes its own; every process is at the same place of one global order, so a run saved by
  P processes resumes on any number of them: `DataStateHandler`);
- `metadata`: the resolved config, the slit version, and each frozen model's source and content
  fingerprint (a resumed run refuses frozen weights that differ from the ones it was trained against).

Saving is asynchronous (the step loop goes on once the arrays are off the devices) and atomic: orbax
writes into a temporary directory and renames it when complete, so an interrupted save never looks
like a checkpoint. The manager keeps the newest `checkpoints_to_keep` plus every
`checkpoint_keep_period`-th step.

Where a run starts from (`resolve_start`), first match wins:
1. the workdir's newest readable checkpoint (a damaged one is moved aside, with a message);
2. `config.resume_from`: another run's workdir or checkpoint (state and data position);
3. `config.init_from`: trainable weights only, matched by name (e.g. a stage-one Q-Former);
4. a fresh start.
Restore always goes into abstract arrays that carry the target shardings, so a checkpoint restores
onto whatever mesh the resumed run has.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import pathlib
import sys
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import slit
from slit import paths
from slit.errors import UserError
from slit.train import sharding

CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints_damaged"


# --------------------------------------------------------------------------------------------------
# Frozen-model identity
# --------------------------------------------------------------------------------------------------


@jax.jit
def _leaf_sums(x: jax.Array) -> jax.Array:
    """Two position-dependent uint32 sums of an array's bits: (2,) uint32. Order-independent to
    compute (integer sums wrap exactly), so any sharding gives the same answer."""
    if x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    else:  # 8-byte types: fold both halves
        pair = jax.lax.bitcast_convert_type(x, jnp.uint32)
        bits = pair[..., 0] ^ (pair[..., 1] * jnp.uint32(0x9E3779B1))
    index = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    a = jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
    b = jnp.sum((bits ^ (index * jnp.uint32(0x85EBCA6B))) * jnp.uint32(0xC2B2AE35), dtype=jnp.uint32)
    return jnp.stack([a, b])


def fingerprint(tree: Any) -> str:
    """A content fingerprint of a pytree of arrays (names, shapes, dtypes and every bit of the
    values), computed on device without gathering the arrays: 16 hex digits."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = [_leaf_sums(x) for _, x in leaves]
    for (path, x), s in zip(leaves, jax.device_get(sums), strict=True):
        digest.update(f"{jax.tree_util.keystr(path)}|{x.shape}|{x.dtype}|{s[0]}|{s[1]};".encode())
    return digest.hexdigest()[:16]


def frozen_identity(frozen: dict, sources: dict[str, str]) -> dict[str, dict[str, str]]:
    """{model name: {"source": where it came from, "fingerprint": its content}} for each frozen model."""
    return {
        name: {"source": sources.get(name, "unknown"), "fingerprint": fingerprint(tree)}
        for name, tree in frozen.items()
    }


def check_frozen_identity(saved: dict, current: dict, where: str, allow_mismatch: bool) -> None:
    """Refuses to resume with frozen models that differ from the ones the checkpoint was trained with.

    A model frozen on one side and trained on the other (`audio_encoder.trainable`, `llm.trainable`
    changed) is refused even with `allow_mismatch`: the checkpoint's trainable weights would not fit."""
    switched = sorted(set(saved) ^ set(current)) if saved else []  # (old checkpoints recorded none)
    if switched:
        raise UserError(
            f"{where} holds "
            + "; ".join(
                f"{name} {'frozen' if name in saved else 'trained'}, while this run "
                f"{'trains' if name in saved else 'freezes'} it"
                for name in switched
            )
            + ". A run cannot change what trains: set audio_encoder.trainable / llm.trainable as that "
            "run did, or start a new workdir with --config.init_from=<that workdir>."
        )
    problems = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if old is None or new is None:
            problems.append(f"{name}: {'not in the checkpoint' if old is None else 'not in this run'}")
        elif old["fingerprint"] != new["fingerprint"]:
            problems.append(
                f"{name}: trained against {old['source']} (fingerprint {old['fingerprint']}), "
                f"now {new['source']} (fingerprint {new['fingerprint']})"
            )
    if not problems:
        return
    message = f"the frozen models differ from those that {where} was trained against:\n  - " + "\n  - ".join(
        problems
    )
    if allow_mismatch:
        print(f"warning: {message}\n  (continuing: allow_frozen_mismatch=true)", file=sys.stderr)
        return
    raise UserError(
        message + "\nUse the same frozen models, or pass --config.allow_frozen_mismatch=true to go on anyway."
    )


# --------------------------------------------------------------------------------------------------
# Locating checkpoints
# --------------------------------------------------------------------------------------------------


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` with the given shardings (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def read_on_host(manager: ocp.CheckpointManager, step: int, *, metadata: bool = False) -> dict:
    """The "state" item of a step as NumPy arrays (and, with `metadata`, the "metadata" JSON too),
    whatever mesh the step was saved from. `manager`: from read_only_manager."""
    # The array metadata (shapes, dtypes): orbax's saved shardings name devices that may not exist here
    # (a run saved from 8 devices, read by 1), so every array is read onto this process's first device.
    tree = manager.item_metadata(step).get("state")
    if tree is None:
        raise ValueError(
            f"{manager.directory}: open it with read_only_manager to read step {step} on the host"
        )
    tree = getattr(tree, "tree", tree)
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda leaf: (
            jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=single)
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
            else leaf
        ),
        tree,
    )
    args = {"state": ocp.args.StandardRestore(target)}
    if metadata:
        args["metadata"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    out = {"state": jax.device_get(restored["state"])}
    if metadata:
        out["metadata"] = restored["metadata"]
    return out


def run_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The resolved config of a run: `<workdir>/config.json` (written by `slit train`), else the one
    recorded in the newest checkpoint's metadata. `workdir`: a local path or a URI (gs://)."""
    workdir = paths.workdir_path(workdir)
    if (workdir / "config.json").is_file():
        return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    steps = (
        sorted((int(p.name) for p in (workdir / CHECKPOINTS).glob("*") if p.name.isdigit()), reverse=True)
        if (workdir / CHECKPOINTS).is_dir()
        else []
    )
    for step in steps:
        path = workdir / CHECKPOINTS / str(step) / "metadata" / "metadata"
        if path.is_file():
            return ml_collections.ConfigDict(json.loads(path.read_text())["config"])
    raise UserError(
        f"{workdir} has neither config.json nor a checkpoint; give the workdir of a `slit train` run"
    )


def locate(path: str | pathlib.Path) -> tuple[epath.Path, int | None]:
    """Resolves a workdir, its checkpoints directory, or one step's directory (local paths or URIs) to
    (checkpoints directory, step or None for the newest)."""
    path = paths.workdir_path(path, absolute=True)
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist")
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, None
    if path.name.isdigit() and (path / "state").exists():
        return path.parent, int(path.name)
    if any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    raise UserError(
        f"{path} holds no slit checkpoint: give a workdir, its {CHECKPOINTS}/ directory, or one step's "
        f"directory ({CHECKPOINTS}/<step>)"
    )


def _manager(directory: epath.Path, config: ml_collections.ConfigDict, read_only: bool = False):
    if read_only:
        return read_only_manager(directory)
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoints_to_keep,
            keep_period=config.checkpoint_keep_period or None,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        ),
    )


class _QuietReadOnlyLogs(logging.Filter):
    """Drops orbax's notices that a read-only manager is read-only (they read like problems)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read_only=True" in message or "directory is read only" in message)


_absl_logger = logging.getLogger("absl")
_absl_logger.addFilter(_QuietReadOnlyLogs())


def read_only_manager(directory: str | pathlib.Path) -> ocp.CheckpointManager:
    """A manager that reads another run's checkpoints (never writes or cleans up there), with the items'
    handlers registered so that orbax can describe every item."""
    return ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
            "data": DataStateHandler(),
        },
        options=ocp.CheckpointManagerOptions(
            create=False, read_only=True, cleanup_tmp_directories=False, save_interval_steps=0
        ),
    )


# --------------------------------------------------------------------------------------------------
# The data position
# --------------------------------------------------------------------------------------------------


class DataStateHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator checkpoints (one `process_<i>-of-<n>.json` per process), restorable by any
    number of processes.

    Every process reads its rows of one global order (slit.data.pipeline.process_batches), so all of
    them hold the same iterator state. A process of a run with another process count than the saved
    one (no file of its own name) takes the saved state they all agree on; saved states that disagree
    are refused, naming the files.
    """

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:  # noqa: ANN401
        item = item or args.item
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item=item)
        files = sorted(directory.glob("process_*-of-*.json"))
        if not files:
            raise ValueError(f"{directory} holds no data-iterator state (process_<i>-of-<n>.json)")
        states = {f.name: json.loads(f.read_text()) for f in files}
        if any(state != states[files[0].name] for state in states.values()):
            raise ValueError(
                f"{directory}: the processes saved different data positions ({', '.join(states)}); this "
                "checkpoint can only resume with the number of processes that wrote it"
            )
        item.set_state(states[files[0].name])
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    """Saves a grain iterator's state (`DataStateHandler`)."""

    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    """Restores a grain iterator's state in place (`DataStateHandler`)."""

    item: Any


# --------------------------------------------------------------------------------------------------
# Saving and restoring
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Start:
    """Where a run starts: its state, the step, and a sentence saying where it came from."""

    state: dict
    step: int
    origin: str


class Checkpointer:
    """Saves one run's checkpoints and decides where the run starts."""

    def __init__(self, workdir: str | pathlib.Path, config: ml_collections.ConfigDict, frozen: dict):
        """`frozen` is `frozen_identity(...)` of this run's frozen models."""
        self.config = config
        self.workdir = paths.workdir_path(workdir, absolute=True)
        self.directory = self.workdir / CHECKPOINTS
        self.frozen = frozen
        self.manager = _manager(self.directory, config)
        self.save_seconds: list[float] = []  # time the step loop waited for each save

    def save(
        self, step: int, state: dict, data_iter: grain.DatasetIterator, force: bool = False
    ) -> float | None:
        """Saves asynchronously (returns once arrays are off the devices) and returns the seconds that
        took; a step saved already is kept (returns None)."""
        if step in self.manager.all_steps():
            return None
        start = time.perf_counter()
        metadata = {
            "step": int(step),
            "slit_version": slit.__version__,
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "frozen_models": self.frozen,
            "config": self.config.to_dict(),
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=DataSave(data_iter),
                metadata=ocp.args.JsonSave(metadata),
            ),
            force=force,
        )
        self.save_seconds.append(time.perf_counter() - start)
        return self.save_seconds[-1]

    def wait(self) -> float:
        """Blocks until pending saves are on disk; returns the seconds waited."""
        start = time.perf_counter()
        self.manager.wait_until_finished()
        return time.perf_counter() - start

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def resolve_start(self, state: dict, shardings: dict, data_iter: grain.DatasetIterator) -> Start:
        """The run's starting point, by the precedence in the module docstring."""
        own = self._restore_newest_readable(self.manager, state, shardings, data_iter, "this workdir")
        if own is not None:
            return own
        if self.config.resume_from:
            directory, step = locate(self.config.resume_from)
            manager = _manager(directory, self.config, read_only=True)
            try:
                if step is not None and step not in manager.all_steps():
                    raise UserError(f"resume_from: {directory} has no step {step}")
                found = self._restore_newest_readable(
                    manager, state, shardings, data_iter, f"resume_from={self.config.resume_from}", only=step
                )
            finally:
                manager.close()
            if found is None:
                raise UserError(f"resume_from: no readable checkpoint in {directory}")
            return found
        if self.config.init_from:
            return self._init_from(self.config.init_from, state, shardings)
        return Start(state, 0, "fresh start")

    def restore_for_eval(self, state: dict, shardings: dict, step: int | None = None) -> tuple[dict, int]:
        """The trainable state of a step (default: the newest) for evaluation; no data state, no moving
        of damaged checkpoints. Checks the frozen models like a resume does."""
        step = self.manager.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise UserError(f"{self.directory} has no checkpoint {'yet' if step is None else step}")
        metadata = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        check_frozen_identity(
            metadata["metadata"].get("frozen_models", {}),
            self.frozen,
            str(self.directory / str(step)),
            self.config.allow_frozen_mismatch,
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(state, shardings))),
        )
        return restored["state"], int(step)

    # ----------------------------------------------------------------------------------------------

    def _restore_newest_readable(
        self,
        manager: ocp.CheckpointManager,
        state: dict,
        shardings: dict,
        data_iter: grain.DatasetIterator,
        where: str,
        only: int | None = None,
    ) -> Start | None:
        """Restores the newest checkpoint that reads back whole; moves damaged ones of this workdir aside."""
        steps = [only] if only is not None else sorted(manager.all_steps(), reverse=True)
        for step in steps:
            step_dir = manager.directory / str(step)
            try:
                metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
                metadata = metadata["metadata"]
            except Exception as e:  # noqa: BLE001 (any failure to read means damage)
                self._damaged(manager, step_dir, e)
                continue
            check_frozen_identity(
                metadata.get("frozen_models", {}),
                self.frozen,
                f"{step_dir}",
                self.config.allow_frozen_mismatch,
            )
            try:
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_like(state, shardings)),
                        data=DataRestore(data_iter),
                    ),
                )
            except Exception as e:  # noqa: BLE001
                self._damaged(manager, step_dir, e)
                continue
            if jax.process_index() == 0:
                print(f"Resuming from {step_dir} (step {step}; {where}).", file=sys.stderr)
            return Start(restored["state"], int(step), f"resumed from {step_dir}")
        return None

    def _damaged(self, manager: ocp.CheckpointManager, step_dir: epath.Path, error: Exception) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        if manager is not self.manager:
            print(f"warning: checkpoint {step_dir} cannot be read ({reason}); trying older", file=sys.stderr)
            return
        target = self.workdir / DAMAGED / f"{step_dir.name}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            paths.move(step_dir, target)
        print(
            f"warning: checkpoint {step_dir} cannot be read ({reason}); moved it to {target} and falling "
            "back to the previous one",
            file=sys.stderr,
        )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"slit: moved damaged {step_dir.name}")
        manager.reload()

    def _init_from(self, path: str, state: dict, shardings: dict) -> Start:
        """Copies trainable weights that exist in both (same name and shape) from another checkpoint."""
        directory, step = locate(path)
        manager = _manager(directory, self.config, read_only=True)
        try:
            step = manager.latest_step() if step is None else step
            if step is None:
                raise UserError(f"init_from={path}: {directory} holds no checkpoint")
            source = read_on_host(manager, step)["state"]["params"]
        finally:
            manager.close()
        params, copied, fresh, mismatched = merge_matching(state["params"], source)
        if mismatched:
            raise UserError(
                f"init_from={path}: these weights exist in both but differ in shape (checkpoint vs this "
                "run):\n  - " + "\n  - ".join(mismatched) + "\nChange the config to match, or start fresh."
            )
        if not copied:
            raise UserError(f"init_from={path}: no weight of the checkpoint matches this model by name")
        params = sharding.replace_from_host(state["params"], params, shardings["params"])
        print(
            f"Initialised {len(copied)} weights from {directory / str(step)}; {len(fresh)} stay freshly "
            f"initialised{': ' + ', '.join(_prefixes(fresh)) if fresh else ''}.",
            file=sys.stderr,
        )
        return Start(dict(state, params=params), 0, f"init_from {directory / str(step)}")


def path_name(path: tuple) -> str:
    """A tree path as "a/b/0/c", the same whether a level is a dict with string keys (as orbax reads
    checkpoints back), a list, a namedtuple or an nnx.State with integer keys."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def merge_matching(target: dict, source: dict) -> tuple[dict, list[str], list[str], list[str]]:
    """Takes `source`'s arrays where the same path exists in `target` with the same shape.

    Paths compare by `path_name`, so a checkpoint read back as nested string-keyed dicts matches
    the model's own state (whose layer lists have integer keys).
    Only shapes of `target` are read: its leaves may be global arrays of any sharding, left where they
    are. Returns (merged params: NumPy arrays at the copied paths, `target`'s leaves elsewhere; copied
    paths, paths left as in target, paths whose shapes differ).
    """
    source_flat = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    copied, fresh, mismatched = [], [], []

    def pick(path: tuple, value: Any) -> Any:
        name = path_name(path)
        if name not in source_flat:
            fresh.append(name)
            return value
        other = source_flat[name]
        if tuple(other.shape) != tuple(value.shape):
            mismatched.append(f"{name}: {tuple(other.shape)} vs {tuple(value.shape)}")
            return value
        copied.append(name)
        return np.asarray(other, dtype=value.dtype)

    merged = jax.tree_util.tree_map_with_path(pick, target)
    return merged, copied, fresh, mismatched


def _prefixes(paths: list[str], depth: int = 2) -> list[str]:
    """Short group names (the first `depth` levels) for a list of `path_name`s."""
    out = []
    for p in paths:
        name = "/".join(p.split("/")[:depth])
        if name not in out:
            out.append(name)
    return out
