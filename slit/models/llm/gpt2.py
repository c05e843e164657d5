"""GPT-2 (Pengi's LM) as a frozen decoder-only LM (the `DecoderOnlyLM` of base.py).

Architecture as in HF `GPT2LMHeadModel`: token embedding plus a learned absolute position embedding
(positions come in explicitly, so left-padded prompts get the right ones), pre-LayerNorm blocks of
multi-head causal self-attention and an MLP (`gelu_new`, the tanh GELU, unless the config names
another activation), a final LayerNorm, and an output layer tied to the token embedding (a separate
`lm_head` when `tie_word_embeddings` is false). Attention logits are scaled by 1/sqrt(E) (unless
`scale_attn_weights` is false) and by 1/(layer + 1) with `scale_attn_by_inverse_layer_idx`.

HF stores GPT-2's projections as `Conv1D` weights, already (in, out). The fused `c_attn` (D, 3D) is
kept as one kernel reshaped to (D, 3, D): [query | key | value] along the middle axis.

Precision as in llama.py: weights in `param_dtype`, matmul inputs in `dtype` with float32
accumulation; residual stream, LayerNorms, softmax and logits in float32.

Shapes: B batch, T inputs, S key slots, D width, H heads, E = D / H, F MLP width, P positions,
V vocabulary. Logical axes: `vocab`, `embed`, `heads`, `mlp`; the position table is (None, `embed`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Mapping
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
from slit.models.llm.llama import FrozenLinear, attention_masks, grouped_query_attention, update_cache_layer

__all__ = ["GPT2", "GPT2Config", "gpt2_config_from_hf", "gpt2_from_hf", "gpt2_from_tensors"]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of a GPT-2 checkpoint (see `gpt2_config_from_hf`). Defaults are GPT-2 small."""

    vocab_size: int = 50257
    max_positions: int = 1024
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    token_ids: TokenIds = TokenIds(bos=50256, eos=(50256,), pad=None)


