"""The optimizer's per-part learning-rate multipliers, against a NumPy AdamW step written from
Loshchilov & Hutter (decoupled weight decay) and Kingma & Ba (bias-corrected moments)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from slit.train.optimizer import lr_multipliers, make_optimizer, multiplier_tree


def _opt(multipliers: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            learning_rate=1e-2,
            min_learning_rate=1e-2,
            warmup_steps=0,
            weight_decay=0.1,
            b1=0.9,
            b2=0.98,
            grad_clip_norm=1e6,
            lr_multipliers=multipliers,
        )
    )


def _adamw_first_step(p: np.ndarray, g: np.ndarray, lr: float, wd: float, b1: float, b2: float) -> np.ndarray:
    m, v = (1 - b1) * g, (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1), v / (1 - b2)
    decay = wd * p if p.ndim >= 2 else 0.0  # biases and norms take no decay
    return p - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + decay)


def test_multipliers_scale_each_part_and_zero_holds_it():
    rng = np.random.default_rng(0)
    params = {
        "bridge": {
            "qformer": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
            "projection": {"kernel": rng.normal(size=(4, 2))},
        },
        "head": {"kernel": rng.normal(size=(2, 2))},
    }
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    tx, _ = make_optimizer(_opt("bridge/qformer=0, bridge/projection=3"), total_steps=10)
    updates, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(params), params)
    new = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)

    expect = {"bridge/qformer": 0.0, "bridge/projection": 3.0, "head": 1.0}
    for path, (p, g, n) in {
        "bridge/qformer": (
            params["bridge"]["qformer"]["kernel"],
            grads["bridge"]["qformer"]["kernel"],
            new["bridge"]["qformer"]["kernel"],
        ),
        "bridge/projection": (
            params["bridge"]["projection"]["kernel"],
            grads["bridge"]["projection"]["kernel"],
            new["bridge"]["projection"]["kernel"],
        ),
        "head": (params["head"]["kernel"], grads["head"]["kernel"], new["head"]["kernel"]),
    }.items():
        ref = _adamw_first_step(p, g, 1e-2, 0.1, 0.9, 0.98)
        np.testing.assert_allclose(n - p, expect[path] * (ref - p), rtol=1e-4, atol=1e-7, err_msg=path)
    np.testing.assert_array_equal(new["bridge"]["qformer"]["bias"], params["bridge"]["qformer"]["bias"])


def test_longest_matching_part_wins_and_unknown_parts_are_refused():
    params = {"bridge": {"qformer": {"w": np.zeros(2)}, "projection": {"w": np.zeros(2)}}}
    tree = multiplier_tree(params, {"bridge": 2.0, "bridge/projection": 5.0})
    assert tree == {"bridge": {"qformer": {"w": 2.0}, "projection": {"w": 5.0}}}
    # "bridge/q" is a prefix of a name, not a folder: it matches nothing.
    with pytest.raises(ValueError, match=r"'bridge/q' names no trainable weight.*bridge/projection"):
        multiplier_tree(params, {"bridge/q": 0.0})


def test_the_command_line_form_and_its_errors():
    assert lr_multipliers(_opt("")) == {}
    assert lr_multipliers(_opt("a=1,b/c=0.5")) == {"a": 1.0, "b/c": 0.5}
    assert lr_multipliers(ml_collections.ConfigDict({"lr_multipliers": {"a": 2}})) == {"a": 2.0}
    with pytest.raises(ValueError, match="part=multiplier"):
        lr_multipliers(_opt("bridge/projection"))
