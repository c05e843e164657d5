"""Stage two through an int8 LLM (`llm.quantization=int8`) on 8 simulated devices (data=2 x fsdp=2 x
tensor=2) against one device: the first update's loss and gradients, and how the int8 kernels and their
scales are sharded.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_llm_int8.py).
Usage: python tests/int8_sharded_check.py DATA_DIR
Prints one JSON line: {"loss": [8 devices, 1 device], "max_grad_diff": ..., "max_grad": ...,
"specs": {weight path: [dtype, PartitionSpec]}} for the first layer's q_proj.
"""

import json
import pathlib
import sys

import jax
import numpy as np

from slit.train import sharding, stage2
from tests.activation_sharding_check import MESH, first_update
from tests.test_levers_towers import LLM
from tests.test_train_stage2 import Built, stage2_config


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    config = stage2_config(sys.argv[1], pathlib.Path("unused"), **LLM, **{"llm.quantization": "int8"})
    single = Built(config, num_batches=1)  # one device
    mesh = sharding.make_mesh(MESH)
    rules = sharding.rules_dict(config.sharding_rules)
    setup = stage2.build_training(config, single.cfg, single.llm, mesh, rules)
    batch = single.batches[0]
    with jax.set_mesh(mesh):
        got, metrics = first_update(setup, batch, setup.step_fn)
    want, want_metrics = first_update(single.setup, batch, single.setup.step_fn)
    q_proj = setup.parts.frozen["llm"]["layers"][0]["attention"]["q_proj"]
    print(
        json.dumps(
            {
                "loss": [float(metrics["loss"]), float(want_metrics["loss"])],
                "max_grad_diff": max(
                    float(np.abs(got["grads"][k] - want["grads"][k]).max()) for k in want["grads"]
                ),
                "max_grad": max(float(np.abs(g).max()) for g in want["grads"].values()),
                "specs": {k: [str(v.dtype), str(v.sharding.spec)] for k, v in q_proj.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
