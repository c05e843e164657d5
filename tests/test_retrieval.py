"""recall@k against a direct computation from the definition."""

import numpy as np
import pytest

from slit.eval.retrieval import (
    format_table,
    ranking_metrics,
    recall_at_k,
    recall_curve,
    relevance,
    rerank_top_k,
    retrieval_metrics,
    retrieval_report,
)


def brute_force(sim, owner, k):
    num_audio, num_text = sim.shape
    a2t = []
    for i in range(num_audio):
        top = sorted(range(num_text), key=lambda j: (-sim[i, j], j))[:k]
        a2t.append(any(owner[j] == i for j in top))
    t2a = []
    for j in range(num_text):
        top = sorted(range(num_audio), key=lambda i: (-sim[i, j], i))[:k]
        t2a.append(owner[j] in top)
    return np.mean(a2t), np.mean(t2a)


@pytest.mark.parametrize("captions_per_clip", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_brute_force(captions_per_clip, seed):
    rng = np.random.default_rng(seed)
    num_audio = 23
    owner = np.repeat(np.arange(num_audio), captions_per_clip)
    rng.shuffle(owner)
    sim = rng.normal(size=(num_audio, len(owner)))
    sim[owner, np.arange(len(owner))] += rng.uniform(0, 2.5, len(owner))  # make it non-trivial
    report = recall_at_k(sim, owner)
    for k in (1, 5, 10):
        a2t, t2a = brute_force(sim, owner, k)
        assert report["audio_to_text"][f"R@{k}"] == pytest.approx(a2t)
        assert report["text_to_audio"][f"R@{k}"] == pytest.approx(t2a)
    assert report["num_audio"] == num_audio and report["num_text"] == len(owner)


def test_perfect_and_reversed_rankings():
    owner = np.arange(12)
    report = recall_at_k(np.eye(12), owner)
    assert report["audio_to_text"]["R@1"] == report["text_to_audio"]["R@1"] == 1.0
    worst = recall_at_k(-np.eye(12), owner)
    assert worst["text_to_audio"]["R@10"] == 0.0 and worst["audio_to_text"]["R@10"] == 0.0
    assert "chance text_to_audio R@1 = 8.33%" in format_table(report)


# ---------------------------------------------------------------------------------------------------- mAP@10


def dcase_map10_text_to_audio(sim, owner):
    """DCASE 2022 task 6b's evaluation: for each caption query, the retrieved top 10 clips; AP = sum over
    the relevant positions of (hits so far / position); one relevant clip per caption."""
    aps = []
    for j in range(sim.shape[1]):
        top10 = sorted(range(sim.shape[0]), key=lambda i: (-sim[i, j], i))[:10]
        positions = [p + 1 for p, i in enumerate(top10) if i == owner[j]]
        aps.append(sum((n + 1) / pos for n, pos in enumerate(positions)))
    return np.mean(aps)


def ap_at_k_audio_to_text(sim, owner, k=10):
    """AP@k with several relevant captions: precision at each relevant hit in the top k, over min(R, k)."""
    aps = []
    for i in range(sim.shape[0]):
        top = sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], j))[:k]
        hits, total = 0, 0.0
        for position, j in enumerate(top, start=1):
            if owner[j] == i:
                hits += 1
                total += hits / position
        aps.append(total / min(int(np.sum(owner == i)), k))
    return np.mean(aps)


def random_problem(seed, num_audio=23, captions_per_clip=5, signal=2.5):
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(num_audio), captions_per_clip)
    rng.shuffle(owner)
    sim = rng.normal(size=(num_audio, len(owner)))
    sim[owner, np.arange(len(owner))] += rng.uniform(0, signal, len(owner))
    return sim, owner


