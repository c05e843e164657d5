"""The Q-Former bridge (BLIP-2 stage two, InstructBLIP): learned queries cross-attend to the audio
frames; their outputs, projected to the LLM width, are the soft prompt (B, num_queries, D_llm).

With `instruction_in_qformer` (InstructBLIP), the instruction's Q-Former tokens sit after the queries in
the self-attention, every non-padding position seeing every other (queries <-> instruction both ways),
and only the query outputs are projected. Without it the queries run alone and the instruction is
ignored. The Q-Former keeps the path `qformer/...` inside the bridge, so that a stage-one Q-Former's
weights copy over by name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slit.models import masks
from slit.models.layers import Dense, normal
from slit.models.qformer import QFormer, QFormerConfig


@dataclasses.dataclass(frozen=True)
class QFormerBridgeConfig:
    """qformer: the Q-Former's sizes; pad_id: its tokenizer's pad id (instruction padding)."""

    qformer: QFormerConfig
    instruction_in_qformer: bool = True
    pad_id: int = 0
    instruction_to_llm: bool = True  # the LLM reads the instruction after the soft prompt
    kind: str = "qformer"


class QFormerBridge(nnx.Module):
    """Trainable Q-Former + one linear projection to the LLM width."""

    def __init__(self, config: QFormerBridgeConfig, llm_width: int, *, rngs: nnx.Rngs):
        self.config = config
        q = config.qformer
        self.qformer = QFormer(q, rngs=rngs)
        self.projection = Dense(
            q.width, llm_width, axes=("embed", "embed"), rngs=rngs, kernel_init=normal(q.initializer_range)
        )

    def query_outputs(
        self,
        frames_bfd: jax.Array,
        frame_mask_bf: jax.Array,
        instruction_ids_bl: jax.Array | None,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """Q-Former query outputs (B, num_queries, width)."""
        q = self.config.qformer.num_queries
        if not self.config.instruction_in_qformer or instruction_ids_bl is None:
            return self.qformer(
                with_queries=True, encoder_bfd=frames_bfd, encoder_mask_bf=frame_mask_bf, rngs=rngs
            )
        valid = instruction_ids_bl != self.config.pad_id
        hidden = self.qformer(
            text_ids_bl=instruction_ids_bl,
            with_queries=True,
            attention_mask_bll=masks.bidirectional_mask(q, valid),
            encoder_bfd=frames_bfd,
            encoder_mask_bf=frame_mask_bf,
            rngs=rngs,
        )
        return hidden[:, :q]

    def __call__(
        self,
        frames_bfd: jax.Array,
        frame_mask_bf: jax.Array,
        instruction_ids_bl: jax.Array | None,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """The soft prompt (B, num_queries, D_llm)."""
        return self.projection(self.query_outputs(frames_bfd, frame_mask_bf, instruction_ids_bl, rngs))

    def match_output_scale(self, target_rms: jax.Array) -> None:
        """Rescales the fresh projection so that soft-prompt elements start with RMS ~ `target_rms`.

        Query outputs leave a LayerNorm with unit-variance elements, so an output element's RMS is the
        kernel's std times sqrt(width): the kernel's std becomes target_rms / sqrt(width).
        """
        q = self.config.qformer
        kernel = self.projection.kernel
        kernel[...] = kernel[...] * (target_rms / np.sqrt(q.width) / q.initializer_range).astype(jnp.float32)
