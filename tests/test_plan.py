"""`slit plan`: the train step compiled ahead of time from abstract weights (slit/train/plan.py).

The per-device bytes are checked against hand counts of the architecture (formulas of the T5 layout and
the linear bridge, divided by the mesh axes each weight's logical axes map to), and XLA's FLOPs against
the LM head's matmuls, which dominate a model with a large vocabulary.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys

import pytest

from slit import cli
from slit import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A tiny stage-two model whose weights are easy to count: the random Whisper tower of
# configs/stage2_synthetic.py (frozen; its cached features feed the step), the linear bridge (trained),
# and a random T5 (frozen, float32) of these sizes.
D, LAYERS, HEADS, FF, BUCKETS = 64, 1, 4, 96, 32
ENCODER_WIDTH, BATCH, ANSWER = 64, 8, 24
CONFIG = """
import ml_collections
from slit import config as config_lib

def get_config():
    c = config_lib.load_config_file({base!r})
    c.unlock()
    c.features = "cached"
    c.bridge.kind = "linear"
    c.bridge.num_tokens = 8
    c.bridge.hidden = 0
    c.optimizer.lr_multipliers = ""
    c.llm.kind = "random"
    c.llm.arch = "t5"
    c.llm.width, c.llm.layers, c.llm.heads, c.llm.mlp_dim = {d}, {layers}, {heads}, {ff}
    c.llm.vocab_size = {vocab}
    c.batch_size = {batch}
    c.eval.batch_size = {batch}
    c.data.max_answer_length = {answer}
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    return c
"""


def write_config(tmp_path: pathlib.Path, vocab: int, name: str = "tiny_plan.py") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(
        CONFIG.format(
            base=str(ROOT / "configs" / "stage2_synthetic.py"),
            d=D,
            layers=LAYERS,
            heads=HEADS,
            ff=FF,
            vocab=vocab,
            batch=BATCH,
            answer=ANSWER,
        )
    )
    return path


def t5_bytes_per_device(vocab: int, fsdp: int, tensor: int, itemsize: int = 4) -> int:
    """The T5 layout's weights by formula, as one device holds them: the matrices carry `embed` (-> fsdp)
    and one of heads / mlp / vocab (-> tensor); the RMSNorm scales `embed` only; the two relative-position
    tables (buckets x heads) `heads` only."""
    d, n = D, LAYERS
    matrices = 2 * vocab * d + n * (4 * d * d + 3 * d * FF) + n * (8 * d * d + 3 * d * FF)
    norms = n * 2 * d + n * 3 * d + 2 * d
    position_tables = 2 * BUCKETS * HEADS
    return itemsize * (matrices // (fsdp * tensor) + norms // fsdp + position_tables // tensor)


def linear_bridge_bytes_per_device(fsdp: int) -> int:
    """LayerNorm scale and bias (encoder width) and the projection's kernel and bias, float32, each split
    along its first `embed` axis over fsdp."""
    return 4 * (2 * ENCODER_WIDTH + ENCODER_WIDTH * D + D) // fsdp


def test_plan_cli_search_table_json_and_hand_counts(tmp_path: pathlib.Path) -> None:
    """`slit plan --search` on 4 simulated devices (its own process): the table and the recommendation
    print, the JSON holds every mesh of 4, and each mesh's bytes per device are the hand counts."""
    vocab = 1000
    config = write_config(tmp_path, vocab)
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "slit.cli", "plan", "--config", str(config), "--devices", "4"]
    command += ["--search", "--compile-limit", "1", "--memory-per-device", "1", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trainable parameters |" in result.stdout
    assert "| activations and temporaries |" in result.stdout
    assert "recommended mesh: --config.mesh.data=" in result.stdout
    assert "fits in 1 GiB per device" in result.stdout
    plan = json.loads(out.read_text())
    meshes = sorted((c["mesh"]["data"], c["mesh"]["fsdp"], c["mesh"]["tensor"]) for c in plan["candidates"])
    assert meshes == [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)]
    for candidate in plan["candidates"]:
        f, t = candidate["mesh"]["fsdp"], candidate["mesh"]["tensor"]
        assert candidate["parts"]["frozen"]["llm"] == t5_bytes_per_device(vocab, f, t), candidate["mesh"]
        assert candidate["param_bytes"] == linear_bridge_bytes_per_device(f), candidate["mesh"]
    chosen = plan["plan"]
    f, t = chosen["mesh"]["fsdp"], chosen["mesh"]["tensor"]
    assert chosen["parts"]["frozen"]["llm"] == t5_bytes_per_device(vocab, f, t)
    assert chosen["param_bytes"] == linear_bridge_bytes_per_device(f)
    # Adam: two float32 moments per trained weight, split as the weight; a few replicated scalar counts.
    assert 0 <= chosen["optimizer_bytes"] - 2 * chosen["param_bytes"] <= 64
    # XLA's arguments: the state, the T5 and the batch (the cached features' step never reads the audio
    # tower, so jit prunes it; so are a few optimizer scalars the step does not read) and the step key.
    expected = chosen["param_bytes"] + chosen["optimizer_bytes"] + chosen["parts"]["frozen"]["llm"]
    assert abs(chosen["argument_bytes"] - (expected + chosen["batch_bytes"])) <= 256
    assert chosen["total_bytes"] > chosen["argument_bytes"] and chosen["flops"] > 0 and plan["fits"] is True


