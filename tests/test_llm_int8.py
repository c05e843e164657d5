"""`llm.quantization=int8` through stage two: the frozen LLM's layers held as int8 with a float32 scale
per output channel (slit/models/llm/quantize.py; its parity with transformers on the dequantised weights
is in tests/test_parity_llama.py), trained against, evaluated, exported and loaded back."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_levers_towers import LLM
from tests.test_train_stage2 import stage2_config


def _frozen(llm: nnx.Module) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(llm))}


def test_stage_two_trains_through_an_int8_llm_and_its_bundle_loads_it_again(tiny_data_dir, tmp_path):
    """(That the train step's frozen weights stay int8 in their shardings: tests/test_bench_train_step.py
    and the slow 8-device test below.)"""
    from slit import config as config_lib
    from slit import export
    from slit.train import stage2
    from slit.train.stage2_model import load_llm

    plain = _frozen(load_llm(stage2_config(tiny_data_dir, pathlib.Path("unused"), **LLM).llm)[0])
    int8_llm, _, source = load_llm(
        stage2_config(tiny_data_dir, pathlib.Path("unused"), **LLM, **{"llm.quantization": "int8"}).llm
    )
    int8 = _frozen(int8_llm)
    assert {str(x.dtype) for x in int8.values()} == {"int8", "float32"} and "int8" in source
    kernels = [k for k in plain if "['layers']" in k and "['kernel']" in k]
    assert kernels and all(int8[k].dtype == jnp.int8 for k in kernels)
    # Every layer kernel goes from 4 bytes to 1, plus 4 bytes of scale per output channel.
    saved = sum(x.nbytes for x in plain.values()) - sum(x.nbytes for x in int8.values())
    assert 0.9 * 3 * sum(plain[k].size for k in kernels) < saved < 3 * sum(plain[k].size for k in kernels)

    workdir = tmp_path / "run"
    workdir.mkdir()
    config = stage2_config(
        tiny_data_dir,
        pathlib.Path("unused"),
        total_steps=2,
        checkpoint_every_steps=2,
        **LLM,
        **{
            "llm.quantization": "int8",
            "eval.max_clips": 4,
            "eval.batch_size": 4,
            "eval.tasks": ("captioning",),
        },
    )
    stage2.validate(config, num_devices=1)
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    stage2.train(config, workdir)
    assert (workdir / "eval").is_dir()
    # The bundle records the int8 LLM's fingerprint; loading it quantises the same way and matches.
    bundle = export.load_bundle(export.export(workdir, "bundle", tmp_path / "bundle"))
    assert "int8" in bundle.info["frozen_models"]["llm"]["source"]
    from slit import runs
    from slit.generate import answerer

    trained = runs.load_trained(workdir)
    gen = answerer.generation_config(trained.config, num_beams=1, do_sample=False)
    rng = np.random.default_rng(0)
    audio, num_samples = rng.normal(0, 0.1, (2, 16000)).astype(np.float32), np.array([16000, 12000])
    instructions = ["describe the sound", "what is the sound"]
    want = trained.answer(audio, num_samples, instructions, gen)
    assert bundle.model.answer(audio, num_samples, instructions, gen) == want and all(want)
    # Resuming against the float weights is refused by the frozen-model fingerprints, naming both.
    from slit.errors import UserError

    config.llm.quantization, config.total_steps = "none", 3
    with pytest.raises(UserError, match="frozen models differ") as refused:
        stage2.train(config, workdir)
    assert "int8" in str(refused.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"llm.quantization": "int4"}, "llm.quantization='int4': use one of 'none', 'int8'"),
        ({"llm.quantization": "int8", "llm.trainable": True}, "a quantised LLM is frozen"),
        ({"llm.quantization": "int8", "llm.arch": "t5"}, "with a T5 LLM"),
    ],
)
def test_quantization_values_that_cannot_work_are_named(tiny_data_dir, overrides, message):
    from slit.errors import UserError
    from slit.train import stage2

    config = stage2_config(tiny_data_dir, pathlib.Path("unused"), **{**LLM, **overrides})
    with pytest.raises(UserError, match=re.escape(message)):
        stage2.validate(config, num_devices=1)


def test_slit_plan_sizes_an_int8_llm_without_its_weights():
    """The abstract LLM slit plan compiles: int8 layer kernels, float32 scales (also under a bf16
    param_dtype), the embedding in param_dtype; a quarter of the layers' float32 bytes."""
    from slit import config as config_lib
    from slit.train import plan
    from tests.test_train_stage2 import CONFIG_FILE

    config = config_lib.load_config_file(CONFIG_FILE)
    config_lib.apply_overrides(
        config, [(k, str(v)) for k, v in LLM.items()] + [("llm.param_dtype", "bfloat16")]
    )
    sizes = {}
    for quantization in ("none", "int8"):
        config.llm.quantization = quantization
        _, state = plan._abstract_llm(config.llm)
        leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}
        sizes[quantization] = {k: (x.dtype, x.size) for k, x in leaves.items()}
    int8 = sizes["int8"]
    kernels = [k for k in int8 if "['layers']" in k and k.endswith("['kernel'].value")]
    assert kernels and all(int8[k][0] == jnp.int8 for k in kernels)
    scales = [k for k in int8 if "kernel_scale" in k]
    assert len(scales) == len(kernels) and all(int8[k][0] == jnp.float32 for k in scales)
    assert int8["['embedding'].value"][0] == jnp.bfloat16
    assert all(sizes["none"][k][0] == jnp.bfloat16 for k in kernels)


@pytest.mark.slow  # ~1 min: a second variant (8 devices) of the int8 stage two tested above
def test_int8_stage_two_sharded_over_8_devices_equals_one_device(tiny_data_dir):
    """The int8 kernels shard by their logical axes (their scales by the output axis), and the sharded
    step's first update equals the single device's."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, xla_flags

    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    script = str(ROOT / "tests" / "int8_sharded_check.py")
    done = subprocess.run(
        [sys.executable, script, tiny_data_dir], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["specs"]["kernel"] == ["int8", "P('fsdp', 'tensor')"]
    assert result["specs"]["kernel_scale"] == ["float32", "P('tensor',)"]
    np.testing.assert_allclose(*result["loss"], rtol=1e-6)
    assert result["max_grad_diff"] <= 1e-5 * max(1.0, result["max_grad"])
