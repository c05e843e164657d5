"""slit.generate: logits processors against transformers' classes, and decoding on a bigram stand-in
LM whose next-token distribution is known exactly, so that greedy tokens, repetition penalty,
soft prompts, EOS handling and the sampling distribution can be checked against NumPy.

Token parity with transformers' `generate` on real architectures is in test_generate_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from slit.errors import UserError
from slit.generate import GenerationConfig, generate, processors
from slit.models.layers import Frozen
from slit.models.llm.base import KVCache, TokenIds

# ---------------------------------------------------------------------------------------------------
# Processors against transformers' LogitsProcessor classes.


def _random_scores(shape=(4, 200), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 2.0).astype(np.float32)


def _same_scores(got, expected):
    got, expected = np.asarray(got), np.asarray(expected)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6, atol=1e-6)


def test_temperature_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import TemperatureLogitsWarper

    scores = _random_scores()
    expected = TemperatureLogitsWarper(0.7)(None, torch.from_numpy(scores))
    _same_scores(processors.apply_temperature(jnp.asarray(scores), 0.7), expected)


@pytest.mark.parametrize("top_k, min_keep", [(1, 1), (10, 1), (3, 5), (500, 1)])
def test_top_k_matches_transformers(top_k, min_keep):
    torch = pytest.importorskip("torch")
    from transformers import TopKLogitsWarper

    scores = _random_scores()
    expected = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(None, torch.from_numpy(scores))
    got = processors.top_k_filter(jnp.asarray(scores), top_k, min_keep)
    _same_scores(got, expected)
    assert (np.isfinite(np.asarray(got)).sum(-1) == min(max(top_k, min_keep), 200)).all()


@pytest.mark.parametrize("top_p, min_keep", [(0.01, 1), (0.3, 1), (0.9, 1), (0.9, 40), (1.0, 1)])
@pytest.mark.parametrize("after_top_k", [False, True])
def test_top_p_matches_transformers(top_p, min_keep, after_top_k):
    torch = pytest.importorskip("torch")
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    scores = _random_scores(seed=1)
    if after_top_k:  # -inf entries in the input, as after top-k in a sampling chain
        scores = TopKLogitsWarper(30)(None, torch.from_numpy(scores)).numpy()
    expected = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(None, torch.from_numpy(scores))
    _same_scores(processors.top_p_filter(jnp.asarray(scores), top_p, min_keep), expected)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    """Counted ids: every occurrence in the row (duplicates once), minus transformers'
    `prompt_ignore_length` leading slots (slit: the counts mask); negative ids never count."""
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = _random_scores(shape=(4, 50))
    ids = np.random.default_rng(2).integers(0, 50, (4, 12))
    ids[1, :4] = ids[1, 4]  # duplicates
    ignore = np.array([0, 3, 5, 0])
    expected = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.from_numpy(ignore))(
        torch.from_numpy(ids), torch.from_numpy(scores)
    )
    counts = np.arange(12)[None, :] >= ignore[:, None]
    seen = processors.seen_tokens(jnp.asarray(ids), 50, jnp.asarray(counts))
    _same_scores(processors.apply_repetition_penalty(jnp.asarray(scores), seen, penalty), expected)

    soft = np.where(counts, ids, -1)  # soft-prompt slots (-1) instead of the mask: the same set
    np.testing.assert_array_equal(processors.seen_tokens(jnp.asarray(soft), 50), seen)


# ---------------------------------------------------------------------------------------------------
# A bigram stand-in LM: embeddings are one-hot rows, logits = embedding @ table, so the next-token
# scores after token a are table[a] and the distribution of a generated sequence is known exactly.

V = 12
EOS, PAD = 11, 0


class BigramLM(nnx.Module):
    """Implements `DecoderOnlyLM` with no attention: logits [B, T, V] = inputs_embeds @ table."""

    def __init__(self, table: np.ndarray, eos: tuple[int, ...] = (EOS,)):
        self.table = Frozen(jnp.asarray(table, jnp.float32))
        self.vocab_size = self.hidden_size = table.shape[0]
        self.token_ids = TokenIds(bos=None, eos=eos, pad=PAD)

    def embed(self, token_ids):
        return jax.nn.one_hot(token_ids, self.vocab_size)

    def init_cache(self, batch_size, max_length, dtype=jnp.float32):
        return KVCache.zeros(0, batch_size, max_length, 1, 1, dtype)

    def __call__(self, inputs_embeds, positions, token_mask, cache=None):
        logits = inputs_embeds @ self.table[...]
        if cache is None:
            return logits, None
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.length))
        return logits, KVCache(keys=(), values=(), valid=valid, length=cache.length + inputs_embeds.shape[1])


def _table(seed=0, scale=2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((V, V)) * scale).astype(np.float32)


def _numpy_greedy(table, last_embeds, seen, max_new, penalty, eos):
    """Reference greedy decoding: last_embeds [B, V] (the prompt's last slot), seen bool [B, V]."""
    tokens, lengths = np.full((len(last_embeds), max_new), PAD), np.zeros(len(last_embeds), int)
    for b in range(len(last_embeds)):
        scores, seen_b = last_embeds[b] @ table, seen[b].copy()
        for step in range(max_new):
            scores = np.where(seen_b, np.where(scores < 0, scores * penalty, scores / penalty), scores)
            token = int(np.argmax(scores))
            tokens[b, step], lengths[b], seen_b[token] = token, step + 1, True
            if token in eos:
                break
            scores = table[token]
    return tokens, lengths


@pytest.mark.parametrize("penalty", [1.0, 2.5])
def test_greedy_with_soft_prompt_matches_numpy(penalty):
    """Left-padded batch [soft prompt; token ids]: soft-prompt slots are not token ids and are not
    penalised; padded slots are neither. Rows stop at EOS and are padded after it."""
    table = _table()
    table[:, EOS] += 0.8  # make EOS come up within a few steps in some rows
    model = BigramLM(table)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, V - 1, (4, 5))
    mask = np.ones((4, 5), bool)
    mask[1, :2] = mask[3, :3] = False  # left padding
    ids = np.where(mask, ids, -1)
    soft = rng.standard_normal((4, 2, V)).astype(np.float32)  # a soft prompt in front of every row
    embeds = np.concatenate([soft, np.asarray(model.embed(jnp.asarray(np.maximum(ids, 0))))], axis=1)
    full_mask = np.concatenate([np.ones((4, 2), bool), mask], axis=1)
    embeds = np.where(full_mask[..., None], embeds, 0.0)
    full_ids = np.concatenate([np.full((4, 2), -1), ids], axis=1)
    # A soft last slot for row 2 too: its scores are the mixture embedding @ table.
    embeds[2, -1] = 0.5 * embeds[2, -1] + 0.5 * soft[2, 0]
    full_ids[2, -1] = -1

    config = GenerationConfig(max_new_tokens=8, repetition_penalty=penalty)
    out = generate(
        model, jnp.asarray(embeds), jnp.asarray(full_mask), config, prompt_token_ids=jnp.asarray(full_ids)
    )
    seen = np.zeros((4, V), bool)
    for b, row in enumerate(full_ids):
        seen[b, row[row >= 0]] = True
    tokens, lengths = _numpy_greedy(table, embeds[:, -1], seen, 8, penalty, (EOS,))
    print(np.asarray(out.tokens).tolist(), lengths.tolist())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_array_equal(out.lengths, lengths)
    assert lengths.min() < 8 and len(set(lengths.tolist())) > 1  # rows stop early, at different steps


