"""What every benchmark reports: the machine, and timings taken the same way."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import numpy as np


def machine() -> dict:
    """The machine the numbers were measured on."""
    import jax

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "jax_version": jax.__version__,
    }


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Times `fn()` (which must block until its result is ready); returns seconds: best, median, all."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": float(np.median(times)), "times_s": times}


def matmul_peak_flops(size: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """The practical matmul peak of the default JAX device, measured now (FLOP/s).

    Utilisation is reported against this number measured in the same run, since a shared machine's
    peak varies between runs.
    """
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    b = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    seconds = time_call(lambda: matmul(a, b).block_until_ready(), repeats=repeats)["best_s"]
    return 2 * size**3 / seconds
