"""PyTorch references for the training-step benchmarks: slit's stage-one and stage-two steps rebuilt from
transformers' modules (BLIP-2 / InstructBLIP as in salesforce/LAVIS `blip2_qformer.py` and transformers'
`InstructBlipForConditionalGeneration`), same shapes, float32, so that `slit bench stage1|stage2` can time
slit's JAX step against them on the same machine.

Stage one (`stage1_reference`): a trainable `transformers.InstructBlipQFormerModel` with learned queries,
`ln_vision` over the frozen encoder features, the contrastive / matching / generation heads and a
learnable temperature. One step runs, in train mode (dropout on hidden states and attention
probabilities):
- ITC: a queries-only pass (cross-attention to the features, frame mask) and a text-only pass; the
  similarity is the max over queries of the normalised embeddings' dot products, over the temperature;
  symmetric cross-entropy with label smoothing 0.1;
- ITM: 3B pairs [positives; (negative audio, text); (audio, negative text)], hard negatives drawn with
  `torch.multinomial` from softmax(similarity) + 1e-4 over the batch, never the positive nor an example with
  the same text; queries and text see each other (a 2-D key-padding mask); 2-way cross-entropy on the
  matching head averaged over the query outputs;
- ITG: [DEC] (id vocab_size - 1) replaces [CLS]; queries + text under the grounded-generation mask (query
  rows see only queries, text rows see every query and earlier-or-same text, padding keys invisible),
  BERT's MLM head tied to the word embeddings on the text outputs but the last, label smoothing 0.1,
  the mean over non-padding targets;
then the sum of the three losses is back-propagated and AdamW (lr 1e-4, weight decay 0.05 on the
weights with ndim >= 2, as slit's `decay_mask` and LAVIS) updates every trainable weight. The AdamW is
PyTorch's fused one (`fused=True`, CPU and CUDA): the same update as the default per-tensor loop, about
5x faster on CPU (0.11 s against 0.56 s for the 178M weights of the base Q-Former on 2 cores).

Stage two (`stage2_reference`): the InstructBLIP bridge (Q-Former over [queries; instruction] with a 2-D
key-padding mask, the query outputs projected to the LLM width) in front of a frozen
`transformers.LlamaForCausalLM` that sees [soft prompt; instruction; answer] with positions counted over
the non-padding tokens; cross-entropy over the answer tokens only (mean over tokens). The LLM's weights
take no gradient and are not in the optimizer; gradients reach the bridge through its activations.

Attention implementation of the Q-Former: "eager" (`QFORMER_ATTENTION`). sdpa would have the same
semantics here: every mask is boolean with no fully masked row ([CLS] is never padding; every query row
sees the queries; a clip has a real frame), so sdpa's -inf and eager's finfo.min give the same softmax
weights, and on CPU both even draw the same dropout masks (equal losses step after step) in the same time
(with dropout > 0 PyTorch's CPU sdpa falls back to its math kernel). Eager is kept because its attention is
plain matmuls, the counterpart of slit's, which FlopCounterMode counts as the model FLOPs (backward = 2x
forward); fused sdpa kernels recompute the scores in the backward (2.5x in torch's formulas). PyTorch's
fused CPU kernel (sdpa without dropout, e.g. a frozen LLM loaded with sdpa) is unknown to FlopCounterMode
(its FLOPs would count as 0), so importing this module registers torch's own sdpa formulas for
`aten._scaled_dot_product_flash_attention_for_cpu` and its backward when absent.

Mask passing: `InstructBlipQFormerModel.forward` hands its `attention_mask` to
`masking_utils.create_bidirectional_mask`, which expands a 2-D (B, L) key-padding mask itself but returns
a 4-D mask unchanged, so the grounded-generation mask is given as 4-D (B, 1, L, L) in the format of the
attention implementation: boolean (True = visible) for sdpa, additive float (0 / finfo.min) for eager; a
boolean 4-D mask given to eager would be *added* to the scores, silently wrong.

Where this departs from LAVIS, to match slit's step instead:
- ITG recomputes the queries in its own pass (query rows blind to text), as slit does; LAVIS reuses the
  ITC query pass's cached keys/values (`past_key_values`) and runs the text rows only.
- The MLM head runs on the first T - 1 text outputs (the ones with a target); LAVIS runs it on all T and
  drops the last.
- The temperature's clamp to [0.001, 0.5] is straight-through in the forward (slit), not LAVIS's in-place
  clamp of the parameter; same value and gradient inside the range.
- The frames of a clip may be padding (`frame_mask`), used as the cross-attention mask; LAVIS's images
  have no padding. The ITM pass is also given the negative clips' frame masks.
- The hard-negative draws are batched (`torch.multinomial` over a (B, B) matrix), not a loop over rows.
Unlike slit, the cross-attention keys/values of the features are recomputed in every pass that has
queries (as LAVIS: B + 3B + B clip passes against slit's B, which projects each clip once and gathers the
keys/values for the matching pass), and the word embedding row 0 (transformers' `padding_idx`) gets no
gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.utils import flop_counter

from slit.bench.shapes import LlamaShape, QFormerShape, Stage1Shape, Stage2Shape

QFORMER_ATTENTION = "eager"
"""transformers' attention implementation of the Q-Former: "eager" or "sdpa" (same semantics here)."""
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
PAD_ID = 0
BERT_LAYER_NORM_EPS = 1e-12
LN_VISION_EPS = 1e-5
TEMPERATURE_INIT, TEMPERATURE_MIN, TEMPERATURE_MAX = 0.07, 0.001, 0.5


