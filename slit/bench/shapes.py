"""The shapes the training-step benchmarks run at, shared by slit's side, the PyTorch reference and the
FLOP counts (slit/bench/flops.py), so that all three describe the same step."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class QFormerShape:
    """A Q-Former's sizes. Defaults: BLIP-2's (BERT-base, 12 layers, 768 wide, 32 queries)."""

    num_queries: int = 32
    num_layers: int = 12
    width: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    cross_attention_freq: int = 2
    vocab_size: int = 30523  # BERT's 30522 + [DEC]
    max_text_positions: int = 512

    @property
    def cross_attention_layers(self) -> int:
        """Layers 0, freq, 2*freq, ... have cross-attention."""
        return len(range(0, self.num_layers, self.cross_attention_freq))


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """A Llama-family decoder's sizes. Defaults: SmolLM2-135M (tied embeddings, 9 / 3 heads)."""

    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    vocab_size: int = 49152

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Stage1Shape:
    """One stage-one step on cached encoder features: batch clips of `frames` frames x `encoder_width`
    (Whisper base: 512 wide, 500 frames for 10 s), one caption of `text_length` tokens each."""

    qformer: QFormerShape = QFormerShape()
    batch: int = 8
    frames: int = 500
    encoder_width: int = 512
    text_length: int = 32
    embed_dim: int = 256


@dataclasses.dataclass(frozen=True)
class Stage2Shape:
    """One stage-two step on cached encoder features: the instruction in Q-Former tokens
    (`qformer_text_length`) and in LLM tokens (`instruction_length`), then the answer (`answer_length`)."""

    qformer: QFormerShape = QFormerShape()
    llm: LlamaShape = LlamaShape()
    batch: int = 8
    frames: int = 500
    encoder_width: int = 512
    qformer_text_length: int = 16
    instruction_length: int = 16
    answer_length: int = 16

    @property
    def llm_length(self) -> int:
        """The LLM's sequence: [soft prompt; instruction; answer]."""
        return self.qformer.num_queries + self.instruction_length + self.answer_length


TINY_QFORMER = QFormerShape(
    num_queries=4, num_layers=2, width=32, num_heads=4, mlp_dim=64, vocab_size=97, max_text_positions=32
)
TINY_LLAMA = LlamaShape(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=101
)
LLAMA_1B = LlamaShape(  # TinyLlama-1.1B's sizes (with a tied output layer): a ~1B frozen LLM
    hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4, vocab_size=32000
)
SIZES: dict[str, tuple[Stage1Shape, Stage2Shape]] = {
    # The issue's size: a BERT-base Q-Former (BLIP-2's), SmolLM2-135M, batch 8, 10 s of Whisper base.
    "base": (Stage1Shape(), Stage2Shape()),
    # An accelerator's size: stage two through a ~1B random Llama (1.03 B weights), batch 32.
    "1b": (Stage1Shape(batch=32), Stage2Shape(llm=LLAMA_1B, batch=32)),
    # For tests: seconds to compile and run.
    "tiny": (
        Stage1Shape(TINY_QFORMER, batch=4, frames=12, encoder_width=16, text_length=6, embed_dim=8),
        Stage2Shape(
            TINY_QFORMER,
            TINY_LLAMA,
            batch=4,
            frames=12,
            encoder_width=16,
            qformer_text_length=5,
            instruction_length=5,
            answer_length=4,
        ),
    ),
}
