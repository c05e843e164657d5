"""T5 / Flan-T5 as a frozen encoder-decoder LLM (the `EncoderDecoderLM` of base.py).

Architecture as in Raffel et al. 2020 and HF `T5ForConditionalGeneration`:
- one shared token embedding for the encoder and the decoder, no embedding scaling;
- pre-norm residual blocks with T5's RMS LayerNorm (no mean, no bias, statistics in float32);
- attention without the 1/sqrt(d) scaling (T5 folds it into the initialisation), plus a learned
  relative position bias: bucketed `key_position - query_position` -> one bias per head, owned by
  the first layer of each stack and shared by all of its layers; bidirectional buckets in the
  encoder, causal ones in the decoder; cross-attention has no position bias;
- feed-forward `relu` (T5 v1.0: wi -> relu -> wo) or gated (T5 v1.1 / Flan-T5 `gated-gelu`:
  act(wi_0) * wi_1 -> wo, with the tanh GELU);
- output layer: the shared embedding with the decoder output scaled by d_model**-0.5 (T5 v1.0,
  tied) or a separate `lm_head` without rescaling (T5 v1.1 / Flan-T5).

Shapes: B batch, S_enc encoder length, T decoder inputs, S cache slots, D d_model, H heads,
D_h d_kv, F d_ff, V vocabulary.

Every weight is a `Frozen` variable. Load a checkpoint directory with `t5_from_hf`. Weights may be
stored in bfloat16 (`param_dtype`); matmuls take their inputs in `dtype` (float32 by default),
while the residual stream, the norms, the attention logits and softmax, and the output logits
stay float32.

Cross-attention keys/values depend only on the encoder output: `cross_attention_cache(encoder_out)`
computes them once, and `decode` accepts the result in place of `encoder_out`. Given the plain
encoder output, `decode` recomputes them on every call, which costs 4 * B * S_enc * D * H * D_h
FLOPs per decoder layer per call (for Flan-T5-XL and S_enc = 64, about 9x what the layer spends
on decoding one token).
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
from flax import nnx, struct, traverse_util
from jax.typing import DTypeLike

from slit.errors import UserError
from slit.models.layers import (
    Dense,
    Embed,
    Frozen,
    compute_dtype_scope,
    merge_heads,
    normal,
    ones,
    scan_layers,
    split_heads,
    stack_layers,
    weight,
)
from slit.models.llm import loading
from slit.models.llm.base import KVCache, TokenIds

__all__ = [
    "CrossAttentionCache",
    "T5",
    "T5Config",
    "relative_position_bucket",
    "t5_config_from_hf",
    "t5_from_hf",
    "t5_from_tensors",
]

# Activation names as transformers' ACT2FN spells them -> functions.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes and switches of a T5 checkpoint (see `t5_config_from_hf`). Defaults are t5-small (T5 v1.0)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (T5 v1.1, Flan-T5), "gated-silu", ...
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True  # output layer = the shared embedding (else a separate lm_head)
    scale_decoder_outputs: bool = True  # decoder output * d_model**-0.5 before the output layer
    token_ids: TokenIds = TokenIds(bos=None, eos=(1,), pad=0, decoder_start=0)

    def __post_init__(self):
        proj = self.feed_forward_proj.split("-")
        if len(proj) > 2 or (len(proj) == 2 and proj[0] != "gated") or self.activation not in _ACTIVATIONS:
            raise UserError(
                f"config.json: feed_forward_proj {self.feed_forward_proj!r} is not supported; "
                f"expected 'ACT' or 'gated-ACT' with ACT one of {sorted(_ACTIVATIONS)}"
            )

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        """The transformers name of the feed-forward activation (`gated-gelu` means the tanh GELU)."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


def t5_config_from_hf(hf: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None) -> T5Config:
    """`T5Config` from a T5 / Flan-T5 config.json dict (and generation_config.json, whose ids win).

    Follows transformers 5: the decoder output is rescaled when `scale_decoder_outputs` says so,
    else when `tie_word_embeddings` is not false (no flag means tied, as in t5-small's config).
    T5 has no BOS; the decoder starts with `decoder_start_token_id` (the pad id when absent).

    Raises UserError for a missing hyperparameter or an unsupported `feed_forward_proj`.
    """
    generation_config = generation_config or {}
    try:
        tied = hf.get("tie_word_embeddings", True) is not False
        token_ids = loading.token_ids_from_config(hf, generation_config)
        pad = 0 if token_ids.pad is None else token_ids.pad
        start = generation_config.get("decoder_start_token_id", hf.get("decoder_start_token_id"))
        return T5Config(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["d_model"]),
            d_kv=int(hf["d_kv"]),
            d_ff=int(hf["d_ff"]),
            num_layers=int(hf["num_layers"]),
            num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
            num_heads=int(hf["num_heads"]),
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            feed_forward_proj=str(hf.get("feed_forward_proj", "relu")),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
            tie_word_embeddings=tied,
            scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", tied)),
            token_ids=TokenIds(
                bos=None,
                eos=token_ids.eos or (1,),
                pad=pad,
                decoder_start=pad if start is None else int(start),
            ),
        )
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}, which a T5 config must have") from None