@dataclasses.dataclass
class ReferenceStep:
    """One PyTorch training step, ready to run.

    step: zero grads, forward, loss, backward, AdamW update; returns the loss (its `.item()`, after
      `torch.cuda.synchronize()` on cuda, is the sync point).
    trainable_parameters: number of trainable scalars (those the optimizer updates).
    description: one line saying what this reference is.
    """

    step: Callable[[], float]
    trainable_parameters: int
    description: str


def _register_cpu_sdpa_flops() -> None:
    """Counts PyTorch's fused CPU attention kernel (sdpa without dropout) in FlopCounterMode, with torch's own
    sdpa formulas (the full L x L scores, as for every other sdpa kernel)."""
    aten = torch.ops.aten
    pairs = [
        ("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop),
    ]
    for name, formula in pairs:
        op = getattr(aten, name, None)
        if (
            op is not None
            and op not in flop_counter.flop_registry
            and op.default not in flop_counter.flop_registry
        ):
            # torch's formulas are already shape-wrapped: register them raw.
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


_register_cpu_sdpa_flops()


# --- building blocks ----------------------------------------------------------------------------------------


def qformer_model(
    shape: QFormerShape, encoder_width: int, dropout: float
) -> transformers.InstructBlipQFormerModel:
    """A randomly initialised `InstructBlipQFormerModel` of `shape`, cross-attending to `encoder_width`."""
    config = transformers.InstructBlipQFormerConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.width,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.mlp_dim,
        cross_attention_frequency=shape.cross_attention_freq,
        encoder_hidden_size=encoder_width,
        max_position_embeddings=shape.max_text_positions,
        layer_norm_eps=BERT_LAYER_NORM_EPS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=PAD_ID,
        attn_implementation=QFORMER_ATTENTION,
    )
    return transformers.InstructBlipQFormerModel(config)


def grounded_generation_mask(num_queries: int, text_valid_bt: torch.Tensor) -> torch.Tensor:
    """Self-attention visibility of the ITG pass, bool (B, Q+T, Q+T) (slit.models.masks): query rows see only
    queries; text rows see every query and earlier-or-same text; padding text keys are invisible."""
    b, t = text_valid_bt.shape
    q = num_queries
    flags = dict(dtype=torch.bool, device=text_valid_bt.device)
    query_rows = torch.cat([torch.ones(q, q, **flags), torch.zeros(q, t, **flags)], 1)
    text_rows = torch.cat([torch.ones(t, q, **flags), torch.ones(t, t, **flags).tril()], 1)
    pattern = torch.cat([query_rows, text_rows], 0)  # (Q+T, Q+T)
    keys_valid = torch.cat([torch.ones(b, q, **flags), text_valid_bt.bool()], 1)  # (B, Q+T)
    return pattern[None] & keys_valid[:, None, :]


