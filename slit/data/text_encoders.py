"""Text encoders for stage two's instruction-tuning mixture (slit.data.pipeline.mixture_dataset) and its
generation: instructions for the Q-Former and for the LLM, answers for the LLM, and how an instruction is
shown to the LLM (`llm_prompt_text`) with the answer after it (`answer_text`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from slit.data.tokenizer import TextTokenizer


class QFormerInstructionEncoder:
    """Instructions -> Q-Former ids (n, length), [CLS] ... [SEP] padded; long ones keep their *end*
    (left truncation, as InstructBLIP)."""

    def __init__(self, tokenizer: TextTokenizer, length: int):
        self.tokenizer, self.length = tokenizer, length

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        length = max_length or self.length
        if getattr(self.tokenizer, "own_truncation", False):  # CLIP's: its own padding and truncation
            return self.tokenizer.encode(texts, length)
        full = self.tokenizer.encode(texts, 4 * length + 8)
        out = np.full((len(texts), length), self.tokenizer.pad_id, np.int32)
        for i, row in enumerate(full):
            ids = row[row != self.tokenizer.pad_id]
            if len(ids) > length:
                ids = np.concatenate([ids[:1], ids[len(ids) - length + 1 :]])
            out[i, : len(ids)] = ids
        return out


class LLMTextEncoder:
    """Texts -> LLM ids padded with -1, after `fmt`. Instructions are left-padded and keep their end;
    answers are right-padded, end with EOS and keep their start."""

    def __init__(self, tokenizer: Any, eos_id: int | None, is_answer: bool, fmt: Callable[[str], str]):  # noqa: ANN401
        self.tokenizer, self.eos_id, self.is_answer, self.fmt = tokenizer, eos_id, is_answer, fmt

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        out = np.full((len(texts), max_length), -1, np.int32)
        for i, text in enumerate(texts):
            ids = list(self.tokenizer(self.fmt(text), add_special_tokens=False)["input_ids"])
            if self.is_answer:
                ids = ids[: max_length - 1] + ([self.eos_id] if self.eos_id is not None else [])
                out[i, : len(ids)] = ids[:max_length]
            elif ids:
                ids = ids[-max_length:]
                out[i, max_length - len(ids) :] = ids
        return out


class PairedInstructionEncoder:
    """One instruction -> [Q-Former ids (Lq) | LLM ids (Li)] in one row (split again by the trainer),
    so that the shared mixture pipeline carries both tokenizations."""

    def __init__(self, qformer: QFormerInstructionEncoder, llm: LLMTextEncoder, llm_length: int):
        self.qformer, self.llm, self.llm_length = qformer, llm, llm_length

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        assert max_length == self.qformer.length + self.llm_length, max_length
        return np.concatenate(
            [self.qformer.encode(texts), self.llm.encode(texts, self.llm_length)], axis=1
        ).astype(np.int32)


def llm_prompt_text(instruction: str) -> str:
    """How an instruction is shown to the LLM; the answer follows it after a space."""
    return f"{instruction}\nAnswer:"


def answer_text(answer: str) -> str:
    """How an answer follows the instruction for the LLM (after a space)."""
    return f" {answer}"
