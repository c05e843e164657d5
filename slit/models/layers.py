"""Small NNX building blocks shared by every tower, with logical axis names on every weight.

Every weight is created through `weight(...)`, which records its logical axes (`embed`, `mlp`,
`heads`, `vocab`, ...) as the variable's `out_sharding` metadata. The rules table in the config maps
them to mesh axes (see `slit/train/sharding.py`). Each module takes a `param_type`: `nnx.Param` for
weights that train, `Frozen` for pretrained weights that never do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


class Frozen(nnx.Variable):
    """A pretrained weight that is never trained.

    Frozen weights get no gradient and no optimizer state, and are not written into training
    checkpoints: a checkpoint records which frozen weights it was trained against instead.
    """


def unfreeze(module: nnx.Module) -> nnx.Module:
    """Makes every `Frozen` weight under `module` an `nnx.Param` (same value and sharding metadata), in
    place: the component then trains (`audio_encoder.trainable`, `llm.trainable`). Returns `module`."""
    for _, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Module):
            continue
        for name, value in list(vars(node).items()):
            if isinstance(value, Frozen):
                setattr(node, name, nnx.Param(value.get_value(), **value.get_metadata()))
    return module


def freeze(module: nnx.Module) -> nnx.Module:
    """Makes every `nnx.Param` under `module` a `Frozen` weight (same value and sharding metadata), in
    place: the counterpart of `unfreeze`, for a pretrained part built from trainable modules (Pengi's
    prompt encoder is a Q-Former-shaped BERT). Returns `module`."""
    for _, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Module):
            continue
        for name, value in list(vars(node).items()):
            if isinstance(value, nnx.Param):
                setattr(node, name, Frozen(value.get_value(), **value.get_metadata()))
    return module


def normal(stddev: float = 0.02) -> Initializer:
    """BERT-style truncated-free normal initialiser."""
    return jax.nn.initializers.normal(stddev)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def weight(
    param_type: type[nnx.Variable],
    init: Initializer,
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Variable:
    """Creates a variable of `param_type` with logical `axes` (one name per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"weight of shape {tuple(shape)} needs one axis name per dimension, got {axes}")
    return param_type(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes))


DROPOUT_LEVELS = 1 << 16  # keep-probability resolution: each 32 random bits decide two elements


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout; the identity when `rngs` is None (evaluation) or `rate` is 0.

    Each element is kept when a 16-bit random draw falls below round((1 - rate) * 2^16), so the keep
    probability is within 2^-17 of 1 - rate, and kept elements are scaled by its inverse (the output's
    expectation is x exactly). Two elements per 32-bit draw halve the random-bit generation, which on
    CPU costs more than the dropout's arithmetic (threefry: ~10 ns per draw on a 2-core machine).
    """
    if rngs is None or rate == 0.0:
        return x
    threshold = round((1.0 - rate) * DROPOUT_LEVELS)
    n = x.size
    bits = jax.random.bits(rngs.dropout(), ((n + 1) // 2,), jnp.uint32)
    halves = jnp.stack([bits & 0xFFFF, bits >> 16], axis=-1).reshape(-1)[:n].reshape(x.shape)
    keep = halves < threshold
    return jnp.where(keep, x * (DROPOUT_LEVELS / threshold), 0.0).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as BERT and Whisper use."""
    return jax.nn.gelu(x, approximate=False)


# ---------------------------------------------------------------------------------------------------------
# The compute-dtype policy (`compute_dtype` in the config).

COMPUTE_DTYPES = ("float32", "bfloat16")
_compute_dtype: list[jnp.dtype | None] = [None]


@contextlib.contextmanager
def compute_dtype_scope(dtype: DTypeLike | str | None) -> Iterator[None]:
    """Within the block (at trace time), `Dense` layers and `dot_product_attention` take their matmul
    inputs in `dtype` and accumulate in float32 (`preferred_element_type`); their outputs are float32.
    None or float32: the plain path (inputs in the activations' dtype). Weights keep their stored dtype
    (trainable master weights stay float32: only the matmul's copy is cast); norms, softmax and losses
    are float32 either way."""
    if isinstance(dtype, str):
        dtype = jnp.dtype(dtype)
    previous = _compute_dtype[0]
    _compute_dtype[0] = None if dtype is None or jnp.dtype(dtype) == jnp.float32 else jnp.dtype(dtype)
    try:
        yield
    finally:
        _compute_dtype[0] = previous


def compute_dtype() -> jnp.dtype | None:
    """The dtype of `compute_dtype_scope` in force (None: the plain float32 path)."""
    return _compute_dtype[0]


