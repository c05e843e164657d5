"""Audio-text retrieval: recall@k in both directions, with several captions per clip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
    num_audio, num_text = sim_at.shape
    order_a2t = np.argsort(-sim_at, axis=1, kind="stable")
    rank_of_text = np.empty_like(order_a2t)
    np.put_along_axis(rank_of_text, order_a2t, np.arange(num_text)[None], axis=1)
    owns = text_owner[None, :] == np.arange(num_audio)[:, None]
    best_rank_a2t = np.where(owns, rank_of_text, num_text).min(axis=1)

    order_t2a = np.argsort(-sim_at.T, axis=1, kind="stable")
    rank_t2a = np.argmax(order_t2a == text_owner[:, None], axis=1)
    return {
        "audio_to_text": {f"R@{k}": float(np.mean(best_rank_a2t < k)) for k in ks},
        "text_to_audio": {f"R@{k}": float(np.mean(rank_t2a < k)) for k in ks},
        "num_audio": int(num_audio),
        "num_text": int(num_text),
    }


def format_table(report: dict) -> str:
    """A small text table of a recall report."""
    ks = list(report["audio_to_text"])
    lines = [f"{'':15}" + "".join(f"{k:>8}" for k in ks)]
    for direction in ("audio_to_text", "text_to_audio"):
        lines.append(f"{direction:15}" + "".join(f"{100 * report[direction][k]:7.1f}%" for k in ks))
    lines.append(
        f"({report['num_audio']} clips, {report['num_text']} captions; "
        f"chance text_to_audio R@1 = {100 / report['num_audio']:.2f}%)"
    )
    return "\n".join(lines)
