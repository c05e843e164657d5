"""What both trainers share: the train state in its shardings, the jitted step, the config checks every
run needs, the global batches, and "loop, evaluate, or stop for preemption".

A stage trainer (slit/train/stage1.py, stage2.py) builds its model (`ModelParts`), gives its train step
and its evaluations, and calls these in order:

    setup = harness.build_training(config, parts, mesh, rules, batch_ranks, make_train_step)
    next_batch = harness.global_batches(train_iter, setup.batch_shardings, global_shapes)
    report = harness.train_then_evaluate(config, workdir, mesh, start, fns, ckpt, writer, train_iter, final)

The step loop itself (logging, periodic evaluation, checkpoints, non-finite guards) is slit/train/loop.py.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from slit import paths
from slit.errors import UserError
from slit.train import checkpoint, loop, sharding
from slit.train.metrics import MetricWriter
from slit.train.optimizer import lr_multipliers, make_optimizer, multiplier_tree
from slit.train.preemption import Preempted, PreemptionWatcher

T = TypeVar("T")

# (graphdef, tx, schedule) -> the pure step (state, frozen, batch, key) -> (state, metrics)
MakeTrainStep = Callable[
    [Any, optax.GradientTransformation, optax.Schedule], Callable[[dict, dict, dict, jax.Array], tuple]
]


@dataclasses.dataclass
class ModelParts:
    """The model split for jit: structure, trainable params, frozen weights, and their shardings."""

    graphdef: Any
    params: dict
    frozen: dict
    param_shardings: dict
    frozen_shardings: dict


@dataclasses.dataclass
class TrainingSetup:
    """Everything the loop needs: the model parts, the initial state, the jitted step and shardings.

    `model_config` is the stage's model dataclass (Stage1Config / Stage2Config), kept for the caller.
    """

    parts: ModelParts
    state: dict
    state_shardings: dict
    batch_shardings: dict
    step_fn: Any
    model_config: Any = None


def build_training(
    config: ml_collections.ConfigDict,
    parts: ModelParts,
    mesh: jax.sharding.Mesh,
    rules: dict,
    batch_ranks: Mapping[str, int],
    make_train_step: MakeTrainStep,
    model_config: Any = None,  # noqa: ANN401
) -> TrainingSetup:
    """The sharded train state and the jitted step, for any stage's model.

    The state ({step: (), params, opt_state}) is initialised directly into its shardings (the optimizer
    state follows its params' shardings) and donated to every step; frozen weights are a separate,
    never-donated argument with no optimizer state. `batch_ranks` names the batch's arrays and their
    ranks ({"audio": 2, "text_ids": 2, ...}): each is sharded over its leading (batch) axis.
    `parts.params` is handed to the state (set to None here).
    """
    try:
        multiplier_tree(parts.params, lr_multipliers(config.optimizer))
    except ValueError as e:
        raise UserError(str(e)) from None
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    rep = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, parts.params),
        parts.param_shardings,
        transform_non_params=lambda _: rep,
    )
    state_shardings = {"step": rep, "params": parts.param_shardings, "opt_state": opt_shardings}
    with jax.set_mesh(mesh):
        state = jax.jit(
            lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
            out_shardings=state_shardings,
        )(parts.params)
    if jax.process_index() == 0:
        print(describe_parameters(parts.params, parts.frozen), file=sys.stderr)
    parts.params = None  # the state owns them now (and donates them every step)
    batch_shardings = {k: sharding.batch_sharding(mesh, rules, n) for k, n in batch_ranks.items()}
    step_fn = jax.jit(
        make_train_step(parts.graphdef, tx, schedule),
        in_shardings=(state_shardings, parts.frozen_shardings, batch_shardings, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
    return TrainingSetup(parts, state, state_shardings, batch_shardings, step_fn, model_config)


def _count(tree: Any) -> int:  # noqa: ANN401
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _millions(count: int) -> str:
    if count >= 100_000:
        return f"{count / 1e6:.2f} M"
    return f"{count / 1e3:.2f} k" if count >= 10_000 else f"{count:,}"


def describe_parameters(params: Mapping[str, Any], frozen: Mapping[str, Any]) -> str:
    """One line: what trains and what is frozen, by top-level component, largest first, e.g.
    "Parameters: trained 1.23 M (qformer 1.10 M, audio_tower 0.12 M, ...); frozen 134.52 M (llm)"."""

    def listing(tree: Mapping[str, Any]) -> str:
        counts = sorted(((_count(v), k) for k, v in tree.items()), reverse=True)
        total = sum(c for c, _ in counts)
        return f"{_millions(total)} (" + ", ".join(f"{k} {_millions(c)}" for c, k in counts) + ")"

    trained = listing(params) if params else "nothing"
    held = listing(frozen) if frozen else "nothing"
    return f"Parameters: trained {trained}; frozen {held}"


def parameter_scalars(params: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, int]:
    """{"trained_parameters": N, "frozen_parameters": M}: logged at step 0 (metrics.jsonl), so that
    `slit report` can set each run's size beside its scores (shapes only; nothing is fetched)."""
    return {"trained_parameters": _count(params), "frozen_parameters": _count(frozen)}


def data_parallel_size(config: ml_collections.ConfigDict, num_devices: int) -> int | None:
    """How many ways the batch is split (the product of the mesh axes `batch` maps to); None when the
    mesh or the rules cannot be resolved (`common_problems` says why)."""
    try:
        shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
    except ValueError:
        return None
    sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
    axes = _batch_axes(config)
    if any(a not in sizes for a in axes):
        return None
    return math.prod(sizes[a] for a in axes)


def _batch_axes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    target = dict(sharding.rules_dict(config.sharding_rules)).get("batch")
    return (target,) if isinstance(target, str) else tuple(target or ())


def common_problems(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> list[str]:
    """What is wrong with the parts of a config every trainer reads (mesh and sharding rules, batch size,
    step counts, resume_from / init_from, the non-finite guard, the optimizer), in words; [] if nothing."""
    problems = []
    try:
        shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        problems.append(str(e))
        shape = None
    if shape is not None:
        sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
        batch_axes = _batch_axes(config)
        unknown_axes = [a for a in batch_axes if a not in sizes]
        if unknown_axes:
            problems.append(f"sharding_rules: 'batch' maps to unknown mesh axes {unknown_axes}")
        else:
            dp = math.prod(sizes[a] for a in batch_axes)
            if config.batch_size % dp:
                problems.append(
                    f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                    f"({' x '.join(f'{a}={sizes[a]}' for a in batch_axes)}); use a multiple of {dp}"
                )
    for name, target in sharding.rules_dict(config.sharding_rules).items():
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in sharding.MESH_AXES]
        if bad:
            problems.append(f"sharding_rules: {name!r} maps to {bad}, not one of {sharding.MESH_AXES}")
    if config.batch_size % num_processes:
        problems.append(f"batch_size={config.batch_size} is not divisible by {num_processes} processes")
    for key in ("total_steps", "log_every_steps", "batch_size"):
        if config[key] <= 0:
            problems.append(f"{key}={config[key]} must be positive")
    for key in ("eval_every_steps", "checkpoint_every_steps", "checkpoint_keep_period"):
        if config[key] < 0:
            problems.append(f"{key}={config[key]} must be >= 0 (0 turns it off)")
    if config.resume_from and config.init_from:
        problems.append("resume_from and init_from are both set; a run starts from one of them")
    if config.init_from and not paths.workdir_path(config.init_from).exists():
        problems.append(f"init_from={config.init_from}: no such workdir or checkpoint")
    if config.resume_from and not paths.workdir_path(config.resume_from).exists():
        problems.append(f"resume_from={config.resume_from}: no such workdir or checkpoint")
    if preemption_check_every(config) < 1:
        problems.append(
            f"preemption_check_every_steps={config.preemption_check_every_steps} must be at least 1"
        )
    if config.max_consecutive_nonfinite < 1:
        problems.append(f"max_consecutive_nonfinite={config.max_consecutive_nonfinite} must be at least 1")
    opt = config.optimizer
    if opt.warmup_steps < 0:
        problems.append(f"optimizer.warmup_steps={opt.warmup_steps} must be >= 0")
    elif opt.warmup_steps > config.total_steps > 0:
        problems.append(
            f"optimizer.warmup_steps={opt.warmup_steps} is more than total_steps={config.total_steps}; "
            f"for a short run add --config.optimizer.warmup_steps={config.total_steps // 10}"
        )
    if opt.learning_rate <= 0 or not 0 <= opt.min_learning_rate <= opt.learning_rate:
        problems.append("optimizer: need learning_rate > 0 and 0 <= min_learning_rate <= learning_rate")
    try:
        negative = {k: v for k, v in lr_multipliers(opt).items() if v < 0}
    except (TypeError, ValueError):
        problems.append(
            f"optimizer.lr_multipliers={opt.get('lr_multipliers')!r}: write part=number,part=number"
        )
    else:
        if negative:
            problems.append(f"optimizer.lr_multipliers: {negative} must be >= 0 (0 holds a part fixed)")
    return problems


def global_batches(
    data_iter: Iterator[dict],
    batch_shardings: Mapping[str, jax.sharding.NamedSharding],
    global_shapes: Mapping[str, tuple[int, ...]],
    to_model: Callable[[dict], dict] = lambda local: local,
) -> Callable[[], dict]:
    """`next_batch()` for the loop: this process's next batch (after `to_model`) placed as global arrays,
    one per key of `batch_shardings`, each of its `global_shapes` entry (the global batch on axis 0)."""

    def next_batch() -> dict:
        local = to_model(next(data_iter))
        return {
            k: sharding.host_to_global(local[k], shard, global_shapes[k])
            for k, shard in batch_shardings.items()
        }

    return next_batch


def preemption_check_every(config: ml_collections.ConfigDict) -> int:
    """How many steps apart the hosts of a multi-process run share a preemption signal (default 10)."""
    return int(config.get("preemption_check_every_steps", 10))


def train_then_evaluate(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    mesh: jax.sharding.Mesh,
    start: checkpoint.Start,
    fns: loop.StepFunctions,
    ckpt: checkpoint.Checkpointer,
    writer: MetricWriter,
    data_iter: Any,  # noqa: ANN401 (a grain DatasetIterator)
    evaluate: Callable[[dict, Callable[[], bool]], T | None],
    kept: Callable[[], str] = lambda: "",
) -> T:
    """Runs the loop from `start` to config.total_steps under the preemption watcher, then
    `evaluate(final state, should_stop)` (still watched: it returns None when it stopped for a signal).

    Raises Preempted when the loop or the evaluation was stopped; `kept()` says what a stopped
    evaluation saved (e.g. "12 batches saved in DIR"). Returns the evaluation's result.
    """
    with jax.set_mesh(mesh), PreemptionWatcher(preemption_check_every(config)) as watcher:
        state = loop.run(config, workdir, start.state, start.step, fns, ckpt, writer, data_iter, watcher)
        ckpt.close()
        result = evaluate(state, lambda: watcher.should_stop(config.total_steps))
    if result is None:
        raise Preempted(config.total_steps, str(ckpt.directory / str(config.total_steps)), kept())
    return result
