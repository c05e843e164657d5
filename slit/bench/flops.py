"""Model FLOPs of one training step, counted from the architectures' definitions, for utilisation (MFU).

Only matrix products are counted (an (m x k) @ (k x n) product is 2mkn FLOPs); layer norms, softmax,
GELU and the optimizer update are not, as is usual for MFU. Attention counts its full score matrix (the
masked entries are computed too). The backward pass of a product costs 2mkn for each operand that
needs a gradient:
- trainable parts (the Q-Former and its heads; everything they compute feeds a trainable weight or
  a trainable input): forward + backward = 3x the forward;
- frozen parts on the gradient's path (stage two's LLM, through which the soft prompt is trained): the
  gradient of the inputs only, 1x the forward for a weight product and 2x for attention's
  activation-by-activation products;
- frozen parts off the path (a frozen encoder's forward) are counted forward only; the step
  benchmarks read cached encoder features, so they have none.

Three choices are parameters, since implementations differ in them and the PyTorch reference's counts are
checked against torch's FlopCounterMode in tests:
- `share_encoder_kv`: the cross-attention keys and values of a clip's frames are projected once per
  clip and shared by every pass over that clip (slit), rather than once per pass (transformers'
  Q-Former: five times per clip in stage one, where the matching pass sees 3 pairs per clip);
- `generation_reuses_queries`: stage one's grounded-generation pass runs the text alone, attending to
  the query pass's self-attention keys and values (LAVIS, slit), or runs [queries; text] again;
- `logits_positions`: stage two's LLM output layer applied to the answer positions only (the useful
  work, and what slit computes) or to every position (transformers' CausalLM).
The model FLOPs that utilisation is reported against are the useful ones: shared keys and values,
generation after the query pass, output layer on answer positions.
"""

from __future__ import annotations

import dataclasses

