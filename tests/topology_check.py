"""One hop of the topology-change test: restore a workdir's checkpoint onto this process's mesh,
check it, then train on to a target step (which saves again).

Run as a subprocess, with XLA_FLAGS=--xla_force_host_platform_device_count=N set for N devices.
Usage: python tests/topology_check.py DATA_DIR WORKDIR DATA FSDP TOTAL_STEPS
Prints one JSON line: what was restored and whether it equalled the checkpoint bit for bit.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from slit.train import checkpoint, sharding, stage1, stage1_model
from tests.conftest import tiny_config


def read_checkpoint_on_host(directory: pathlib.Path, step: int) -> dict:
    """The saved state as NumPy arrays, read without any mesh."""
    with checkpoint.read_only_manager(directory) as manager:
        return checkpoint.read_on_host(manager, step)["state"]


def by_name(tree: dict) -> dict:
    """Leaves keyed by their path as plain names, so that a namedtuple (optax state) and the dict
    orbax reads it back as compare equal."""

    def name(key: object) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {"/".join(map(name, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main() -> None:
    data_dir, workdir, data, fsdp, total_steps = sys.argv[1:]
    workdir = pathlib.Path(workdir)
    overrides = {"mesh.data": int(data), "mesh.fsdp": int(fsdp), "total_steps": int(total_steps)}
    config = tiny_config(data_dir, checkpoint_every_steps=0, **overrides)
    result = {"devices": jax.device_count()}

    if (workdir / "checkpoints").is_dir():
        tokenizer = stage1_model.make_tokenizer(config, workdir)
        mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules_dict(config.sharding_rules)
        setup = stage1.build_training(config, tokenizer, mesh, rules)
        frozen = checkpoint.frozen_identity(setup.parts.frozen, stage1_model.frozen_sources(config))
        ckpt = checkpoint.Checkpointer(workdir, config, frozen)
        from slit.data import pipeline, sources

        spec = pipeline.AudioSpec(16000, int(config.data.max_seconds * 16000))
        source = sources.open_split(config.data.name, config.data.data_dir, "train")
        data_iter = iter(
            pipeline.train_dataset(
                source,
                tokenizer,
                spec,
                max_text_length=config.data.max_text_length,
                global_batch_size=8,
                seed=0,
            )
        )
        start = ckpt.resolve_start(setup.state, setup.state_shardings, data_iter)
        ckpt.close()
        saved = read_checkpoint_on_host(workdir / "checkpoints", start.step)
        restored = jax.device_get(start.state)
        saved, restored = by_name(saved), by_name(restored)
        result["restored_step"] = start.step
        result["same_names"] = sorted(saved) == sorted(restored)
        result["bitwise_equal"] = all(np.array_equal(saved[k], restored[k]) for k in saved)
        target = jax.tree.leaves(setup.state_shardings)
        result["shardings_match"] = all(
            leaf.sharding.is_equivalent_to(s, leaf.ndim)
            for leaf, s in zip(jax.tree.leaves(start.state), target, strict=True)
        )
        result["fsdp_sharded_leaves"] = sum(
            "fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(start.state)
        )

    stage1.train(config, workdir)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
