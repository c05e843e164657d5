"""Logits processors: what happens to next-token scores between the model and the token choice.

Each one is a pure function on scores [B, V] with the semantics of the transformers class of the
same purpose (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper), so that slit's decoding picks the tokens transformers picks. Filtered scores
become -inf. B is the batch (times beams), V the vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "apply_repetition_penalty",
    "apply_temperature",
    "mark_seen",
    "seen_tokens",
    "top_k_filter",
    "top_p_filter",
]


def seen_tokens(token_ids_bt: jax.Array, vocab_size: int, counts_bt: jax.Array | None = None) -> jax.Array:
    """bool [B, V]: True for every token id that occurs in row b of `token_ids_bt` (int [B, T]).

    Entries where `counts_bt` (bool [B, T]) is False, and negative ids, do not count (padding, and
    soft-prompt positions that hold embeddings rather than token ids). Ids >= V are ignored, as
    transformers ignores ids the output layer cannot produce.
    """
    b, t = token_ids_bt.shape
    counts = token_ids_bt >= 0
    if counts_bt is not None:
        counts = counts & counts_bt
    ids = jnp.where(counts, token_ids_bt, vocab_size)  # out of range: dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return jnp.zeros((b, vocab_size), bool).at[rows, ids].set(True, mode="drop")


def mark_seen(seen_bv: jax.Array, token_ids_b: jax.Array) -> jax.Array:
    """`seen_bv` with each row's new token id (int [B]) marked."""
    return seen_bv.at[jnp.arange(seen_bv.shape[0]), token_ids_b].set(True, mode="drop")


def apply_repetition_penalty(scores_bv: jax.Array, seen_bv: jax.Array, penalty: float) -> jax.Array:
    """CTRL's repetition penalty (Keskar et al. 2019), once per seen token: negative scores are
    multiplied by `penalty`, the others divided by it (penalty > 1 discourages repeats)."""
    penalised = jnp.where(scores_bv < 0, scores_bv * penalty, scores_bv / penalty)
    return jnp.where(seen_bv, penalised, scores_bv)


def apply_temperature(scores_bv: jax.Array, temperature: float) -> jax.Array:
    """scores / temperature (temperature > 0)."""
    return scores_bv / temperature


def top_k_filter(scores_bv: jax.Array, top_k: int, min_tokens_to_keep: int = 1) -> jax.Array:
    """Keeps the max(top_k, min_tokens_to_keep) highest scores of each row (and any score tied with
    the last of them); the rest become -inf."""
    k = min(max(top_k, min_tokens_to_keep), scores_bv.shape[-1])
    kth_b1 = jax.lax.top_k(scores_bv, k)[0][..., -1:]
    return jnp.where(scores_bv < kth_b1, -jnp.inf, scores_bv)


def top_p_filter(scores_bv: jax.Array, top_p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """Nucleus filtering (Holtzman et al. 2020), as transformers does it.

    Sorted ascending, a token is removed while the cumulative softmax probability up to and
    including it is <= 1 - top_p; the `min_tokens_to_keep` most likely tokens always stay. Removed
    scores become -inf. The kept set is "every score >= the smallest kept score", which equals
    transformers' set except among exact ties at the boundary (whose order torch's sort leaves
    unspecified).
    """
    vocab = scores_bv.shape[-1]
    ascending = jnp.sort(scores_bv, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    num_removed = jnp.sum(cumulative <= 1.0 - top_p, axis=-1, keepdims=True)
    num_removed = jnp.minimum(num_removed, vocab - min(min_tokens_to_keep, vocab))
    smallest_kept_b1 = jnp.take_along_axis(ascending, num_removed, axis=-1)
    return jnp.where(scores_bv < smallest_kept_b1, -jnp.inf, scores_bv)