def gpt2_config_from_hf(
    hf: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
) -> GPT2Config:
    """`GPT2Config` from a config.json dict (model_type gpt2). UserError for what slit does not implement."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"config.json: model_type {hf.get('model_type')!r} is not 'gpt2'")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise UserError(
            f"config.json: activation_function={activation!r} is not supported; slit implements "
            f"{sorted(_ACTIVATIONS)}"
        )
    if hf.get("add_cross_attention"):
        raise UserError(
            "config.json: add_cross_attention=true (GPT-2 as a decoder with cross-attention) is not supported"
        )
    try:
        hidden = int(hf["n_embd"])
        return GPT2Config(
            vocab_size=int(hf["vocab_size"]),
            max_positions=int(hf["n_positions"]),
            hidden_size=hidden,
            num_layers=int(hf["n_layer"]),
            num_heads=int(hf["n_head"]),
            mlp_dim=int(hf.get("n_inner") or 4 * hidden),
            activation=activation,
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            token_ids=loading.token_ids_from_config(hf, generation_config),
        )
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}, which a gpt2 config must have") from None


class FrozenLayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32; frozen `scale` and `bias` stored in `param_dtype`."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs, param_dtype: DTypeLike = jnp.float32):
        self.eps = eps
        self.scale = weight(Frozen, ones, rngs, (features,), ("embed",), param_dtype)
        self.bias = weight(Frozen, zeros, rngs, (features,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., D) -> float32 (..., D)."""
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class GPT2Attention(nnx.Module):
    def __init__(
        self, c: GPT2Config, layer: int, *, rngs: nnx.Rngs, dtype: DTypeLike, param_dtype: DTypeLike
    ):
        d = c.hidden_size
        self.dtype, self.num_heads = dtype, c.num_heads
        self.scale = (1.0 / math.sqrt(d // c.num_heads) if c.scale_attn_weights else 1.0) / (
            layer + 1.0 if c.scale_attn_by_inverse_layer_idx else 1.0
        )
        self.qkv_kernel = weight(Frozen, normal(), rngs, (d, 3, d), ("embed", None, "heads"), param_dtype)
        self.qkv_bias = weight(Frozen, zeros, rngs, (3, d), (None, "heads"), param_dtype)
        self.out = FrozenLinear(
            d, d, axes=("heads", "embed"), use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(
        self, x_btd: jax.Array, mask_bts: jax.Array, layer_cache: tuple[jax.Array, ...] | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D] -> ([B, T, D] float32, updated (keys, values) or None); layer_cache: (k, v, length)."""
        b, t, d = x_btd.shape
        qkv = jnp.einsum(
            "btd,dcf->btcf",
            x_btd.astype(self.dtype),
            self.qkv_kernel[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        ) + self.qkv_bias[...].astype(jnp.float32)
        q, k, v = (qkv[:, :, i].reshape(b, t, self.num_heads, d // self.num_heads) for i in range(3))
        new_kv = None
        if layer_cache is not None:
            new_kv = update_cache_layer(*layer_cache, k, v)
            k, v = new_kv
        return self.out(grouped_query_attention(q, k, v, mask_bts, self.dtype, self.scale)), new_kv


class GPT2Block(nnx.Module):
    def __init__(
        self, c: GPT2Config, layer: int, *, rngs: nnx.Rngs, dtype: DTypeLike, param_dtype: DTypeLike
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.activation = c.activation
        self.attention_norm = FrozenLayerNorm(
            c.hidden_size, eps=c.layer_norm_eps, rngs=rngs, param_dtype=param_dtype
        )
        self.attention = GPT2Attention(c, layer, **kw)
        self.mlp_norm = FrozenLayerNorm(
            c.hidden_size, eps=c.layer_norm_eps, rngs=rngs, param_dtype=param_dtype
        )
        self.fc = FrozenLinear(c.hidden_size, c.mlp_dim, axes=("embed", "mlp"), use_bias=True, **kw)
        self.proj = FrozenLinear(c.mlp_dim, c.hidden_size, axes=("mlp", "embed"), use_bias=True, **kw)

    def __call__(self, x_btd: jax.Array, mask_bts: jax.Array, layer_cache: Any) -> tuple[jax.Array, Any]:
        attended, new_kv = self.attention(self.attention_norm(x_btd), mask_bts, layer_cache)
        x_btd = x_btd + attended
        return x_btd + self.proj(_ACTIVATIONS[self.activation](self.fc(self.mlp_norm(x_btd)))), new_kv


class GPT2(nnx.Module):
    """A frozen GPT-2; implements `slit.models.llm.base.DecoderOnlyLM`."""

    def __init__(
        self,
        config: GPT2Config,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        scan_layers: bool = False,
    ):
        """scan_layers: layers stored stacked and run by one `jax.lax.scan` (as `Llama`'s); refused with
        `scale_attn_by_inverse_layer_idx`, whose layers differ by a constant."""
        c = self.config = config
        if scan_layers and c.scale_attn_by_inverse_layer_idx:
            raise UserError(
                "llm.scan_layers: this GPT-2 scales attention by 1/(layer + 1) "
                "(scale_attn_by_inverse_layer_idx), so its layers differ; run it with scan_layers=false"
            )
        self.vocab_size, self.hidden_size, self.token_ids = c.vocab_size, c.hidden_size, c.token_ids
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat_policy = "none"  # of the scanned layers (set by slit.models.stage2.rematerialised_layers)
        d = c.hidden_size
        self.token_embedding = weight(
            Frozen, normal(), rngs, (c.vocab_size, d), ("vocab", "embed"), param_dtype
        )
        self.position_embedding = weight(
            Frozen, normal(0.01), rngs, (c.max_positions, d), (None, "embed"), param_dtype
        )
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        layers = [GPT2Block(c, i, **kw) for i in range(c.num_layers)]
        self.layers = stack_layers(layers) if scan_layers else nnx.List(layers)
        self.final_norm = FrozenLayerNorm(d, eps=c.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = (
            None if c.tie_word_embeddings else FrozenLinear(d, c.vocab_size, axes=("embed", "vocab"), **kw)
        )

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """int32 [B, T] -> [B, T, D] in `dtype`: token embeddings only (positions are added in `__call__`)."""
        return jnp.take(self.token_embedding[...], token_ids, axis=0).astype(self.dtype)

    def init_cache(self, batch_size: int, max_length: int, dtype: DTypeLike = jnp.float32) -> KVCache:
        c = self.config
        return KVCache.zeros(
            c.num_layers, batch_size, max_length, c.num_heads, c.hidden_size // c.num_heads, dtype
        )

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        token_mask: jax.Array,
        cache: KVCache | None = None,
        logits_span: tuple[int, int] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, T, D], positions int32 [B, T] (< P), token_mask bool [B, T] -> logits [B, T, V].

        Logits are float32; the cache (when given) comes back with the T inputs written. With
        `logits_span=(start, stop)` only positions start..stop-1 get logits: [B, stop - start, V].
        """
        masks, new_valid = attention_masks(token_mask, cache, {None})
        position_table = self.position_embedding[...].astype(jnp.float32)
        x = inputs_embeds.astype(jnp.float32) + jnp.take(position_table, positions, axis=0)
        keys, values = [], []
        if self.scan_layers:
            cached = None if cache is None else (jnp.stack(cache.keys), jnp.stack(cache.values))

            def body(layer: GPT2Block, x: jax.Array, kv: Any) -> tuple[jax.Array, Any]:  # noqa: ANN401
                return layer(x, masks[None], None if kv is None else (kv[0], kv[1], cache.length))

            x, new_kv = scan_layers(self.layers, body, x, cached, remat_policy=self.remat_policy)
            if new_kv is not None:
                keys, values = list(new_kv[0]), list(new_kv[1])
        for i, layer in enumerate([] if self.scan_layers else self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.length)
            x, new_kv = layer(x, masks[None], layer_cache)
            if new_kv is not None:
                keys.append(new_kv[0])
                values.append(new_kv[1])
        if logits_span is not None:
            x = x[:, logits_span[0] : logits_span[1]]
        x = self.final_norm(x)
        if self.lm_head is None:
            table = self.token_embedding[...].astype(self.dtype)
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


# ---------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints.

_LAYER_NAMES = {
    "attention_norm.scale": "ln_1.weight",
    "attention_norm.bias": "ln_1.bias",
    "attention.qkv_kernel": "attn.c_attn.weight",
    "attention.qkv_bias": "attn.c_attn.bias",
    "attention.out.kernel": "attn.c_proj.weight",
    "attention.out.bias": "attn.c_proj.bias",
    "mlp_norm.scale": "ln_2.weight",
    "mlp_norm.bias": "ln_2.bias",
    "fc.kernel": "mlp.c_fc.weight",
    "fc.bias": "mlp.c_fc.bias",
    "proj.kernel": "mlp.c_proj.weight",
    "proj.bias": "mlp.c_proj.bias",
}
_TOP_NAMES = {
    "token_embedding": "wte.weight",
    "position_embedding": "wpe.weight",
    "final_norm.scale": "ln_f.weight",
    "final_norm.bias": "ln_f.bias",
}
# Causal-mask buffers older checkpoints store; nothing to load from them.
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")


def _hf_name(path: tuple[str | int, ...], prefix: str) -> str:
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    if path[0] == "layers":
        return f"{prefix}h.{path[1]}." + _LAYER_NAMES[".".join(map(str, path[2:]))]
    return prefix + _TOP_NAMES[".".join(map(str, path))]


def _hf_shape(path: tuple[str | int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of a slit weight: Conv1D weights are (in, out) like slit's; c_attn is fused."""
    if path[-1] == "qkv_kernel":
        return (shape[0], shape[1] * shape[2])
    if path[-1] == "qkv_bias":
        return (shape[0] * shape[1],)
    if path == ("lm_head", "kernel"):  # nn.Linear: (out, in)
        return (shape[1], shape[0])
    return shape


def gpt2_from_tensors(
    tensors: Mapping[str, np.ndarray],
    config: GPT2Config,
    origin: str = "the checkpoint",
    *,
    strict: bool = True,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
) -> GPT2:
    """A `GPT2` (layers stacked with `scan_layers`) from HF-named tensors:
    `transformer.h.{i}.attn.c_attn.weight`, ... (or without the
    `transformer.` prefix, as the original GPT-2 checkpoints have them).

    Raises UserError listing every missing, mis-shaped and (when `strict`) unused tensor.
    """
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""
    source = loading.TensorSource(tensors, origin)
    source.mark_used(
        name
        for name in tensors
        if name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")
    )

    def build(scan: bool = False) -> GPT2:
        return GPT2(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, scan_layers=scan)

    params, names = {}, {}
    for path, struct_ in loading.expected_shapes(build).items():
        name = names[path] = _hf_name(path, prefix)
        value = source.take(name, _hf_shape(path, tuple(struct_.shape)), ".".join(map(str, path)))
        if value is not None:
            params[path] = value.T if path == ("lm_head", "kernel") else value.reshape(struct_.shape)
    return loading.build_frozen(
        build,
        traverse_util.unflatten_dict(params),
        what="GPT-2",
        origin=origin,
        source=source,
        names=names,
        strict=strict,
        layout_build=(lambda: build(True)) if scan_layers else None,
    )


def gpt2_from_hf(
    directory: str | pathlib.Path,
    *,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
) -> GPT2:
    """The frozen GPT-2 of a HF checkpoint directory (config.json + safetensors)."""
    hf_config, tensors = loading.read_hf_checkpoint(directory)
    config = gpt2_config_from_hf(hf_config, loading.read_generation_config(directory))
    return gpt2_from_tensors(
        tensors, config, str(directory), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers
    )