def matmul(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` under the compute-dtype policy: in the policy's dtype with float32
    accumulation and a float32 result when one is in force, else in x's dtype (the plain path)."""
    dtype = compute_dtype()
    if dtype is None:
        return jnp.einsum(spec, x, w.astype(x.dtype))
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class Dense(nnx.Module):
    """`y = x @ kernel + bias`, kernel stored (in, out) with logical axes `axes`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        use_bias: bool = True,
        param_type: type[nnx.Variable] = nnx.Param,
        kernel_init: Initializer | None = None,
    ):
        self.kernel = weight(param_type, kernel_init or normal(), rngs, (in_features, out_features), axes)
        self.bias = weight(param_type, zeros, rngs, (out_features,), axes[1:]) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., out)."""
        y = matmul("...i,io->...o", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in float32."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        rngs: nnx.Rngs,
        axis_name: str = "embed",
        param_type: type[nnx.Variable] = nnx.Param,
    ):
        self.eps = eps
        self.scale = weight(param_type, ones, rngs, (features,), (axis_name,))
        self.bias = weight(param_type, zeros, rngs, (features,), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., features) -> (..., features)."""
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Embed(nnx.Module):
    """A (num_embeddings, features) lookup table."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        param_type: type[nnx.Variable] = nnx.Param,
        init: Initializer | None = None,
    ):
        self.embedding = weight(param_type, init or normal(), rngs, (num_embeddings, features), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """(...) int -> (..., features)."""
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """(..., features) -> (..., num_embeddings): logits against the table (tied output layer)."""
        return matmul("...d,vd->...v", x, self.embedding[...])


def dot_product_attention(
    q_bqhd: jax.Array,
    k_bkhd: jax.Array,
    v_bkhd: jax.Array,
    mask_bqk: jax.Array | None,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> jax.Array:
    """Scaled dot-product attention; softmax in float32.

    Args:
      q_bqhd: queries (batch, q_len, heads, head_dim); k_bkhd, v_bkhd: (batch, k_len, heads, head_dim).
      mask_bqk: bool (batch, q_len, k_len), True where a query may attend to a key; None for all.
      dropout_rate, rngs: dropout on the attention probabilities (BERT); off when `rngs` is None.

    Returns:
      (batch, q_len, heads, head_dim).
    """
    scale = 1.0 / math.sqrt(q_bqhd.shape[-1])
    logits = matmul("bqhd,bkhd->bhqk", q_bqhd, k_bkhd).astype(jnp.float32) * scale
    if mask_bqk is not None:
        logits = jnp.where(mask_bqk[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, rngs)
    if compute_dtype() is None:
        probs = probs.astype(v_bkhd.dtype)
    return matmul("bhqk,bkhd->bqhd", probs, v_bkhd)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Normalises the last axis to unit length (as torch's F.normalize; a zero row stays zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def split_heads(x_bld: jax.Array, num_heads: int) -> jax.Array:
    """(batch, length, heads * head_dim) -> (batch, length, heads, head_dim)."""
    b, length, d = x_bld.shape
    return x_bld.reshape(b, length, num_heads, d // num_heads)


def merge_heads(x_blhd: jax.Array) -> jax.Array:
    """(batch, length, heads, head_dim) -> (batch, length, heads * head_dim)."""
    b, length, h, d = x_blhd.shape
    return x_blhd.reshape(b, length, h * d)


# ---------------------------------------------------------------------------------------------------------
# Rematerialisation and scanned layers (the large-model levers; README "Parallelism").

REMAT_POLICIES = ("none", "dots_saveable", "everything")
"""none: keep every activation (no rematerialisation); dots_saveable: keep matmul outputs, recompute
the rest in the backward pass; everything: keep only each layer's inputs, recompute the whole layer."""


def checkpoint_policy(name: str) -> Any:  # noqa: ANN401 (a jax.checkpoint policy)
    """The jax.checkpoint policy a REMAT_POLICIES name stands for ("none" has none: do not remat)."""
    if name not in REMAT_POLICIES or name == "none":
        raise ValueError(f"remat policy {name!r}: choose one of {REMAT_POLICIES[1:]} (or 'none')")
    return {
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "everything": jax.checkpoint_policies.nothing_saveable,
    }[name]


def remat_call(layer: nnx.Module, policy: str, *args: Any) -> Any:  # noqa: ANN401
    """`layer(*args)`, its activations rematerialised in the backward pass with `policy` (REMAT_POLICIES;
    "none": a plain call). Array (and None) arguments are traced; an `nnx.Rngs` (dropout) is traced and
    its advanced counters are written back, so later layers draw fresh keys as in the plain call;
    anything else (a dtype, a flag) is static. Same values and gradients as the plain call."""
    if policy == "none":
        return layer(*args)
    dynamic = [i for i, a in enumerate(args) if _is_array_tree(a)]
    rng_slots = [i for i, a in enumerate(args) if isinstance(a, nnx.Rngs)]
    graphdef, state = nnx.split(layer)
    rng_splits = [nnx.split(args[i]) for i in rng_slots]
    rng_graphdefs, rng_states = [g for g, _ in rng_splits], [s for _, s in rng_splits]

    def run(state: Any, values: list, rng_states: tuple) -> Any:  # noqa: ANN401
        full = list(args)
        for i, v in zip(dynamic, values, strict=True):
            full[i] = v
        for i, g, s in zip(rng_slots, rng_graphdefs, rng_states, strict=True):
            full[i] = nnx.merge(g, s)
        out = nnx.merge(graphdef, state)(*full)
        return out, tuple(nnx.state(full[i]) for i in rng_slots)

    out, new_rng_states = jax.checkpoint(run, policy=checkpoint_policy(policy))(
        state, [args[i] for i in dynamic], tuple(rng_states)
    )
    for i, s in zip(rng_slots, new_rng_states, strict=True):
        nnx.update(args[i], s)
    return out


def _is_array_tree(value: Any) -> bool:  # noqa: ANN401
    return all(isinstance(x, jax.Array | jax.core.Tracer | np.ndarray) for x in jax.tree.leaves(value))


LAYER_AXIS = "layers"
"""The logical axis of the leading (layer) dimension of stacked weights; no sharding rule names it, so it
stays unsharded (each layer's slice is sharded as the plain layer's weight is)."""


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the structure of `layers[0]` whose every variable is the stack of the layers' own
    (leading axis L = len(layers), logical axis `LAYER_AXIS`), for `scan_layers`.

    Why stacked storage (the design of `scan_layers` fields): `jax.lax.scan` needs each weight as one
    [L, ...] array. Stacking per-layer weights inside the jitted step would copy every layer's weights
    into a new buffer on each step (XLA does not alias a concatenation of parameters): a second copy of
    the frozen LLM. So a scanned tower *stores* its layers stacked, and converts at the boundaries:
    random towers are initialised per layer then stacked (the same values as the plain tower's),
    pretrained weights are read in the per-layer layout then stacked (`to_layout`), and checkpoints and
    bundles hold the stacked layout with the config that made it (`scan_layers` lives in the model's
    config group, which bundles copy). Under `jax.eval_shape`/`nnx.eval_shape` nothing is allocated.
    """
    graphdef = nnx.graphdef(layers[0])
    states = [nnx.state(layer) for layer in layers]

    def stack(*xs: Any) -> Any:  # noqa: ANN401
        if any(isinstance(x, jax.core.Tracer) for x in xs) or not all(isinstance(x, jax.Array) for x in xs):
            return jnp.stack(xs)
        return jnp.asarray(np.stack([np.asarray(x) for x in xs]))  # on the host: no second device copy

    stacked = jax.tree.map(stack, *states)
    module = nnx.merge(graphdef, stacked)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get("out_sharding")
            if axes is not None and len(axes) == node.ndim - 1:
                node.set_metadata(out_sharding=(LAYER_AXIS, *axes))
    return module


def num_stacked(stacked: nnx.Module) -> int:
    """L of a `stack_layers` module."""
    return jax.tree.leaves(nnx.state(stacked))[0].shape[0]


def scan_layers(
    stacked: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,  # noqa: ANN401
    xs: Any = None,  # noqa: ANN401
    *,
    remat_policy: str = "none",
    stop: int | None = None,
) -> tuple[Any, Any]:
    """`jax.lax.scan` of `body(layer, carry, x) -> (carry, y)` over the L layers of a `stack_layers`
    module (layer i sees the i-th slice of every weight and of `xs`), compiled once for all layers.

    remat_policy: rematerialise each layer's activations (REMAT_POLICIES). stop: run layers 0..stop-1
    only (a hidden state before the last layer); the later ones are skipped by a `lax.cond` rather than
    by slicing the weights, which would copy them. Returns (final carry, ys stacked over L).
    """
    graphdef, state = nnx.split(stacked)
    length = num_stacked(stacked)

    def step(carry: Any, inputs: Any) -> tuple[Any, Any]:  # noqa: ANN401
        index, layer_state, x = inputs
        layer = nnx.merge(graphdef, layer_state)
        if stop is None or stop >= length:
            return body(layer, carry, x)
        skipped = jax.eval_shape(lambda: body(layer, carry, x))
        return jax.lax.cond(
            index < stop,
            lambda: body(layer, carry, x),
            lambda: (carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), skipped[1])),
        )

    if remat_policy != "none":
        step = jax.checkpoint(step, policy=checkpoint_policy(remat_policy))
    return jax.lax.scan(step, carry, (jnp.arange(length), state, xs))


def _is_layer_key(key: object) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def to_layout(values: Any, like: Any) -> Any:  # noqa: ANN401
    """A nested pure dict of weights converted between the per-layer layout ({"layers": {0: {...}, 1:
    {...}}}) and the stacked one ({"layers": {...}} with a leading L axis) wherever `like` (a pure dict,
    of arrays or ShapeDtypeStructs, in the wanted layout) has the other; elsewhere unchanged. Host
    (numpy) arrays stay on the host."""
    if not isinstance(values, dict) or not isinstance(like, dict):
        return values
    per_layer = bool(values) and all(_is_layer_key(k) for k in values)  # orbax reads keys back as "0"
    wants_per_layer = bool(like) and all(_is_layer_key(k) for k in like)
    if per_layer and not wants_per_layer:
        layers = [values[i] for i in sorted(values, key=int)]
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
        return to_layout(stacked, like)
    if wants_per_layer and not per_layer:
        count = len(like)
        return {
            i: to_layout(jax.tree.map(lambda x, i=i: np.asarray(x)[i], values), like[i]) for i in range(count)
        }
    return {k: to_layout(v, like.get(k)) if isinstance(like, dict) else v for k, v in values.items()}
