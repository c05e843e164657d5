"""Independent float64 NumPy references for the stage-one losses (BLIP-2 / LAVIS `blip2_qformer.py`).

The references are written from the definitions (PyTorch `F.cross_entropy` with `label_smoothing`,
LAVIS hard-negative mining), not from `slit/losses.py`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slit import losses

RTOL = 1e-5
ATOL = 1e-6


# ---------------------------------------------------------------------------------------------------
# NumPy references (float64).


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


def ref_smoothed_ce(logits: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    """PyTorch F.cross_entropy(reduction='none', label_smoothing=eps) per example, by explicit loop."""
    logits = np.asarray(logits, np.float64)
    n, c = logits.shape
    out = np.zeros(n)
    for k in range(n):
        logp = _log_softmax(logits[k])
        # (1 - eps) * NLL of the label + eps * mean over classes of -log p.
        out[k] = (1.0 - eps) * -logp[labels[k]] + eps * -logp.sum() / c
    return out


def ref_similarity(audio: np.ndarray, text: np.ndarray, temperature: float) -> np.ndarray:
    audio = np.asarray(audio, np.float64)
    text = np.asarray(text, np.float64)
    ba, nq, _ = audio.shape
    bt = text.shape[0]
    sim = np.empty((ba, bt))
    for i in range(ba):
        for j in range(bt):
            sim[i, j] = max(float(audio[i, q] @ text[j]) for q in range(nq)) / temperature
    return sim


def ref_contrastive(audio, text, temperature, eps):
    sim = ref_similarity(audio, text, temperature)
    labels = np.arange(sim.shape[0])
    a2t = ref_smoothed_ce(sim, labels, eps).mean()
    t2a = ref_smoothed_ce(sim.T, labels, eps).mean()
    return (a2t + t2a) / 2.0, sim


def ref_negative_distributions(sim: np.ndarray, same_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row i of the first: P(negative text j | audio i); row j of the second: P(negative audio i | text j).

    LAVIS: weights = softmax(sim, dim=1) + 1e-4 (softmax over the FULL row), then the positive and
    same-text candidates are zeroed; a row with no candidate left falls back to any index but itself.
    """
    sim = np.asarray(sim, np.float64)
    b = sim.shape[0]

    def dists(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((b, b))
        for r in range(b):
            w = _softmax(rows[r]) + 1e-4
            allowed = np.array([(c != r) and not same_text[r, c] for c in range(b)])
            if not allowed.any():
                allowed = np.array([c != r for c in range(b)])
            w = np.where(allowed, w, 0.0)
            out[r] = w / w.sum()
        return out

    return dists(sim), dists(sim.T)


# ---------------------------------------------------------------------------------------------------
# Helpers.


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(seed: int, b: int, q: int, e: int):
    rng = np.random.default_rng(seed)
    audio = _unit(rng.standard_normal((b, q, e))).astype(np.float32)
    text = _unit(rng.standard_normal((b, e))).astype(np.float32)
    return audio, text


# ---------------------------------------------------------------------------------------------------
# Cross-entropy.


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("n,c", [(1, 2), (7, 5), (33, 130)])
def test_smoothed_cross_entropy_matches_torch_definition(n, c, eps):
    rng = np.random.default_rng(n * 1000 + c)
    logits = (3.0 * rng.standard_normal((n, c))).astype(np.float32)
    labels = rng.integers(0, c, n)
    got = np.asarray(losses.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps))
    assert got.shape == (n,)
    np.testing.assert_allclose(got, ref_smoothed_ce(logits, labels, eps), rtol=RTOL, atol=ATOL)


