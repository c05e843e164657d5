"""AdamW with linear warmup + cosine decay, global-norm clipping, no decay on biases and norms.

The whole chain sits inside `optax.apply_if_finite`: a step whose gradients hold a NaN or Inf changes
neither the parameters nor the optimizer moments, and is counted (see `nonfinite_counts`). The
trainer aborts after `max_consecutive_nonfinite` such steps in a row (slit/train/loop.py), so optax's
own "apply anyway after N errors" never triggers.
"""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_learning_rate`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        decay_steps=max(total_steps, opt.warmup_steps + 1),
        end_value=opt.min_learning_rate,
    )


def decay_mask(params: dict) -> dict:
    """True for weights that take weight decay (matrices, tables); not biases, norms, scalars (ndim < 2)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The stage optimizer and its schedule, from the config's `optimizer` group."""
    schedule = learning_rate_schedule(opt, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask),
    )
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER), schedule


_NEVER = 2**31 - 1  # optax would apply non-finite updates after this many; the trainer aborts long before


def nonfinite_counts(opt_state: optax.ApplyIfFiniteState) -> dict:
    """Skipped steps so far: {"nonfinite_consecutive": int32, "nonfinite_total": int32} (jax scalars)."""
    return {
        "nonfinite_consecutive": opt_state.notfinite_count,
        "nonfinite_total": opt_state.total_notfinite,
    }


def apply_gradients(
    tx: optax.GradientTransformation, schedule: optax.Schedule, state: dict, grads: dict, metrics: dict
) -> tuple[dict, dict]:
    """One optimizer update of a train state {"step", "params", "opt_state"}; adds grad_norm, the
    learning rate and the non-finite-step counters to `metrics`. Returns (new state, metrics)."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(
        metrics,
        grad_norm=optax.global_norm(grads),
        learning_rate=schedule(state["step"]),
        **nonfinite_counts(opt_state),
    )
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics
