"""Activation sharding constraints on 8 simulated devices: which constraints the lowered stage-two train
steps hold (activation_sharding on and off; 2 micro-batches), and, with `--compare`, stage two's sharded
step (constraints on; plain and with 2 micro-batches) against the single-device step, and stage one's
lowered steps (on and off).

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(tests/test_activation_sharding.py).
Usage: python tests/activation_sharding_check.py DATA_DIR WORK_DIR [--compare]
Prints one JSON line: {"stage1": {"on": [[shape, spec], ...], "off": [...]}, "stage2": {...}, ...}.
"""

import json
import pathlib
import re
import sys

import jax
import numpy as np

from slit.train import sharding, stage1, stage1_model, stage2
from slit.train.optimizer import make_optimizer
from tests.conftest import tiny_config, train_batches
from tests.test_train_stage2 import Built, adam_moments, flat, stage2_config, write_tiny_llama

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
CONSTRAINT = re.compile(r"sdy\.sharding_constraint %\S+ <@\w+, \[(.*)\]> : tensor<([0-9x]+)x\w+>")


def constraints(lowered_text: str) -> list[list[str]]:
    """[shape "8x100x32", spec '{"data", "fsdp"}, {}, {}'] of every sharding constraint in the text."""
    return [[shape, spec] for spec, shape in CONSTRAINT.findall(lowered_text)]


def lowered(step: object, setup: object, batch: dict, mesh: jax.sharding.Mesh) -> str:
    with jax.set_mesh(mesh):
        return step.lower(setup.state, setup.parts.frozen, batch, jax.random.key(0)).as_text()


def switched_off(module: object, setup: object, config: object, **options: object) -> object:
    """The step of `setup`'s model jitted with other options (the trainer's own: `setup.step_fn`)."""
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    return jax.jit(module.make_train_step(setup.parts.graphdef, tx, schedule, dropout=False, **options))


def stage1_constraints(data_dir: str) -> dict:
    config = tiny_config(data_dir)
    tokenizer = stage1_model.make_tokenizer(config, pathlib.Path("/nonexistent"))
    mesh = sharding.make_mesh(MESH)
    setup = stage1.build_training(config, tokenizer, mesh, sharding.rules_dict(config.sharding_rules))
    batch = {k: v for k, v in train_batches(config, tokenizer, 1)[0].items() if k in stage1.BATCH_KEYS}
    return {
        "on": constraints(lowered(setup.step_fn, setup, batch, mesh)),
        "off": constraints(lowered(switched_off(stage1, setup, config), setup, batch, mesh)),
    }


def first_update(setup: object, batch: dict, step: object) -> tuple[dict, dict]:
    """(params, gradients from Adam's first moment), and the metrics, of one `step` from step 1."""
    state = jax.tree.map(lambda x: x.copy(), setup.state)
    state["step"] = state["step"] + 1
    state, metrics = step(state, setup.parts.frozen, batch, jax.random.key(0))
    state, metrics = jax.device_get((state, metrics))
    return {"params": flat(state["params"]), "grads": flat(adam_moments(state["opt_state"]).mu)}, metrics


def main() -> None:
    data_dir, work_dir, compare = sys.argv[1], pathlib.Path(sys.argv[2]), "--compare" in sys.argv
    assert jax.device_count() == 8, jax.device_count()
    # An even vocabulary (one more word when odd), so that the logits' vocab axis divides over tensor=2.
    llm_dir = write_tiny_llama(work_dir / "llm")
    vocab = len(json.loads((llm_dir / "tokenizer.json").read_text())["model"]["vocab"])
    if vocab % 2:
        llm_dir, vocab = write_tiny_llama(work_dir / "llm_even", words=["zzz"]), vocab + 1
    # (Stage one's default check is tests/test_train_stage1.py's sharded step; here with --compare.)
    report = {"stage1": stage1_constraints(data_dir) if compare else None, "stage2": {}}
    single = Built(stage2_config(data_dir, llm_dir), num_batches=1)  # one device
    batch = single.batches[0]
    mesh = sharding.make_mesh(MESH)
    rules = sharding.rules_dict(single.config.sharding_rules)
    config = single.config
    setup = stage2.build_training(config, single.cfg, single.llm, mesh, rules)
    steps = {
        "on": setup.step_fn,
        "off": switched_off(stage2, setup, config),
        "accum": switched_off(
            stage2,
            setup,
            config,
            accum_steps=2,
            param_shardings=setup.parts.param_shardings,
            activation_rules=rules,
            mesh=mesh,
        ),
    }
    results = {}
    for name, step in steps.items():
        report["stage2"][name] = constraints(lowered(step, setup, batch, mesh))
        if compare and name != "off":
            with jax.set_mesh(mesh):
                results[name] = first_update(setup, batch, step)
    report["stage2"]["vocab"] = vocab
    report["stage2"]["batch_shapes"] = {k: list(np.shape(v)) for k, v in batch.items()}
    if compare:
        want, want_metrics = first_update(single.setup, batch, single.setup.step_fn)
        report["compare"] = {
            name: {
                "loss": [float(metrics["loss"]), float(want_metrics["loss"])],
                "max_grad_diff": max(
                    float(np.abs(got["grads"][k] - want["grads"][k]).max()) for k in want["grads"]
                ),
                "max_grad": max(float(np.abs(g).max()) for g in want["grads"].values()),
                "max_param_diff": max(
                    float(
                        np.abs(got["params"][k] - want["params"][k])[np.abs(want["grads"][k]) > 1e-7].max(
                            initial=0
                        )
                    )
                    for k in want["params"]
                ),
            }
            for name, (got, metrics) in results.items()
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
