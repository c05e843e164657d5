"""Eval reports: JSON, Markdown table and PNG plot for each task, under <workdir>/eval/."""

import json

import ml_collections
import numpy as np
import pytest

from slit.eval import aqa, captioning, classification, reports, retrieval


def read_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something was drawn
    return image


def test_retrieval_report_json_markdown_and_recall_curves(tmp_path):
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(15), 5)
    sim = rng.normal(size=(15, 75))
    sim[owner, np.arange(75)] += 1.0
    itm = rng.normal(size=sim.shape)
    itm[owner, np.arange(75)] += 2.0
    metrics = retrieval.retrieval_report(
        sim, owner, lambda a, t: itm[a, t], k=12, batch_size=32, curve_max_k=20
    )
    config = ml_collections.ConfigDict({"batch_size": 8, "data": {"name": "clotho/v2.1"}})
    paths = reports.write_report(
        tmp_path, "retrieval", "clotho/v2.1", "test", metrics, config=config, step=1200
    )

    assert paths["json"] == tmp_path / "eval" / "retrieval-clotho_v2.1-test.json"
    document = json.loads(paths["json"].read_text())
    assert (
        document["task"] == "retrieval"
        and document["split"] == "test"
        and document["checkpoint_step"] == 1200
    )
    assert document["config"] == {"batch_size": 8, "data": {"name": "clotho/v2.1"}}
    assert document["metrics"]["reranked"] == metrics["reranked"]
    assert len(document["metrics"]["curves"]["reranked"]["text_to_audio"]) == 15  # k up to the 15 clips

    text = paths["markdown"].read_text()
    assert text.startswith("# retrieval: clotho/v2.1 (test), checkpoint step 1200")
    assert "| ranking | direction | R@1 (%) | R@5 (%) | R@10 (%) | mAP@10 (%) |" in text
    reranked_t2a = metrics["reranked"]["text_to_audio"]
    row = f"| reranked (top 12) | text to audio | {100 * reranked_t2a['R@1']:.2f} | "
    row += f"{100 * reranked_t2a['R@5']:.2f} |"
    assert row in text
    assert "15 clips, 75 captions." in text
    read_png(paths["plot"])
    assert paths["plot"].name == "retrieval-clotho_v2.1-test.png"


def test_captioning_report_marks_unavailable_metrics(tmp_path, monkeypatch):
    predictions = {"a": "a dog barks", "b": "rain falls on a roof", "c": "birds sing"}
    references = {
        "a": ["a dog is barking", "dogs bark loudly"],
        "b": ["rain falls on a tin roof", "heavy rain on a roof"],
        "c": ["birds are singing", "a bird chirps"],
    }
    monkeypatch.setenv("PATH", str(tmp_path))  # no Java: METEOR and SPICE unavailable
    metrics = captioning.score_captions(predictions, references)
    paths = reports.write_report(tmp_path, "captioning", "slit_synthetic_sounds", "test", metrics, step=7)
    text = paths["markdown"].read_text()
    assert "| BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D | SPICE | SPIDEr |" in text
    assert f"| {metrics['BLEU-1']:.4f} |" in text and "| n/a |" in text
    assert "- METEOR unavailable: Java (the `java` command) is not on PATH" in text
    document = json.loads(paths["json"].read_text())
    assert document["metrics"]["SPICE"] is None and document["metrics"]["CIDEr-D"] == metrics["CIDEr-D"]
    read_png(paths["plot"])


def test_classification_report_with_confusion_matrix(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 40)
    predicted = np.where(rng.random(40) < 0.7, labels, rng.integers(0, 4, 40))
    names = ["dog", "rain", "siren", "speech"]
    metrics = classification.classification_report(predicted, labels, names)
    metrics["mAP"] = 0.5
    paths = reports.write_report(tmp_path, "classification", "esc50", "fold1", metrics)
    text = paths["markdown"].read_text()
    assert f"| {100 * metrics['accuracy']:.2f} | 50.00 | 40 |" in text
    assert "| class | accuracy (%) |" in text and "| siren |" in text
    read_png(paths["plot"])


def test_aqa_report_with_accuracy_per_question_type(tmp_path):
    metrics = aqa.aqa_accuracy(
        {"1": "yes", "2": "no", "3": "a dog", "4": "two"}, {"1": "yes", "2": "yes", "3": "dog", "4": "3"}
    )
    paths = reports.write_report(tmp_path, "aqa", "clotho_aqa", "test", metrics)
    text = paths["markdown"].read_text()
    assert (
        "| all | 50.00 | 4 |" in text and "| yes/no | 50.00 | 2 |" in text and "| open | 50.00 | 2 |" in text
    )
    read_png(paths["plot"])


def test_scalar_metrics_and_json_safety(tmp_path):
    metrics = {
        "contrastive": {"text_to_audio": {"R@1": np.float32(0.25)}, "num_audio": 4},
        "curves": {"contrastive": {"text_to_audio": [0.25, 0.5]}},
        "SPICE": None,
        "weird": float("nan"),
        "per_item": {"CIDEr-D": {"a": 1.0}},
    }
    assert reports.scalar_metrics(metrics, "test") == {
        "test/contrastive/text_to_audio/R@1": pytest.approx(0.25),
        "test/contrastive/num_audio": 4.0,
        "test/weird": pytest.approx(float("nan"), nan_ok=True),
    }
    paths = reports.write_report(tmp_path, "other", "d", "s", metrics, with_plot=False)
    document = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert document["metrics"]["weird"] is None and "plot" not in paths
    assert "| contrastive/text_to_audio/R@1 | 0.2500 |" in paths["markdown"].read_text()
