"""The training-step benchmarks: FLOP counts against hand-enumerated matrix products and against torch's
FlopCounterMode on the PyTorch reference; the train state's memory (Adam's two moments only; frozen
weights once, in their dtype); and both benchmarks end to end at the tiny size. No timings are checked."""

import dataclasses
import json

import numpy as np
import pytest

from slit.bench import flops
from slit.bench.shapes import SIZES, LlamaShape, QFormerShape, Stage1Shape, Stage2Shape


def mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) product."""
    return 2 * m * k * n


# A Q-Former small enough to enumerate: 2 layers (cross-attention in layer 0 only), width 4, 2 queries.
Q, W, M, V, LAYERS = 2, 4, 8, 10, 2
F, E, T, B, D = 3, 5, 3, 2, 6
QF = QFormerShape(num_queries=Q, num_layers=LAYERS, width=W, num_heads=2, mlp_dim=M, vocab_size=V)


def _layer(rows: int, query_rows: int, cross: bool, prefix: int = 0) -> int:
    """One Q-Former layer's products for one example, written out one by one (`prefix`: keys and values
    of an earlier pass that the rows also attend to)."""
    total = 4 * mm(rows, W, W)  # self-attention q, k, v, o
    total += mm(rows, W, prefix + rows) + mm(rows, prefix + rows, W)  # scores, context (all heads)
    if cross and query_rows:
        total += 2 * mm(query_rows, W, W)  # cross-attention q, o
        total += mm(query_rows, W, F) + mm(query_rows, F, W)  # scores, context over the frames
    total += mm(rows, W, M) + mm(rows, M, W)  # feed-forward (query rows and text rows, each their own)
    return total


def _pass(query_rows: int, text_rows: int, prefix: int = 0) -> int:
    rows = query_rows + text_rows
    return _layer(rows, query_rows, True, prefix) + _layer(rows, query_rows, False, prefix)


def test_stage1_flops_match_the_products_written_out():
    shape = Stage1Shape(QF, batch=B, frames=F, encoder_width=E, text_length=T, embed_dim=D)
    kv = 2 * mm(F, E, W)  # keys and values of the frames, the one cross-attention layer
    heads_and_passes = (
        _pass(Q, 0)  # contrastive, queries
        + _pass(0, T)  # contrastive, text
        + 3 * _pass(Q, T)  # matching: positive, negative text, negative clip
        + mm(Q, W, D)  # audio projection
        + mm(1, W, D)  # text projection
        + mm(Q, D, B)  # similarity of each query to each text
        + 3 * mm(Q, W, 2)  # matching head
        + mm(T - 1, W, W)  # MLM head transform
        + mm(T - 1, W, V)  # tied output layer
    )
    reusing = heads_and_passes + _pass(0, T, prefix=Q)  # generation: text after the query pass's keys
    shared = flops.stage1(shape)
    assert shared.trainable_forward == B * (reusing + kv)
    assert shared.trainable_backward == 2 * shared.trainable_forward
    assert shared.frozen_forward == shared.frozen_backward == 0
    # The PyTorch reference: a joint generation pass; keys and values of the frames in every pass.
    joint = heads_and_passes + _pass(Q, T)
    unshared = flops.stage1(shape, share_encoder_kv=False, generation_reuses_queries=False)
    assert unshared.trainable_forward == B * (joint + 5 * kv)


def test_stage2_flops_match_the_products_written_out():
    llm = LlamaShape(
        hidden_size=6, intermediate_size=10, num_layers=2, num_heads=3, num_kv_heads=1, vocab_size=20
    )
    shape = Stage2Shape(
        QF,
        llm,
        batch=B,
        frames=F,
        encoder_width=E,
        qformer_text_length=3,
        instruction_length=4,
        answer_length=2,
    )
    s = Q + 4 + 2  # LLM positions: soft prompt, instruction, answer
    head_dim, kv_width = 2, 2  # 6 / 3 heads; 1 key-value head
    weight_products = 2 * mm(s, 6, 6) + 2 * mm(s, 6, kv_width) + 3 * mm(s, 6, 10)  # q, o; k, v; MLP
    attention = 3 * (mm(s, head_dim, s) + mm(s, s, head_dim))  # per head: scores, context
    layer_forward = weight_products + attention
    bridge = _pass(Q, 3) + 2 * mm(F, E, W) + mm(Q, W, 6)  # Q-Former, frames' keys/values, projection
    for positions, logits_rows in (("answer", 2), ("all", s)):
        counted = flops.stage2(shape, logits_positions=positions)
        head = mm(logits_rows, 6, 20)
        assert counted.trainable_forward == B * bridge
        assert counted.trainable_backward == 2 * B * bridge
        assert counted.frozen_forward == B * (2 * layer_forward + head)
        # Back to the inputs only: once through each weight product, twice through attention's.
        assert counted.frozen_backward == B * (2 * (weight_products + 2 * attention) + head)


def _counted_by_torch(reference) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        reference.step()
    return counter.get_total_flops()


def test_reference_flops_match_torch_flop_counter():
    """The PyTorch reference's forward + backward, counted by torch itself, is what flops.py says the
    reference computes (keys and values projected per pass; the LLM's output layer on every position)."""
    pytest.importorskip("torch")
    from slit.bench import torch_reference, train_step

    stage1, stage2 = SIZES["tiny"]
    ref1 = torch_reference.stage1_reference(stage1, train_step.stage1_batch(stage1), dropout=0.0)
    counted = flops.stage1(stage1, share_encoder_kv=False, generation_reuses_queries=False)
    assert _counted_by_torch(ref1) == counted.total
    llm = torch_reference.random_llama(stage2.llm)
    ref2 = torch_reference.stage2_reference(stage2, llm, train_step.stage2_batch(stage2), dropout=0.0)
    assert _counted_by_torch(ref2) == flops.stage2(stage2, logits_positions="all").total


def test_train_state_holds_adam_moments_once_and_frozen_weights_in_their_dtype():
    """Optimizer state = Adam's two moments of the trainable params (plus scalar counters); the frozen
    LLM is stored once (not among the params), in bfloat16 when asked."""
    pytest.importorskip("torch")
    import jax

    from slit.bench import stage2, torch_reference, train_step
    from slit.models.llm import llama

    shape = SIZES["tiny"][1]
    hf = torch_reference.random_llama(shape.llm)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    lm = llama.llama_from_tensors(
        tensors, llama.llama_config_from_hf(hf.config.to_dict()), "test", param_dtype="bfloat16"
    )
    setup, *_ = stage2.slit_setup(shape, lm, 0.1, [("llm.param_dtype", "bfloat16")])
    memory = train_step.state_memory(setup)
    assert 0 <= memory["opt_state_beyond_adam_moments_bytes"] <= 64
    assert memory["frozen_dtypes"] == ["bfloat16"] or set(memory["frozen_dtypes"]) == {"bfloat16", "float32"}
    llm_leaves = jax.tree.leaves(setup.parts.frozen["llm"])
    assert {str(x.dtype) for x in llm_leaves} == {"bfloat16"}
    llm_count = sum(p.numel() for p in hf.parameters())  # tied: the embedding table once
    assert sum(x.size for x in llm_leaves) == llm_count
    assert "llm" not in setup.state["params"]


@pytest.mark.parametrize("name", ["stage1", "stage2"])
def test_bench_runs_both_sides_at_tiny_size(name, tmp_path, capsys):
    pytest.importorskip("torch")
    from slit import cli

    out = tmp_path / f"{name}.json"
    code = cli.main(
        ["bench", name, "--size", "tiny", "--repeats", "2", "--torch-threads", "1", "--out", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr()
    assert json.loads(printed.out) == result  # the JSON on stdout, the readable table on stderr
    assert "| slit (JAX) |" in printed.err and "| PyTorch reference" in printed.err
    for key in ("speedup", "mfu", "peak_flops"):
        assert np.isfinite(result[key]) and result[key] > 0, key
    assert len(result["slit"]["times_s"]) == len(result["reference"]["times_s"]) == 2
    shape = SIZES["tiny"][0 if name == "stage1" else 1]
    assert result["shape"] == dataclasses.asdict(shape) | (
        {"llm": result["shape"]["llm"]} if name == "stage2" else {}
    )
    expected = (flops.stage1(shape) if name == "stage1" else flops.stage2(shape)).total
    assert result["model_flops_per_step"]["total"] == expected
    assert all(np.isfinite(result["slit_losses"])) and all(np.isfinite(result["reference_losses"]))
    # No more optimizer state than Adam's two moments (and a few scalar counters).
    assert 0 <= result["memory"]["slit_state"]["opt_state_beyond_adam_moments_bytes"] <= 64

    from slit.bench import tables

    page = tables.render([out], ["make benchmarks"])
    slit_row = next(line for line in page.splitlines() if line.startswith("| slit (JAX)"))
    assert f"{result['slit']['median_s']:.2f}" in slit_row and f"{result['speedup']:.2f}x" in slit_row
    assert f"{100 * result['mfu']:.0f}%" in page and "make benchmarks" in page


def test_overrides_may_not_change_the_benchmarked_shape():
    """The reference and the FLOP counts follow the shape: an override of a shaped field is refused."""
    from slit.bench import train_step
    from slit.errors import UserError

    shape = SIZES["tiny"][0]
    with pytest.raises(UserError, match="qformer.layers.*--size"):
        train_step.sized_config("stage1_synthetic.py", shape, 0.1, {}, [("qformer.layers", "6")])
    config = train_step.sized_config("stage1_synthetic.py", shape, 0.1, {}, [("optimizer.b2", "0.99")])
    assert config.qformer.layers == shape.qformer.num_layers and config.optimizer.b2 == 0.99


def test_bfloat16_sets_both_sides_matmul_dtype():
    """--dtype bfloat16: slit's config gets compute_dtype (an override of it is refused, naming --dtype);
    the reference holds its frozen LLM in bfloat16 and its Q-Former's matmuls run under autocast, while
    the trained weights (the master copy AdamW updates) stay float32."""
    torch = pytest.importorskip("torch")
    from slit.bench import torch_reference, train_step
    from slit.errors import UserError

    shape = SIZES["tiny"][1]
    config = train_step.sized_config("stage2_synthetic.py", shape, 0.1, {}, [], "bfloat16")
    assert config.compute_dtype == "bfloat16"
    with pytest.raises(UserError, match="compute_dtype.*--dtype"):
        train_step.sized_config("stage2_synthetic.py", shape, 0.1, {}, [("compute_dtype", "float32")])

    hf = torch_reference.random_llama(shape.llm)
    batch = train_step.stage2_batch(shape)
    seen = []
    step = torch_reference.stage2_reference(shape, hf, batch, dtype="bfloat16")
    hf.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    loss = step.step()
    assert np.isfinite(loss)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    assert seen == [torch.bfloat16]


def test_stage2_bench_lays_the_llm_out_as_its_config_says(tmp_path):
    """The 1b size scans its LLM's layers by default (one compiled layer, not 22); any size builds its LLM
    as --config.llm.scan_layers and --config.llm.quantization say (the benchmark reads no load_llm, so
    this is its own path; the scanned and int8 modules' outputs are tested in tests/test_levers_towers.py
    and tests/test_parity_llama.py)."""
    pytest.importorskip("torch")
    from slit import cli
    from slit.bench import stage2

    config = stage2.bench_config(SIZES["1b"][1], 0.1, [], "bfloat16", stage2.SIZE_SETTINGS["1b"])
    assert config.llm.scan_layers is True and config.llm.param_dtype == "bfloat16"
    overridden = [("llm.scan_layers", "false")]
    config = stage2.bench_config(SIZES["1b"][1], 0.1, overridden, "bfloat16", stage2.SIZE_SETTINGS["1b"])
    assert config.llm.scan_layers is False
    out = tmp_path / "scanned_int8.json"
    args = ["bench", "stage2", "--size", "tiny", "--repeats", "2", "--skip-reference", "--out", str(out)]
    assert cli.main([*args, "--config.llm.scan_layers=true", "--config.llm.quantization=int8"]) == 0
    result = json.loads(out.read_text())
    assert result["llm_scan_layers"] is True  # read from the module the benchmark built
    assert result["llm_quantization"] == "int8" and "int8" in result["memory"]["slit_state"]["frozen_dtypes"]
    assert "layers stored int8" in result["llm"] and all(np.isfinite(result["slit_losses"]))
