"""Stage-one objectives of BLIP-2 over the global batch (arXiv 2301.12597; LAVIS `blip2_qformer.py`).

Everything here is a pure function of arrays. Inside a jitted, sharded step the arrays are global, so
contrastive negatives and hard negatives come from the whole global batch; XLA inserts the
collectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_cross_entropy(logits_nc: jax.Array, labels_n: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example cross-entropy against targets (1 - eps) * onehot + eps / C. Returns (n,)."""
    num_classes = logits_nc.shape[-1]
    log_probs = jax.nn.log_softmax(logits_nc.astype(jnp.float32), axis=-1)
    targets = jax.nn.one_hot(labels_n, num_classes) * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -(targets * log_probs).sum(-1)


def audio_text_similarity(audio_bqe: jax.Array, text_be: jax.Array, temperature: jax.Array) -> jax.Array:
    """sim[i, j] = max over queries q of <audio_i,q, text_j> / temperature. Returns (B_audio, B_text).

    Both inputs are L2-normalised embeddings: audio (B_audio, queries, E), text (B_text, E).
    """
    return jnp.einsum("iqe,je->ijq", audio_bqe, text_be).max(-1) / temperature


def contrastive_loss(
    audio_bqe: jax.Array, text_be: jax.Array, temperature: jax.Array, label_smoothing: float = 0.1
) -> tuple[jax.Array, jax.Array]:
    """Audio-text contrastive loss (ITC): symmetric cross-entropy, positives on the diagonal.

    Returns the scalar loss and the audio-to-text similarity matrix (B, B) (text-to-audio is its
    transpose), for hard-negative mining.
    """
    sim_a2t = audio_text_similarity(audio_bqe, text_be, temperature)
    labels = jnp.arange(sim_a2t.shape[0])
    a2t = smoothed_cross_entropy(sim_a2t, labels, label_smoothing).mean()
    t2a = smoothed_cross_entropy(sim_a2t.T, labels, label_smoothing).mean()
    return (a2t + t2a) / 2.0, sim_a2t


def sample_hard_negatives(
    key: jax.Array, sim_a2t_bb: jax.Array, same_text_bb: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Draws one negative text per audio and one negative audio per text, BLIP-2 style.

    Candidates are drawn with probability softmax(similarity) + 1e-4 over the global batch, never the
    positive itself nor any example whose text equals the positive's (a false negative). Vectorised
    with `jax.random.categorical`.

    Args:
      key: PRNG key.
      sim_a2t_bb: (B, B) audio-to-text similarities (already divided by the temperature).
      same_text_bb: bool (B, B), True where examples i and j have identical text.

    Returns:
      (negative text index for each audio (B,), negative audio index for each text (B,)).
    """
    b = sim_a2t_bb.shape[0]
    allowed = ~jnp.eye(b, dtype=bool) & ~same_text_bb
    # A row with no allowed candidate (all texts identical) falls back to any other example.
    allowed = jnp.where(allowed.any(-1, keepdims=True), allowed, ~jnp.eye(b, dtype=bool))
    sim = jax.lax.stop_gradient(sim_a2t_bb.astype(jnp.float32))

    def draw(k: jax.Array, sim_rows: jax.Array) -> jax.Array:
        weights = jax.nn.softmax(sim_rows, axis=-1) + 1e-4
        return jax.random.categorical(k, jnp.where(allowed, jnp.log(weights), -jnp.inf), axis=-1)

    key_text, key_audio = jax.random.split(key)
    return draw(key_text, sim), draw(key_audio, sim.T)


def matching_loss(logits_n2: jax.Array, labels_n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Audio-text matching (ITM): plain 2-way cross-entropy. Returns (loss, accuracy)."""
    loss = smoothed_cross_entropy(logits_n2, labels_n, 0.0).mean()
    accuracy = (logits_n2.argmax(-1) == labels_n).mean()
    return loss, accuracy


def language_modeling_loss(
    logits_blv: jax.Array, targets_bl: jax.Array, weights_bl: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean token cross-entropy over positions with weight 1 (the ignored ones have weight 0).

    logits (B, L, V) at position t predict targets[:, t] (callers shift); weights (B, L) in {0, 1}.
    """
    b, length, v = logits_blv.shape
    per_token = smoothed_cross_entropy(
        logits_blv.reshape(b * length, v), targets_bl.reshape(-1), label_smoothing
    )
    weights = weights_bl.reshape(-1).astype(jnp.float32)
    return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1.0)
