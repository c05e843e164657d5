"""The Llama family (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2) as a frozen decoder-only LM (base.py).

Architecture as in HF `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM`: token embedding
(not scaled), pre-norm blocks with RMSNorm (weight only, statistics in float32), grouped-query
self-attention with rotary position embeddings (rotate-half layout; `rope_theta`; `linear` and
`llama3` frequency scaling), SwiGLU feed-forward `down(silu(gate(x)) * up(x))`, a final RMSNorm and
an output layer that is either separate or the embedding table (`tie_word_embeddings`).
Variants, all read from config.json: `head_dim` when given; biases on q/k/v (Qwen2) or on all
projections (`attention_bias`), MLP biases (`mlp_bias`); a sliding attention window (Mistral;
Qwen2 with `use_sliding_window`, on the layers `layer_types`/`max_window_layers` name): a query at
slot q sees keys at slots s with q - window < s <= q, as transformers does.

Precision: weights are stored in `param_dtype` (bfloat16 keeps a frozen LLM at half the memory);
matmuls take their inputs in `dtype` and accumulate in float32; the residual stream, the norms, the
rotary embedding, attention logits and softmax, and the output logits are float32.

Shapes: B batch, T inputs, S key slots, D hidden, H query heads, K key/value heads, G = H / K,
E head width, F intermediate width, V vocabulary. Logical axes of weights: `vocab`, `embed`,
`heads` (H * E, query/output projections), `kv_heads` (K * E, key/value projections), `mlp`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.typing import DTypeLike

from slit.errors import UserError
from slit.models.layers import Frozen, normal, ones, scan_layers, stack_layers, weight, zeros
from slit.models.llm import loading
from slit.models.llm.base import KVCache, TokenIds

__all__ = [
    "FrozenLinear",
    "Llama",
    "LlamaConfig",
    "RopeConfig",
    "attention_masks",
    "grouped_query_attention",
    "llama_config_from_hf",
    "llama_from_hf",
    "llama_from_tensors",
    "rope_inverse_frequencies",
    "update_cache_layer",
]

LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral")


# ---------------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base `theta` and the frequency scaling (`default`, `linear` or `llama3`)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_positions: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-family checkpoint (see `llama_config_from_hf`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    # One entry per layer: the sliding window of that layer, or None for full attention.
    sliding_windows: tuple[int | None, ...] | None = None
    token_ids: TokenIds = TokenIds(bos=None, eos=(), pad=None)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    def window_of(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


def _rope_config(hf: Mapping[str, Any]) -> RopeConfig:
    """From `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older config.json)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"config.json: partial_rotary_factor={partial} is not supported (only 1.0)")
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(
                params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
            ),
        )
    raise UserError(
        f"config.json: RoPE scaling type {kind!r} is not supported; slit implements 'default', 'linear' "
        "and 'llama3'. Remove the rope scaling entry only if the model was not trained with it."
    )


def _sliding_windows(hf: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...] | None:
    model_type = hf.get("model_type")
    window = hf.get("sliding_window")
    if not window or not hf.get("use_sliding_window", model_type != "qwen2"):
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None and model_type == "qwen2":
        first = hf.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if layer_types is None:
        return (int(window),) * num_layers
    if len(layer_types) != num_layers:
        raise UserError(f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def llama_config_from_hf(
    hf: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
) -> LlamaConfig:
    """`LlamaConfig` from a config.json dict of model_type llama, qwen2 or mistral.

    Raises UserError for another model_type, an activation other than SiLU, or unsupported RoPE.
    """
    model_type = hf.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise UserError(
            f"config.json: model_type {model_type!r} is not of the Llama family {LLAMA_MODEL_TYPES}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"config.json: hidden_act={act!r}; slit's Llama family implements 'silu' only")
    try:
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        num_layers = int(hf["num_hidden_layers"])
        attention_bias = bool(hf.get("attention_bias", False))
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            output_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_windows=_sliding_windows(hf, num_layers),
            token_ids=loading.token_ids_from_config(hf, generation_config),
        )
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}, which a {model_type} config must have") from None


# ---------------------------------------------------------------------------------------------------------
# Building blocks (GPT-2 uses them too).


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32 [E / 2]: the rotation frequency of each pair of channels, after scaling."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_positions / rope.high_freq_factor
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x_bthe: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates channel pairs (i, i + E/2) of x [B, T, heads, E] by position * frequency; float32 out."""
    angles_bte = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles_bte = jnp.concatenate([angles_bte, angles_bte], axis=-1)[:, :, None, :]
    x = x_bthe.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * jnp.cos(angles_bte) + rotated * jnp.sin(angles_bte)


class FrozenLinear(nnx.Module):
    """`y = x @ kernel (+ bias)`, kernel (in, out) frozen in `param_dtype`; inputs in `dtype`, float32 out.

    Stored in int8 (`slit.models.llm.quantize`), the kernel comes with `kernel_scale` (out,) float32 and
    `y = (x @ kernel) * kernel_scale (+ bias)`, the int8 values converted to `dtype` inside the matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        use_bias: bool = False,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
    ):
        self.dtype = dtype
        self.kernel = weight(Frozen, normal(), rngs, (in_features, out_features), axes, param_dtype)
        self.bias = weight(Frozen, zeros, rngs, (out_features,), axes[1:], param_dtype) if use_bias else None
        self.kernel_scale: Frozen | None = nnx.data(None)  # (out,) float32 when the kernel is int8

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> float32 (..., out)."""
        y = jnp.einsum(
            "...i,io->...o",
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        if self.kernel_scale is not None:
            y = y * self.kernel_scale[...]
        return y if self.bias is None else y + self.bias[...].astype(jnp.float32)


class RMSNorm(nnx.Module):
    """`x / sqrt(mean(x^2) + eps) * scale` over the last axis, in float32."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, param_dtype: DTypeLike = jnp.float32):
        self.eps = eps
        self.scale = weight(Frozen, ones, rngs, (features,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., D) -> float32 (..., D)."""
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...].astype(jnp.float32)


def attention_masks(
    token_mask_bt: jax.Array, cache: KVCache | None, windows: set[int | None]
) -> tuple[dict[int | None, jax.Array], jax.Array | None]:
    """Boolean masks [B, T, S] (True = may attend), one per sliding window (None = full attention).

    Without a cache, the T inputs are the key slots (S = T). With one, the inputs go to slots
    [length, length + T) and keys are all S slots; also returns the updated `valid` [B, S].
    """
    t = token_mask_bt.shape[1]
    if cache is None:
        query_slot, key_slot = jnp.arange(t), jnp.arange(t)
        valid_bs, new_valid = token_mask_bt, None
    else:
        query_slot, key_slot = cache.length + jnp.arange(t), jnp.arange(cache.max_length)
        valid_bs = new_valid = jax.lax.dynamic_update_slice(cache.valid, token_mask_bt, (0, cache.length))
    causal_ts = key_slot[None, :] <= query_slot[:, None]
    masks = {}
    for window in windows:
        allowed_ts = (
            causal_ts if window is None else causal_ts & (key_slot[None, :] > query_slot[:, None] - window)
        )
        masks[window] = allowed_ts[None] & valid_bs[:, None, :]
    return masks, new_valid


def update_cache_layer(
    cache_keys: jax.Array, cache_values: jax.Array, length: jax.Array, keys: jax.Array, values: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Writes keys/values [B, T, K, E] into the cache arrays [B, S, K, E] at slots [length, length + T)."""
    at = (0, length, 0, 0)
    return (
        jax.lax.dynamic_update_slice(cache_keys, keys.astype(cache_keys.dtype), at),
        jax.lax.dynamic_update_slice(cache_values, values.astype(cache_values.dtype), at),
    )


def grouped_query_attention(
    q_bthe: jax.Array,
    k_bske: jax.Array,
    v_bske: jax.Array,
    mask_bts: jax.Array,
    dtype: DTypeLike,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention of H query heads over K key/value heads (H = G * K); float32 logits and softmax.

    q [B, T, H, E], k and v [B, S, K, E], mask bool [B, T, S] -> [B, T, H * E] in float32.
    Logits are scaled by `scale` (default 1 / sqrt(E)).
    """
    b, t, h, e = q_bthe.shape
    k_heads = k_bske.shape[2]
    q = q_bthe.reshape(b, t, k_heads, h // k_heads, e).astype(dtype)
    logits = jnp.einsum("btkge,bske->bkgts", q, k_bske.astype(dtype), preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(e) if scale is None else scale)
    logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bske->btkge", probs.astype(dtype), v_bske.astype(dtype), preferred_element_type=jnp.float32
    )
    return out.reshape(b, t, h * e)


# ---------------------------------------------------------------------------------------------------------
# The model.


class LlamaAttention(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs, dtype: DTypeLike, param_dtype: DTypeLike):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.rope = c.rope
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = FrozenLinear(c.hidden_size, q_width, axes=("embed", "heads"), use_bias=c.qkv_bias, **kw)
        self.k_proj = FrozenLinear(
            c.hidden_size, kv_width, axes=("embed", "kv_heads"), use_bias=c.qkv_bias, **kw
        )
        self.v_proj = FrozenLinear(
            c.hidden_size, kv_width, axes=("embed", "kv_heads"), use_bias=c.qkv_bias, **kw
        )
        self.o_proj = FrozenLinear(
            q_width, c.hidden_size, axes=("heads", "embed"), use_bias=c.output_bias, **kw
        )

    def __call__(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array,
        mask_bts: jax.Array,
        layer_cache: tuple[jax.Array, jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D] -> ([B, T, D] float32, updated (keys, values) or None); layer_cache: (k, v, length)."""
        b, t, _ = x_btd.shape
        inv_freq = rope_inverse_frequencies(self.rope, self.head_dim)
        q = apply_rope(
            self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim), positions_bt, inv_freq
        )
        k = apply_rope(
            self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim), positions_bt, inv_freq
        )
        v = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        new_kv = None
        if layer_cache is not None:
            new_kv = update_cache_layer(*layer_cache, k, v)
            k, v = new_kv
        return self.o_proj(grouped_query_attention(q, k, v, mask_bts, self.dtype)), new_kv


class SwiGLU(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs, dtype: DTypeLike, param_dtype: DTypeLike):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=c.mlp_bias)
        self.gate_proj = FrozenLinear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = FrozenLinear(c.hidden_size, c.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = FrozenLinear(c.intermediate_size, c.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class LlamaBlock(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs, dtype: DTypeLike, param_dtype: DTypeLike):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attention_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.attention = LlamaAttention(c, **kw)
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.mlp = SwiGLU(c, **kw)

    def __call__(
        self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array, layer_cache: Any
    ) -> tuple[jax.Array, Any]:
        attended, new_kv = self.attention(self.attention_norm(x_btd), positions_bt, mask_bts, layer_cache)
        x_btd = x_btd + attended
        return x_btd + self.mlp(self.mlp_norm(x_btd)), new_kv


class Llama(nnx.Module):
    """A frozen Llama-family decoder-only LM; implements `slit.models.llm.base.DecoderOnlyLM`."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        scan_layers: bool = False,
    ):
        """scan_layers: store the layers stacked and run them with one `jax.lax.scan` (compiled once for
        all layers; `slit.models.layers.stack_layers` says why stacked). Same weights from the same
        `rngs`, same outputs; weight paths `layers.<name>` [L, ...] instead of `layers.<i>.<name>`."""
        c = self.config = config
        self.vocab_size, self.hidden_size, self.token_ids = c.vocab_size, c.hidden_size, c.token_ids
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat_policy = "none"  # of the scanned layers (set by slit.models.stage2.rematerialised_layers)
        self.embedding = weight(
            Frozen, normal(), rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), param_dtype
        )
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        layers = [LlamaBlock(c, **kw) for _ in range(c.num_layers)]
        self.layers = stack_layers(layers) if scan_layers else nnx.List(layers)
        self.final_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else FrozenLinear(c.hidden_size, c.vocab_size, axes=("embed", "vocab"), **kw)
        )

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """int32 [B, T] -> [B, T, D] in `dtype` (Llama does not scale its embeddings)."""
        return jnp.take(self.embedding[...], token_ids, axis=0).astype(self.dtype)

    def init_cache(self, batch_size: int, max_length: int, dtype: DTypeLike = jnp.float32) -> KVCache:
        c = self.config
        return KVCache.zeros(c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim, dtype)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        token_mask: jax.Array,
        cache: KVCache | None = None,
        logits_span: tuple[int, int] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, T, D], positions int32 [B, T], token_mask bool [B, T] -> logits [B, T, V].

        Logits are float32; the cache (when given) comes back with the T inputs written. With
        `logits_span=(start, stop)` only positions start..stop-1 get logits: [B, stop - start, V].
        """
        c = self.config
        windows = {c.window_of(i) for i in range(c.num_layers)}
        masks, new_valid = attention_masks(token_mask, cache, windows)
        x = inputs_embeds.astype(jnp.float32)
        keys, values = [], []
        if self.scan_layers:
            x, keys, values = self._scan(x, positions, masks, cache)
        for i, layer in enumerate([] if self.scan_layers else self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.length)
            x, new_kv = layer(x, positions, masks[c.window_of(i)], layer_cache)
            if new_kv is not None:
                keys.append(new_kv[0])
                values.append(new_kv[1])
        if logits_span is not None:
            x = x[:, logits_span[0] : logits_span[1]]
        x = self.final_norm(x)
        if self.lm_head is None:
            table = self.embedding[...].astype(self.dtype)
            logits = jnp.einsum(
                "btd,vd->btv", x.astype(self.dtype), table, preferred_element_type=jnp.float32
            )
        else:
            logits = self.lm_head(x)
        if cache is None:
            return logits, None
        t = inputs_embeds.shape[1]
        return logits, KVCache(
            keys=tuple(keys), values=tuple(values), valid=new_valid, length=cache.length + t
        )

    def _scan(
        self, x_btd: jax.Array, positions: jax.Array, masks: dict, cache: KVCache | None
    ) -> tuple[jax.Array, list, list]:
        """The scanned layers: x [B, T, D] -> (x, new per-layer keys, values; empty without a cache).
        Each layer picks its sliding window's mask by index; a cache's per-layer arrays are stacked for
        the scan and split again after it (one copy of the cache per call)."""
        c = self.config
        windows = sorted({c.window_of(i) for i in range(c.num_layers)}, key=lambda w: -1 if w is None else w)
        mask_stack = jnp.stack([masks[w] for w in windows])
        which = jnp.asarray([windows.index(c.window_of(i)) for i in range(c.num_layers)])
        cached = None if cache is None else (jnp.stack(cache.keys), jnp.stack(cache.values))

        def body(layer: LlamaBlock, x: jax.Array, inputs: tuple) -> tuple[jax.Array, Any]:
            window, kv = inputs
            layer_cache = None if kv is None else (kv[0], kv[1], cache.length)
            return layer(x, positions, mask_stack[window], layer_cache)

        x_btd, new_kv = scan_layers(self.layers, body, x_btd, (which, cached), remat_policy=self.remat_policy)
        if new_kv is None:
            return x_btd, [], []
        return x_btd, list(new_kv[0]), list(new_kv[1])


# ---------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints.

_LAYER_NAMES = {
    "attention_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
    **{
        f"attention.{p}_proj.{leaf}": f"self_attn.{p}_proj.{hf}"
        for p in "qkvo"
        for leaf, hf in (("kernel", "weight"), ("bias", "bias"))
    },
    **{
        f"mlp.{p}_proj.{leaf}": f"mlp.{p}_proj.{hf}"
        for p in ("gate", "up", "down")
        for leaf, hf in (("kernel", "weight"), ("bias", "bias"))
    },
}
_TOP_NAMES = {
    "embedding": "model.embed_tokens.weight",
    "final_norm.scale": "model.norm.weight",
    "lm_head.kernel": "lm_head.weight",
}
# Buffers some older checkpoints store; nothing to load from them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _hf_name(path: tuple[str | int, ...]) -> str:
    if path[0] == "layers":
        return f"model.layers.{path[1]}." + _LAYER_NAMES[".".join(map(str, path[2:]))]
    return _TOP_NAMES[".".join(map(str, path))]


def llama_from_tensors(
    tensors: Mapping[str, np.ndarray],
    config: LlamaConfig,
    origin: str = "the checkpoint",
    *,
    strict: bool = True,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
) -> Llama:
    """A `Llama` built from HF-named tensors (`model.layers.{i}.self_attn.q_proj.weight`, ...); with
    `scan_layers`, its layers stored stacked (read per layer, then stacked on the host).

    Linear weights (out, in) are transposed to slit's (in, out) kernels. With tied embeddings, an
    `lm_head.weight` in the checkpoint is ignored. Raises UserError listing every missing, mis-shaped
    and (when `strict`) unused tensor.
    """
    source = loading.TensorSource(tensors, origin)
    source.mark_used(
        name
        for name in tensors
        if name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")
    )

    def build(scan: bool = False) -> Llama:
        return Llama(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, scan_layers=scan)

    params: dict[tuple[str | int, ...], Any] = {}
    names = {}
    for path, struct_ in loading.expected_shapes(build).items():
        name = names[path] = _hf_name(path)
        is_kernel = path[-1] == "kernel"  # nn.Linear stores (out, in)
        hf_shape = tuple(reversed(struct_.shape)) if is_kernel else struct_.shape
        value = source.take(name, hf_shape, ".".join(map(str, path)))
        params[path] = value.T if (value is not None and is_kernel) else value
    nested = traverse_util.unflatten_dict({p: v for p, v in params.items() if v is not None})
    return loading.build_frozen(
        build,
        nested,
        what="Llama-family LM",
        origin=origin,
        source=source,
        names=names,
        strict=strict,
        layout_build=(lambda: build(True)) if scan_layers else None,
    )


def llama_from_hf(
    directory: str | pathlib.Path,
    *,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
) -> Llama:
    """The frozen Llama-family LM of a HF checkpoint directory (config.json + safetensors).

    `param_dtype=jnp.bfloat16` keeps the frozen weights in bf16; `dtype` is the matmul input dtype;
    `scan_layers`: layers stored stacked and scanned (`Llama`).
    """
    hf_config, tensors = loading.read_hf_checkpoint(directory)
    config = llama_config_from_hf(hf_config, loading.read_generation_config(directory))
    return llama_from_tensors(
        tensors, config, str(directory), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers
    )
