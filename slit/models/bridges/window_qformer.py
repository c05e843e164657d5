"""The windowed Q-Former bridge (SALMONN, Tang et al. 2024, "window-level Q-Former"): the encoder's frames
are cut into consecutive windows of `window_frames`, one Q-Former pass with `num_queries` queries reads
each window alone, and the query outputs of all windows, in time order, projected to the LLM width, are
the soft prompt (B, K * num_queries, D_llm) with K = ceil(F / window_frames).

So the soft prompt grows with the audio's length and keeps its time order, where the plain Q-Former
compresses any clip into a fixed number of queries. SALMONN uses 1 query per window of 17 Whisper frames
(~0.33 s). The last window is zero-padded (masked); a window with no valid frame (padding beyond the
clip's end) still gives its queries, from the LayerNorm of masked frames, as SALMONN's fixed 30 s input
does. With `instruction_in_qformer`, every window's pass also reads the instruction (InstructBLIP-style).

The Q-Former and the projection keep the paths of the Q-Former bridge (`qformer/...`, `projection`), so a
stage-one Q-Former with the same number of queries copies over by name (`init_from`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from slit.models.bridges.qformer import QFormerBridge
from slit.models.qformer import QFormerConfig


@dataclasses.dataclass(frozen=True)
class WindowQFormerBridgeConfig:
    """qformer: the Q-Former's sizes (`num_queries`: queries per window); window_frames: encoder frames
    per window; pad_id: the Q-Former tokenizer's pad id (instruction padding)."""

    qformer: QFormerConfig
    window_frames: int = 17
    instruction_in_qformer: bool = False
    pad_id: int = 0
    instruction_to_llm: bool = True  # the LLM reads the instruction after the soft prompt
    kind: str = "window_qformer"

    def __post_init__(self):
        if self.window_frames < 1:
            raise ValueError(f"window_frames={self.window_frames} must be at least 1")


def to_windows(
    frames_bfd: jax.Array, frame_mask_bf: jax.Array, window: int
) -> tuple[jax.Array, jax.Array, int]:
    """(B, F, D) frames and (B, F) mask -> ((B * K, window, D) frames, (B * K, window) mask, K): consecutive
    windows of each clip, row b * K + k holding clip b's window k; the last window zero-padded, masked."""
    batch, num_frames, width = frames_bfd.shape
    count = -(-num_frames // window)
    pad = count * window - num_frames
    frames = jnp.pad(frames_bfd, ((0, 0), (0, pad), (0, 0))).reshape(batch * count, window, width)
    mask = jnp.pad(frame_mask_bf, ((0, 0), (0, pad))).reshape(batch * count, window)
    return frames, mask, count


class WindowQFormerBridge(QFormerBridge):
    """One Q-Former pass per window of frames + one linear projection to the LLM width."""

    def __call__(
        self,
        frames_bfd: jax.Array,
        frame_mask_bf: jax.Array,
        instruction_ids_bl: jax.Array | None,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """The soft prompt (B, K * num_queries, D_llm), window by window in time order."""
        batch = frames_bfd.shape[0]
        frames, mask, count = to_windows(frames_bfd, frame_mask_bf, self.config.window_frames)
        if instruction_ids_bl is not None:
            instruction_ids_bl = jnp.repeat(instruction_ids_bl, count, axis=0)  # (B * K, L)
        outputs = self.query_outputs(frames, mask, instruction_ids_bl, rngs)  # (B * K, Q, width)
        return self.projection(outputs.reshape(batch, count * outputs.shape[1], outputs.shape[2]))
