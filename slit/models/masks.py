"""Self-attention visibility masks of the Q-Former, one per stage-one objective.

All masks are bool (batch, L, L) over the sequence [queries; text] with L = num_queries + text_len:
entry [b, i, j] is True when position i may attend to position j. Padding text positions are never
visible as keys. Rows of padding positions are left as their pattern gives; their outputs are unused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def text_only_mask(text_valid_bl: jax.Array) -> jax.Array:
    """Contrastive text pass (no queries): text sees all non-padding text, both ways. (B, T, T)."""
    b, t = text_valid_bl.shape
    return jnp.broadcast_to(text_valid_bl.astype(bool)[:, None, :], (b, t, t))


def bidirectional_mask(num_queries: int, text_valid_bl: jax.Array) -> jax.Array:
    """Matching (and instruction-aware) pass: queries and text all see each other. (B, Q+T, Q+T)."""
    b, t = text_valid_bl.shape
    keys_valid = jnp.concatenate([jnp.ones((b, num_queries), bool), text_valid_bl.astype(bool)], axis=1)
    length = num_queries + t
    return jnp.broadcast_to(keys_valid[:, None, :], (b, length, length))


def grounded_generation_mask(num_queries: int, text_valid_bl: jax.Array) -> jax.Array:
    """Grounded generation pass: queries see only queries; text sees all queries and earlier text.

    Returns (B, Q+T, Q+T): the query rows are blind to text, the text rows are causal over text.
    """
    b, t = text_valid_bl.shape
    q = num_queries
    query_rows = jnp.concatenate([jnp.ones((q, q), bool), jnp.zeros((q, t), bool)], axis=1)
    text_rows = jnp.concatenate([jnp.ones((t, q), bool), jnp.tril(jnp.ones((t, t), bool))], axis=1)
    pattern = jnp.concatenate([query_rows, text_rows], axis=0)
    keys_valid = jnp.concatenate([jnp.ones((b, q), bool), text_valid_bl.astype(bool)], axis=1)
    return pattern[None] & keys_valid[:, None, :]


def grounded_generation_text_mask(num_queries: int, text_valid_bl: jax.Array) -> jax.Array:
    """The text rows of `grounded_generation_mask`, for a text-only pass that attends to the queries'
    keys and values of an earlier queries-only pass (their rows are that pass's outputs: queries see only
    queries). Returns (B, T, Q+T): every query, and earlier-or-same non-padding text."""
    return grounded_generation_mask(num_queries, text_valid_bl)[:, num_queries:]
