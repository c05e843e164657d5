"""Runs stage-one train steps on 1 device and on an 8-device mesh; prints the largest differences.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_train_stage1.py).
Usage: python tests/sharded_step_check.py DATA_DIR DATA FSDP TENSOR
"""

import functools
import json
import pathlib
import re
import sys

import jax
import numpy as np

from slit.train import sharding, stage1, stage1_model
from tests.conftest import tiny_config, train_batches

# A sharding constraint in the lowered text: its spec ('{"data", "fsdp"}, {}, {}') and shape ("8x100x64").
CONSTRAINT = re.compile(r"sdy\.sharding_constraint %\S+ <@\w+, \[(.*)\]> : tensor<([0-9x]+)x\w+>")


def run(config, devices, mesh_sizes, tokenizer, batches):
    mesh = sharding.make_mesh(mesh_sizes, devices)
    rules = sharding.rules_dict(config.sharding_rules)
    setup = stage1.build_training(config, tokenizer, mesh, rules)
    state, losses = setup.state, []
    key = jax.random.key(config.seed)
    grads_fn = jax.jit(
        functools.partial(stage1.loss_and_grads, setup.parts.graphdef, dropout=False),
        in_shardings=(
            setup.state_shardings["params"],
            setup.parts.frozen_shardings,
            setup.batch_shardings,
            sharding.replicated(mesh),
            sharding.replicated(mesh),
        ),
        out_shardings=(setup.state_shardings["params"], sharding.replicated(mesh)),
    )
    with jax.set_mesh(mesh):
        first = {k: jax.device_put(batches[0][k], setup.batch_shardings[k]) for k in stage1.BATCH_KEYS}
        # The activation sharding constraints in the step compared here (tests/test_activation_sharding.py)
        lowered = setup.step_fn.lower(state, setup.parts.frozen, first, key).as_text()
        constraints = [[shape, spec] for spec, shape in CONSTRAINT.findall(lowered)]
        grads, _ = grads_fn(state["params"], setup.parts.frozen, first, key, state["step"])
        grads = jax.device_get(grads)
        for batch in batches:
            batch = {k: jax.device_put(batch[k], setup.batch_shardings[k]) for k in stage1.BATCH_KEYS}
            state, metrics = setup.step_fn(state, setup.parts.frozen, batch, key)
            losses.append(float(metrics["loss"]))
            if len(losses) == 1:
                after_first_step = jax.device_get(state["params"])
    shardings = {
        "/".join(str(getattr(k, "key", k)) for k in path): str(leaf.sharding.spec)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])
    }
    return after_first_step, grads, losses, shardings, constraints


def main():
    data_dir, data, fsdp, tensor = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    assert jax.device_count() == 8, jax.device_count()
    config = tiny_config(data_dir, **{"qformer.width": 64, "qformer.mlp_dim": 128, "audio_encoder.width": 64})
    tokenizer = stage1_model.make_tokenizer(config, pathlib.Path("/nonexistent"))
    batches = train_batches(config, tokenizer, 3)
    single, single_grads, single_losses, _, _ = run(
        config, jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1}, tokenizer, batches
    )
    multi, multi_grads, multi_losses, specs, constraints = run(
        config, jax.devices(), {"data": data, "fsdp": fsdp, "tensor": tensor}, tokenizer, batches
    )

    # AdamW's first update is ~lr * sign(g): compare where the gradient's sign is unambiguous.
    def diff_where_clear(a, b, g):
        clear = np.abs(g) > 1e-6
        return float(np.max(np.abs(a - b)[clear])) if clear.any() else 0.0

    diffs = jax.tree.map(diff_where_clear, single, multi, single_grads)
    grad_diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), single_grads, multi_grads)
    print(
        json.dumps(
            {
                "max_grad_diff": max(jax.tree.leaves(grad_diffs)),
                "max_grad": max(float(np.max(np.abs(g))) for g in jax.tree.leaves(single_grads)),
                "max_param_diff": max(jax.tree.leaves(diffs)),
                "single_losses": single_losses,
                "multi_losses": multi_losses,
                "sharded_params": sum("fsdp" in s or "tensor" in s for s in specs.values()),
                "num_params": len(specs),
                "constraints": constraints,
            }
        )
    )


if __name__ == "__main__":
    main()
