"""Text generation from frozen LLMs: greedy, beam search and sampling in one jitted KV-cache loop."""

from slit.generate.decoding import (
    Generated,
    GenerationConfig,
    generate,
    generate_seq2seq,
    positions_from_mask,
)

__all__ = ["GenerationConfig", "Generated", "generate", "generate_seq2seq", "positions_from_mask"]
