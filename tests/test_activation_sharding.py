"""Activation sharding constraints named by logical axes (slit.train.sharding.constrain): the tower
boundaries of both stages' train steps carry the PartitionSpecs the config's sharding_rules give them, on
8 simulated devices (data=2 x fsdp=2 x tensor=2); a switch turns them off; and the sharded stage-two
step with them (plain, and with 2 micro-batches) equals the single-device step.

Stage one's sharded step, with these constraints on (the default), is compared with one device, and
its constraints checked, by tests/test_train_stage1.py::test_sharded_step_equals_single_device (and the
slow test here checks stage one's switch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slit.train import sharding
from tests.conftest import ROOT, xla_flags

BATCH = '{"data", "fsdp"}'  # the rules' batch -> (data, fsdp); embed -> fsdp is then taken: replicated
RULES = {"batch": ("data", "fsdp"), "embed": "fsdp", "vocab": "tensor"}


def run_check(data_dir: str, work_dir: str, *flags: str) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags(8),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
    )
    script = str(ROOT / "tests" / "activation_sharding_check.py")
    result = subprocess.run(
        [sys.executable, script, data_dir, work_dir, *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def has(found: list[list[str]], shape: str, spec: str) -> bool:
    return [shape, spec] in found


def test_constrain_is_a_no_op_without_rules_or_mesh():
    x = jnp.ones((8, 4, 6))

    def lowered(rules: dict | None) -> str:
        def f(x: jax.Array) -> jax.Array:
            with sharding.activation_sharding(rules):
                return sharding.constrain(x * 2, ("batch", "length", "embed"))

        return jax.jit(f).lower(x).as_text()

    assert (
        "sharding_constraint"
        not in jax.jit(lambda x: sharding.constrain(x, ("batch", None, None))).lower(x).as_text()
    )
    assert "sharding_constraint" not in lowered(None)  # activation_sharding=False
    assert "sharding_constraint" not in lowered(RULES)  # no mesh set
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with jax.set_mesh(mesh):
        assert "sharding_constraint" not in lowered(RULES)  # one device: nothing to split
    np.testing.assert_array_equal(jax.jit(lambda x: sharding.constrain(x, ("batch", None, None)))(x), x)


@pytest.fixture(scope="module")
def report(tiny_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_check(tiny_data_dir, str(tmp_path_factory.mktemp("activation_sharding")))


def test_tower_boundaries_carry_their_logical_shardings(report):
    # Stage two (tests/test_train_stage2.py's tiny Llama, width 32, an even vocabulary; batch 8): the
    # encoder's features (100 frames of 2 s, width 32), the soft prompt (4 queries), the LLM's input
    # embeddings (4 + 16 instruction + 10 answer positions) and the answer logits (10 positions), their
    # vocabulary over tensor.
    s2, vocab = report["stage2"], report["stage2"]["vocab"]
    assert vocab % 2 == 0
    for shape in ("8x100x32", "8x4x32", "8x30x32"):
        assert has(s2["on"], shape, f"{BATCH}, {{}}, {{}}"), (shape, s2["on"])
    assert has(s2["on"], f"8x10x{vocab}", f'{BATCH}, {{}}, {{"tensor"}}'), s2["on"]
    # activation_sharding=False: none of them.
    boundary = {"8x100x32", "8x4x32", "8x30x32", f"8x10x{vocab}"}
    assert not [c for c in s2["off"] if c[0] in boundary], s2["off"]


def test_micro_batches_stay_on_their_devices(report):
    """With 2 micro-batches, each (8, ...) input is viewed as (4, 2, ...) and then (2, 4, ...) with the
    batch axis split the same way, and the boundaries inside the scan are constrained at 4 rows."""
    accum, vocab = report["stage2"]["accum"], report["stage2"]["vocab"]
    for name, shape in report["stage2"]["batch_shapes"].items():
        rest = "".join(f"x{n}" for n in shape[1:])
        tail = ", {}" * (len(shape) - 1)
        assert has(accum, f"4x2{rest}", f"{BATCH}, {{}}{tail}"), (name, accum)
        assert has(accum, f"2x4{rest}", f"{{}}, {BATCH}{tail}"), (name, accum)
    assert has(accum, "4x30x32", f"{BATCH}, {{}}, {{}}") and has(
        accum, f"4x10x{vocab}", f'{BATCH}, {{}}, {{"tensor"}}'
    )


@pytest.mark.slow
def test_sharded_stage_two_step_with_constraints_equals_one_device(tiny_data_dir, tmp_path):
    report = run_check(tiny_data_dir, str(tmp_path), "--compare")
    # Stage one (tests/conftest.py's tiny sizes): the encoder's features (8, 100, 32), the Q-Former's
    # query outputs (8, 4, 32), the generation logits (8, 23 text positions, a vocabulary that tensor=2
    # need not divide); none with activation_sharding=False.
    s1 = report["stage1"]
    assert has(s1["on"], "8x100x32", f"{BATCH}, {{}}, {{}}") and has(
        s1["on"], "8x4x32", f"{BATCH}, {{}}, {{}}"
    )
    assert any(shape.startswith("8x23x") and spec.startswith(BATCH) for shape, spec in s1["on"]), s1["on"]
    assert not [c for c in s1["off"] if c[0] in ("8x100x32", "8x4x32")], s1["off"]
    compare = report["compare"]
    for name in ("on", "accum"):  # 8 devices with constraints; and with 2 micro-batches as well
        got = compare[name]
        assert got["loss"][0] == pytest.approx(got["loss"][1], abs=1e-5), (name, got)
        # Adam's first moment is 0.1 x the gradient: gradients within 1e-5 ...
        assert got["max_grad_diff"] < 1e-6 and got["max_grad"] > 1e-4, (name, got)
        # ... and the params after the first update within 1e-5 where the gradient is clearly nonzero.
        assert got["max_param_diff"] < 1e-5, (name, got)
