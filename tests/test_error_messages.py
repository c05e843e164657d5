"""Error messages about many weights name the first few and count the rest, instead of hundreds."""

import jax
import numpy as np
import pytest

from slit.errors import some_names
from slit.train import pretrained


def test_some_names_shows_at_most_the_limit_then_counts_the_rest():
    names = [f"w{i}" for i in range(15)]
    assert some_names(names[:3]) == "w0, w1, w2"
    assert some_names(names, limit=10) == ", ".join(names[:10]) + " and 5 more"
    assert some_names([]) == ""


def test_put_like_names_a_few_of_many_missing_weights():
    abstract = {f"layer_{i:02d}": {"kernel": jax.ShapeDtypeStruct((2, 2), np.float32)} for i in range(30)}
    values = {"layer_00": {"kernel": np.zeros((2, 2), np.float32)}, "extra": np.zeros(3)}
    with pytest.raises(ValueError) as raised:
        pretrained.put_like(abstract, values, {})
    message = str(raised.value)
    assert "missing layer_01.kernel" in message and "and 18 more" in message  # 29 missing + 1 unexpected
    assert "layer_29" not in message and len(message) < 400