def qformer_4d_mask(mask_bll: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A bool (B, L, L) visibility mask as the 4-D (B, 1, L, L) mask that `InstructBlipQFormerModel` passes
    through unchanged: bool for sdpa, additive float (0 visible / finfo.min hidden) for eager."""
    mask = mask_bll[:, None]
    if attn_implementation == "sdpa":
        return mask
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, torch.finfo(dtype).min)


def _masked_mean_cross_entropy(
    logits_nv: torch.Tensor, targets_n: torch.Tensor, valid_n: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """sum over valid tokens of CE / max(#valid, 1) (slit's language-modelling and answer losses)."""
    per_token = F.cross_entropy(logits_nv, targets_n, reduction="none", label_smoothing=label_smoothing)
    weights = valid_n.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


class MaskedLMHead(torch.nn.Module):
    """BERT's MLM head: dense -> GELU -> LayerNorm -> logits tied to the word embeddings (+ bias)."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width, eps=BERT_LAYER_NORM_EPS)
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden_blw: torch.Tensor, word_embeddings_vw: torch.Tensor) -> torch.Tensor:
        """(B, L, W) hidden states, (V, W) word embeddings -> logits (B, L, V)."""
        return F.linear(self.norm(F.gelu(self.dense(hidden_blw))), word_embeddings_vw, self.bias)


class Stage1Reference(torch.nn.Module):
    """BLIP-2 stage one on cached features: Q-Former, queries, ln_vision, ITC/ITM/ITG heads, temperature."""

    def __init__(self, shape: Stage1Shape, dropout: float):
        super().__init__()
        q = shape.qformer
        self.num_queries = q.num_queries
        self.dec_token_id = q.vocab_size - 1
        self.qformer = qformer_model(q, shape.encoder_width, dropout)
        std = self.qformer.config.initializer_range
        self.query_tokens = torch.nn.Parameter(torch.randn(1, q.num_queries, q.width) * std)
        self.ln_vision = torch.nn.LayerNorm(shape.encoder_width, eps=LN_VISION_EPS)
        self.vision_proj = torch.nn.Linear(q.width, shape.embed_dim)
        self.text_proj = torch.nn.Linear(q.width, shape.embed_dim)
        self.itm_head = torch.nn.Linear(q.width, 2)
        self.lm_head = MaskedLMHead(q.width, q.vocab_size)
        self.temperature = torch.nn.Parameter(torch.tensor(TEMPERATURE_INIT))

    def clamped_temperature(self) -> torch.Tensor:
        """The temperature clamped to [0.001, 0.5], gradient straight through (a scalar)."""
        t = self.temperature
        return t + (t.clamp(TEMPERATURE_MIN, TEMPERATURE_MAX) - t).detach()

    def forward(
        self,
        features_bfe: torch.Tensor,
        frame_mask_bf: torch.Tensor,
        text_ids_bt: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The stage-one loss itc + itm + itg (scalar).

        features (B, F, E) float; frame_mask (B, F) bool; text_ids (B, T) long (0 = padding, [CLS] first).
        `generator` draws the hard negatives (torch.multinomial); B >= 2.
        """
        b, t = text_ids_bt.shape
        nq = self.num_queries
        text_valid = text_ids_bt != PAD_ID
        enc = self.ln_vision(features_bfe)
        queries = self.query_tokens.expand(b, -1, -1)

        # ITC: queries alone (cross-attending to the clip), text alone.
        query_out = self.qformer(
            input_ids=None,
            query_embeds=queries,
            encoder_hidden_states=enc,
            encoder_attention_mask=frame_mask_bf,
        ).last_hidden_state
        audio_emb = F.normalize(self.vision_proj(query_out), dim=-1)  # (B, Q, D)
        text_out = self.qformer(input_ids=text_ids_bt, attention_mask=text_valid).last_hidden_state
        text_emb = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)  # (B, D)
        sim_a2t = torch.einsum("iqd,jd->ijq", audio_emb, text_emb).amax(-1) / self.clamped_temperature()
        labels = torch.arange(b, device=sim_a2t.device)
        itc = (
            F.cross_entropy(sim_a2t, labels, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_a2t.T, labels, label_smoothing=LABEL_SMOOTHING)
        ) / 2

        # ITM: hard negatives from the batch, never the positive nor an example with the same text.
        with torch.no_grad():
            same_text = (text_ids_bt[:, None, :] == text_ids_bt[None, :, :]).all(-1)
            others = ~torch.eye(b, dtype=torch.bool, device=sim_a2t.device)
            allowed = others & ~same_text
            # A row whose every other text equals its own falls back to any other example.
            allowed = torch.where(allowed.any(-1, keepdim=True), allowed, others)
            weights_t = (F.softmax(sim_a2t, dim=-1) + 1e-4) * allowed
            weights_a = (F.softmax(sim_a2t.T, dim=-1) + 1e-4) * allowed
            neg_text = torch.multinomial(weights_t, 1, generator=generator)[:, 0]
            neg_audio = torch.multinomial(weights_a, 1, generator=generator)[:, 0]
        itm_text = torch.cat([text_ids_bt, text_ids_bt, text_ids_bt[neg_text]], 0)
        query_valid = torch.ones(1, nq, dtype=torch.bool, device=text_ids_bt.device)
        order = torch.cat([labels, neg_audio, labels])
        itm_out = self.qformer(
            input_ids=itm_text,
            attention_mask=torch.cat([query_valid.expand(3 * b, -1), itm_text != PAD_ID], 1),
            query_embeds=self.query_tokens.expand(3 * b, -1, -1),
            encoder_hidden_states=enc[order],
            encoder_attention_mask=frame_mask_bf[order],
        ).last_hidden_state
        itm_logits = self.itm_head(itm_out[:, :nq]).mean(1)  # (3B, 2)
        itm_labels = torch.cat([torch.ones_like(labels), torch.zeros_like(labels), torch.zeros_like(labels)])
        itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: [DEC] replaces [CLS]; text causal, seeing every query; queries blind to text.
        decoder_ids = text_ids_bt.clone()
        decoder_ids[:, 0] = self.dec_token_id
        mask = qformer_4d_mask(
            grounded_generation_mask(nq, text_valid), self.qformer.config._attn_implementation, enc.dtype
        )
        itg_out = self.qformer(
            input_ids=decoder_ids,
            attention_mask=mask,
            query_embeds=queries,
            encoder_hidden_states=enc,
            encoder_attention_mask=frame_mask_bf,
        ).last_hidden_state
        word_embeddings = self.qformer.get_input_embeddings().weight
        logits = self.lm_head(itg_out[:, nq : nq + t - 1], word_embeddings)  # (B, T-1, V)
        itg = _masked_mean_cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            text_ids_bt[:, 1:].reshape(-1),
            text_valid[:, 1:].reshape(-1),
            LABEL_SMOOTHING,
        )
        return itc + itm + itg


