"""Audio-text retrieval: R@k and mAP@10 in both directions, with several captions per clip, and BLIP-2's
re-ranking of the top k candidates by the matching head.

Definitions (ties rank in index order everywhere):

- **R@k**: the fraction of queries with at least one relevant item among the first k. Text to audio: the
  caption's clip. Audio to text: any of the clip's captions.
- **mAP@10**: DCASE's definition (language-based audio retrieval, DCASE 2022-2025 task 6b/8): for each
  query, AP@10 = sum over relevant items ranked p <= 10 of precision@p, divided by min(relevant items, 10);
  mAP@10 is the mean over queries. With one relevant clip per caption (text to audio, as DCASE scores it)
  AP@10 is 1/rank when rank <= 10, else 0. Audio to text has one relevant caption per reference caption
  (Clotho: 5), and the same formula averages the precision at each of them.
- **Re-ranking** (LAVIS `compute_sim_matrix`, BLIP-2): for each query, the top k candidates by contrastive
  similarity get score = ITM logit (match class, averaged over queries) + contrastive similarity, and are
  re-ordered by it; candidates after the first k keep their contrastive order behind them (LAVIS gives them
  -100, which changes no R@k or mAP@10 for k >= 10).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# Scores (audio index, text index) pairs: (pairs,) int arrays in; out (pairs,) ITM "match" logits, or
# (pairs, 2) [no-match, match] logits (then the head's own accuracy is reported too).
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def recall_at_k(sim_at: np.ndarray, text_owner: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k from a similarity matrix.

    Args:
      sim_at: (num_audio, num_text) similarities, higher is closer.
      text_owner: (num_text,) the index of the clip each caption describes.
      ks: cut-offs.

    Returns:
      {"audio_to_text": {"R@k": ...}, "text_to_audio": {"R@k": ...}, "num_audio", "num_text"}: audio to
      text counts a hit when any of the clip's captions is in the top k; text to audio when the
      caption's clip is in the top k. Ties rank in index order.
    """
    return retrieval_metrics(sim_at, text_owner, ks, map_k=None)


def relevance(text_owner: np.ndarray, num_audio: int) -> np.ndarray:
    """(num_audio, num_text) booleans: caption t describes clip a."""
    return np.asarray(text_owner)[None, :] == np.arange(num_audio)[:, None]


def ranking_metrics(
    scores_qc: np.ndarray, relevant_qc: np.ndarray, ks: Sequence[int] = (1, 5, 10), map_k: int | None = 10
) -> dict:
    """R@k and mAP@map_k for one direction.

    Args:
      scores_qc: (queries, candidates) scores, higher ranks first; ties in index order.
      relevant_qc: (queries, candidates) booleans.
      ks: recall cut-offs.
      map_k: the mAP cut-off (None: no mAP).

    Returns:
      {"R@k": float for k in ks, "mAP@{map_k}": float}.
    """
    order = np.argsort(-np.asarray(scores_qc), axis=1, kind="stable")
    relevant_in_order = np.take_along_axis(np.asarray(relevant_qc, bool), order, axis=1)
    out = {f"R@{k}": float(np.mean(relevant_in_order[:, :k].any(axis=1))) for k in ks}
    if map_k is not None:
        top = relevant_in_order[:, :map_k]
        hits_so_far = np.cumsum(top, axis=1)
        precision_at_hits = np.where(top, hits_so_far / np.arange(1, top.shape[1] + 1), 0.0).sum(axis=1)
        num_relevant = np.minimum(np.asarray(relevant_qc, bool).sum(axis=1), map_k)
        out[f"mAP@{map_k}"] = float(np.mean(precision_at_hits / np.maximum(num_relevant, 1)))
    return out