@struct.dataclass
class CrossAttentionCache:
    """Cross-attention keys and values of every decoder layer, computed once from the encoder output.

    keys, values: one [B, S_enc, H, D_h] array per decoder layer.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of `key_position - query_position` (int array, any shape) -> int32 in [0, num_buckets).

    Half of the buckets (per direction when bidirectional) hold exact distances, the other half
    logarithmically wider ranges up to `max_distance`; farther distances share the last bucket. The
    causal (decoder) form maps every key after the query to bucket 0.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    scaled = log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    if_large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, if_large)


class RMSNorm(nnx.Module):
    """T5's LayerNorm: x / sqrt(mean(x^2) + eps) * scale, no mean, no bias; statistics in float32."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = weight(Frozen, ones, rngs, (features,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., D) -> (..., D) float32."""
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return x32 * jax.lax.rsqrt(variance + self.eps) * self.scale[...].astype(jnp.float32)


class RelativePositionBias(nnx.Module):
    """Learned bias per (relative-position bucket, head), [num_buckets, H]."""

    def __init__(self, c: T5Config, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets = c.relative_attention_num_buckets
        self.max_distance = c.relative_attention_max_distance
        self.embedding = weight(
            Frozen,
            normal(c.d_model**-0.5),
            rngs,
            (c.relative_attention_num_buckets, c.num_heads),
            (None, "heads"),
        )

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """query_positions [B|1, Q], key_positions [B|1, K] int -> float32 bias [B|1, H, Q, K]."""
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        bucket = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias_bqkh = jnp.take(self.embedding[...].astype(jnp.float32), bucket, axis=0)
        return bias_bqkh.transpose(0, 3, 1, 2)


def _attend(
    q_bqhd: jax.Array, k_bkhd: jax.Array, v_bkhd: jax.Array, bias_bhqk: jax.Array | None, mask_bqk: jax.Array
) -> jax.Array:
    """Unscaled attention with an additive bias; logits and softmax in float32 -> [B, Q, H, D_h]."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q_bqhd, k_bkhd, preferred_element_type=jnp.float32)
    if bias_bhqk is not None:
        logits = logits + bias_bhqk
    logits = jnp.where(mask_bqk[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_bkhd.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v_bkhd)


class T5Attention(nnx.Module):
    """Projections q, k, v: D -> H * D_h and o: H * D_h -> D, no biases."""

    def __init__(self, c: T5Config, *, rngs: nnx.Rngs):
        inner = c.num_heads * c.d_kv
        frozen = dict(rngs=rngs, param_type=Frozen, use_bias=False)
        self.num_heads = c.num_heads
        self.q = Dense(
            c.d_model,
            inner,
            axes=("embed", "heads"),
            kernel_init=normal((c.d_model * c.d_kv) ** -0.5),
            **frozen,
        )
        self.k = Dense(
            c.d_model, inner, axes=("embed", "heads"), kernel_init=normal(c.d_model**-0.5), **frozen
        )
        self.v = Dense(
            c.d_model, inner, axes=("embed", "heads"), kernel_init=normal(c.d_model**-0.5), **frozen
        )
        self.o = Dense(inner, c.d_model, axes=("heads", "embed"), kernel_init=normal(inner**-0.5), **frozen)

    def keys_values(self, x_bsd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, S, D] -> keys, values [B, S, H, D_h]."""
        return split_heads(self.k(x_bsd), self.num_heads), split_heads(self.v(x_bsd), self.num_heads)

    def __call__(
        self,
        x_bqd: jax.Array,
        k_bkhd: jax.Array,
        v_bkhd: jax.Array,
        bias_bhqk: jax.Array | None,
        mask_bqk: jax.Array,
    ) -> jax.Array:
        """Queries from x [B, Q, D] attend to the given keys/values -> [B, Q, D] (x's dtype)."""
        q = split_heads(self.q(x_bqd), self.num_heads)
        out = _attend(q, k_bkhd.astype(x_bqd.dtype), v_bkhd.astype(x_bqd.dtype), bias_bhqk, mask_bqk)
        return self.o(merge_heads(out))


class T5FeedForward(nnx.Module):
    """wi -> act -> wo (v1.0), or act(wi_0) * wi_1 -> wo (gated, v1.1 / Flan-T5); no biases."""

    def __init__(self, c: T5Config, *, rngs: nnx.Rngs):
        frozen = dict(rngs=rngs, param_type=Frozen, use_bias=False)
        in_init = normal(c.d_model**-0.5)
        self.activation = c.activation
        if c.is_gated:
            self.wi_0 = Dense(c.d_model, c.d_ff, axes=("embed", "mlp"), kernel_init=in_init, **frozen)
            self.wi_1 = Dense(c.d_model, c.d_ff, axes=("embed", "mlp"), kernel_init=in_init, **frozen)
        else:
            self.wi = Dense(c.d_model, c.d_ff, axes=("embed", "mlp"), kernel_init=in_init, **frozen)
        self.wo = Dense(c.d_ff, c.d_model, axes=("mlp", "embed"), kernel_init=normal(c.d_ff**-0.5), **frozen)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        act = _ACTIVATIONS[self.activation]
        if hasattr(self, "wi_0"):
            hidden = act(self.wi_0(x_btd)) * self.wi_1(x_btd)
        else:
            hidden = act(self.wi(x_btd))
        return self.wo(hidden)


class T5EncoderLayer(nnx.Module):
    """Pre-norm bidirectional self-attention, then pre-norm feed-forward, each with a residual."""

    def __init__(self, c: T5Config, *, rngs: nnx.Rngs):
        self.self_attention_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, rngs=rngs)
        self.self_attention = T5Attention(c, rngs=rngs)
        self.ffn_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, rngs=rngs)
        self.ffn = T5FeedForward(c, rngs=rngs)

    def __call__(
        self, x_bsd: jax.Array, bias_bhss: jax.Array, mask_bss: jax.Array, dtype: DTypeLike
    ) -> jax.Array:
        """Residual stream [B, S, D] float32 -> [B, S, D] float32."""
        h = self.self_attention_norm(x_bsd).astype(dtype)
        k, v = self.self_attention.keys_values(h)
        x_bsd = x_bsd + self.self_attention(h, k, v, bias_bhss, mask_bss).astype(jnp.float32)
        return x_bsd + self.ffn(self.ffn_norm(x_bsd).astype(dtype)).astype(jnp.float32)


