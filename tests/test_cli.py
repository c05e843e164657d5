"""`slit train` end to end on the tiny dataset: metrics, eval report, checkpoints, resume."""

import json

from tests.conftest import ROOT, run_slit, tiny_overrides


def slit_train(workdir, data_dir, **extra):
    args = [f"--config.{k}={v}" for k, v in tiny_overrides(data_dir, **extra).items()]
    return run_slit(
        "train", "--config", str(ROOT / "configs" / "stage1_synthetic.py"), "--workdir", str(workdir), *args
    )


def test_short_run_writes_metrics_eval_report_and_resumes(tmp_path, tiny_data_dir):
    workdir = tmp_path / "run"
    result = slit_train(workdir, tiny_data_dir, total_steps=4, eval_every_steps=2)
    assert result.returncode == 0, result.stderr[-3000:]

    config = json.loads((workdir / "config.json").read_text())
    assert config["total_steps"] == 4 and config["data"]["name"] == "slit_synthetic_sounds/tiny"

    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [2, 4]
    for m in train_lines:
        for key in (
            "loss",
            "itc_loss",
            "itm_loss",
            "itg_loss",
            "itm_accuracy",
            "temperature",
            "grad_norm",
            "learning_rate",
            "steps_per_second",
            "examples_per_second",
        ):
            assert key in m, key
        assert abs(m["loss"] - (m["itc_loss"] + m["itm_loss"] + m["itg_loss"])) < 1e-4
    assert any("validation/text_to_audio_R@1" in m and m["step"] == 2 for m in lines)
    assert list((workdir / "tensorboard").iterdir())

    stem = workdir / "eval" / "retrieval-slit_synthetic_sounds_tiny-test"
    document = json.loads(stem.with_suffix(".json").read_text())
    assert document["checkpoint_step"] == 4 and document["config"]["retrieval_rerank_k"] == 4
    assert stem.with_suffix(".md").is_file() and stem.with_suffix(".png").is_file()
    for ranking in ("contrastive", "reranked"):
        report = document["metrics"][ranking]
        assert report["num_audio"] == 16 and report["num_text"] == 16 * 5
        for direction in ("audio_to_text", "text_to_audio"):
            r = report[direction]
            assert set(r) == {"R@1", "R@5", "R@10", "mAP@10"}
            assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1.0 and 0.0 <= r["mAP@10"] <= 1.0
    assert any("test_reranked/text_to_audio_R@1" in m for m in lines)
    # The stable summary scripts read: the contrastive numbers at the top level.
    summary = json.loads((workdir / "eval" / "retrieval.json").read_text())
    assert summary["num_audio"] == 16 and summary["num_text"] == 80 and summary["step"] == 4
    for direction in ("audio_to_text", "text_to_audio"):
        assert summary[direction] == document["metrics"]["contrastive"][direction]
        assert summary["reranked"][direction] == document["metrics"]["reranked"][direction]
    assert "text_to_audio" in result.stdout and "chance" in result.stdout and "top 4" in result.stdout
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    # Checkpoints hold the trainable state and never the frozen tower.
    saved = json.loads((workdir / "checkpoints" / "4" / "state" / "_METADATA").read_text())["tree_metadata"]
    assert any("'qformer'" in key and "'params'" in key for key in saved)
    assert any("'opt_state'" in key for key in saved)
    assert not any("audio_tower" in key for key in saved)
    meta = json.loads((workdir / "checkpoints" / "4" / "metadata" / "metadata").read_text())
    assert meta["step"] == 4 and meta["config"]["total_steps"] == 4
    assert meta["slit_version"] and set(meta["frozen_models"]) == {"audio_tower"}
    assert len(meta["frozen_models"]["audio_tower"]["fingerprint"]) == 16

    # The same command again resumes from the last checkpoint and has nothing left to train.
    again = slit_train(workdir, tiny_data_dir, total_steps=4, eval_every_steps=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from" in again.stderr and "(step 4; this workdir)" in again.stderr
    lines_after = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in map(json.loads, lines_after) if "loss" in m]) == 2

    # Extending the run continues from step 4 with the same data stream.
    longer = slit_train(workdir, tiny_data_dir, total_steps=6, eval_every_steps=2)
    assert longer.returncode == 0, longer.stderr[-3000:]
    steps = [
        m["step"]
        for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        if "loss" in m
    ]
    assert steps == [2, 4, 6]
    assert "total_steps: 4 -> 6" in longer.stderr


def test_help_shows_the_override_syntax_defaults_and_the_config_fields(capsys):
    import pytest

    from slit import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--config.a.b=value" in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(ROOT / "configs" / "stage1_synthetic.py"), "--help"])
    text = capsys.readouterr().out
    assert "--config.total_steps=900" in text and "--config.optimizer.learning_rate=0.001" in text
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "the split to evaluate (default: test)" in " ".join(capsys.readouterr().out.split())
    # One override syntax: the benchmarks that read a config take --config.a.b=value, others refuse it.
    assert cli.main(["bench", "frontend", "--config.batch_size=3"]) == 2
    assert "reads no config file" in capsys.readouterr().err
