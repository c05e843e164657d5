"""`slit eval` on a stage-one run: zero-shot classification and retrieval from a checkpoint, checked
against the model rebuilt from an exported bundle and scored with scikit-learn / direct NumPy."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from slit import export
from slit.data import pipeline, sources
from slit.eval import reports
from slit.eval import stage1 as stage1_eval
from slit.train import stage1_model
from tests.conftest import run_slit


def bundle_embeddings(workdir, tmp_path, config, texts):
    """Every test clip's query embeddings (N, Q, E) and the texts' embeddings (T, E), computed by the
    model that an exported bundle rebuilds (not the evaluation code's jitted, sharded functions)."""
    model, tokenizer, _ = export.load_bundle(export.export(workdir, "bundle", tmp_path / "bundle"))
    source = sources.open_split(config.data.name, config.data.data_dir, "test")
    clips = []
    for batch in pipeline.eval_audio_batches(source, stage1_model.audio_spec(config), config.batch_size):
        features, mask = model.encode_audio(batch["audio"], batch["num_samples"])
        clips.append(
            np.asarray(model.audio_embeddings(model.query_outputs(features, mask, None)))[batch["valid"]]
        )
    ids = tokenizer.encode(list(texts), config.data.max_text_length)
    return source, np.concatenate(clips), np.asarray(model.text_embeddings(ids, None))


def own_copy(trained_run, tmp_path):
    """The shared run copied, so that the reports written here do not replace the trainer's."""
    workdir, config = trained_run
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run", config


def test_zero_shot_classification_equals_sklearn_on_the_rebuilt_model(trained_run, tmp_path):
    from sklearn.metrics import average_precision_score

    workdir, config = own_copy(trained_run, tmp_path)
    # --task all (the default): every stage-one evaluation the split can answer (it has captions and
    # labels: retrieval and classification), each with its report. Without --rerank-k, retrieval
    # re-ranks the run's retrieval_rerank_k.
    result = run_slit("eval", "--workdir", str(workdir), "--data", config.data.name)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "by contrastive similarity" in result.stdout and "skipped" not in result.stdout
    retrieval = workdir / "eval" / (reports.report_stem("retrieval", config.data.name, "test") + ".json")
    assert json.loads(retrieval.read_text())["metrics"]["rerank_k"] == config.retrieval_rerank_k > 0
    stem = workdir / "eval" / reports.report_stem("classification", config.data.name, "test")
    document = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".md").is_file() and document["checkpoint_step"] == 2
    metrics = document["metrics"]

    # Classes: every label of the split, sorted; each label's prompt per the template.
    source = sources.open_split(config.data.name, config.data.data_dir, "test")
    labels = [
        [x.decode() if isinstance(x, bytes) else str(x) for x in source[i]["labels"]] for i in range(16)
    ]
    classes = sorted({x for clip in labels for x in clip})
    assert metrics["classes"] == classes and metrics["num_items"] == 16
    prompts = [f"this is a sound of {c.replace('_', ' ')}" for c in classes]
    _, clips, prompt_emb = bundle_embeddings(workdir, tmp_path, config, prompts)

    scores = np.einsum("nqe,ce->ncq", clips, prompt_emb).max(-1)  # BLIP-2 ITC: max over queries
    targets = np.array([[c in clip for c in classes] for clip in labels])
    if targets.sum(1).max() > 1:  # multi-label: mAP over classes with a positive, and top-1 hits
        want = [
            average_precision_score(targets[:, c], scores[:, c])
            for c in range(len(classes))
            if targets[:, c].any()
        ]
        assert metrics["multi_label"] is True
        assert metrics["mAP"] == pytest.approx(float(np.mean(want)), abs=1e-5)
        assert metrics["num_classes_scored"] == len(want)
    else:
        assert "confusion_matrix" in metrics and stem.with_suffix(".png").is_file()
    hits = targets[np.arange(16), scores.argmax(1)]
    assert metrics["accuracy"] == pytest.approx(hits.mean())


