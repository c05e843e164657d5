"""AdamW with linear warmup + cosine decay, global-norm clipping, no decay on biases and norms, and
per-part learning-rate multipliers (`optimizer.lr_multipliers`: {"bridge/projection": 10.0}).

The whole chain sits inside `optax.apply_if_finite`: a step whose gradients hold a NaN or Inf changes
neither the parameters nor the optimizer moments, and is counted (see `nonfinite_counts`). The
trainer aborts after `max_consecutive_nonfinite` such steps in a row (slit/train/loop.py), so optax's
own "apply anyway after N errors" never triggers.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import optax

from slit.train.checkpoint import path_name  # the checkpoints' "a/b/c" names


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


def multiplier_tree(params: dict, multipliers: Mapping[str, float]) -> dict:
    """Each weight's learning-rate multiplier: that of the longest key of `multipliers` that is its path
    or a folder of it ("bridge" covers "bridge/qformer/..."), else 1.

    Raises ValueError naming a key that matches no weight, with the top-level parts there are."""
    paths = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for key in multipliers:
        if not any(p == key or p.startswith(key.rstrip("/") + "/") for p in paths):
            parts = sorted({"/".join(p.split("/")[:2]) for p in paths})
            raise ValueError(
                f"optimizer.lr_multipliers: {key!r} names no trainable weight; "
                f"the trainable parts are {parts}"
            )

    def multiplier(path: tuple, _: jax.Array) -> float:
        name = path_name(path)
        matches = [k for k in multipliers if name == k or name.startswith(k.rstrip("/") + "/")]
        return float(multipliers[max(matches, key=len)]) if matches else 1.0

    return jax.tree_util.tree_map_with_path(multiplier, params)


def lr_multipliers(opt: ml_collections.ConfigDict) -> dict[str, float]:
    """The config's `optimizer.lr_multipliers`: "part=multiplier,part=multiplier" (the command-line form,
    e.g. "bridge/projection=10,bridge/qformer=0.1") or a {part: multiplier} dict; {} when empty or absent
    (runs recorded before it existed).

    Raises ValueError for text that is not of that form."""
    value = opt.get("lr_multipliers", None) or {}
    if isinstance(value, str):
        pairs = [item.split("=") for item in value.replace(" ", ",").split(",") if item]
        if any(len(pair) != 2 or not pair[0] for pair in pairs):
            raise ValueError(f"optimizer.lr_multipliers={value!r}: write part=multiplier,part=multiplier")
        value = dict(pairs)
    return {str(k): float(v) for k, v in dict(value).items()}


def scale_by_multipliers(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies each weight's update by its `multiplier_tree` entry (stateless; nothing when empty).
    After AdamW, this scales the learning rate and the weight decay of that part alike; 0 holds the part
    where it starts (it is still saved with the run)."""

    def init(params: dict) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: dict, state: optax.EmptyState, params: dict | None = None) -> tuple:
        scales = multiplier_tree(updates, multipliers)
        return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, scales), state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The stage optimizer and its schedule, from the config's `optimizer` group."""
    schedule = learning_rate_schedule(opt, total_steps)
    parts = [
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask),
    ]
    multipliers = lr_multipliers(opt)
    if multipliers:  # (only then: the optimizer state of runs without multipliers keeps its structure)
        parts.append(scale_by_multipliers(multipliers))
    tx = optax.chain(*parts)
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