class Stage2Bridge(torch.nn.Module):
    """The InstructBLIP bridge: ln_vision, Q-Former over [queries; instruction], projection to the LLM."""

    def __init__(self, shape: Stage2Shape, llm_width: int, dropout: float):
        super().__init__()
        q = shape.qformer
        self.num_queries = q.num_queries
        self.qformer = qformer_model(q, shape.encoder_width, dropout)
        std = self.qformer.config.initializer_range
        self.query_tokens = torch.nn.Parameter(torch.randn(1, q.num_queries, q.width) * std)
        self.ln_vision = torch.nn.LayerNorm(shape.encoder_width, eps=LN_VISION_EPS)
        self.language_projection = torch.nn.Linear(q.width, llm_width)

    def forward(
        self, features_bfe: torch.Tensor, frame_mask_bf: torch.Tensor, qformer_ids_bl: torch.Tensor
    ) -> torch.Tensor:
        """The soft prompt (B, Q, D_llm) from features (B, F, E), frame_mask (B, F) bool and the instruction
        in Q-Former tokens qformer_ids (B, Lq) long (0 = padding)."""
        b = qformer_ids_bl.shape[0]
        nq = self.num_queries
        query_valid = torch.ones(b, nq, dtype=torch.bool, device=qformer_ids_bl.device)
        keys_valid = torch.cat([query_valid, qformer_ids_bl != PAD_ID], 1)  # (B, Q + Lq)
        hidden = self.qformer(
            input_ids=qformer_ids_bl,
            attention_mask=keys_valid,
            query_embeds=self.query_tokens.expand(b, -1, -1),
            encoder_hidden_states=self.ln_vision(features_bfe),
            encoder_attention_mask=frame_mask_bf,
        ).last_hidden_state
        return self.language_projection(hidden[:, :nq])


