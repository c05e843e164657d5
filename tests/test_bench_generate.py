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
