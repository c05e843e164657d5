"""Gradient accumulation (`grad_accum_steps` = k): one optimizer update from k micro-batches.

The global batch the data pipeline yields stays `batch_size` rows (so the data order, the checkpoints
and resuming are those of the plain step); inside the jitted step it is split into k micro-batches of
batch_size / k rows, and a `jax.lax.scan` runs the forward and backward pass of one micro-batch at a
time, adding its gradients into one accumulator: the activations held are one micro-batch's.

Micro-batch i holds rows i, i + k, i + 2k, ... of the global batch. Each device holds the same number
of rows of every micro-batch (batch_size must divide by k x the data-parallel size), so splitting
moves no data, and a micro-batch has the same rows whatever the mesh.

What one accumulated update equals is the trainer's choice (slit/train/stage1.py, stage2.py): stage
two's answer-token loss is exactly the full batch's; stage one's contrastive and matching losses take
their negatives from each micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from slit.train import sharding


def micro_batches(batch: dict, k: int) -> dict:
    """Splits every (B, ...) array of `batch` into (k, B / k, ...): [i] holds rows i, i + k, i + 2k, ...

    The reshape to (B / k, k, ...) keeps each device's rows where they are (B / k divides over the
    data-parallel axes); the swap puts the micro-batch index first, for `jax.lax.scan`."""

    def split(x: jax.Array) -> jax.Array:
        rest = (None,) * (x.ndim - 1)
        rows = sharding.constrain(x.reshape(x.shape[0] // k, k, *x.shape[1:]), ("batch", None, *rest))
        return sharding.constrain(jnp.swapaxes(rows, 0, 1), (None, "batch", *rest))

    return jax.tree.map(split, batch)


def accumulate(
    grads_and_metrics: Callable[[dict, jax.Array], tuple[dict, dict]],
    batch: dict,
    k: int,
    params: dict,
    param_shardings: dict | None = None,
) -> tuple[dict, dict]:
    """Sums the gradients of k micro-batches of `batch` in one `jax.lax.scan`.

    grads_and_metrics(micro_batch, i) -> (grads shaped like `params`, metrics of scalars) for micro-batch
    i (0 <= i < k, a traced int32), each micro-batch a dict of (B / k, ...) arrays. The accumulator is
    float32 (or wider) and, given `param_shardings`, sharded like the params; the sum is returned in the
    gradients' own dtype. Returns (summed grads, metrics stacked over micro-batches: each (k,)).
    """
    micro = micro_batches(batch, k)

    def zeros(p: jax.Array) -> jax.Array:
        return jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32))

    total = jax.tree.map(zeros, params)
    if param_shardings is not None:
        total = jax.lax.with_sharding_constraint(total, param_shardings)

    def body(total: dict, inputs: tuple[jax.Array, dict]) -> tuple[dict, dict]:
        i, micro_batch = inputs
        grads, metrics = grads_and_metrics(micro_batch, i)
        return jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, grads), metrics

    total, metrics = jax.lax.scan(body, total, (jnp.arange(k, dtype=jnp.int32), micro))
    return jax.tree.map(lambda t, p: t.astype(p.dtype), total, params), metrics


def accumulation_problems(config: ml_collections.ConfigDict, data_parallel: int | None) -> list[str]:
    """What is wrong with `grad_accum_steps` for this config's batch (in words; [] if nothing):
    batch_size must divide by grad_accum_steps x the data-parallel size (None: unknown, taken as 1)."""
    k = int(config.get("grad_accum_steps", 1))
    if k < 1:
        return [f"grad_accum_steps={k} must be at least 1 (1: no accumulation)"]
    dp = data_parallel or 1
    if k > 1 and config.batch_size % (k * dp):
        return [
            f"batch_size={config.batch_size} is not divisible by grad_accum_steps={k} x the data-parallel "
            f"size {dp} = {k * dp}: each of the {k} micro-batches must split evenly over the devices; use a "
            f"batch_size that is a multiple of {k * dp}"
        ]
    return []


def step_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The train step's options read from the config: accum_steps (`grad_accum_steps`, default 1) and
    whether tower-boundary activations are constrained (`activation_sharding`, default True)."""
    return {
        "accum_steps": int(config.get("grad_accum_steps", 1)),
        "activation_sharding": bool(config.get("activation_sharding", True)),
    }