def answer_loss(
    llm: transformers.PreTrainedModel,
    soft_bqd: torch.Tensor,
    instruction_ids_bl: torch.Tensor,
    answer_ids_ba: torch.Tensor,
) -> torch.Tensor:
    """The frozen LLM over [soft prompt (B, Q, D); instruction (B, Li), left-padded with -1; answer (B, La),
    right-padded with -1]; the mean cross-entropy over the answer tokens (scalar)."""
    b, nq, _ = soft_bqd.shape
    embed = llm.get_input_embeddings()
    inst_valid, answer_valid = instruction_ids_bl >= 0, answer_ids_ba >= 0
    embeds = torch.cat(
        [soft_bqd, embed(instruction_ids_bl.clamp(min=0)), embed(answer_ids_ba.clamp(min=0))], 1
    )
    soft_valid = torch.ones(b, nq, dtype=torch.bool, device=inst_valid.device)
    mask = torch.cat([soft_valid, inst_valid, answer_valid], 1)  # (B, Q + Li + La)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = llm(
        inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids, use_cache=False
    ).logits  # (B, Q + Li + La, V): every position, as InstructBLIP's HF model
    p, a = nq + instruction_ids_bl.shape[1], answer_ids_ba.shape[1]
    answer_logits = logits[:, p - 1 : p + a - 1]
    return _masked_mean_cross_entropy(
        answer_logits.reshape(-1, answer_logits.shape[-1]),
        answer_ids_ba.clamp(min=0).reshape(-1),
        answer_valid.reshape(-1),
        0.0,
    )


def _adamw(module: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over the module's trainable weights, decay on those with ndim >= 2 (slit's `decay_mask`)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # fused: PyTorch's single-kernel AdamW (CPU and CUDA), the fastest stock update; same arithmetic.
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, fused=True)


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _tensor(batch: dict[str, np.ndarray], key: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(batch[key])).to(device=device, dtype=dtype)


