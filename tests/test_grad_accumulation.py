"""Gradient accumulation (`grad_accum_steps`): one optimizer update from k micro-batches, scanned inside
the step, against independent references, with the trainers' own AdamW, schedule and non-finite guard.

- Stage two: the accumulated step equals the plain full-batch step (loss, gradients, updated params;
  1e-5), for both loss averages (tokens by default; examples as a slow variant).
- Stage one (slow: a stage-one compile of its own): the accumulated step equals its definition
  computed here without the scan: the mean of k plain gradient computations, micro-batch i being rows
  i, i + k, ... with the key fold_in(key, i) (which draws the matching loss's hard negatives, so the
  keys matter), then one optimizer update.
- The schedule and the non-finite guard count updates, not micro-batches; the config checks name the
  values.

Gradients are read from Adam's first moment after the first update (mu = (1 - b1) * clipped gradient).
Params are compared where the gradient is clearly nonzero (|g| > 1e-6): Adam's first update is
lr * g / (|g| + eps), so an element whose gradient is float32 rounding noise around zero moves by +-lr
in either step (as tests/test_train_stage1.py's sharded check).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from slit import config as config_lib
from slit.models.layers import Frozen
from slit.train import accumulation, sharding, stage1, stage1_model, stage2
from slit.train.optimizer import apply_gradients, make_optimizer
from tests.conftest import tiny_config, train_batches
from tests.test_train_stage2 import Built, adam_moments, flat, stage2_config, write_tiny_llama

K = 2


def one_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def copy(tree: object) -> object:
    return jax.tree.map(lambda x: x.copy(), tree)


def at_step_one(state: dict) -> dict:
    """A copy of a fresh state whose schedule is past its one warmup step (learning rate > 0); Adam's
    state is still the fresh one."""
    return dict(copy(state), step=state["step"] + 1)


def gradients(state: dict, b1: float) -> dict[str, np.ndarray]:
    """The (clipped) gradient of a first update, from Adam's first moment."""
    return {k: v / (1 - b1) for k, v in flat(jax.device_get(adam_moments(state["opt_state"]).mu)).items()}


def assert_same_update(state: dict, want: dict, b1: float) -> None:
    """Gradients within 1e-5; params within 1e-5 where the gradient is clearly nonzero."""
    grads, want_grads = gradients(state, b1), gradients(want, b1)
    params, want_params = flat(jax.device_get(state["params"])), flat(jax.device_get(want["params"]))
    assert max(np.abs(grads[k] - want_grads[k]).max() for k in grads) < 1e-5
    assert max(np.abs(g).max() for g in want_grads.values()) > 1e-3  # (and not trivially zero)
    for name, g in want_grads.items():
        clear = np.abs(g) > 1e-6
        np.testing.assert_allclose(params[name][clear], want_params[name][clear], atol=1e-5, err_msg=name)
    assert int(state["step"]) == int(want["step"]) == 2


# --------------------------------------------------------------------------------------------------
# Stage two: exactly the plain step
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_two(tiny_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """tests/test_train_stage2.py's tiny setup (so its plain step is the compiled program that file's
    tests run, read from the session's compilation cache)."""
    llm_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    return Built(stage2_config(tiny_data_dir, llm_dir), num_batches=1)


def with_loss_average(built: Built, loss_average: str) -> object:
    """The model's graphdef with another loss_average (a static field of its config)."""
    parts = built.setup.parts
    model = nnx.merge(parts.graphdef, built.setup.state["params"], parts.frozen)
    model.config = dataclasses.replace(model.config, loss_average=loss_average)
    return nnx.split(model, nnx.Param, Frozen)[0]


@pytest.fixture(scope="module")
def steps(stage_two: Built) -> object:
    """steps(loss_average) -> (plain step, accumulated step of K micro-batches), jitted once each, with
    the trainer's optimizer and schedule; "tokens"' plain step is the trainer's own (`setup.step_fn`)."""
    config, setup = stage_two.config, stage_two.setup
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)

    @functools.cache
    def make(loss_average: str) -> tuple:
        graphdef = with_loss_average(stage_two, loss_average)
        plain = setup.step_fn
        if loss_average != "tokens":
            plain = jax.jit(stage2.make_train_step(graphdef, tx, schedule, dropout=False))
        accumulated = stage2.make_train_step(
            graphdef, tx, schedule, dropout=False, accum_steps=K, param_shardings=setup.parts.param_shardings
        )
        return plain, jax.jit(accumulated)

    return make