def test_smoothed_cross_entropy_large_logits_stable():
    logits = np.array([[1000.0, -1000.0, 0.0], [-500.0, 500.0, 499.0]], np.float32)
    labels = np.array([0, 2])
    got = np.asarray(losses.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref_smoothed_ce(logits, labels, 0.1), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------
# Contrastive (ITC).


@pytest.mark.parametrize("b,q,e", [(1, 1, 4), (4, 3, 8), (9, 32, 16)])
def test_audio_text_similarity(b, q, e):
    audio, text = _embeddings(b + q + e, b, q, e)
    temperature = 0.07
    got = np.asarray(
        losses.audio_text_similarity(jnp.asarray(audio), jnp.asarray(text), jnp.asarray(temperature))
    )
    np.testing.assert_allclose(got, ref_similarity(audio, text, temperature), rtol=RTOL, atol=1e-4)


def test_audio_text_similarity_rectangular():
    rng = np.random.default_rng(5)
    audio = _unit(rng.standard_normal((3, 4, 8))).astype(np.float32)
    text = _unit(rng.standard_normal((6, 8))).astype(np.float32)
    got = np.asarray(losses.audio_text_similarity(jnp.asarray(audio), jnp.asarray(text), jnp.asarray(0.5)))
    assert got.shape == (3, 6)
    np.testing.assert_allclose(got, ref_similarity(audio, text, 0.5), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("b,q,e,temperature", [(2, 1, 4, 1.0), (5, 4, 8, 0.07), (16, 8, 32, 0.2)])
def test_contrastive_loss(b, q, e, temperature, eps):
    audio, text = _embeddings(7 * b + q, b, q, e)
    loss, sim = losses.contrastive_loss(jnp.asarray(audio), jnp.asarray(text), jnp.asarray(temperature), eps)
    ref_loss, ref_sim = ref_contrastive(audio, text, temperature, eps)
    assert np.shape(loss) == ()
    np.testing.assert_allclose(np.asarray(sim), ref_sim, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL, atol=ATOL)


def test_contrastive_loss_is_symmetric_not_one_sided():
    """A similarity matrix far from symmetric: the loss must average the a2t and t2a directions."""
    audio, text = _embeddings(11, 6, 4, 8)
    temperature = 0.1
    loss, _ = losses.contrastive_loss(jnp.asarray(audio), jnp.asarray(text), jnp.asarray(temperature), 0.0)
    sim = ref_similarity(audio, text, temperature)
    labels = np.arange(6)
    a2t = ref_smoothed_ce(sim, labels, 0.0).mean()
    t2a = ref_smoothed_ce(sim.T, labels, 0.0).mean()
    assert abs(a2t - t2a) > 1e-3  # the test is informative
    np.testing.assert_allclose(float(loss), (a2t + t2a) / 2, rtol=RTOL)


def test_contrastive_loss_default_label_smoothing_is_0_1():
    audio, text = _embeddings(3, 4, 2, 8)
    loss, _ = losses.contrastive_loss(jnp.asarray(audio), jnp.asarray(text), jnp.asarray(0.07))
    np.testing.assert_allclose(float(loss), ref_contrastive(audio, text, 0.07, 0.1)[0], rtol=RTOL)


# ---------------------------------------------------------------------------------------------------
# Hard negatives.

NUM_DRAWS = 4000


@functools.partial(jax.jit, static_argnums=0)
def _draw_many(num: int, sim, same_text):
    keys = jax.random.split(jax.random.key(1234), num)
    return jax.vmap(lambda k: losses.sample_hard_negatives(k, sim, same_text))(keys)


def _empirical(draws: np.ndarray, b: int) -> np.ndarray:
    """draws (num, B) -> frequencies (B rows, B candidates)."""
    freq = np.zeros((b, b))
    for r in range(b):
        freq[r] = np.bincount(draws[:, r], minlength=b) / draws.shape[0]
    return freq


def _check_sampler(sim: np.ndarray, same_text: np.ndarray, tv_tol: float = 0.05):
    b = sim.shape[0]
    neg_text, neg_audio = _draw_many(NUM_DRAWS, jnp.asarray(sim, jnp.float32), jnp.asarray(same_text))
    neg_text, neg_audio = np.asarray(neg_text), np.asarray(neg_audio)
    assert neg_text.shape == (NUM_DRAWS, b) and neg_audio.shape == (NUM_DRAWS, b)
    assert neg_text.min() >= 0 and neg_text.max() < b and neg_audio.min() >= 0 and neg_audio.max() < b
    p_text, p_audio = ref_negative_distributions(sim, same_text)
    f_text, f_audio = _empirical(neg_text, b), _empirical(neg_audio, b)
    for r in range(b):
        # Never drawn where the reference gives zero probability (the positive, same-text examples).
        assert np.all(f_text[r][p_text[r] == 0] == 0), (r, f_text[r], p_text[r])
        assert np.all(f_audio[r][p_audio[r] == 0] == 0), (r, f_audio[r], p_audio[r])
        tv_t = 0.5 * np.abs(f_text[r] - p_text[r]).sum()
        tv_a = 0.5 * np.abs(f_audio[r] - p_audio[r]).sum()
        assert tv_t < tv_tol, ("audio->text row", r, tv_t, f_text[r], p_text[r])
        assert tv_a < tv_tol, ("text->audio row", r, tv_a, f_audio[r], p_audio[r])
    return f_text, f_audio, p_text, p_audio


def _same_text_from_groups(groups) -> np.ndarray:
    g = np.asarray(groups)
    return g[:, None] == g[None, :]


B_NEG = 6  # one batch size for every sampler test: a single compilation of `_draw_many`


def test_hard_negatives_distribution_distinct_texts():
    rng = np.random.default_rng(0)
    sim = 2.0 * rng.standard_normal((B_NEG, B_NEG))  # not symmetric: a2t and t2a distributions differ
    f_text, f_audio, _, _ = _check_sampler(sim, np.eye(B_NEG, dtype=bool))
    assert np.all(np.diag(f_text) == 0) and np.all(np.diag(f_audio) == 0)


def test_hard_negatives_excludes_same_text():
    rng = np.random.default_rng(1)
    same_text = _same_text_from_groups([0, 0, 1, 2, 1, 0])
    sim = 3.0 * rng.standard_normal((B_NEG, B_NEG))
    # Make same-text candidates the most similar, so excluding them is actually tested.
    sim = np.where(same_text & ~np.eye(B_NEG, dtype=bool), sim + 10.0, sim)
    f_text, f_audio, _, _ = _check_sampler(sim, same_text)
    assert np.all(f_text[same_text] == 0)
    assert np.all(f_audio[same_text] == 0)


def test_hard_negatives_prefer_hard_ones():
    """A row with one much more similar candidate draws it most of the time (softmax weighting)."""
    sim = np.zeros((B_NEG, B_NEG))
    sim[0, 3] = 5.0  # audio 0 is close to text 3; text 3 is close to audio 0
    f_text, f_audio, p_text, p_audio = _check_sampler(sim, np.eye(B_NEG, dtype=bool))
    assert p_text[0, 3] > 0.9 and f_text[0, 3] > 0.85
    assert p_audio[3, 0] > 0.9 and f_audio[3, 0] > 0.85


def test_hard_negatives_softmax_over_full_row_plus_1e4():
    """When the positive dominates the softmax, every allowed weight is ~1e-4: nearly uniform draws.

    This distinguishes LAVIS's softmax(full row) + 1e-4 from a softmax restricted to the candidates,
    which would pick candidate 3 (similarity 10 vs 0/5) almost always.
    """
    sim = 100.0 * np.eye(B_NEG)
    sim[0, 2], sim[0, 3] = 5.0, 10.0
    f_text, _, p_text, _ = _check_sampler(sim, np.eye(B_NEG, dtype=bool))
    np.testing.assert_allclose(p_text[0], [0] + [1 / (B_NEG - 1)] * (B_NEG - 1), atol=1e-3)
    assert f_text[0, 3] < 0.3


def test_hard_negatives_fallback_when_all_texts_identical():
    """Every pair shares its text: no allowed candidate, so fall back to any index but the positive."""
    rng = np.random.default_rng(2)
    sim = rng.standard_normal((B_NEG, B_NEG))
    off_diagonal = ~np.eye(B_NEG, dtype=bool)
    f_text, f_audio, p_text, _ = _check_sampler(sim, np.ones((B_NEG, B_NEG), dtype=bool))
    assert np.all(np.diag(f_text) == 0) and np.all(np.diag(f_audio) == 0)
    assert np.all(f_text[off_diagonal] > 0) and np.all(f_audio[off_diagonal] > 0)
    assert np.all(p_text[off_diagonal] > 0)


def test_hard_negatives_partial_fallback_row():
    """Only example 0 has no allowed candidate (its text matches every other); the rest are normal."""
    rng = np.random.default_rng(3)
    sim = rng.standard_normal((B_NEG, B_NEG))
    same_text = np.eye(B_NEG, dtype=bool)
    same_text[0, :] = True
    same_text[:, 0] = True
    same_text[1, 2] = same_text[2, 1] = True
    f_text, f_audio, p_text, _ = _check_sampler(sim, same_text)
    assert np.all(p_text[0, 1:] > 0) and p_text[0, 0] == 0
    assert f_text[0, 0] == 0 and f_audio[0, 0] == 0
    assert np.all(f_text[0, 1:] > 0) and np.all(f_audio[0, 1:] > 0)
    assert f_text[1, 2] == 0 and f_text[1, 0] == 0 and f_audio[1, 2] == 0 and f_audio[1, 0] == 0


def test_hard_negatives_keys_matter_and_are_deterministic():
    rng = np.random.default_rng(4)
    sim = jnp.asarray(rng.standard_normal((B_NEG, B_NEG)), jnp.float32)
    same = jnp.eye(B_NEG, dtype=bool)
    t1, a1 = _draw_many(NUM_DRAWS, sim, same)
    t2, a2 = _draw_many(NUM_DRAWS, sim, same)
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t2))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    # Different keys (rows of the draws) give different samples, and the two directions use
    # different randomness.
    assert len({tuple(r) for r in np.asarray(t1[:50])}) > 1
    assert not np.array_equal(np.asarray(t1), np.asarray(a1))


