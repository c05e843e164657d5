"""Q-Former self-attention masks against explicit-loop references of the BLIP-2 rules, and end to end.

Sequence layout [queries; text], L = num_queries + text_len; mask[b, i, j] True when i may attend to j.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slit.models import masks
from slit.models.qformer import QFormer, QFormerConfig

# ---------------------------------------------------------------------------------------------------
# References, one (i, j) at a time.


def ref_text_only(text_valid: np.ndarray) -> np.ndarray:
    b, t = text_valid.shape
    out = np.zeros((b, t, t), bool)
    for n in range(b):
        for i in range(t):
            for j in range(t):
                out[n, i, j] = bool(text_valid[n, j])  # every text sees every non-padding text
    return out


def ref_bidirectional(num_queries: int, text_valid: np.ndarray) -> np.ndarray:
    b, t = text_valid.shape
    length = num_queries + t
    out = np.zeros((b, length, length), bool)
    for n in range(b):
        for i in range(length):
            for j in range(length):
                if j < num_queries:
                    out[n, i, j] = True  # every position sees every query
                else:
                    out[n, i, j] = bool(text_valid[n, j - num_queries])  # and every non-padding text
    return out


def ref_grounded_generation(num_queries: int, text_valid: np.ndarray) -> np.ndarray:
    b, t = text_valid.shape
    q = num_queries
    length = q + t
    out = np.zeros((b, length, length), bool)
    for n in range(b):
        for i in range(length):
            for j in range(length):
                if i < q:
                    out[n, i, j] = j < q  # queries see only queries
                elif j < q:
                    out[n, i, j] = True  # text sees every query
                else:
                    ti, tj = i - q, j - q
                    out[n, i, j] = tj <= ti and bool(text_valid[n, tj])  # causal, non-padding text
    return out


def _padding_patterns(text_len: int) -> np.ndarray:
    """Rows: no padding, right padding, only the first token valid, a hole in the middle, all valid."""
    rows = [
        np.ones(text_len, bool),
        np.arange(text_len) < max(1, text_len - 2),
        np.arange(text_len) < 1,  # all padding after the first token
        np.array([k % 3 != 1 for k in range(text_len)]),
    ]
    return np.stack(rows)


CASES = [(1, 1), (1, 4), (3, 5), (4, 7), (32, 6), (0, 5)]


@pytest.mark.parametrize("num_queries,text_len", CASES)
def test_text_only_mask(num_queries, text_len):
    del num_queries
    valid = _padding_patterns(text_len)
    got = np.asarray(masks.text_only_mask(jnp.asarray(valid)))
    assert got.dtype == np.bool_ and got.shape == (valid.shape[0], text_len, text_len)
    np.testing.assert_array_equal(got, ref_text_only(valid))


@pytest.mark.parametrize("num_queries,text_len", CASES)
def test_bidirectional_mask(num_queries, text_len):
    valid = _padding_patterns(text_len)
    got = np.asarray(masks.bidirectional_mask(num_queries, jnp.asarray(valid)))
    length = num_queries + text_len
    assert got.dtype == np.bool_ and got.shape == (valid.shape[0], length, length)
    np.testing.assert_array_equal(got, ref_bidirectional(num_queries, valid))


@pytest.mark.parametrize("num_queries,text_len", CASES)
def test_grounded_generation_mask(num_queries, text_len):
    valid = _padding_patterns(text_len)
    got = np.asarray(masks.grounded_generation_mask(num_queries, jnp.asarray(valid)))
    length = num_queries + text_len
    assert got.dtype == np.bool_ and got.shape == (valid.shape[0], length, length)
    np.testing.assert_array_equal(got, ref_grounded_generation(num_queries, valid))


def test_masks_random_padding():
    """Random (not prefix-shaped) validity patterns, several batch rows."""
    rng = np.random.default_rng(0)
    for q, t in [(2, 9), (5, 3)]:
        valid = rng.random((6, t)) < 0.6
        valid[:, 0] = True
        v = jnp.asarray(valid)
        np.testing.assert_array_equal(np.asarray(masks.text_only_mask(v)), ref_text_only(valid))
        np.testing.assert_array_equal(np.asarray(masks.bidirectional_mask(q, v)), ref_bidirectional(q, valid))
        np.testing.assert_array_equal(
            np.asarray(masks.grounded_generation_mask(q, v)), ref_grounded_generation(q, valid)
        )


def test_mask_properties_in_words():
    q, t = 4, 6
    valid = _padding_patterns(t)
    gen = np.asarray(masks.grounded_generation_mask(q, jnp.asarray(valid)))
    bi = np.asarray(masks.bidirectional_mask(q, jnp.asarray(valid)))
    txt = np.asarray(masks.text_only_mask(jnp.asarray(valid)))
    pad_cols = ~valid  # (B, T)

    # Generation: queries never see text.
    assert not gen[:, :q, q:].any()
    # Generation: queries see all queries; text sees all queries.
    assert gen[:, :, :q].all()
    # Generation: text never sees future text.
    for ti in range(t):
        assert not gen[:, q + ti, q + ti + 1 :].any()
    # Generation: a valid text token sees itself.
    for n in range(valid.shape[0]):
        for ti in range(t):
            assert gen[n, q + ti, q + ti] == valid[n, ti]
    # Nothing sees padding, under any mask.
    for n in range(valid.shape[0]):
        assert not gen[n][:, q:][:, pad_cols[n]].any()
        assert not bi[n][:, q:][:, pad_cols[n]].any()
        assert not txt[n][:, pad_cols[n]].any()
    # Matching: every position sees every query and every valid text token.
    for n in range(valid.shape[0]):
        assert bi[n][:, :q].all() and bi[n][:, q:][:, valid[n]].all()
    # Every row (even a padding row) has at least one visible key: no all-masked softmax.
    assert gen.any(-1).all() and bi.any(-1).all() and txt.any(-1).all()


# ---------------------------------------------------------------------------------------------------
# End to end through a tiny Q-Former.

NUM_QUERIES = 4
TEXT_LEN = 6
ATOL = 1e-6


@pytest.fixture(scope="module")
def tiny_qformer():
    config = QFormerConfig(
        vocab_size=50,
        num_queries=NUM_QUERIES,
        num_layers=2,
        width=32,
        num_heads=4,
        mlp_dim=64,
        cross_attention_freq=2,
        encoder_width=16,
        max_text_positions=32,
        dropout_rate=0.0,
    )
    model = QFormer(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    feature_mask = jnp.asarray([[True] * 5, [True, True, True, False, False]])

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(ids, mask):
        m = nnx.merge(graphdef, state)
        return m(text_ids_bl=ids, attention_mask_bll=mask, encoder_bfd=features, encoder_mask_bf=feature_mask)

    run.model = model
    run.features, run.feature_mask = features, feature_mask
    return run


def _ids():
    rng = np.random.default_rng(1)
    return rng.integers(1, 50, (2, TEXT_LEN))


def _changed(ids: np.ndarray, pos: int) -> np.ndarray:
    out = ids.copy()
    out[:, pos] = out[:, pos] % 49 + 1  # ids in 1..49, each moved to another id in 1..49
    assert np.all(out[:, pos] != ids[:, pos])
    return out


def test_qformer_generation_mask_is_causal_and_blinds_queries(tiny_qformer):
    valid = np.ones((2, TEXT_LEN), bool)
    mask = masks.grounded_generation_mask(NUM_QUERIES, jnp.asarray(valid))
    ids = _ids()
    base = np.asarray(tiny_qformer(jnp.asarray(ids), mask))
    assert base.shape == (2, NUM_QUERIES + TEXT_LEN, 32)

    later = 4
    out = np.asarray(tiny_qformer(jnp.asarray(_changed(ids, later)), mask))
    # Queries are blind to text; text before the changed token cannot see it.
    np.testing.assert_allclose(out[:, :NUM_QUERIES], base[:, :NUM_QUERIES], atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        out[:, : NUM_QUERIES + later], base[:, : NUM_QUERIES + later], atol=ATOL, rtol=0
    )
    # The changed position and those after it do change.
    for p in range(later, TEXT_LEN):
        assert np.abs(out[:, NUM_QUERIES + p] - base[:, NUM_QUERIES + p]).max() > 1e-3

    earlier = 1
    out = np.asarray(tiny_qformer(jnp.asarray(_changed(ids, earlier)), mask))
    np.testing.assert_allclose(
        out[:, : NUM_QUERIES + earlier], base[:, : NUM_QUERIES + earlier], atol=ATOL, rtol=0
    )
    for p in range(earlier, TEXT_LEN):
        assert np.abs(out[:, NUM_QUERIES + p] - base[:, NUM_QUERIES + p]).max() > 1e-3


def test_qformer_bidirectional_mask_queries_see_text(tiny_qformer):
    valid = np.ones((2, TEXT_LEN), bool)
    mask = masks.bidirectional_mask(NUM_QUERIES, jnp.asarray(valid))
    ids = _ids()
    base = np.asarray(tiny_qformer(jnp.asarray(ids), mask))
    out = np.asarray(tiny_qformer(jnp.asarray(_changed(ids, TEXT_LEN - 1)), mask))
    # A late token changes the queries and every earlier text position.
    for p in range(NUM_QUERIES + TEXT_LEN):
        assert np.abs(out[:, p] - base[:, p]).max() > 1e-4, p


@pytest.mark.parametrize("mask_fn", [masks.grounded_generation_mask, masks.bidirectional_mask])
def test_qformer_padding_tokens_are_invisible(tiny_qformer, mask_fn):
    valid = np.ones((2, TEXT_LEN), bool)
    valid[0, 3:] = False  # row 0: three padding tokens at the end
    valid[1, 1:] = False  # row 1: all padding after the first token
    mask = mask_fn(NUM_QUERIES, jnp.asarray(valid))
    ids = _ids()
    base = np.asarray(tiny_qformer(jnp.asarray(ids), mask))
    other = ids.copy()
    rng = np.random.default_rng(2)
    other[~valid] = rng.integers(1, 50, int((~valid).sum()))
    assert np.any(other != ids)
    out = np.asarray(tiny_qformer(jnp.asarray(other), mask))
    keep = np.concatenate([np.ones((2, NUM_QUERIES), bool), valid], axis=1)
    for n in range(2):
        np.testing.assert_allclose(out[n][keep[n]], base[n][keep[n]], atol=ATOL, rtol=0)
    assert np.all(np.isfinite(out))


def test_generation_from_the_query_pass_equals_the_joint_pass(tiny_qformer):
    """Grounded generation as stage one computes it (a text-only pass attending to the keys and values
    of the queries-only pass, as LAVIS reuses `past_key_values`) gives the text rows of the joint
    [queries; text] pass under the grounded-generation mask, padding included."""
    model = tiny_qformer.model
    valid = np.ones((2, TEXT_LEN), bool)
    valid[1, 4:] = False
    ids = jnp.asarray(np.where(valid, _ids(), 0))
    joint = np.asarray(tiny_qformer(ids, masks.grounded_generation_mask(NUM_QUERIES, jnp.asarray(valid))))
    f, fm = tiny_qformer.features, tiny_qformer.feature_mask
    queries, query_kv = model(encoder_bfd=f, encoder_mask_bf=fm, return_self_kv=True)
    text = model(
        text_ids_bl=ids,
        with_queries=False,
        attention_mask_bll=masks.grounded_generation_text_mask(NUM_QUERIES, jnp.asarray(valid)),
        prefix_kv=query_kv,
    )
    np.testing.assert_allclose(np.asarray(queries), joint[:, :NUM_QUERIES], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(text)[valid], joint[:, NUM_QUERIES:][valid], atol=1e-5, rtol=0)
