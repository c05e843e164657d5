"""Classification metrics and zero-shot ranking helpers.

- accuracy and a confusion matrix for single-label data;
- mAP for multi-label data: per class, average precision as sklearn's `average_precision_score` defines
  it (sum over distinct score thresholds of (R_n - R_{n-1}) P_n, tied scores form one threshold), averaged
  over the classes that have at least one positive (AudioSet convention; the others are counted);
- zero-shot by contrastive similarity: each label becomes a prompt ("this is a sound of {label}"), the
  clip's score for a label is its similarity to that prompt (max over Q-Former queries, as BLIP-2's ITC);
- zero-shot by an LLM (InstructBLIP / Pengi closed-set ranking): each candidate label is scored by the
  LLM's summed token loss given the audio and prompt; the label with the lowest loss wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_PROMPT = "this is a sound of {label}"


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predicted == labels; both (N,) ints."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or predicted.ndim != 1 or len(labels) == 0:
        raise ValueError(
            f"predicted {predicted.shape} and labels {labels.shape} must be the same non-empty (N,)"
        )
    return float(np.mean(predicted == labels))


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return matrix


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of one class (sklearn's definition): scores (N,), positive (N,) booleans.

    Returns NaN when there is no positive."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    num_positive = positive.sum()
    if num_positive == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    # The last index of each run of equal scores: one threshold per distinct score.
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(positive)[ends]
    precision = true_positives / (ends + 1)
    recall = true_positives / num_positive
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores_nc: np.ndarray, targets_nc: np.ndarray) -> dict:
    """Multi-label mAP: scores_nc (N, C) (higher = more likely), targets_nc (N, C) in {0, 1}.

    Returns {"mAP": mean AP over classes with a positive, "num_classes_scored",
    "num_classes_without_positive", "per_class_ap": [AP or None]}."""
    scores_nc, targets_nc = np.asarray(scores_nc), np.asarray(targets_nc)
    if scores_nc.shape != targets_nc.shape or scores_nc.ndim != 2:
        raise ValueError(f"scores {scores_nc.shape} and targets {targets_nc.shape} must be the same (N, C)")
    per_class = [average_precision(scores_nc[:, c], targets_nc[:, c] > 0) for c in range(scores_nc.shape[1])]
    scored = [ap for ap in per_class if not np.isnan(ap)]
    return {
        "mAP": float(np.mean(scored)) if scored else None,
        "num_classes_scored": len(scored),
        "num_classes_without_positive": len(per_class) - len(scored),
        "per_class_ap": [None if np.isnan(ap) else ap for ap in per_class],
    }


def label_prompts(labels: Sequence[str], template: str = DEFAULT_PROMPT) -> list[str]:
    """One text prompt per label: template.format(label=label), underscores read as spaces."""
    if "{label}" not in template:
        raise ValueError(f"the prompt template {template!r} has no {{label}}")
    return [template.format(label=label.replace("_", " ")) for label in labels]


def similarity_scores(audio_emb: np.ndarray, prompt_emb_ce: np.ndarray) -> np.ndarray:
    """Zero-shot scores by contrastive similarity.

    Args:
      audio_emb: (N, E) or (N, Q, E) normalised audio embeddings (Q: Q-Former queries).
      prompt_emb_ce: (C, E) normalised prompt embeddings.

    Returns:
      (N, C) similarities, the max over queries when Q is present (BLIP-2's ITC similarity).
    """
    audio_emb = np.asarray(audio_emb)
    if audio_emb.ndim == 2:
        return audio_emb @ np.asarray(prompt_emb_ce).T
    return np.einsum("nqe,ce->ncq", audio_emb, prompt_emb_ce).max(axis=-1)


def token_losses(logits_btv: np.ndarray, targets_bt: np.ndarray) -> np.ndarray:
    """Per-token negative log-likelihood -log softmax(logits)[target]; (B, T, V), (B, T) -> (B, T)."""
    logits = np.asarray(logits_btv, dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    return log_norm - np.take_along_axis(logits, np.asarray(targets_bt)[..., None], axis=-1)[..., 0]


def rank_labels_by_loss(token_nll_nct: np.ndarray, mask_nct: np.ndarray, reduce: str = "sum") -> dict:
    """InstructBLIP/Pengi closed-set classification: pick, per clip, the candidate label whose tokens the
    LLM finds least surprising.

    Args:
      token_nll_nct: (N, C, T) per-token losses (-log p) of candidate label c's tokens for clip n; pass
        -log_probs if you hold log-probabilities.
      mask_nct: (N, C, T) 1 where the token belongs to the label (0 for padding and prompt tokens).
      reduce: "sum" (InstructBLIP: summed loss) or "mean" (loss per label token).

    Returns:
      {"predicted": (N,) label indices (lowest loss; ties to the lower index), "loss": (N, C) reduced losses}.
    """
    nll, mask = np.asarray(token_nll_nct, dtype=np.float64), np.asarray(mask_nct, dtype=np.float64)
    if nll.shape != mask.shape or nll.ndim != 3:
        raise ValueError(f"losses {nll.shape} and mask {mask.shape} must be the same (N, C, T)")
    if np.any(mask.sum(-1) == 0):
        raise ValueError("a candidate label has no tokens in the mask")
    loss = (nll * mask).sum(-1)
    if reduce == "mean":
        loss = loss / mask.sum(-1)
    elif reduce != "sum":
        raise ValueError(f"reduce={reduce!r}: choose sum or mean")
    return {"predicted": np.argmin(loss, axis=1), "loss": loss}


def classification_report(predicted: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """{"accuracy", "num_items", "per_class_accuracy": {name: accuracy or None}, "confusion_matrix"}."""
    matrix = confusion_matrix(predicted, labels, len(class_names))
    support = matrix.sum(axis=1)
    return {
        "accuracy": accuracy(predicted, labels),
        "num_items": int(len(labels)),
        "per_class_accuracy": {
            name: (float(matrix[c, c] / support[c]) if support[c] else None)
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": matrix.tolist(),
    }


def zero_shot_report(scores_nc: np.ndarray, labels: Sequence[Sequence[str]], classes: Sequence[str]) -> dict:
    """Metrics of zero-shot class scores (N, C) (higher = more likely) for items with label lists.

    Every item with exactly one label: `classification_report` of the argmax (accuracy, per-class
    accuracy, confusion matrix). Otherwise (multi-label): `mean_average_precision` with per-class AP by
    name, and "accuracy" = the share of items whose best-scoring class is one of their labels.
    """
    scores_nc = np.asarray(scores_nc)
    index = {name: c for c, name in enumerate(classes)}
    predicted = scores_nc.argmax(axis=1)
    if all(len(item) == 1 for item in labels):
        return classification_report(predicted, np.array([index[item[0]] for item in labels]), classes)
    targets = np.zeros(scores_nc.shape, np.int32)
    for n, item in enumerate(labels):
        targets[n, [index[x] for x in item]] = 1
    metrics = mean_average_precision(scores_nc, targets)
    metrics["per_class_ap"] = dict(zip(classes, metrics["per_class_ap"], strict=True))
    metrics["accuracy"] = float(targets[np.arange(len(labels)), predicted].mean())
    metrics["num_items"] = len(labels)
    metrics["multi_label"] = True
    return metrics
