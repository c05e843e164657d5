"""The interface every frozen LLM offers to stage two, to instruction tuning and to the decoder.

Shapes: B batch, T new positions, S cache slots (the maximum length), D model width, V vocabulary,
L layers, H_kv key/value heads, D_h head width.

Decoder-only models (Llama family, GPT-2) take embeddings, so that a soft prompt of projected
Q-Former outputs can go in front of embedded text, and explicit positions, so that left-padded
prompts in a batch get the right rotary/absolute positions. Encoder-decoder models (T5) add
`encode` and take the encoder output in `decode`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct
from jax.typing import DTypeLike


@struct.dataclass
class KVCache:
    """Self-attention keys and values for incremental decoding.

    keys, values: one [B, S, H_kv, D_h] array per layer.
    valid: bool [B, S]; True for slots that hold a real token (False for padding and unwritten slots).
    length: int32 scalar; slots [0, length) have been written. The next call writes its T inputs to
      slots [length, length + T), and each of them attends to the valid slots at or before its own.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    length: jax.Array

    @classmethod
    def zeros(
        cls,
        num_layers: int,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: DTypeLike = jnp.float32,
    ) -> KVCache:
        shape = (batch_size, max_length, num_kv_heads, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            valid=jnp.zeros((batch_size, max_length), bool),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The special tokens a model's checkpoint declares (None where it declares none)."""

    bos: int | None
    eos: tuple[int, ...]  # generation stops at any of these
    pad: int | None
    decoder_start: int | None = None  # encoder-decoder models only


class DecoderOnlyLM(Protocol):
    """A frozen decoder-only LLM (Llama family, GPT-2)."""

    vocab_size: int
    hidden_size: int
    token_ids: TokenIds

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """int32 [B, T] -> [B, T, D] (the input embedding table, scaled as the model does)."""
        ...

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        token_mask: jax.Array,
        cache: KVCache | None = None,
        logits_span: tuple[int, int] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """inputs_embeds [B, T, D], positions int32 [B, T], token_mask bool [B, T] (False = padding).

        Returns float32 logits [B, T, V] and the updated cache (None when called without one); with
        `logits_span=(start, stop)`, logits of positions start..stop-1 only, [B, stop - start, V] (the
        output layer is the largest product of a small LLM: a loss on a few positions need not pay it
        on every position).
        Without a cache, attention is causal among the T inputs and ignores padded keys.
        """
        ...

    def init_cache(self, batch_size: int, max_length: int, dtype: DTypeLike = jnp.float32) -> KVCache: ...


class EncoderDecoderLM(Protocol):
    """A frozen encoder-decoder LLM (T5 / Flan-T5), used as a prefix LM."""

    vocab_size: int
    hidden_size: int
    token_ids: TokenIds

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """int32 [B, T] -> [B, T, D] (the shared input embedding)."""
        ...

    def encode(self, inputs_embeds: jax.Array, token_mask: jax.Array) -> jax.Array:
        """inputs_embeds [B, S_enc, D], token_mask bool [B, S_enc] -> encoder output [B, S_enc, D]."""
        ...

    def decode(
        self,
        decoder_token_ids: jax.Array,
        positions: jax.Array,
        encoder_out: jax.Array,
        encoder_mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """decoder_token_ids int32 [B, T], positions int32 [B, T] -> logits float32 [B, T, V], cache."""
        ...

    def init_cache(self, batch_size: int, max_length: int, dtype: DTypeLike = jnp.float32) -> KVCache: ...


def set_matmul_dtype(llm: Any, compute_dtype: str) -> None:  # noqa: ANN401 (an nnx.Module)
    """The compute-dtype policy for a built LLM, in place: with compute_dtype "bfloat16", every module of
    `llm` that has a matmul input `dtype` (the model, its attention and linear layers) takes bfloat16
    inputs; products accumulate in float32 and the residual stream, norms, softmax and logits stay float32
    (each model's docstring). "float32" leaves the model as built. Weights keep their `param_dtype`."""
    if compute_dtype == "float32":
        return
    from flax import nnx

    dtype = jnp.dtype(compute_dtype)
    for _, node in nnx.iter_graph(llm):
        if isinstance(node, nnx.Module) and "dtype" in vars(node):
            node.dtype = dtype
