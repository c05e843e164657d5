"""The BLIP-2 Q-Former: a BERT whose learned queries cross-attend to a frozen encoder.

Follows salesforce/LAVIS `lavis/models/blip2_models/Qformer.py` and `blip2.py` (BLIP-2, arXiv 2301.12597):
- `num_queries` learned query tokens, no position embeddings; text positions start at 0; one
  embedding LayerNorm over the concatenation [queries; text];
- each layer: self-attention over [queries; text] under a caller-given mask, then (every
  `cross_attention_freq` layers, starting with layer 0) cross-attention for the query positions only,
  then a feed-forward block, separate for queries (`ffn_query`) and text (`ffn_text`);
- a trainable LayerNorm on the frozen encoder output before cross-attention.
Post-LayerNorm residual blocks, exact GELU, LayerNorm eps 1e-12, as BERT.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from slit.models.layers import (
    COMPUTE_DTYPES,
    REMAT_POLICIES,
    Dense,
    Embed,
    LayerNorm,
    compute_dtype_scope,
    dot_product_attention,
    dropout,
    gelu,
    merge_heads,
    normal,
    remat_call,
    split_heads,
    weight,
)

BERT_LAYER_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Sizes of a Q-Former. Defaults are BLIP-2's (BERT-base, 32 queries)."""

    vocab_size: int = 30523
    num_queries: int = 32
    num_layers: int = 12
    width: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    cross_attention_freq: int = 2
    encoder_width: int = 1408
    max_text_positions: int = 512
    dropout_rate: float = 0.1
    # Std of the normal init of every weight matrix, table and query token (BERT/HF
    # `initializer_range`). 0.02 suits BERT-base widths; narrow Q-Formers need ~1/sqrt(width), or the
    # randomly initialised cross-attention passes almost nothing of the audio to the queries.
    initializer_range: float = 0.02
    # Large-model levers (README "Parallelism"); neither changes the weights. remat_policy: rematerialise
    # each layer's activations in the backward pass (`qformer.remat_policy`; slit.models.layers.
    # REMAT_POLICIES); compute_dtype: the matmul input dtype, float32 accumulation (the top-level
    # `compute_dtype`).
    remat_policy: str = "none"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"qformer remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; choose one of {COMPUTE_DTYPES}")