def test_retrieval_eval_from_a_checkpoint_matches_the_rebuilt_model(trained_run, tmp_path):
    workdir, config = own_copy(trained_run, tmp_path)
    result = run_slit(
        "eval",
        "--workdir",
        str(workdir),
        "--task",
        "retrieval",
        "--data",
        config.data.name,
        "--rerank-k",
        "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "by contrastive similarity" in result.stdout and "re-ranking" not in result.stdout
    assert not (workdir / "eval" / "partial").exists()  # per-batch results go once the report is written
    metrics = json.loads(
        (
            workdir / "eval" / (reports.report_stem("retrieval", config.data.name, "test") + ".json")
        ).read_text()
    )["metrics"]
    assert "reranked" not in metrics

    texts, owners = pipeline.split_captions(
        sources.open_split(config.data.name, config.data.data_dir, "test")
    )
    _, clips, text_emb = bundle_embeddings(workdir, tmp_path, config, texts)
    sim = np.einsum("aqe,te->atq", clips, text_emb).max(-1)  # (clips, texts)
    # Text -> audio R@k: the clip a caption belongs to is among its k most similar clips.
    rank_of_owner = (sim.T > sim.T[np.arange(len(texts)), owners][:, None]).sum(1)
    for k in (1, 5, 10):
        want = float((rank_of_owner < k).mean())
        assert metrics["contrastive"]["text_to_audio"][f"R@{k}"] == pytest.approx(want, abs=1e-9), k


def test_eval_refuses_bad_requests(trained_run, tmp_path):
    workdir, config = trained_run
    missing = run_slit("eval", "--workdir", str(tmp_path), "--task", "retrieval", "--data", config.data.name)
    assert missing.returncode == 2 and "neither config.json nor a checkpoint" in missing.stderr
    nodata = run_slit(
        "eval", "--workdir", str(workdir), "--task", "classification", "--data", "no_such_dataset"
    )
    assert nodata.returncode != 0 and "no_such_dataset" in nodata.stderr
    other_stage = run_slit("eval", "--workdir", str(workdir), "--task", "aqa", "--data", config.data.name)
    assert other_stage.returncode == 2, other_stage.stderr[-2000:]
    assert "--task aqa evaluates stage2 runs" in other_stage.stderr
    assert "use retrieval or classification" in other_stage.stderr


def test_a_stopped_retrieval_eval_resumes_from_its_saved_batches(trained_run, tmp_path):
    """Stopped once while embedding clips and once while re-ranking, the evaluation re-runs only the
    batches it had not saved and reports exactly what an uninterrupted evaluation reports."""
    workdir, config = own_copy(trained_run, tmp_path)
    run = stage1_eval.load_run(workdir, config.data.name)
    calls = {"embed": 0, "match": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)

        return wrapper

    fns = run.fns
    run.fns = dataclasses.replace(
        fns, embed_audio=counted("embed", fns.embed_audio), match=counted("match", fns.match)
    )

    def evaluate(should_stop, progress):
        return stage1_eval.evaluate_retrieval(
            "test", run.config, run.tokenizer, run.spec, run.fns, run.params, run.frozen,
            should_stop, rerank_k=4, progress=progress,
        )  # fmt: skip

    with jax.set_mesh(run.mesh):
        want = evaluate(lambda: False, None)
        total = dict(calls)
        assert total["embed"] == 2 and total["match"] > 2  # 16 clips in batches of 8; many pair batches

        progress = stage1_eval.eval_progress(workdir, run.config, task="retrieval", step=run.step)
        for stop_after in (1, total["embed"] + 2):  # inside the audio batches, then inside re-ranking
            calls.update(embed=0, match=0)
            checks = iter(range(10**9))
            assert evaluate(lambda c=checks, n=stop_after: next(c) >= n, progress) is None
        saved = sorted(p.name for p in progress.directory.iterdir())
        assert saved[:2] == ["audio-000000.npz", "audio-000001.npz"] and "rerank-000000.npz" in saved

        calls.update(embed=0, match=0)
        again = stage1_eval.eval_progress(workdir, run.config, task="retrieval", step=run.step)
        got = evaluate(lambda: False, again)
    assert calls["embed"] == 0 and calls["match"] == total["match"] - (len(saved) - 2)
    assert again.resumed == len(saved) == 3
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
