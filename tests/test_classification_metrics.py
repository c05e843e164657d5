"""Classification metrics against sklearn and direct computations from the definitions."""

import numpy as np
import pytest
from scipy.special import log_softmax

from slit.eval import classification as cls


@pytest.fixture
def sk():
    """sklearn.metrics: the reference; scikit-learn belongs to the test extra."""
    return pytest.importorskip("sklearn.metrics")


def ap_from_definition(scores, positive):
    """AP = sum over distinct thresholds t (high to low) of (R(t) - R(previous t)) * P(t)."""
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        selected = scores >= t
        precision = positive[selected].sum() / selected.sum()
        recall = positive[selected].sum() / positive.sum()
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_average_precision_matches_sklearn_and_definition(ties, seed, sk):
    rng = np.random.default_rng(seed)
    positive = rng.random(60) < 0.3
    scores = rng.normal(size=60) + positive
    if ties:
        scores = np.round(scores, 1)
    ours = cls.average_precision(scores, positive)
    assert ours == pytest.approx(sk.average_precision_score(positive, scores), abs=1e-12)
    assert ours == pytest.approx(ap_from_definition(scores, positive), abs=1e-12)


def test_multilabel_map_skips_and_counts_classes_without_positives(sk):
    rng = np.random.default_rng(2)
    targets = (rng.random((50, 6)) < 0.25).astype(int)
    targets[:, 4] = 0  # no positive for class 4
    scores = rng.normal(size=(50, 6)) + 1.5 * targets
    report = cls.mean_average_precision(scores, targets)
    kept = [0, 1, 2, 3, 5]
    expected = sk.average_precision_score(targets[:, kept], scores[:, kept], average="macro")
    assert report["mAP"] == pytest.approx(expected, abs=1e-12)
    assert report["num_classes_scored"] == 5 and report["num_classes_without_positive"] == 1
    assert report["per_class_ap"][4] is None


def test_accuracy_and_confusion_matrix_match_sklearn(sk):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 80)
    predicted = np.where(rng.random(80) < 0.6, labels, rng.integers(0, 5, 80))
    assert cls.accuracy(predicted, labels) == pytest.approx(sk.accuracy_score(labels, predicted))
    np.testing.assert_array_equal(
        cls.confusion_matrix(predicted, labels, 5), sk.confusion_matrix(labels, predicted, labels=range(5))
    )
    report = cls.classification_report(predicted, labels, list("abcde"))
    recall = sk.recall_score(labels, predicted, average=None, labels=range(5))
    assert list(report["per_class_accuracy"].values()) == pytest.approx(recall)
    with pytest.raises(ValueError, match="same non-empty"):
        cls.accuracy(predicted[:3], labels)


def test_zero_shot_by_similarity_takes_the_max_over_queries():
    rng = np.random.default_rng(4)
    audio = rng.normal(size=(7, 4, 8))
    prompts = rng.normal(size=(3, 8))
    scores = cls.similarity_scores(audio, prompts)
    for n in range(7):
        for c in range(3):
            assert scores[n, c] == pytest.approx(max(audio[n, q] @ prompts[c] for q in range(4)))
    np.testing.assert_allclose(cls.similarity_scores(audio[:, 0], prompts), audio[:, 0] @ prompts.T)
    assert cls.label_prompts(["dog_bark", "rain"]) == [
        "this is a sound of dog bark",
        "this is a sound of rain",
    ]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_rank_labels_by_llm_loss_matches_direct_computation(reduce):
    rng = np.random.default_rng(5)
    n, c, t, v = 6, 4, 5, 11
    logits = rng.normal(size=(n, c, t, v)) * 2
    targets = rng.integers(0, v, (n, c, t))
    lengths = rng.integers(1, t + 1, (n, c))
    mask = np.arange(t)[None, None] < lengths[..., None]
    nll = cls.token_losses(logits.reshape(n * c, t, v), targets.reshape(n * c, t)).reshape(n, c, t)
    result = cls.rank_labels_by_loss(nll, mask, reduce=reduce)
    for i in range(n):
        losses = []
        for j in range(c):
            log_p = log_softmax(logits[i, j], axis=-1)
            token_loss = [-log_p[s, targets[i, j, s]] for s in range(lengths[i, j])]
            losses.append(sum(token_loss) / (len(token_loss) if reduce == "mean" else 1))
        np.testing.assert_allclose(result["loss"][i], losses, rtol=1e-12)
        assert result["predicted"][i] == int(np.argmin(losses))
    assert len(set(result["predicted"].tolist())) > 1  # the inputs do not make every clip pick one label


def test_rank_labels_rejects_an_empty_candidate():
    with pytest.raises(ValueError, match="no tokens"):
        cls.rank_labels_by_loss(np.ones((1, 2, 3)), np.array([[[1, 1, 0], [0, 0, 0]]]))