class BertAttentionBlock(nnx.Module):
    """Multi-head attention followed by dense + dropout + residual + LayerNorm (BERT post-LN)."""

    def __init__(
        self,
        width: int,
        kv_width: int,
        num_heads: int,
        dropout_rate: float,
        init_std: float,
        *,
        rngs: nnx.Rngs,
    ):
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        dense = dict(rngs=rngs, kernel_init=normal(init_std))
        self.query = Dense(width, width, axes=("embed", "heads"), **dense)
        self.key = Dense(kv_width, width, axes=("embed", "heads"), **dense)
        self.value = Dense(kv_width, width, axes=("embed", "heads"), **dense)
        self.output = Dense(width, width, axes=("heads", "embed"), **dense)
        self.norm = LayerNorm(width, eps=BERT_LAYER_NORM_EPS, rngs=rngs)

    def project_kv(self, kv_bkd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values (batch, K, heads, head_dim) from (batch, K, kv_width)."""
        return split_heads(self.key(kv_bkd), self.num_heads), split_heads(self.value(kv_bkd), self.num_heads)

    def __call__(
        self,
        x_bld: jax.Array,
        kv: jax.Array | tuple[jax.Array, jax.Array],
        mask_blk: jax.Array | None,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """x (batch, L, width) attends to kv under mask (batch, L, K).

        `kv` is either the sequence to attend to (batch, K, kv_width) or its keys and values already
        projected by `project_kv` (shared between passes that attend to the same encoder output).
        """
        k, v = self.project_kv(kv) if not isinstance(kv, tuple) else kv
        q = split_heads(self.query(x_bld), self.num_heads)
        context = merge_heads(dot_product_attention(q, k, v, mask_blk, self.dropout_rate, rngs))
        return self.norm(x_bld + dropout(self.output(context), self.dropout_rate, rngs))


class FeedForward(nnx.Module):
    """BERT FFN: dense -> GELU -> dense -> dropout -> residual -> LayerNorm."""

    def __init__(self, width: int, mlp_dim: int, dropout_rate: float, init_std: float, *, rngs: nnx.Rngs):
        self.dropout_rate = dropout_rate
        self.intermediate = Dense(
            width, mlp_dim, axes=("embed", "mlp"), rngs=rngs, kernel_init=normal(init_std)
        )
        self.output = Dense(mlp_dim, width, axes=("mlp", "embed"), rngs=rngs, kernel_init=normal(init_std))
        self.norm = LayerNorm(width, eps=BERT_LAYER_NORM_EPS, rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """(..., width) -> (..., width)."""
        h = self.output(gelu(self.intermediate(x)))
        return self.norm(x + dropout(h, self.dropout_rate, rngs))


class QFormerLayer(nnx.Module):
    """Self-attention over [queries; text], cross-attention for queries, separate FFNs."""

    def __init__(self, config: QFormerConfig, has_cross_attention: bool, *, rngs: nnx.Rngs):
        c = config
        self.self_attention = BertAttentionBlock(
            c.width, c.width, c.num_heads, c.dropout_rate, c.initializer_range, rngs=rngs
        )
        self.cross_attention = (
            BertAttentionBlock(
                c.width, c.encoder_width, c.num_heads, c.dropout_rate, c.initializer_range, rngs=rngs
            )
            if has_cross_attention
            else None
        )
        self.ffn_query = FeedForward(c.width, c.mlp_dim, c.dropout_rate, c.initializer_range, rngs=rngs)
        self.ffn_text = FeedForward(c.width, c.mlp_dim, c.dropout_rate, c.initializer_range, rngs=rngs)

    def __call__(
        self,
        hidden_bld: jax.Array,
        mask_bll: jax.Array | None,
        num_queries: int,
        encoder_kv: tuple[jax.Array, jax.Array] | None,
        encoder_mask_bf: jax.Array | None,
        rngs: nnx.Rngs | None,
        prefix_kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """hidden (batch, num_queries + text_len, width); the first `num_queries` rows are queries.

        `encoder_kv`: this layer's cross-attention keys and values (see `QFormer.encoder_kv`).
        `prefix_kv`: self-attention keys and values (batch, P, heads, head_dim) x 2 that lead this pass's
        own (the queries' of an earlier queries-only pass; `mask_bll` is then (batch, L, P + L)).
        Returns the hidden states and this pass's own self-attention keys and values.
        """
        own_kv = self.self_attention.project_kv(hidden_bld)
        kv = own_kv
        if prefix_kv is not None:
            kv = tuple(jnp.concatenate([p, o], axis=1) for p, o in zip(prefix_kv, own_kv, strict=True))
        hidden_bld = self.self_attention(hidden_bld, kv, mask_bll, rngs)
        queries, text = hidden_bld[:, :num_queries], hidden_bld[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attention is not None:
                if encoder_kv is None:
                    raise ValueError("query positions need the encoder output for cross-attention")
                cross_mask = None
                if encoder_mask_bf is not None:
                    cross_mask = jnp.broadcast_to(
                        encoder_mask_bf[:, None, :], (queries.shape[0], num_queries, encoder_mask_bf.shape[1])
                    )
                queries = self.cross_attention(queries, encoder_kv, cross_mask, rngs)
            parts.append(self.ffn_query(queries, rngs))
        if text.shape[1]:
            parts.append(self.ffn_text(text, rngs))
        return (jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]), own_kv


class QFormer(nnx.Module):
    """Learned queries + BERT text embeddings + `num_layers` Q-Former layers."""

    def __init__(self, config: QFormerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.query_tokens = weight(
            nnx.Param, normal(c.initializer_range), rngs, (c.num_queries, c.width), ("queries", "embed")
        )
        init = normal(c.initializer_range)
        self.word_embeddings = Embed(c.vocab_size, c.width, axes=("vocab", "embed"), rngs=rngs, init=init)
        self.position_embeddings = Embed(
            c.max_text_positions, c.width, axes=(None, "embed"), rngs=rngs, init=init
        )
        self.embedding_norm = LayerNorm(c.width, eps=BERT_LAYER_NORM_EPS, rngs=rngs)
        # Trainable LayerNorm over the frozen encoder's output (BLIP-2's `ln_vision`).
        self.encoder_norm = LayerNorm(c.encoder_width, eps=1e-5, rngs=rngs)
        self.layers = nnx.List(
            [QFormerLayer(c, i % c.cross_attention_freq == 0, rngs=rngs) for i in range(c.num_layers)]
        )

    def embed(
        self, text_ids_bl: jax.Array | None, with_queries: bool, batch_size: int, rngs: nnx.Rngs | None
    ) -> jax.Array:
        """Embeds [queries; text] -> (batch, num_queries + text_len, width), after LayerNorm + dropout."""
        parts = []
        if with_queries:
            parts.append(jnp.broadcast_to(self.query_tokens[...], (batch_size, *self.query_tokens.shape)))
        if text_ids_bl is not None:
            positions = jnp.arange(text_ids_bl.shape[1])
            parts.append(self.word_embeddings(text_ids_bl) + self.position_embeddings(positions)[None])
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return dropout(self.embedding_norm(x), self.config.dropout_rate, rngs)

    def encoder_kv(self, encoder_bfd: jax.Array) -> list[tuple[jax.Array, jax.Array] | None]:
        """Cross-attention keys/values of every layer (None where a layer has no cross-attention).

        Computed once per clip and shared by every pass over the same audio; rows can be gathered
        (e.g. hard negatives) instead of recomputed. Each entry is (batch, frames, heads, head_dim) x 2.
        """
        with compute_dtype_scope(self.config.compute_dtype):
            normed = self.encoder_norm(encoder_bfd)
            return [
                layer.cross_attention.project_kv(normed) if layer.cross_attention is not None else None
                for layer in self.layers
            ]

    def __call__(
        self,
        *,
        text_ids_bl: jax.Array | None = None,
        with_queries: bool = True,
        attention_mask_bll: jax.Array | None = None,
        encoder_bfd: jax.Array | None = None,
        encoder_mask_bf: jax.Array | None = None,
        encoder_kv: list[tuple[jax.Array, jax.Array] | None] | None = None,
        rngs: nnx.Rngs | None = None,
        prefix_kv: list[tuple[jax.Array, jax.Array]] | None = None,
        return_self_kv: bool = False,
    ) -> jax.Array | tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """Runs the Q-Former.

        Args:
          text_ids_bl: token ids (batch, text_len), or None for a queries-only pass.
          with_queries: whether the learned queries lead the sequence.
          attention_mask_bll: bool (batch, L, L) self-attention visibility, L = queries + text_len;
            None lets every position see every other (see `slit/models/masks.py`).
          encoder_bfd: frozen encoder output (batch, frames, encoder_width), before `encoder_norm`.
          encoder_mask_bf: bool (batch, frames), True for frames that hold real audio.
          encoder_kv: instead of `encoder_bfd`, its per-layer keys/values from `encoder_kv`.
          rngs: dropout randomness, or None for deterministic evaluation.
          prefix_kv: per layer, self-attention keys and values (batch, P, heads, head_dim) x 2 that every
            position may also attend to, before its own (an earlier pass's `return_self_kv`, e.g. the
            queries' for a text-only pass: LAVIS's grounded generation reuses the query pass this way);
            `attention_mask_bll` is then (batch, L, P + L).
          return_self_kv: also return each layer's self-attention keys and values.

        Returns:
          Hidden states (batch, L, width); the first `num_queries` rows are the query outputs. With
          `return_self_kv`, (hidden states, [(keys, values) per layer]).
        """
        if text_ids_bl is None and not with_queries:
            raise ValueError("a Q-Former pass needs queries, text or both")
        with compute_dtype_scope(self.config.compute_dtype):
            return self._run(
                text_ids_bl, with_queries, attention_mask_bll, encoder_bfd, encoder_mask_bf, encoder_kv, rngs,
                prefix_kv, return_self_kv,
            )  # fmt: skip

    def _run(
        self,
        text_ids_bl: jax.Array | None,
        with_queries: bool,
        attention_mask_bll: jax.Array | None,
        encoder_bfd: jax.Array | None,
        encoder_mask_bf: jax.Array | None,
        encoder_kv: list[tuple[jax.Array, jax.Array] | None] | None,
        rngs: nnx.Rngs | None,
        prefix_kv: list[tuple[jax.Array, jax.Array]] | None,
        return_self_kv: bool,
    ) -> jax.Array | tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        num_queries = self.config.num_queries if with_queries else 0
        if with_queries and encoder_kv is None and encoder_bfd is not None:
            encoder_kv = self.encoder_kv(encoder_bfd)
        if text_ids_bl is not None:
            batch_size = text_ids_bl.shape[0]
        else:
            batch_size = next(kv[0].shape[0] for kv in encoder_kv if kv is not None)
        hidden = self.embed(text_ids_bl, with_queries, batch_size, rngs)
        self_kv = []
        for i, layer in enumerate(self.layers):
            layer_kv = encoder_kv[i] if (with_queries and encoder_kv is not None) else None
            prefix = prefix_kv[i] if prefix_kv is not None else None
            hidden, own_kv = remat_call(
                layer,
                self.config.remat_policy,
                hidden,
                attention_mask_bll,
                num_queries,
                layer_kv,
                encoder_mask_bf,
                rngs,
                prefix,
            )
            self_kv.append(own_kv)
        return (hidden, self_kv) if return_self_kv else hidden