class T5DecoderLayer(nnx.Module):
    """Pre-norm causal self-attention, pre-norm cross-attention, pre-norm feed-forward."""

    def __init__(self, c: T5Config, *, rngs: nnx.Rngs):
        self.self_attention_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, rngs=rngs)
        self.self_attention = T5Attention(c, rngs=rngs)
        self.cross_attention_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, rngs=rngs)
        self.cross_attention = T5Attention(c, rngs=rngs)
        self.ffn_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, rngs=rngs)
        self.ffn = T5FeedForward(c, rngs=rngs)


class T5(nnx.Module):
    """T5 / Flan-T5 with frozen weights, implementing `EncoderDecoderLM` (see base.py).

    Build it from a checkpoint with `t5_from_hf`; `T5(config, rngs=...)` gives random weights
    (T5's initialisation) for tests and shapes.
    """

    def __init__(
        self, config: T5Config, *, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32, scan_layers: bool = False
    ):
        """scan_layers: the encoder's and the decoder's layers stored stacked, each stack run by one
        `jax.lax.scan` (see `slit.models.layers.stack_layers`); same weights from the same `rngs`.
        dtype: the matmul input dtype (bfloat16: float32 accumulation and outputs)."""
        c = config
        self.config = c
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat_policy = "none"  # of the scanned layers (set by slit.models.stage2.rematerialised_layers)
        self.vocab_size = c.vocab_size
        self.hidden_size = c.d_model
        self.token_ids = c.token_ids
        self.shared = Embed(
            c.vocab_size, c.d_model, axes=("vocab", "embed"), rngs=rngs, param_type=Frozen, init=normal(1.0)
        )
        self.encoder_position_bias = RelativePositionBias(c, bidirectional=True, rngs=rngs)
        stack = stack_layers if scan_layers else nnx.List
        self.encoder_layers = stack([T5EncoderLayer(c, rngs=rngs) for _ in range(c.num_layers)])
        self.encoder_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, rngs=rngs)
        self.decoder_position_bias = RelativePositionBias(c, bidirectional=False, rngs=rngs)
        self.decoder_layers = stack([T5DecoderLayer(c, rngs=rngs) for _ in range(c.num_decoder_layers)])
        self.decoder_norm = RMSNorm(c.d_model, eps=c.layer_norm_epsilon, rngs=rngs)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(
                c.d_model,
                c.vocab_size,
                axes=("embed", "vocab"),
                rngs=rngs,
                param_type=Frozen,
                use_bias=False,
                kernel_init=normal(1.0),
            )

    # --- EncoderDecoderLM -------------------------------------------------------------------------

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """int32 [B, T] -> float32 [B, T, D]: rows of the shared embedding (T5 does not scale them)."""
        return self.shared(token_ids).astype(jnp.float32)

    def encode(self, inputs_embeds: jax.Array, token_mask: jax.Array) -> jax.Array:
        """inputs_embeds [B, S_enc, D], token_mask bool [B, S_enc] -> float32 encoder output [B, S_enc, D].

        Padded positions are never attended to (their own outputs are computed but meaningless).
        Relative positions are index differences, so padding may be on either side.
        """
        with compute_dtype_scope(self.dtype):
            return self._encode(inputs_embeds, token_mask)

    def _encode(self, inputs_embeds: jax.Array, token_mask: jax.Array) -> jax.Array:
        x = inputs_embeds.astype(jnp.float32)
        positions = jnp.arange(x.shape[1])[None]
        bias = self.encoder_position_bias(positions, positions)
        mask = jnp.broadcast_to(token_mask[:, None, :].astype(bool), (x.shape[0], x.shape[1], x.shape[1]))
        if self.scan_layers:
            x, _ = scan_layers(
                self.encoder_layers,
                lambda layer, x, _: (layer(x, bias, mask, self.dtype), None),
                x,
                remat_policy=self.remat_policy,
            )
            return self.encoder_norm(x)
        for layer in self.encoder_layers:
            x = layer(x, bias, mask, self.dtype)
        return self.encoder_norm(x)

    def cross_attention_cache(self, encoder_out: jax.Array) -> CrossAttentionCache:
        """Encoder output [B, S_enc, D] -> every decoder layer's cross-attention keys/values, for `decode`."""
        h = encoder_out.astype(self.dtype)
        if self.scan_layers:
            _, (keys, values) = scan_layers(
                self.decoder_layers, lambda layer, c, _: (c, layer.cross_attention.keys_values(h)), None
            )
            return CrossAttentionCache(keys=tuple(keys), values=tuple(values))
        kv = [layer.cross_attention.keys_values(h) for layer in self.decoder_layers]
        return CrossAttentionCache(keys=tuple(k for k, _ in kv), values=tuple(v for _, v in kv))

    def decode(
        self,
        decoder_token_ids: jax.Array,
        positions: jax.Array,
        encoder_out: jax.Array | CrossAttentionCache,
        encoder_mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """decoder_token_ids int32 [B, T], positions int32 [B, T] -> logits float32 [B, T, V], cache.

        encoder_out: the encoder output [B, S_enc, D], or `cross_attention_cache(encoder_out)` to
          skip recomputing the cross-attention keys/values on every call.
        encoder_mask: bool [B, S_enc], False for padded encoder positions.
        cache: without one, the T inputs attend causally among themselves, with relative positions
          `positions[key] - positions[query]`. With one, they are written to slots
          [length, length + T) (the caller keeps length + T <= max_length) and each attends to the
          valid slots at or before its own; a cached slot s of row b has position
          s + positions[b, 0] - length (positions advance by one per slot, as when decoding from
          slot 0). All new slots are valid (T5's decoder inputs are never padded).
        """
        with compute_dtype_scope(self.dtype):
            return self._decode(decoder_token_ids, positions, encoder_out, encoder_mask, cache)

    def _decode(
        self,
        decoder_token_ids: jax.Array,
        positions: jax.Array,
        encoder_out: jax.Array | CrossAttentionCache,
        encoder_mask: jax.Array,
        cache: KVCache | None,
    ) -> tuple[jax.Array, KVCache | None]:
        b, t = decoder_token_ids.shape
        x = self.embed(decoder_token_ids)
        positions = jnp.asarray(positions, jnp.int32)
        if isinstance(encoder_out, CrossAttentionCache):
            cross = encoder_out
        else:
            cross = self.cross_attention_cache(encoder_out)
        cross_mask = jnp.broadcast_to(encoder_mask[:, None, :].astype(bool), (b, t, encoder_mask.shape[1]))

        if cache is None:
            key_positions = positions
            self_mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        else:
            slots = jnp.arange(cache.max_length)
            query_slots = cache.length + jnp.arange(t)
            key_positions = slots[None, :] + (positions[:, :1] - cache.length)
            new = (slots >= cache.length) & (slots < cache.length + t)
            valid = cache.valid | new[None, :]
            self_mask = valid[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])
        bias = self.decoder_position_bias(positions, key_positions)

        def run_layer(layer: T5DecoderLayer, x: jax.Array, inputs: tuple) -> tuple[jax.Array, Any]:
            """One decoder layer; inputs: (cached keys, values or None, cross keys, cross values)."""
            cache_k, cache_v, cross_k, cross_v = inputs
            h = layer.self_attention_norm(x).astype(self.dtype)
            k, v = layer.self_attention.keys_values(h)
            if cache_k is not None:
                k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), cache.length, 1)
                v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), cache.length, 1)
            x = x + layer.self_attention(h, k, v, bias, self_mask).astype(jnp.float32)
            h = layer.cross_attention_norm(x).astype(self.dtype)
            x = x + layer.cross_attention(h, cross_k, cross_v, None, cross_mask).astype(jnp.float32)
            x = x + layer.ffn(layer.ffn_norm(x).astype(self.dtype)).astype(jnp.float32)
            return x, (None if cache_k is None else (k, v))

        new_keys, new_values = [], []
        if self.scan_layers:
            cached = (None, None) if cache is None else (jnp.stack(cache.keys), jnp.stack(cache.values))
            xs = (*cached, jnp.stack(cross.keys), jnp.stack(cross.values))
            x, new_kv = scan_layers(self.decoder_layers, run_layer, x, xs, remat_policy=self.remat_policy)
            if new_kv is not None:
                new_keys, new_values = list(new_kv[0]), list(new_kv[1])
        for i, layer in enumerate([] if self.scan_layers else self.decoder_layers):
            cached = (None, None) if cache is None else (cache.keys[i], cache.values[i])
            x, new_kv = run_layer(layer, x, (*cached, cross.keys[i], cross.values[i]))
            if new_kv is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])

        logits = self._logits(self.decoder_norm(x))
        if cache is None:
            return logits, None
        return logits, KVCache(
            keys=tuple(new_keys), values=tuple(new_values), valid=valid, length=cache.length + t
        )

    def init_cache(self, batch_size: int, max_length: int, dtype: DTypeLike = jnp.float32) -> KVCache:
        """An empty self-attention cache: per decoder layer [batch_size, max_length, H, D_h]."""
        c = self.config
        return KVCache.zeros(c.num_decoder_layers, batch_size, max_length, c.num_heads, c.d_kv, dtype)

    # --- helpers ------------------------------------------------------------------------------------

    def _logits(self, x_btd: jax.Array) -> jax.Array:
        """Final decoder states float32 [B, T, D] -> float32 logits [B, T, V]."""
        if self.config.scale_decoder_outputs:
            x_btd = x_btd * self.config.d_model**-0.5
        x = x_btd.astype(self.dtype)
        if self.config.tie_word_embeddings:
            table = self.shared.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)
        kernel = self.lm_head.kernel[...].astype(self.dtype)
        return jnp.einsum("btd,dv->btv", x, kernel, preferred_element_type=jnp.float32)


