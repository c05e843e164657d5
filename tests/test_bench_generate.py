"""`slit bench generate` on a tiny random transformers Llama: runs end to end through the CLI, writes
the JSON it prints, and slit's greedy tokens equal transformers' `generate` on the same weights."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from slit import cli  # noqa: E402

NEW_TOKENS = 5


def test_bench_generate_tiny_random_llama(tmp_path, capsys):
    out = tmp_path / "bench_generate.json"
    argv = ["bench", "generate", "--model", "random", "--random-size", "tiny", "--batch-sizes", "1,3"]
    argv += ["--max-new-tokens", str(NEW_TOKENS), "--repeats", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["bench"] == "generate" and result["model_kind"] == "random"
    assert result["machine"]["cpu_count"] >= 1 and result["matmul_peak_flops"] > 1e8
    assert [run["batch_size"] for run in result["runs"]] == [1, 3]
    for run in result["runs"]:
        batch, slit, reference = run["batch_size"], run["slit"], run["transformers"]
        # Same weights, float32 on both sides: the greedy tokens are identical.
        assert run["tokens_agree"] and run["rows_agreeing"] == batch
        assert run["agreeing_prefix_per_row"] == [NEW_TOKENS] * batch
        assert len(run["slit_tokens_row0"]) == NEW_TOKENS and len(set(run["slit_tokens_row0"])) > 1
        for side in (slit, reference):
            assert len(side["times_s"]) == 2 and side["best_s"] == min(side["times_s"]) > 0
            assert side["tokens_per_s_best"] == pytest.approx(batch * NEW_TOKENS / side["best_s"])
            flops = run["model_gflops_per_call"] * 1e9
            assert side["utilisation_best"] == pytest.approx(
                flops / side["best_s"] / result["matmul_peak_flops"]
            )
            assert 0 < side["utilisation_best"] < 1
        assert slit["first_call_s"] >= slit["compile_s"] > 0
        assert reference["torch_threads"] in {int(t) for t in reference["by_torch_threads"]}
        assert run["speedup_best"] == pytest.approx(reference["best_s"] / slit["best_s"])
    # Left padding does not change a row's answer: row 0 (the longest prompt) in batch 1 and batch 3.
    assert result["runs"][0]["slit_tokens_row0"] == result["runs"][1]["slit_tokens_row0"]


def test_bench_generate_refuses_bad_arguments(capsys):
    assert cli.main(["bench", "generate", "--model", "random", "--batch-sizes", "1,9"]) == 2
    assert "--batch-sizes 1,9: each must be in 1..8" in capsys.readouterr().err
    assert cli.main(["bench", "generate", "--model", "gguf", "--gguf", "missing.gguf"]) == 2
    assert "GGUF file not found: missing.gguf" in capsys.readouterr().err


def test_bench_generate_bf16_and_int8_weights(tmp_path):
    """--weights bfloat16: slit stores and multiplies in bf16 and transformers runs in bf16: the same
    greedy tokens. --weights int8: slit's layers in int8 against float32 transformers, with the change in
    loss on transformers' continuations (int8 minus float32, both scored by slit)."""
    results = {}
    for weights in ("bfloat16", "int8"):
        out = tmp_path / f"{weights}.json"
        argv = ["bench", "generate", "--model", "random", "--random-size", "tiny", "--batch-sizes", "3"]
        argv += ["--max-new-tokens", str(NEW_TOKENS), "--repeats", "1", "--weights", weights]
        assert cli.main([*argv, "--torch-threads", "1", "--out", str(out)]) == 0
        results[weights] = json.loads(out.read_text())
    bf16 = results["bfloat16"]
    assert bf16["weights"] == bf16["transformers_dtype"] == "bfloat16"
    assert bf16["runs"][0]["tokens_agree"] and bf16["runs"][0]["slit_weight_dtypes"] == ["bfloat16"]
    int8 = results["int8"]
    assert int8["weights"] == "int8" and int8["transformers_dtype"] == "float32"
    assert int8["runs"][0]["slit_weight_dtypes"] == ["float32", "int8"]
    losses = int8["runs"][0]["transformers_continuation_loss"]
    assert losses["change"] == pytest.approx(losses["int8"] - losses["float32"])
    # Rounded weights score the continuations differently, but not by much.
    assert 0 < losses["float32"] and 0 < abs(losses["change"]) < 0.1 * losses["float32"]


def test_continuation_loss_is_transformers_cross_entropy():
    """The loss the int8 comparison reports, on float32 weights, against transformers' logits."""
    import numpy as np
    import torch

    from slit.bench import generate as bench

    ref = bench._load_random("tiny", "cpu")
    tensors = {k: v.detach().numpy() for k, v in ref.model.state_dict().items()}
    lm = bench._slit_llm(tensors, ref.model.config.to_dict(), "test", "float32")
    ids, mask = bench._left_pad(ref.prompts[:3], ref.pad_id)
    with torch.no_grad():
        out = ref.model.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
        full_mask = torch.cat([torch.from_numpy(mask).long(), torch.ones(3, 4, dtype=torch.long)], 1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)
        logits = ref.model(input_ids=out, attention_mask=full_mask, position_ids=positions).logits
    tokens = out[:, ids.shape[1] :]
    predicted = logits[:, ids.shape[1] - 1 : -1]
    want = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), tokens.reshape(-1))
    got = bench.continuation_loss(lm, ids, mask, tokens.numpy())
    assert got == pytest.approx(float(want), abs=1e-5)
    assert np.isfinite(got)
