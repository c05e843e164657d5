"""Small NNX building blocks shared by every tower, with logical axis names on every weight.

Every weight is created through `weight(...)`, which records its logical axes (`embed`, `mlp`,
`heads`, `vocab`, ...) as the variable's `out_sharding` metadata. The rules table in the config maps
them to mesh axes (see `slit/train/sharding.py`). Each module takes a `param_type`: `nnx.Param` for
weights that train, `Frozen` for pretrained weights that never do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
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
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(x.dtype))


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
    logits = jnp.einsum("bqhd,bkhd->bhqk", q_bqhd, k_bkhd).astype(jnp.float32) * scale
    if mask_bqk is not None:
        logits = jnp.where(mask_bqk[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, rngs).astype(v_bkhd.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v_bkhd)


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