def retrieval_metrics(
    sim_at: np.ndarray,
    text_owner: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int | None = 10,
    sim_ta: np.ndarray | None = None,
) -> dict:
    """R@k and mAP@10 both ways from one similarity matrix.

    Args:
      sim_at: (num_audio, num_text) scores used to rank texts for each audio.
      text_owner: (num_text,) the clip index each caption describes.
      ks, map_k: cut-offs (map_k None: no mAP).
      sim_ta: (num_text, num_audio) scores used to rank audio for each text; default sim_at.T (re-ranking
        gives the two directions different scores).

    Returns:
      {"audio_to_text": {"R@1", "R@5", "R@10", "mAP@10"}, "text_to_audio": {...}, "num_audio", "num_text"}.
    """
    num_audio, num_text = np.shape(sim_at)
    relevant_at = relevance(text_owner, num_audio)
    return {
        "audio_to_text": ranking_metrics(sim_at, relevant_at, ks, map_k),
        "text_to_audio": ranking_metrics(sim_at.T if sim_ta is None else sim_ta, relevant_at.T, ks, map_k),
        "num_audio": int(num_audio),
        "num_text": int(num_text),
    }


def recall_curve(scores_qc: np.ndarray, relevant_qc: np.ndarray, max_k: int = 50) -> list[float]:
    """R@k for k = 1..min(max_k, candidates): scores_qc, relevant_qc (queries, candidates) as in
    ranking_metrics. Returns a list, entry k-1 being R@k."""
    order = np.argsort(-np.asarray(scores_qc), axis=1, kind="stable")
    relevant_in_order = np.take_along_axis(np.asarray(relevant_qc, bool), order, axis=1)
    first_hit = np.where(relevant_in_order.any(axis=1), relevant_in_order.argmax(axis=1), np.inf)
    ks = np.arange(1, min(max_k, relevant_in_order.shape[1]) + 1)
    return np.mean(first_hit[None, :] < ks[:, None], axis=1).tolist()


def _score_in_batches(
    score_pairs: PairScorer, audio: np.ndarray, text: np.ndarray, batch_size: int
) -> np.ndarray:
    """Calls score_pairs on fixed-size batches (the last one padded by repeating its final pair, so a
    jitted scorer compiles once); returns (pairs, 1) or (pairs, 2) float64 (as score_pairs gives)."""
    out = None
    for start in range(0, len(audio), batch_size):
        a, t = audio[start : start + batch_size], text[start : start + batch_size]
        pad = batch_size - len(a)
        if pad:
            a, t = np.concatenate([a, np.repeat(a[-1:], pad)]), np.concatenate([t, np.repeat(t[-1:], pad)])
        scores = np.asarray(score_pairs(a, t), dtype=np.float64)
        scores = scores.reshape(batch_size, -1) if scores.shape[:1] == (batch_size,) else scores
        if scores.shape not in ((batch_size, 1), (batch_size, 2)):
            raise ValueError(f"score_pairs returned shape {scores.shape} for {batch_size} pairs")
        if out is None:
            out = np.empty((len(audio), scores.shape[1]))
        out[start : start + batch_size] = scores[: batch_size - pad]
    return np.empty((0, 1)) if out is None else out


def _rerank_rows(
    sim_qc: np.ndarray, extra: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int
) -> np.ndarray:
    """Each row's top k by sim re-ordered by sim + extra(query, candidate) (ties keep the contrastive order),
    followed by the rest in contrastive order. Returns (queries, candidates) scores that encode this order
    (candidates minus position), for ranking_metrics."""
    num_queries, num_candidates = sim_qc.shape
    k = min(k, num_candidates)
    order = np.argsort(-sim_qc, axis=1, kind="stable")
    top = order[:, :k]
    rows = np.repeat(np.arange(num_queries), k)
    rescored = (sim_qc[rows, top.ravel()] + extra(rows, top.ravel())).reshape(num_queries, k)
    top = np.take_along_axis(top, np.argsort(-rescored, axis=1, kind="stable"), axis=1)
    final_order = np.concatenate([top, order[:, k:]], axis=1)
    ranking = np.empty((num_queries, num_candidates))
    np.put_along_axis(ranking, final_order, np.arange(num_candidates, 0, -1, dtype=np.float64)[None], axis=1)
    return ranking