def _numpy_filtered_probs(scores: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampling distribution from the definitions: scores / T; keep the k highest; keep the
    smallest most-likely set whose probability reaches top_p; renormalise."""
    z = scores.astype(np.float64) / temperature
    keep = np.zeros_like(z, bool)
    keep[np.argsort(-z)[:top_k]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    order = np.argsort(-p)
    reach = np.searchsorted(np.cumsum(p[order]), top_p) + 1  # tokens needed to reach top_p
    nucleus = np.zeros_like(keep)
    nucleus[order[:reach]] = True
    p = np.where(nucleus, p, 0.0)
    return p / p.sum()


SAMPLING = dict(do_sample=True, temperature=0.8, top_k=6, top_p=0.85, max_new_tokens=2, eos_token_ids=())


def _sample(model, first_token: int, rows: int, seed: int, **overrides) -> np.ndarray:
    ids = jnp.full((rows, 1), first_token, jnp.int32)
    config = GenerationConfig(**{**SAMPLING, **overrides})
    return np.asarray(
        generate(model, model.embed(ids), jnp.ones((rows, 1), bool), config, jax.random.key(seed)).tokens
    )


def test_sampling_is_reproducible_and_seeded():
    model = BigramLM(_table(scale=0.5))  # a spread distribution
    a, b = _sample(model, 3, 64, seed=7), _sample(model, 3, 64, seed=7)
    np.testing.assert_array_equal(a, b)
    assert (a != _sample(model, 3, 64, seed=8)).any()
    ids = jnp.full((64, 1), 3, jnp.int32)
    by_seed = [
        np.asarray(
            generate(
                model, model.embed(ids), jnp.ones((64, 1), bool), GenerationConfig(**SAMPLING, seed=s)
            ).tokens
        )
        for s in (1, 1, 2)
    ]
    np.testing.assert_array_equal(by_seed[0], by_seed[1])
    assert (by_seed[0] != by_seed[2]).any()


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5), (5, 0.7)])
def test_sampled_tokens_lie_in_top_k_and_nucleus_sets(top_k, top_p):
    table = _table(seed=3, scale=1.0)
    model = BigramLM(table)
    tokens = _sample(model, 4, 512, seed=0, top_k=top_k, top_p=top_p, max_new_tokens=3, temperature=1.3)
    previous = np.concatenate([np.full((512, 1), 4), tokens[:, :-1]], axis=1)
    allowed = np.stack([_numpy_filtered_probs(table[a], 1.3, top_k or V, top_p) > 0 for a in range(V)])
    assert allowed[previous, tokens].all()
    # Every allowed first token shows up (the sets are not smaller than they should be).
    np.testing.assert_array_equal(np.unique(tokens[:, 0]), np.flatnonzero(allowed[4]))


def test_sampling_distribution_matches_definition():
    """Chi-square test of 4000 sampled (first, second) token pairs against the exact distribution
    p(a) p(b | a) computed in NumPy; the same counts must reject a distribution without temperature."""
    table = _table(seed=5, scale=1.0)
    model = BigramLM(table)
    rows = 4000
    tokens = _sample(model, 2, rows, seed=11)
    t, k, p = SAMPLING["temperature"], SAMPLING["top_k"], SAMPLING["top_p"]

    def pair_probs(temperature: float) -> np.ndarray:
        first = _numpy_filtered_probs(table[2], temperature, k, p)
        return first[:, None] * np.stack(
            [_numpy_filtered_probs(table[a], temperature, k, p) for a in range(V)]
        )

    counts = np.zeros((V, V))
    np.add.at(counts, (tokens[:, 0], tokens[:, 1]), 1)
    expected = pair_probs(t)
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    result = stats.chisquare(counts[support], rows * expected[support])
    print(f"chi-square over {support.sum()} pairs: p-value {result.pvalue:.3f}")
    assert result.pvalue > 1e-3
    wrong = pair_probs(1.0)
    shared = support & (wrong > 0)
    wrong_result = stats.chisquare(counts[shared], counts[shared].sum() * wrong[shared] / wrong[shared].sum())
    assert wrong_result.pvalue < 1e-6


def test_sampling_rows_finish_at_eos_and_are_padded():
    table = _table(seed=6, scale=0.5)
    table[:, EOS] += 1.0
    model = BigramLM(table)
    out = generate(
        model,
        model.embed(jnp.full((256, 1), 2, jnp.int32)),
        jnp.ones((256, 1), bool),
        GenerationConfig(do_sample=True, top_k=0, max_new_tokens=6),
        jax.random.key(0),
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row, length in zip(tokens, lengths, strict=True):
        stops = np.flatnonzero(row == EOS)
        assert length == (stops[0] + 1 if stops.size else 6)
        assert (row[length:] == PAD).all()
    assert 1 <= lengths.min() and lengths.max() == 6 and (lengths < 6).mean() > 0.3


def test_beam_sampling_is_reproducible():
    model = BigramLM(_table(scale=0.5))
    config = dict(num_beams=2, max_new_tokens=4)
    a, b = _sample(model, 1, 16, seed=3, **config), _sample(model, 1, 16, seed=3, **config)
    np.testing.assert_array_equal(a, b)
    assert ((a >= 0) & (a < V)).all()


# ---------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_inputs_are_reported():
    model = BigramLM(_table())
    ids = jnp.ones((2, 3), jnp.int32)
    good_mask = jnp.ones((2, 3), bool)
    config = GenerationConfig(max_new_tokens=2)
    right_padded = jnp.asarray([[True, True, True], [True, True, False]])
    with pytest.raises(UserError, match=r"rows \[1\] end with padding; prompts must be left-padded"):
        generate(model, model.embed(ids), right_padded, config)
    with pytest.raises(UserError, match=r"rows \[0\] have no valid token"):
        generate(model, model.embed(ids), jnp.asarray([[False] * 3, [True] * 3]), config)
    with pytest.raises(UserError, match=r"shape \(2, 3, 5\); expected \[batch, length, 12\]"):
        generate(model, jnp.zeros((2, 3, 5)), good_mask, config)
    with pytest.raises(UserError, match="prompt_token_ids has shape"):
        generate(model, model.embed(ids), good_mask, config, prompt_token_ids=jnp.ones((2, 4), jnp.int32))
    for bad in (dict(top_p=0.0), dict(temperature=0.0), dict(max_new_tokens=0), dict(early_stopping="soon")):
        with pytest.raises(UserError, match=f"{next(iter(bad))}="):
            generate(model, model.embed(ids), good_mask, GenerationConfig(**bad))
