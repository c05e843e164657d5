"""`slit bench frontend` and `slit bench cache` with tiny settings: they run, compare against their
references in the same run, and report what they promise."""

import argparse
import json

import numpy as np
import pytest

from tests.conftest import ROOT, tiny_overrides


def test_bench_frontend_compares_with_whisper_feature_extractor():
    pytest.importorskip("transformers")
    from slit.bench import frontend

    result = frontend.run(argparse.Namespace(seconds=1.0, batch_sizes="1,3", mel_bins=80, repeats=2))
    assert [r["batch_size"] for r in result["results"]] == [1, 3]
    for row in result["results"]:
        # The same features as transformers computes, up to float32 rounding.
        assert row["max_abs_diff"] < 2e-4
        assert row["audio_seconds"] == row["batch_size"] * 1.0
        for side in ("slit", "transformers"):
            assert 0 < row[side]["best_s"] <= row[side]["median_s"]
            expected = row["audio_seconds"] / row[side]["best_s"]
            assert row[side]["audio_seconds_per_second"] == pytest.approx(expected)
        assert row["speedup_best"] == pytest.approx(row["transformers"]["best_s"] / row["slit"]["best_s"])
    assert result["goal_met"] == (result["best_speedup"] >= 10.0)
    json.dumps(result)  # JSON-serialisable


def test_bench_cache_runs_an_epoch_both_ways(tiny_data_dir, tmp_path):
    import json

    from slit import cli

    overrides = tiny_overrides(tiny_data_dir)
    for key in ("total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        overrides.pop(key)
    config = str(ROOT / "configs" / "stage1_synthetic.py")
    out = tmp_path / "cache.json"
    args = ["bench", "cache", "--config", config, "--steps", "4", "--out", str(out)]
    # The overrides are --config.a.b=value, as for slit train.
    assert cli.main([*args, *(f"--config.{k}={v}" for k, v in overrides.items())]) == 0
    report = json.loads(out.read_text())
    assert report["steps_per_epoch"] == 64 // 8
    assert report["cache"]["written"] and report["cache"]["bytes"] > 0 and report["cache"]["clips"] == 96
    assert report["cache"]["seconds"] > 0
    for mode in ("compute", "cached"):
        run = report[mode]
        assert "error" not in run, run
        assert run["features"] == mode and run["steps"] == 4 and run["steps_measured"] > 0
        assert run["epoch_seconds"] == pytest.approx(8 / run["steps_per_second"])
    assert report["epoch_speedup"] == pytest.approx(
        report["compute"]["epoch_seconds"] / report["cached"]["epoch_seconds"]
    )
    assert np.isfinite(report["epoch_speedup"])
    json.dumps(report)
