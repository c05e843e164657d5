"""Dropout (slit.models.layers.dropout) against its definition: each element kept independently with
probability 1 - rate, kept elements scaled so that the expectation is unchanged."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slit.models.layers import dropout


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_scale_and_independence(rate):
    shape = (400, 501)  # an odd element count: the last 32-bit draw is half used
    y = np.asarray(dropout(jnp.ones(shape), rate, nnx.Rngs(dropout=3)))
    kept = y != 0
    n = kept.size
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(kept.mean() - (1 - rate)) < 5 * sigma
    assert np.allclose(y[kept], 1 / (1 - rate), rtol=1e-4)
    assert abs(y.mean() - 1.0) < 5 * sigma / (1 - rate)
    # Neighbours (the two halves of one draw) and rows are uncorrelated.
    flat = kept.reshape(-1).astype(float)
    for a, b in ((flat[0::2][: n // 2], flat[1::2][: n // 2]), (kept[:-1].ravel(), kept[1:].ravel())):
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(len(a))


def test_identity_in_evaluation_and_fresh_masks_per_draw():
    x = jnp.arange(12.0).reshape(3, 4)
    assert dropout(x, 0.1, None) is x and dropout(x, 0.0, nnx.Rngs(dropout=0)) is x
    rngs = nnx.Rngs(dropout=0)
    first, second = (np.asarray(dropout(jnp.ones((64, 64)), 0.5, rngs)) != 0 for _ in range(2))
    assert (first != second).mean() > 0.3