# -------------------------------------------------------------------------------------------------
# Hugging Face checkpoint -> slit.

# Copies of `shared.weight` that old checkpoints carry, and a tensor transformers itself ignores.
_IGNORED_TENSORS = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)
_HF_BLOCKS = {
    "self_attention": "SelfAttention",
    "cross_attention": "EncDecAttention",
    "ffn": "DenseReluDense",
}


def _hf_name(path: tuple[str | int, ...]) -> str:
    """slit variable path -> HF tensor name, e.g. ("decoder_layers", 1, "cross_attention", "q", "kernel")
    -> "decoder.block.1.layer.1.EncDecAttention.q.weight"."""
    top = {
        ("shared", "embedding"): "shared.weight",
        ("lm_head", "kernel"): "lm_head.weight",
        ("encoder_norm", "scale"): "encoder.final_layer_norm.weight",
        ("decoder_norm", "scale"): "decoder.final_layer_norm.weight",
    }
    if path in top:
        return top[path]
    stack = str(path[0]).split("_")[0]  # "encoder" or "decoder"
    if path[1:] == ("embedding",):  # {encoder,decoder}_position_bias: owned by the first block
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    _, index, module, *rest = path
    blocks = ["self_attention", "ffn"] if stack == "encoder" else ["self_attention", "cross_attention", "ffn"]
    block = module.removesuffix("_norm")
    prefix = f"{stack}.block.{index}.layer.{blocks.index(block)}."
    if module.endswith("_norm"):
        return prefix + "layer_norm.weight"
    return prefix + f"{_HF_BLOCKS[block]}.{rest[0]}.weight"