# ---------------------------------------------------------------------------------------------------
# Matching (ITM).


@pytest.mark.parametrize("n", [1, 6, 48])
def test_matching_loss(n):
    rng = np.random.default_rng(n)
    logits = (2.0 * rng.standard_normal((n, 2))).astype(np.float32)
    labels = rng.integers(0, 2, n)
    loss, acc = losses.matching_loss(jnp.asarray(logits), jnp.asarray(labels))
    ref_loss = np.mean([-_log_softmax(logits[k])[labels[k]] for k in range(n)])
    ref_acc = np.mean([int(np.argmax(logits[k]) == labels[k]) for k in range(n)])
    np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(acc), ref_acc, rtol=0, atol=1e-7)


def test_matching_loss_known_values():
    logits = np.array([[0.0, 0.0], [5.0, -5.0], [-1.0, 2.0]], np.float32)
    labels = np.array([1, 0, 0])
    loss, acc = losses.matching_loss(jnp.asarray(logits), jnp.asarray(labels))
    expected = (np.log(2) + np.log1p(np.exp(-10.0)) + (3.0 + np.log1p(np.exp(-3.0)))) / 3
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)
    # Row 0 ties: argmax picks class 0 (first maximum), which != 1; row 1 right; row 2 wrong.
    np.testing.assert_allclose(float(acc), 1 / 3, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Language modelling (LM).


def ref_lm_loss(logits, targets, weights, eps):
    """PyTorch F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100, label_smoothing)."""
    b, length, _ = logits.shape
    total, count = 0.0, 0.0
    for i in range(b):
        for t in range(length):
            if weights[i, t] == 0:
                continue
            total += weights[i, t] * ref_smoothed_ce(logits[i, t][None], np.array([targets[i, t]]), eps)[0]
            count += weights[i, t]
    return total / count


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("b,length,v", [(1, 1, 3), (3, 7, 11), (4, 16, 257)])
def test_language_modeling_loss(b, length, v, eps):
    rng = np.random.default_rng(b * 100 + length + v)
    logits = (2.0 * rng.standard_normal((b, length, v))).astype(np.float32)
    targets = rng.integers(0, v, (b, length))
    # Variable-length sequences: weight 1 on a prefix of each row, at least one token overall.
    lengths = rng.integers(1, length + 1, b)
    weights = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    # Ignored positions carry PyTorch's ignore index; they must contribute nothing.
    targets = np.where(weights > 0, targets, -100)
    got = losses.language_modeling_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), eps)
    np.testing.assert_allclose(float(got), ref_lm_loss(logits, targets, weights, eps), rtol=RTOL, atol=ATOL)


def test_language_modeling_loss_is_token_mean_not_sequence_mean():
    """Rows of different lengths: the mean is over tokens, so a long row weighs more than a short one."""
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((2, 8, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 8))
    weights = np.zeros((2, 8), np.float32)
    weights[0, :1] = 1
    weights[1, :8] = 1
    got = float(
        losses.language_modeling_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    )
    np.testing.assert_allclose(got, ref_lm_loss(logits, targets, weights, 0.0), rtol=RTOL)
    per_row = [ref_lm_loss(logits[i : i + 1], targets[i : i + 1], weights[i : i + 1], 0.0) for i in range(2)]
    assert abs(got - np.mean(per_row)) > 1e-3


def test_language_modeling_loss_default_no_smoothing_and_bool_weights():
    rng = np.random.default_rng(10)
    logits = rng.standard_normal((2, 4, 6)).astype(np.float32)
    targets = rng.integers(0, 6, (2, 4))
    weights = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    got = float(
        losses.language_modeling_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    )
    np.testing.assert_allclose(got, ref_lm_loss(logits, targets, weights.astype(np.float64), 0.0), rtol=RTOL)