def _autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """float32: nothing; bfloat16: torch.autocast, matmul inputs in bfloat16 (float32 master weights,
    optimizer and losses: autocast keeps softmax, norms and cross-entropy in float32), as slit's
    compute_dtype does."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def _sync(device: str) -> Callable[[], None]:
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# --- the references -----------------------------------------------------------------------------------------


def stage1_reference(
    shape: Stage1Shape,
    batch: dict[str, np.ndarray],
    *,
    dropout: float = 0.1,
    device: str = "cpu",
    seed: int = 0,
    dtype: str = "float32",
) -> ReferenceStep:
    """BLIP-2's stage-one step (ITC + ITM + ITG) on cached features, in PyTorch; `dtype` the matmuls'
    (_autocast).

    batch: features (B, F, E) float32, frame_mask (B, F) bool (True = real frame), text_ids (B, T) int
    (0 = padding, position 0 is [CLS]); copied to `device` once, here. `seed` seeds the initialisation,
    the dropout (torch's global generator) and the hard-negative draws.
    """
    if np.asarray(batch["text_ids"]).shape[0] < 2:
        raise ValueError("stage one needs a batch of at least 2 (contrastive and hard negatives)")
    torch.manual_seed(seed)
    model = Stage1Reference(shape, dropout).to(device).train()
    optimizer = _adamw(model)
    features = _tensor(batch, "features", torch.float32, device)
    frame_mask = _tensor(batch, "frame_mask", torch.bool, device)
    text_ids = _tensor(batch, "text_ids", torch.long, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    sync = _sync(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = model(features, frame_mask, text_ids, generator)
        loss.backward()
        optimizer.step()
        sync()
        return loss.item()

    q = shape.qformer
    description = (
        f"PyTorch {torch.__version__} / transformers {transformers.__version__} BLIP-2 stage one "
        f"(InstructBlipQFormerModel {q.num_layers}x{q.width}, {q.num_queries} queries, "
        f"{model.qformer.config._attn_implementation} attention; ITC+ITM+ITG), {dtype} matmuls, fused AdamW, "
        f"on {device}"
    )
    return ReferenceStep(step, _trainable(model), description)


def stage2_reference(
    shape: Stage2Shape,
    llm: transformers.LlamaForCausalLM,
    batch: dict[str, np.ndarray],
    *,
    dropout: float = 0.1,
    device: str = "cpu",
    seed: int = 0,
    dtype: str = "float32",
) -> ReferenceStep:
    """InstructBLIP's stage-two step in PyTorch: the Q-Former bridge trained through a frozen LLM; `dtype`
    the matmuls' (_autocast), the frozen LLM stored in it.

    batch: features (B, F, E) float32, frame_mask (B, F) bool, qformer_ids (B, Lq) int (0 = padding),
    instruction_ids (B, Li) int left-padded with -1, answer_ids (B, La) int right-padded with -1; copied to
    `device` once, here. `llm` is frozen in place (requires_grad_(False), eval mode) and moved to `device`.
    """
    torch.manual_seed(seed)
    llm.requires_grad_(False)
    llm.to(device=device, dtype=getattr(torch, dtype)).eval()
    bridge = Stage2Bridge(shape, llm.config.hidden_size, dropout).to(device).train()
    optimizer = _adamw(bridge)
    features = _tensor(batch, "features", torch.float32, device)
    frame_mask = _tensor(batch, "frame_mask", torch.bool, device)
    qformer_ids = _tensor(batch, "qformer_ids", torch.long, device)
    instruction_ids = _tensor(batch, "instruction_ids", torch.long, device)
    answer_ids = _tensor(batch, "answer_ids", torch.long, device)
    sync = _sync(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            soft = bridge(features, frame_mask, qformer_ids)
            loss = answer_loss(llm, soft, instruction_ids, answer_ids)
        loss.backward()
        optimizer.step()
        sync()
        return loss.item()

    q, c = shape.qformer, llm.config
    description = (
        f"PyTorch {torch.__version__} / transformers {transformers.__version__} InstructBLIP stage two "
        f"(InstructBlipQFormerModel {q.num_layers}x{q.width}, {q.num_queries} queries, "
        f"{bridge.qformer.config._attn_implementation} attention; frozen {type(llm).__name__} "
        f"{c.num_hidden_layers}x{c.hidden_size}, {c._attn_implementation} attention, held in {dtype}), "
        f"{dtype} matmuls, fused AdamW, "
        f"on {device}"
    )
    return ReferenceStep(step, _trainable(bridge), description)


def random_llama(
    shape: LlamaShape, seed: int = 0, attn_implementation: str = "eager"
) -> transformers.LlamaForCausalLM:
    """A randomly initialised float32 transformers Llama of `shape` (tied embeddings, rope theta 1e5, RMSNorm
    eps 1e-5), on the CPU. Eager attention by default: plain matmuls, so that FlopCounterMode counts
    exactly the model FLOPs (a fused sdpa kernel's backward also recomputes the scores); "sdpa" is what a
    GPU user runs."""
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.float32)