def candidate_pairs(sim_at: np.ndarray, k: int) -> np.ndarray:
    """(pairs, 2) unique (audio, text) index pairs: every audio query's top k texts and every text
    query's top k clips by contrastive similarity (what re-ranking scores, each pair once)."""
    sim_at = np.asarray(sim_at, dtype=np.float64)
    num_audio, num_text = sim_at.shape
    k_at, k_ta = min(k, num_text), min(k, num_audio)
    top_at = np.argsort(-sim_at, axis=1, kind="stable")[:, :k_at]
    top_ta = np.argsort(-sim_at.T, axis=1, kind="stable")[:, :k_ta]
    pairs = np.concatenate(
        [
            np.stack([np.repeat(np.arange(num_audio), k_at), top_at.ravel()], 1),
            np.stack([top_ta.ravel(), np.repeat(np.arange(num_text), k_ta)], 1),
        ]
    )
    return np.unique(pairs, axis=0)


def rerank_with_logits(
    sim_at: np.ndarray, pairs: np.ndarray, match_logits: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """`rerank_top_k` from the "match" logits (pairs,) of `candidate_pairs(sim_at, k)`."""
    sim_at = np.asarray(sim_at, dtype=np.float64)
    lookup = dict(zip(map(tuple, pairs.tolist()), np.asarray(match_logits).tolist(), strict=True))

    def logit_at(audio: np.ndarray, text: np.ndarray) -> np.ndarray:
        return np.array([lookup[(a, t)] for a, t in zip(audio.tolist(), text.tolist(), strict=True)])

    scores_at = _rerank_rows(sim_at, logit_at, k)
    scores_ta = _rerank_rows(sim_at.T, lambda text, audio: logit_at(audio, text), k)
    return scores_at, scores_ta


def rerank_top_k(
    sim_at: np.ndarray, score_pairs: PairScorer, k: int = 128, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """BLIP-2 re-ranking: the top k of each query by contrastive similarity are re-scored as
    ITM logit + similarity (both directions, as LAVIS does).

    Args:
      sim_at: (num_audio, num_text) contrastive similarities (cosine; not divided by the temperature).
      score_pairs: (audio indices, text indices), each (batch_size,) int64 -> (batch_size,) ITM logits
        for "match" (or (batch_size, 2) [no-match, match]). Called with fixed-size batches (the last
        padded), so it may be a jitted function.
      k: candidates re-scored per query (LAVIS k_test: 128 by default).
      batch_size: pairs per score_pairs call.

    Returns:
      (scores_at (num_audio, num_text) for audio->text ranking, scores_ta (num_text, num_audio) for
      text->audio ranking): higher ranks first (they encode the order, not the logits); pass them to
      retrieval_metrics(scores_at, owner, sim_ta=scores_ta).
    """
    pairs = candidate_pairs(sim_at, k)
    logits = _score_in_batches(score_pairs, pairs[:, 0], pairs[:, 1], batch_size)
    return rerank_with_logits(sim_at, pairs, logits[:, -1], k)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The probability that a random positive scores above a random negative (ties count half);
    None without both kinds."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (1-based), then the Mann-Whitney U statistic.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def matching_report(
    sim_at: np.ndarray, text_owner: np.ndarray, pairs: np.ndarray, logits: np.ndarray
) -> dict:
    """How well the matching head separates the re-scored pairs: the true (clip, caption) pairs among
    them (positives) from the others (hard negatives: the contrastive top k's mistakes).

    {"positives", "hard_negatives": counts; "positive_accuracy", "hard_negative_accuracy": the fraction
    the head classifies right (match logit above no-match; only with (pairs, 2) logits); "auc_matching_head",
    "auc_contrastive", "auc_combined": ROC AUC of the match logit, of the similarity, and of their sum
    (the re-ranking score) on those pairs}. Re-ranking pays when auc_combined > auc_contrastive."""
    positive = np.asarray(text_owner)[pairs[:, 1]] == pairs[:, 0]
    sim = np.asarray(sim_at, np.float64)[pairs[:, 0], pairs[:, 1]]
    match = logits[:, -1]
    out = {
        "positives": int(positive.sum()),
        "hard_negatives": int((~positive).sum()),
        "auc_matching_head": roc_auc(match, positive),
        "auc_contrastive": roc_auc(sim, positive),
        "auc_combined": roc_auc(match + sim, positive),
    }
    if logits.shape[1] == 2:
        says_match = logits[:, 1] > logits[:, 0]
        out["positive_accuracy"] = float(says_match[positive].mean()) if positive.any() else None
        out["hard_negative_accuracy"] = float((~says_match[~positive]).mean()) if (~positive).any() else None
    return out


def retrieval_report(
    sim_at: np.ndarray,
    text_owner: np.ndarray,
    score_pairs: PairScorer | None = None,
    k: int = 128,
    batch_size: int = 256,
    curve_max_k: int = 50,
) -> dict:
    """Both sets of numbers: {"contrastive": retrieval_metrics, "reranked": retrieval_metrics and
    "matching": matching_report (when score_pairs is given), "rerank_k": k, "curves": {ranking:
    {direction: [R@1, ..., R@curve_max_k]}}}."""
    relevant_at = relevance(text_owner, np.shape(sim_at)[0])
    report = {"contrastive": retrieval_metrics(sim_at, text_owner)}
    report["curves"] = {
        "contrastive": {
            "audio_to_text": recall_curve(sim_at, relevant_at, curve_max_k),
            "text_to_audio": recall_curve(np.transpose(sim_at), relevant_at.T, curve_max_k),
        }
    }
    if score_pairs is not None:
        pairs = candidate_pairs(sim_at, k)
        logits = _score_in_batches(score_pairs, pairs[:, 0], pairs[:, 1], batch_size)
        scores_at, scores_ta = rerank_with_logits(sim_at, pairs, logits[:, -1], k)
        report["reranked"] = retrieval_metrics(scores_at, text_owner, sim_ta=scores_ta)
        report["rerank_k"] = int(k)
        report["matching"] = matching_report(sim_at, text_owner, pairs, logits)
        report["curves"]["reranked"] = {
            "audio_to_text": recall_curve(scores_at, relevant_at, curve_max_k),
            "text_to_audio": recall_curve(scores_ta, relevant_at.T, curve_max_k),
        }
    return report


def format_table(report: dict) -> str:
    """A small text table of a retrieval_metrics / recall_at_k report."""
    ks = list(report["audio_to_text"])
    lines = [f"{'':15}" + "".join(f"{k:>8}" for k in ks)]
    for direction in ("audio_to_text", "text_to_audio"):
        lines.append(f"{direction:15}" + "".join(f"{100 * report[direction][k]:7.1f}%" for k in ks))
    lines.append(
        f"({report['num_audio']} clips, {report['num_text']} captions; "
        f"chance text_to_audio R@1 = {100 / report['num_audio']:.2f}%)"
    )
    return "\n".join(lines)


def describe_matching(matching: dict) -> str:
    """One sentence of `matching_report`: the head's accuracy and the three AUCs."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    text = (
        f"matching head on the {matching['positives']} true and {matching['hard_negatives']} hard-negative "
        "re-scored pairs"
    )
    if "positive_accuracy" in matching:
        text += (
            f": right on {pct(matching['positive_accuracy'])} of the true pairs and "
            f"{pct(matching['hard_negative_accuracy'])} of the hard negatives"
        )
    return text + (
        f"; ROC AUC: head {num(matching['auc_matching_head'])}, "
        f"contrastive {num(matching['auc_contrastive'])}, "
        f"head + contrastive (the re-ranking score) {num(matching['auc_combined'])}"
    )