@pytest.mark.parametrize("loss_average", ["tokens", pytest.param("examples", marks=pytest.mark.slow)])
def test_stage_two_accumulated_step_equals_the_plain_step(stage_two, steps, loss_average):
    config, setup = stage_two.config, stage_two.setup
    batch = stage_two.batches[0]
    answers = batch["answer_ids"]
    # The micro-batches (rows 0, 2, 4, ... and 1, 3, 5, ...) hold different numbers of answer tokens, so
    # averaging each micro-batch by its own tokens would not give the full batch's mean.
    assert (answers[0::K] >= 0).sum() != (answers[1::K] >= 0).sum()
    plain_step, step = steps(loss_average)
    key = jax.random.key(0)
    plain_state, plain = jax.device_get(plain_step(at_step_one(setup.state), setup.parts.frozen, batch, key))
    state, metrics = jax.device_get(step(at_step_one(setup.state), setup.parts.frozen, batch, key))
    assert_same_update(state, plain_state, config.optimizer.b1)
    assert float(metrics["loss"]) == pytest.approx(float(plain["loss"]), abs=1e-5)
    assert float(metrics["token_accuracy"]) == pytest.approx(float(plain["token_accuracy"]), abs=1e-6)
    assert int(metrics["answer_tokens"]) == int(plain["answer_tokens"]) == int((answers >= 0).sum())
    assert float(metrics["grad_norm"]) == pytest.approx(float(plain["grad_norm"]), rel=1e-5)


def test_schedule_and_nonfinite_guard_count_updates(stage_two, steps):
    """Three accumulated steps are three updates; a NaN in one micro-batch skips one update, not k."""
    config, setup, batch = stage_two.config, stage_two.setup, stage_two.batches[0]
    _, schedule = make_optimizer(config.optimizer, config.total_steps)
    _, step = steps("tokens")
    nan_row = np.arange(config.batch_size)[:, None] == 1  # in micro-batch 1 only
    bad = dict(batch, audio=np.where(nan_row, np.nan, batch["audio"]).astype(np.float32))
    state, history = at_step_one(setup.state), []
    for b in (batch, bad, batch):
        state, metrics = step(state, setup.parts.frozen, b, jax.random.key(0))
        history.append(jax.device_get(metrics))
    assert int(state["step"]) == 4
    want_lr = [float(schedule(s)) for s in (1, 2, 3)]
    assert min(want_lr) > 0
    assert [float(m["learning_rate"]) for m in history] == pytest.approx(want_lr)
    assert [int(m["nonfinite_total"]) for m in history] == [0, 1, 1]
    assert [int(m["nonfinite_consecutive"]) for m in history] == [0, 1, 0]
    assert int(adam_moments(state["opt_state"]).count) == 2  # the skipped update left Adam's state alone


# --------------------------------------------------------------------------------------------------
# Stage one: the mean of the micro-batches' gradients, each with its own negatives
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_one(tiny_data_dir: str) -> tuple:
    """(config, setup, a batch, the first accumulated update): tests/test_train_stage1.py's tiny config
    at batch 16 with grad_accum_steps=2, so that its micro-batches have that file's batch size."""
    config = tiny_config(tiny_data_dir, **{"batch_size": 2 * 8, "grad_accum_steps": K})
    tokenizer = stage1_model.make_tokenizer(config, pathlib.Path("/nonexistent"))
    setup = stage1.build_training(
        config, tokenizer, one_device_mesh(), sharding.rules_dict(config.sharding_rules)
    )
    batches = [{k: b[k] for k in stage1.BATCH_KEYS} for b in train_batches(config, tokenizer, 1)]
    first = setup.step_fn(at_step_one(setup.state), setup.parts.frozen, batches[0], jax.random.key(5))
    return config, setup, batches, first