@pytest.mark.parametrize("captions_per_clip", [1, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_map10_matches_dcase_definition(captions_per_clip, seed):
    sim, owner = random_problem(seed, captions_per_clip=captions_per_clip)
    report = retrieval_metrics(sim, owner)
    assert report["text_to_audio"]["mAP@10"] == pytest.approx(
        dcase_map10_text_to_audio(sim, owner), abs=1e-12
    )
    assert report["audio_to_text"]["mAP@10"] == pytest.approx(ap_at_k_audio_to_text(sim, owner), abs=1e-12)
    assert 0.05 < report["text_to_audio"]["mAP@10"] < 0.95  # neither trivial nor hopeless
    for k in (1, 5, 10):  # the same R@k as recall_at_k
        assert report["audio_to_text"][f"R@{k}"] == recall_at_k(sim, owner)["audio_to_text"][f"R@{k}"]


def test_untruncated_map_equals_sklearn_average_precision():
    average_precision_score = pytest.importorskip("sklearn.metrics").average_precision_score

    sim, owner = random_problem(3, num_audio=9, captions_per_clip=4, signal=1.0)
    relevant = relevance(owner, 9)
    ours = ranking_metrics(sim, relevant, ks=(1,), map_k=sim.shape[1])[f"mAP@{sim.shape[1]}"]
    expected = np.mean([average_precision_score(relevant[i], sim[i]) for i in range(9)])
    assert ours == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------- re-ranking


class FakeMatchingHead:
    """A fixed ITM logit per (audio, text) pair; records the batches it was called with."""

    def __init__(self, itm):
        self.itm, self.batches = itm, []

    def __call__(self, audio_idx, text_idx):
        self.batches.append(len(audio_idx))
        return self.itm[audio_idx, text_idx]


def lavis_score_matrices(sim, itm, k):
    """LAVIS compute_sim_matrix: -100 everywhere but each query's top k, which get ITM logit + similarity."""
    i2t = np.full(sim.shape, -100.0)
    for i in range(sim.shape[0]):
        top = np.argsort(-sim[i], kind="stable")[:k]
        i2t[i, top] = itm[i, top] + sim[i, top]
    t2i = np.full(sim.T.shape, -100.0)
    for j in range(sim.shape[1]):
        top = np.argsort(-sim[:, j], kind="stable")[:k]
        t2i[j, top] = itm[top, j] + sim[top, j]
    return i2t, t2i


def brute_force_metrics(score_at, score_ta, owner):
    num_audio = score_at.shape[0]
    out = {}
    for name, scores, relevant in (
        ("audio_to_text", score_at, lambda q, c: owner[c] == q),
        ("text_to_audio", score_ta, lambda q, c: owner[q] == c),
    ):
        recalls = {k: [] for k in (1, 5, 10)}
        aps = []
        for q in range(scores.shape[0]):
            ranked = sorted(range(scores.shape[1]), key=lambda c: (-scores[q, c], c))
            rel = [relevant(q, c) for c in ranked]
            for k in recalls:
                recalls[k].append(any(rel[:k]))
            hits = [n for n in range(10) if rel[n]]
            aps.append(sum((m + 1) / (n + 1) for m, n in enumerate(hits)) / min(sum(rel), 10))
        out[name] = {**{f"R@{k}": np.mean(v) for k, v in recalls.items()}, "mAP@10": np.mean(aps)}
    assert num_audio == score_ta.shape[1]
    return out


@pytest.mark.parametrize("k", [10, 16, 200])
def test_rerank_matches_lavis(k):
    sim, owner = random_problem(4, num_audio=20, captions_per_clip=5, signal=1.0)
    rng = np.random.default_rng(5)
    itm = rng.normal(size=sim.shape)
    itm[owner, np.arange(len(owner))] += 1.5  # the matching head knows something the similarity does not
    head = FakeMatchingHead(itm)
    report = retrieval_report(sim, owner, head, k=k, batch_size=64)
    expected = brute_force_metrics(*lavis_score_matrices(sim, itm, k), owner)
    for direction in ("audio_to_text", "text_to_audio"):
        for metric, value in expected[direction].items():
            assert report["reranked"][direction][metric] == pytest.approx(value, abs=1e-12), (
                direction,
                metric,
            )
    assert report["rerank_k"] == k
    assert report["contrastive"] == retrieval_metrics(sim, owner)
    assert report["reranked"]["text_to_audio"]["R@1"] > report["contrastive"]["text_to_audio"]["R@1"]
    assert set(head.batches) == {64}  # fixed-size batches, the last one padded
    pairs_needed = len(
        {(a, t) for a in range(20) for t in np.argsort(-sim[a], kind="stable")[:k]}
        | {(a, t) for t in range(100) for a in np.argsort(-sim[:, t], kind="stable")[:k]}
    )
    assert sum(head.batches) - 64 < pairs_needed <= sum(head.batches)  # each pair scored once


def test_rerank_below_ten_keeps_contrastive_order_after_the_top_k():
    sim, owner = random_problem(6, num_audio=12, captions_per_clip=2, signal=1.0)
    itm = np.random.default_rng(7).normal(size=sim.shape) * 3
    scores_at, scores_ta = rerank_top_k(sim, FakeMatchingHead(itm), k=3, batch_size=8)
    for i in range(sim.shape[0]):
        contrastive = list(np.argsort(-sim[i], kind="stable"))
        top = sorted(contrastive[:3], key=lambda j: -(itm[i, j] + sim[i, j]))
        assert list(np.argsort(-scores_at[i], kind="stable")) == top + contrastive[3:]
    for j in range(sim.shape[1]):
        contrastive = list(np.argsort(-sim[:, j], kind="stable"))
        top = sorted(contrastive[:3], key=lambda a: -(itm[a, j] + sim[a, j]))
        assert list(np.argsort(-scores_ta[j], kind="stable")) == top + contrastive[3:]


def test_recall_curve_matches_recall_at_k():
    sim, owner = random_problem(8, num_audio=30, captions_per_clip=3, signal=1.0)
    relevant = relevance(owner, 30)
    curve = recall_curve(sim.T, relevant.T, max_k=50)
    assert len(curve) == 30  # at most the number of candidates
    expected = ranking_metrics(sim.T, relevant.T, ks=range(1, 31), map_k=None)
    assert curve == [expected[f"R@{k}"] for k in range(1, 31)]
    assert curve[-1] == 1.0 and all(a <= b for a, b in zip(curve, curve[1:], strict=False))
    for k in (1, 5, 10):
        assert curve[k - 1] == recall_at_k(sim, owner)["text_to_audio"][f"R@{k}"]


def test_matching_report_against_sklearn_and_a_direct_count():
    """The matching head's accuracy on the re-scored true pairs and hard negatives, and the ROC AUCs
    (sklearn's roc_auc_score on the same pairs), from a head that gives [no-match, match] logits."""
    from sklearn.metrics import roc_auc_score

    sim, owner = random_problem(8, num_audio=15, captions_per_clip=3, signal=1.0)
    rng = np.random.default_rng(9)
    itm = rng.normal(size=sim.shape + (2,))
    itm[owner, np.arange(len(owner)), 1] += 1.0
    report = retrieval_report(sim, owner, lambda a, t: itm[a, t], k=5, batch_size=16)
    m = report["matching"]
    pairs = {(a, t) for a in range(15) for t in np.argsort(-sim[a], kind="stable")[:5]}
    pairs |= {(a, t) for t in range(45) for a in np.argsort(-sim[:, t], kind="stable")[:5]}
    pairs = sorted(pairs)
    positive = np.array([owner[t] == a for a, t in pairs])
    match = np.array([itm[a, t, 1] for a, t in pairs])
    says = np.array([itm[a, t, 1] > itm[a, t, 0] for a, t in pairs])
    s = np.array([sim[a, t] for a, t in pairs])
    assert (m["positives"], m["hard_negatives"]) == (positive.sum(), (~positive).sum())
    assert m["positive_accuracy"] == pytest.approx(says[positive].mean())
    assert m["hard_negative_accuracy"] == pytest.approx((~says[~positive]).mean())
    assert m["auc_matching_head"] == pytest.approx(roc_auc_score(positive, match))
    assert m["auc_contrastive"] == pytest.approx(roc_auc_score(positive, s))
    assert m["auc_combined"] == pytest.approx(roc_auc_score(positive, match + s))
    # With (pairs,) "match" logits only, the ranking is the same and accuracy is not reported.
    only_match = retrieval_report(sim, owner, lambda a, t: itm[a, t, 1], k=5, batch_size=16)
    assert only_match["reranked"] == report["reranked"] and "positive_accuracy" not in only_match["matching"]