def test_plan_allocates_no_weights_and_counts_the_lm_head_flops(tmp_path: pathlib.Path, capsys) -> None:
    """A T5 whose two 200M-row vocabulary tables hold 102 GB of float32 (more than this machine's memory)
    plans on one device in this process, and is said not to fit 16 GiB, naming the weights first; the
    process's peak memory stays far below the weights'. XLA's
    FLOPs are the LM head's: (B x La x d) @ (d x V) forward and its input gradient backward (the frozen
    head gets no weight gradient), 2 x 2 x B x La x d x V, which dwarfs the rest of the model."""
    import jax

    vocab = 200_000_000
    config = write_config(tmp_path, vocab)
    out = tmp_path / "plan.json"
    cache = jax.config.jax_enable_compilation_cache
    command = ["plan", "--config", str(config), "--devices", "1", "--memory-per-device", "16"]
    code = cli.main([*command, "--out", str(out)])
    assert code == 1  # does not fit
    assert jax.config.jax_enable_compilation_cache == cache  # turned off for the plan only
    plan = json.loads(out.read_text())["plan"]
    weights = plan["parts"]["frozen"]["llm"]
    assert weights == t5_bytes_per_device(vocab, 1, 1) > 100e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux: KiB)
    assert peak < weights / 10
    lm_head = 2 * 2 * BATCH * ANSWER * D * vocab
    assert lm_head <= plan["flops"] <= 1.1 * lm_head, plan["flops"] / lm_head
    printed = capsys.readouterr().out
    assert "| FLOPs per step |" in printed
    assert "does not fit in 16 GiB per device" in printed and "- weights (" in printed


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["--devices", "8", "--config.mesh.data=3"], "data*fsdp*tensor = 3 but there are 8 devices"),
        (["--devices", "3"], "not divisible by the data-parallel size 3"),
        (["--devices", "4", "--config.audio_encoder.kind=whisper"], "slit plan builds architectures"),
    ],
)
def test_plan_refuses_a_mesh_that_cannot_work(tmp_path: pathlib.Path, capsys, overrides, words) -> None:
    """Meshes the devices or the batch cannot take, and configs that would read weights, are refused
    before anything compiles, naming the problem."""
    config = write_config(tmp_path, 1000)
    code = cli.main(["plan", "--config", str(config), *overrides])
    assert code == 2
    assert words in capsys.readouterr().err


def test_mesh_candidates_are_every_factorisation() -> None:
    from slit.train.plan import mesh_candidates

    meshes = {(m["data"], m["fsdp"], m["tensor"]) for m in mesh_candidates(8)}
    by_hand = {(a, b, c) for a in (1, 2, 4, 8) for b in (1, 2, 4, 8) for c in (1, 2, 4, 8) if a * b * c == 8}
    assert meshes == by_hand and len(by_hand) == 10


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "devices"),
    [("configs/paper_slit_stage2.py", 8), ("configs/paper_whisper_llama7b_stage2.py", 64)],
)
def test_paper_configs_plan(tmp_path: pathlib.Path, config: str, devices: int) -> None:
    """The paper-scale plans of the README (minutes each on 2 cores)."""
    loaded = config_lib.load_config_file(ROOT / config)
    assert loaded.llm.kind == "random" and loaded.audio_encoder.kind == "random"
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "slit.cli", "plan", "--config", str(ROOT / config)]
    command += ["--devices", str(devices), "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(out.read_text())["plan"]
    assert plan["argument_bytes"] > 0 and plan["flops"] > 0


@pytest.mark.slow
def test_stage_one_plans(tmp_path: pathlib.Path, capsys) -> None:
    """Stage one's step plans too (one device, in this process): its trainable Q-Former and heads, the
    frozen tower, and Adam's two moments per trained weight."""
    out = tmp_path / "plan.json"
    code = cli.main(
        ["plan", "--config", str(ROOT / "configs" / "stage1_synthetic.py"), "--devices", "1"]
        + ["--out", str(out)]
    )
    assert code == 0
    plan = json.loads(out.read_text())["plan"]
    assert set(plan["parts"]["params"]) >= {"qformer", "audio_projection", "text_projection"}
    assert set(plan["parts"]["frozen"]) == {"audio_tower"}
    assert 0 <= plan["optimizer_bytes"] - 2 * plan["param_bytes"] <= 64
