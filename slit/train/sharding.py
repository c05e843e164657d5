"""The device mesh and the one table that maps logical axis names to mesh axes.

Weights carry logical names (`embed`, `mlp`, `heads`, `vocab`, ...; see `slit/models/layers.py`);
batches carry `batch`. The config's `sharding_rules` maps each name to a mesh axis (`data`, `fsdp`,
`tensor`), a tuple of them, or None (replicated). Changing the parallelism is a config change.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves mesh sizes (one of them may be -1, "the rest") against the device count.

    Raises ValueError naming the sizes when they cannot cover `num_devices` devices.
    """
    shape = [int(sizes[a]) for a in MESH_AXES]
    unknown = [a for a, s in zip(MESH_AXES, shape, strict=True) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape, strict=True))}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(
            f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, shape, strict=True))}"
        )
    named = dict(zip(MESH_AXES, shape, strict=True))
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices cannot be split with {named}; "
                f"the fixed axes multiply to {known}, which does not divide {num_devices}"
            )
        shape[MESH_AXES.index(unknown[0])] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {known} but there are {num_devices} devices; "
            f"set the sizes so that they multiply to {num_devices} (or use -1 for one axis)"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a Mesh(data, fsdp, tensor) over `devices` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_dict(rules: Sequence[Sequence[Any]]) -> dict[str, str | tuple[str, ...] | None]:
    """Turns the config's ((logical, mesh_axes), ...) table into a dict."""
    return {
        str(name): (tuple(target) if isinstance(target, list | tuple) else target) for name, target in rules
    }


def _mesh_axis_size(mesh: Mesh, target: str | tuple[str, ...] | None) -> int:
    if target is None:
        return 1
    names = (target,) if isinstance(target, str) else target
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh
) -> PartitionSpec:
    """Maps per-dimension logical names to a PartitionSpec.

    A dimension whose size is not divisible by its mesh axes is replicated instead (tiny vocabularies,
    2-way heads); a mesh axis already used by an earlier dimension is not used twice.
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        target = rules.get(name) if name is not None else None
        names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        if not names or size % _mesh_axis_size(mesh, names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def state_shardings(abstract_state: nnx.State, rules: Rules, mesh: Mesh) -> dict:
    """NamedShardings for every variable of an (abstract) nnx.State, as a pure dict."""

    def sharding_of(variable: nnx.Variable) -> nnx.Variable:
        axes = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        return variable.replace(NamedSharding(mesh, logical_to_spec(axes, variable.shape, rules, mesh)))

    shardings = jax.tree.map(sharding_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a (batch, ...) array: the batch axis by the `batch` rule, the rest replicated."""
    target = rules.get("batch")
    return NamedSharding(mesh, PartitionSpec(target, *([None] * (ndim - 1))))


# (rules, mesh or None) while a train step is traced under `activation_sharding`; None: `constrain` is a no-op
_ACTIVATION_RULES: contextvars.ContextVar[tuple[dict, Mesh | None] | None] = contextvars.ContextVar(
    "slit_activation_rules", default=None
)


@contextlib.contextmanager
def activation_sharding(rules: Rules | None, mesh: Mesh | None = None) -> Iterator[None]:
    """Within the block (a train step being traced), `constrain` maps logical activation axes through
    `rules` (the config's `sharding_rules`) onto `mesh` (None: the mesh of `jax.set_mesh`). rules=None
    (`activation_sharding=False` in the config) leaves `constrain` a no-op."""
    token = _ACTIVATION_RULES.set(None if rules is None else (dict(rules), mesh))
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint named by logical axes, one per dimension (as MaxText's
    `with_logical_constraint`), e.g. constrain(features, ("batch", "frames", "embed")): the
    PartitionSpec comes from the same rules table as the weights' (`logical_to_spec`; names without a
    rule, and dimensions that do not divide, stay replicated).

    A no-op (returns `x`) outside `activation_sharding`, with rules=None, or without a mesh of more than
    one device. Tower boundaries in slit/models/stage1.py and stage2.py call it, so that XLA keeps the
    batch split between the towers instead of choosing a layout of its own."""
    active = _ACTIVATION_RULES.get()
    if active is None:
        return x
    rules, mesh = active
    target = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if target.empty or target.size == 1:
        return x
    spec = logical_to_spec(tuple(logical_axes), x.shape, rules, target)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if mesh is not None else spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicated_to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a numpy array that every process holds in full (e.g. an eval batch)."""
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def fetch_replicated(array: jax.Array) -> np.ndarray:
    """A fully replicated jax.Array as numpy, on any process."""
    return np.asarray(array.addressable_shards[0].data)


def host_to_global(array: np.ndarray, sharding: NamedSharding, global_shape: Sequence[int]) -> jax.Array:
    """Assembles this process's rows of a global batch into one global jax.Array."""
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_process_local_data(sharding, array, tuple(global_shape))


def gather_to_host(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly sharded, possibly multi-host) array as NumPy on this process. Every
    process must call it (a multi-host gather); for the few small tensors that are really needed whole
    on the host (a word-embedding table to remap), never for whole models."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def replace_from_host(arrays: dict, host: dict, shardings: dict) -> dict:
    """`arrays` (a pure dict of global jax.Arrays) with the leaves that `host` gives as NumPy arrays
    put in their place, in each leaf's sharding and dtype; the other leaves stay as they are (on their
    devices: nothing of them is fetched). Every process holds the same `host` values (each reads the same
    file) and places only its own shards. Raises ValueError naming a host leaf the arrays lack or one of
    another shape."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(arrays)
    flat_shardings = traverse_util.flatten_dict(shardings)
    for path, value in traverse_util.flatten_dict(host).items():
        if not isinstance(value, np.ndarray):
            continue
        if path not in flat:
            raise ValueError(f"{'/'.join(map(str, path))} is not a weight of this model")
        target = flat[path]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{'/'.join(map(str, path))}: {value.shape}, expected {tuple(target.shape)}")
        value = value.astype(target.dtype)
        flat[path] = jax.make_array_from_callback(
            value.shape, flat_shardings[path], lambda index, v=value: v[index]
        )
    return traverse_util.unflatten_dict(flat)


def placeholders(arrays: dict, keep: dict[tuple[str, ...], np.ndarray]) -> dict:
    """The structure of `arrays` (a pure dict) with None at every leaf but the paths of `keep`, whose
    NumPy values fill them: the host view a weight reader fills in without any other leaf being
    fetched (see `replace_from_host`)."""
    from flax import traverse_util

    flat = {path: keep.get(path) for path in traverse_util.flatten_dict(arrays)}
    return traverse_util.unflatten_dict(flat)


def host_to_sharded(tree: Any, shardings: Any) -> Any:  # noqa: ANN401
    """A tree of arrays that every process holds whole (weights each process read from the same file)
    placed as global arrays in `shardings` (a matching tree): each process puts only its own shards,
    so it works on any number of hosts (a plain device_put assumes one)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: replicated_to_global(np.asarray(x), s), tree, shardings)