@pytest.mark.slow  # a stage-one compile of its own (~20 s); stage two's default test runs the same scan
def test_stage_one_accumulated_step_is_the_mean_of_micro_batch_gradients(tiny_data_dir, stage_one):
    config, setup, batches, (state, metrics) = stage_one
    batch, key = batches[0], jax.random.key(5)

    # The definition, without the scan: the plain step (tests/test_train_stage1.py's: batch 8, the same
    # model) on rows i::k with the key fold_in(key, i), one gradient each (read from Adam's first moment,
    # unclipped: their norms are under grad_clip_norm); their mean; one AdamW update from it.
    plain_config = tiny_config(tiny_data_dir)
    tokenizer = stage1_model.make_tokenizer(plain_config, pathlib.Path("/nonexistent"))
    plain = stage1.build_training(
        plain_config, tokenizer, one_device_mesh(), sharding.rules_dict(plain_config.sharding_rules)
    )
    b1 = config.optimizer.b1
    micro_grads, micro_metrics = [], []
    for i in range(K):
        micro = {n: v[i::K] for n, v in batch.items()}
        after, m = jax.device_get(
            plain.step_fn(at_step_one(setup.state), setup.parts.frozen, micro, jax.random.fold_in(key, i))
        )
        assert float(m["grad_norm"]) < config.optimizer.grad_clip_norm
        micro_grads.append(gradients(after, b1))
        micro_metrics.append(m)
    mean = {n: np.mean([g[n] for g in micro_grads], axis=0).astype(np.float32) for n in micro_grads[0]}
    grads = jax.tree_util.tree_unflatten(
        jax.tree.structure(setup.state["params"]), [mean[n] for n in flat(setup.state["params"])]
    )
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    want = jax.jit(lambda state, grads: apply_gradients(tx, schedule, state, grads, {})[0])(
        at_step_one(setup.state), grads
    )
    assert_same_update(state, want, b1)
    for name in ("loss", "itc_loss", "itm_loss", "itg_loss", "itm_accuracy", "temperature"):
        want_metric = np.mean([float(m[name]) for m in micro_metrics])
        assert float(metrics[name]) == pytest.approx(want_metric, abs=1e-5), name
    # Deterministic: the same step again gives the same update.
    again, _ = setup.step_fn(at_step_one(setup.state), setup.parts.frozen, batch, key)
    assert all(np.array_equal(x, y) for x, y in zip(*map(jax.tree.leaves, (again, state)), strict=True))


# --------------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "devices", "message"),
    [
        (
            {"grad_accum_steps": "3"},
            1,
            r"batch_size=16 is not divisible by grad_accum_steps=3 x the data-parallel size 1",
        ),
        (
            {"grad_accum_steps": "4", "mesh.data": "8"},
            8,
            r"grad_accum_steps=4 x the data-parallel size 8 = 32",
        ),
        ({"grad_accum_steps": "0"}, 1, "grad_accum_steps=0 must be at least 1"),
        ({"grad_accum_steps": "16"}, 1, "each micro-batch is a contrastive batch of its own"),
    ],
)
def test_validation_names_the_values(overrides, devices, message):
    config = config_lib.load_config_file(config_lib.configs_dir() / "stage1_synthetic.py")
    config_lib.apply_overrides(config, overrides.items())
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_stage1(config, num_devices=devices)


def test_accumulation_problems_for_stage_two_batches():
    config = config_lib.load_config_file(config_lib.configs_dir() / "stage2_synthetic.py")
    config.grad_accum_steps = 4
    assert (
        accumulation.accumulation_problems(config, 1) == accumulation.accumulation_problems(config, 2) == []
    )
    (problem,) = accumulation.accumulation_problems(config, 4)
    assert "batch_size=8 is not divisible by grad_accum_steps=4 x the data-parallel size 4 = 16" in problem