from slit.bench.shapes import LlamaShape, QFormerShape, Stage1Shape, Stage2Shape


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step, by kind (see the module docstring)."""

    trainable_forward: float = 0.0
    trainable_backward: float = 0.0
    frozen_forward: float = 0.0
    frozen_backward: float = 0.0  # gradients of a frozen part's inputs (the path to trainable weights)

    @property
    def total(self) -> float:
        return self.trainable_forward + self.trainable_backward + self.frozen_forward + self.frozen_backward

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "total": self.total}


def _trainable(forward: float) -> StepFlops:
    return StepFlops(trainable_forward=forward, trainable_backward=2 * forward)


def qformer_pass(
    q: QFormerShape, query_rows: int, text_rows: int, frames: int, prefix_keys: int = 0
) -> float:
    """Forward FLOPs of one Q-Former pass for one example over [queries (query_rows: 0 or Q); text],
    without the frames' key/value projections (`encoder_kv`). `prefix_keys`: keys and values of an
    earlier pass that every row also attends to (stage one's generation pass reusing the query pass).

    Per layer: self-attention's q, k, v, o projections (8 R W^2 for R rows), scores and context
    (4 R (P + R) W with P prefix keys), the feed-forward blocks (4 R W M, query and text rows each
    through their own); per cross-attention layer: the queries' q and o projections (4 Q W^2), scores
    and context over the frames (4 Q F W).
    """
    rows, w, m = query_rows + text_rows, q.width, q.mlp_dim
    per_layer = 8 * rows * w * w + 4 * rows * (prefix_keys + rows) * w + 4 * rows * w * m
    cross = 4 * query_rows * w * w + 4 * query_rows * frames * w if query_rows else 0
    return q.num_layers * per_layer + q.cross_attention_layers * cross


def encoder_kv(q: QFormerShape, frames: int, encoder_width: int) -> float:
    """Forward FLOPs of one clip's cross-attention keys and values, every cross-attention layer."""
    return q.cross_attention_layers * 4 * frames * encoder_width * q.width


def stage1(
    shape: Stage1Shape, share_encoder_kv: bool = True, generation_reuses_queries: bool = True
) -> StepFlops:
    """One stage-one step (BLIP-2's contrastive, matching and grounded-generation losses) on `batch`
    clips: the query pass and the text pass (contrastive), 3 matching pairs per clip (the positive, a
    negative text, a negative clip), the generation pass; the projections, similarities and heads.

    `generation_reuses_queries`: the generation pass runs the text only, attending to the query pass's
    keys and values (slit, LAVIS), rather than [queries; text] again (the PyTorch reference)."""
    q, b, t, f = shape.qformer, shape.batch, shape.text_length, shape.frames
    nq, w, d = q.num_queries, q.width, shape.embed_dim
    passes = (
        qformer_pass(q, nq, 0, f)  # contrastive: queries
        + qformer_pass(q, 0, t, f)  # contrastive: text
        + 3 * qformer_pass(q, nq, t, f)  # matching
        + (
            qformer_pass(q, 0, t, f, prefix_keys=nq)
            if generation_reuses_queries
            else qformer_pass(q, nq, t, f)
        )
    )
    # Per clip once, or per pass over it: the query pass, 3 matching pairs, and a joint generation pass.
    kv = encoder_kv(q, f, shape.encoder_width) * (
        1 if share_encoder_kv else 4 + (not generation_reuses_queries)
    )
    heads = (
        2 * nq * w * d  # audio projection of each query
        + 2 * w * d  # text projection of [CLS]
        + 2 * b * nq * d  # similarities to every text of the batch (per clip)
        + 3 * 2 * nq * w * 2  # matching head on each query of 3 pairs
        + (t - 1) * (2 * w * w + 2 * w * q.vocab_size)  # MLM head: transform, tied output layer
    )
    return _trainable(b * (passes + kv + heads))


def llama_forward(llm: LlamaShape, length: int, logits_positions: int) -> float:
    """Forward FLOPs of a Llama decoder over `length` positions of one example, the output layer on
    `logits_positions` of them. Returns the forward FLOPs; see `llama_backward_to_inputs`."""
    return _llama_weight_products(llm, length, logits_positions) + _llama_attention(llm, length)


def _llama_weight_products(llm: LlamaShape, length: int, logits_positions: int) -> float:
    d, kv = llm.hidden_size, llm.num_kv_heads * llm.head_dim
    per_token = 2 * (2 * d * d + 2 * d * kv + 3 * d * llm.intermediate_size)  # q, o; k, v; gate, up, down
    return llm.num_layers * length * per_token + logits_positions * 2 * d * llm.vocab_size


def _llama_attention(llm: LlamaShape, length: int) -> float:
    return llm.num_layers * 4 * length * length * llm.num_heads * llm.head_dim


def llama_backward_to_inputs(llm: LlamaShape, length: int, logits_positions: int) -> float:
    """The gradient of the inputs of a frozen Llama: 1x the weight products, 2x attention's."""
    return _llama_weight_products(llm, length, logits_positions) + 2 * _llama_attention(llm, length)


def stage2(shape: Stage2Shape, logits_positions: str = "answer") -> StepFlops:
    """One stage-two step on `batch` clips: the instruction-aware Q-Former pass ([queries;
    instruction]), the projection to the LLM width, the frozen LLM over [soft prompt; instruction;
    answer] forward and back to the soft prompt (one Q-Former pass: the frames' keys and values are
    projected once either way)."""
    q, b, llm = shape.qformer, shape.batch, shape.llm
    if logits_positions not in ("answer", "all"):
        raise ValueError(f"logits_positions={logits_positions!r}: 'answer' or 'all'")
    logits = shape.answer_length if logits_positions == "answer" else shape.llm_length
    bridge = (
        qformer_pass(q, q.num_queries, shape.qformer_text_length, shape.frames)
        + encoder_kv(q, shape.frames, shape.encoder_width)
        + 2 * q.num_queries * q.width * llm.hidden_size
    )
    trainable = _trainable(b * bridge)
    return dataclasses.replace(
        trainable,
        frozen_forward=b * llama_forward(llm, shape.llm_length, logits),
        frozen_backward=b * llama_backward_to_inputs(llm, shape.llm_length, logits),
    )