def t5_from_tensors(
    tensors: Mapping[str, np.ndarray],
    config: T5Config,
    origin: str = "the checkpoint",
    *,
    strict: bool = True,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
) -> T5:
    """A frozen `T5` built from HF `T5ForConditionalGeneration` tensors (layers stacked with
    `scan_layers`).

    tensors: `shared.weight` [V, D]; `{encoder,decoder}.block.{i}.layer.{j}.{SelfAttention,
      EncDecAttention}.{q,k,v,o}.weight` [out, in]; `...DenseReluDense.{wi | wi_0, wi_1, wo}.weight`
      [out, in]; `...layer_norm.weight` [D]; `{encoder,decoder}.final_layer_norm.weight` [D];
      `{encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight` [buckets, H];
      `lm_head.weight` [V, D] for a separate output layer. Linear weights are transposed to slit's
      (in, out) kernels. Copies of the shared embedding (`*.embed_tokens.weight`) are ignored.

    As transformers 5 does, an `lm_head.weight` that differs from `shared.weight` is used as a
    separate output layer even when `config` says tied (transformers 5 writes untied models so);
    the decoder-output rescale stays as `config` says. Weights are stored in `param_dtype` (e.g.
    jnp.bfloat16); matmuls take their inputs in `dtype`.

    Raises:
      UserError: listing every missing and mis-shaped tensor and (when `strict`) every unused one.
    """
    if config.tie_word_embeddings and "lm_head.weight" in tensors and "shared.weight" in tensors:
        if not np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["shared.weight"])):
            config = dataclasses.replace(config, tie_word_embeddings=False)
    source = loading.TensorSource(tensors, origin)
    ignored = _IGNORED_TENSORS + (("lm_head.weight",) if config.tie_word_embeddings else ())
    source.mark_used(name for name in tensors if name in ignored)

    def build(scan: bool = False) -> T5:
        return T5(config, rngs=nnx.Rngs(0), dtype=dtype, scan_layers=scan)

    params: dict[tuple[str | int, ...], Any] = {}
    names = {}
    for path, struct_ in loading.expected_shapes(build).items():
        name = names[path] = _hf_name(path)
        is_kernel = path[-1] == "kernel"  # nn.Linear stores (out, in)
        hf_shape = tuple(reversed(struct_.shape)) if is_kernel else struct_.shape
        value = source.take(name, hf_shape, ".".join(map(str, path)))
        params[path] = value.T if (value is not None and is_kernel) else value
    nested = traverse_util.unflatten_dict({p: v for p, v in params.items() if v is not None})
    what = (
        f"T5 ({config.num_layers} encoder / {config.num_decoder_layers} decoder layers, "
        f"feed_forward_proj {config.feed_forward_proj!r}, "
        f"{'tied' if config.tie_word_embeddings else 'separate'} output layer)"
    )
    return loading.build_frozen(
        build,
        nested,
        what=what,
        origin=origin,
        source=source,
        names=names,
        dtype=param_dtype,
        strict=strict,
        layout_build=(lambda: build(True)) if scan_layers else None,
    )


def t5_from_hf(
    directory: str | pathlib.Path,
    *,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
) -> T5:
    """The frozen T5 / Flan-T5 of a HF checkpoint directory (config.json + safetensors, sharded or not).

    `param_dtype=jnp.bfloat16` keeps the frozen weights in bf16; `dtype` is the matmul input dtype.
    """
    hf_config, tensors = loading.read_hf_checkpoint(directory)
    config = t5_config_from_hf(hf_config, loading.read_generation_config(directory))
    return t5_from_tensors(
        tensors, config, str(directory), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers
    )
