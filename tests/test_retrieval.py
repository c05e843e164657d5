"""recall@k against a direct computation from the definition."""

import numpy as np
import pytest

from slit.eval.retrieval import format_table, recall_at_k


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
