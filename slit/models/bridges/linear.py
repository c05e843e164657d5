"""The linear (or MLP) bridge, as LTU and LLaVA-style models use: the encoder's frames, pooled into a
fixed number of segments, each mapped to one soft-prompt token.

Each clip's valid frames (the mask) are cut into `num_tokens` equal consecutive segments, and each
segment's frames are averaged: a clip of any length gives `num_tokens` vectors in time order. Each goes
through a LayerNorm (the encoder's features are not normalised) and `projection` (one Dense to the LLM
width; with `hidden` > 0, a Dense to `hidden`, GELU, then `projection`). The instruction is not read: the
LLM sees it after the soft prompt. There is no text side, so stage one does not apply to this bridge.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from slit.models.layers import Dense, LayerNorm, gelu, normal


@dataclasses.dataclass(frozen=True)
class LinearBridgeConfig:
    """encoder_width: the frames' width; num_tokens: soft-prompt length; hidden: 0 for one linear map,
    > 0 for an MLP with that hidden width."""

    encoder_width: int
    num_tokens: int = 8
    hidden: int = 0
    initializer_range: float = 0.02
    instruction_to_llm: bool = True  # the LLM reads the instruction after the soft prompt
    kind: str = "linear"


def segment_means(frames_bfd: jax.Array, frame_mask_bf: jax.Array, num_segments: int) -> jax.Array:
    """(B, F, D) frames and (B, F) mask -> (B, num_segments, D): the mean of each of `num_segments`
    equal consecutive parts of each row's valid frames (valid frames come first; a part with no frame,
    when a clip has fewer valid frames than parts, is zero)."""
    num_frames = frames_bfd.shape[1]
    valid = frame_mask_bf.astype(jnp.float32)
    count = jnp.maximum(valid.sum(axis=1, keepdims=True), 1.0)  # (B, 1)
    position = jnp.arange(num_frames, dtype=jnp.float32)[None, :]  # (1, F)
    segment = jnp.floor(position * num_segments / count).astype(jnp.int32)  # (B, F)
    weights = jax.nn.one_hot(segment, num_segments, dtype=jnp.float32) * valid[..., None]  # (B, F, P)
    sums = jnp.einsum("bfp,bfd->bpd", weights, frames_bfd.astype(jnp.float32))
    return sums / jnp.maximum(weights.sum(axis=1), 1.0)[..., None]


class LinearBridge(nnx.Module):
    """Segment means -> LayerNorm -> [Dense -> GELU ->] projection: (B, num_tokens, D_llm)."""

    def __init__(self, config: LinearBridgeConfig, llm_width: int, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.norm = LayerNorm(c.encoder_width, eps=1e-5, rngs=rngs)
        width = c.hidden or c.encoder_width
        init = normal(c.initializer_range)
        self.hidden = (
            Dense(c.encoder_width, c.hidden, axes=("embed", "mlp"), rngs=rngs, kernel_init=init)
            if c.hidden
            else None
        )
        self.projection = Dense(width, llm_width, axes=("embed", "embed"), rngs=rngs, kernel_init=init)

    def __call__(
        self,
        frames_bfd: jax.Array,
        frame_mask_bf: jax.Array,
        instruction_ids_bl: jax.Array | None,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """The soft prompt (B, num_tokens, D_llm); `instruction_ids_bl` and `rngs` are not used."""
        x = self.norm(segment_means(frames_bfd, frame_mask_bf, self.config.num_tokens))
        if self.hidden is not None:
            x = gelu(self.hidden(x))
        return self.projection(x)

    def match_output_scale(self, target_rms: jax.Array) -> None:
        """Rescales the fresh projection so that soft-prompt elements start with RMS ~ `target_rms` (its
        inputs have unit-variance elements: LayerNorm's output, or ~0.5-0.6 after GELU, taken as 1)."""
        c = self.config
        width = c.hidden or c.encoder_width
        kernel = self.projection.kernel
        kernel[...] = kernel[...] * (target_rms / np.sqrt(width) / c.initializer_range).astype(jnp.float32)
