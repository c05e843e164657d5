"""The Pengi bridge (Deshmukh et al. 2023, arXiv 2305.11834; microsoft/Pengi `models/pengi.py` and
`models/decoder.py`): the audio and the prompt each become a fixed number of prefix tokens for the LLM.

For each clip:
- audio: the encoder's valid frames are averaged into one vector (HTSAT's pooled output is this mean),
  which `audio_projection` maps to `projection_width`;
- prompt: a frozen text encoder (`prompt_tower`) embeds the instruction: CLIP's text tower, as Pengi
  (its projected pooled output), or the Q-Former-shaped BERT/MiniLM that slit loads (its [CLS] output, as
  Pengi's non-CLIP text encoders); `prompt_projection` maps that to `projection_width`;
- each projection is Pengi's `Projection`: e1 = x W1, e2 = dropout(GELU(e1) W2), LayerNorm(e1 + e2), no
  biases in W1 and W2;
- both vectors are L2-normalised (Pengi's `normalize_prefix`) and each is mapped by its own
  `PrefixMapper` (Pengi's `TransformerMapper`) to `prefix_length` tokens of the LLM's width;
- the soft prompt is [audio prefix; prompt prefix]: (B, 2 * prefix_length, D_llm).

Pengi's LM sees the prompt only through its prefix; with `instruction_to_llm` (off by default, as
published) the LLM also reads the instruction's own tokens after the soft prompt, as the other bridges'
LLMs do. There is no contrastive or matching text side to pretrain, so stage one does not apply.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from slit.models import masks
from slit.models.bridges.linear import segment_means
from slit.models.layers import (
    Dense,
    LayerNorm,
    dot_product_attention,
    dropout,
    freeze,
    gelu,
    l2_normalize,
    merge_heads,
    normal,
    split_heads,
    weight,
)
from slit.models.qformer import QFormer, QFormerConfig
from slit.models.text.clip import CLIPTextConfig, CLIPTextTower

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which Pengi's projections and mapper use


@dataclasses.dataclass(frozen=True)
class PengiBridgeConfig:
    """encoder_width: the audio frames' width; prompt_encoder: the frozen text encoder's sizes, CLIP's text
    tower (`CLIPTextConfig`) or a BERT in the Q-Former's layout (`QFormerConfig`: only its text path
    runs); pad_id: its tokenizer's pad id.

    Pengi's published sizes are the defaults: projections to 1024, 40 prefix tokens per side from
    `clip_length` = 40 mapper inputs, 4 mapper layers (`num_layers` 8 / 2) of 8 heads, MLP ratio 2,
    projection dropout 0.5.
    """

    encoder_width: int
    prompt_encoder: CLIPTextConfig | QFormerConfig
    pad_id: int = 0
    prompt_encoder_weights: str = ""  # where a pretrained CLIP prompt encoder comes from (not read here)
    # The frozen prompt encoder's own random initialisation (pretrained weights then replace it), apart from
    # the run's seed: a seed sweep changes the trained weights only.
    prompt_encoder_seed: int = 0
    projection_width: int = 1024
    prefix_length: int = 40
    clip_length: int = 40
    mapper_layers: int = 4
    mapper_heads: int = 8
    mapper_mlp_ratio: float = 2.0
    projection_dropout: float = 0.5
    instruction_to_llm: bool = False
    kind: str = "pengi"

    @property
    def prompt_width(self) -> int:
        """The prompt encoder's embedding width."""
        p = self.prompt_encoder
        return p.output_width if isinstance(p, CLIPTextConfig) else p.width

    def __post_init__(self):
        if min(self.prefix_length, self.clip_length, self.mapper_layers, self.projection_width) < 1:
            raise ValueError(
                "bridge.prefix_length, bridge.clip_length, bridge.mapper_layers and "
                "bridge.projection_width must be at least 1"
            )


class Projection(nnx.Module):
    """Pengi's `Projection`: (..., in) -> (..., out) = LayerNorm(e1 + dropout(GELU(e1) W2)), e1 = x W1."""

    def __init__(self, in_width: int, out_width: int, dropout_rate: float, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.xavier_uniform()  # as Pengi's `init_layer`
        self.dropout_rate = dropout_rate
        self.linear1 = Dense(
            in_width, out_width, axes=("embed", "mlp"), rngs=rngs, use_bias=False, kernel_init=init
        )
        self.linear2 = Dense(
            out_width, out_width, axes=("mlp", "mlp"), rngs=rngs, use_bias=False, kernel_init=init
        )
        self.norm = LayerNorm(out_width, eps=LAYER_NORM_EPS, rngs=rngs, axis_name="mlp")

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        e1 = self.linear1(x)
        return self.norm(e1 + dropout(self.linear2(gelu(e1)), self.dropout_rate, rngs))


class MapperLayer(nnx.Module):
    """Pre-LN transformer layer of Pengi's mapper: x += attn(LN(x)); x += MLP(LN(x)) (ReLU MLP, no bias on
    the query/key/value maps, a bias on the output map), (B, L, D) -> (B, L, D)."""

    def __init__(
        self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, init: nnx.Initializer
    ):
        if width % num_heads:
            raise ValueError(f"bridge.mapper_heads={num_heads} must divide the LLM width {width}")
        self.num_heads = num_heads
        hidden = int(width * mlp_ratio)
        self.norm1 = LayerNorm(width, eps=LAYER_NORM_EPS, rngs=rngs)
        self.query = Dense(width, width, axes=("embed", "heads"), rngs=rngs, use_bias=False, kernel_init=init)
        self.key = Dense(width, width, axes=("embed", "heads"), rngs=rngs, use_bias=False, kernel_init=init)
        self.value = Dense(width, width, axes=("embed", "heads"), rngs=rngs, use_bias=False, kernel_init=init)
        self.output = Dense(width, width, axes=("heads", "embed"), rngs=rngs, kernel_init=init)
        self.norm2 = LayerNorm(width, eps=LAYER_NORM_EPS, rngs=rngs)
        self.fc1 = Dense(width, hidden, axes=("embed", "mlp"), rngs=rngs, kernel_init=init)
        self.fc2 = Dense(hidden, width, axes=("mlp", "embed"), rngs=rngs, kernel_init=init)

    def __call__(self, x_bld: jax.Array) -> jax.Array:
        h = self.norm1(x_bld)
        q, k, v = (split_heads(proj(h), self.num_heads) for proj in (self.query, self.key, self.value))
        x_bld = x_bld + self.output(merge_heads(dot_product_attention(q, k, v, None)))
        return x_bld + self.fc2(jax.nn.relu(self.fc1(self.norm2(x_bld))))


class PrefixMapper(nnx.Module):
    """Pengi's `TransformerMapper`: (B, in_width) -> (B, prefix_length, width).

    `linear` maps the vector to `clip_length` tokens, learned `prefix_const` tokens follow them, the
    transformer runs over both, and the outputs at the constants' positions are the prefix.
    """

    def __init__(self, config: PengiBridgeConfig, width: int, *, rngs: nnx.Rngs):
        c = config
        init = normal(0.02)
        self.clip_length, self.width = c.clip_length, width
        self.linear = Dense(
            c.projection_width, c.clip_length * width, axes=("mlp", "embed"), rngs=rngs, kernel_init=init
        )
        # torch.randn in Pengi: unit-variance constants
        self.prefix_const = weight(
            nnx.Param, normal(1.0), rngs, (c.prefix_length, width), ("queries", "embed")
        )
        self.layers = nnx.List(
            [
                MapperLayer(width, c.mapper_heads, c.mapper_mlp_ratio, rngs=rngs, init=init)
                for _ in range(c.mapper_layers)
            ]
        )

    def __call__(self, x_be: jax.Array) -> jax.Array:
        batch = x_be.shape[0]
        clip = self.linear(x_be).reshape(batch, self.clip_length, self.width)
        const = jnp.broadcast_to(self.prefix_const[...].astype(clip.dtype), (batch, *self.prefix_const.shape))
        x = jnp.concatenate([clip, const], axis=1)
        for layer in self.layers:
            x = layer(x)
        return x[:, self.clip_length :]


class PromptTower(nnx.Module):
    """The frozen text encoder: a BERT/MiniLM in the Q-Former's layout (weights under `qformer/`, so that
    `qformer.init`'s BERT fills them as it fills a Q-Former), run on text only. (B, L) ids -> (B, width),
    the [CLS] position's output."""

    def __init__(self, config: QFormerConfig, pad_id: int, *, rngs: nnx.Rngs):
        self.pad_id = pad_id
        self.qformer = freeze(QFormer(config, rngs=rngs))  # no gradient, no Adam state

    def __call__(self, ids_bl: jax.Array) -> jax.Array:
        mask = masks.text_only_mask(ids_bl != self.pad_id)  # BERT's: every position sees the real tokens
        hidden = self.qformer(text_ids_bl=ids_bl, with_queries=False, attention_mask_bll=mask, rngs=None)
        return jax.lax.stop_gradient(hidden[:, 0])


class PengiBridge(nnx.Module):
    """Pooled audio + frozen prompt embedding -> projections -> L2 norm -> mappers -> (B, 2P, D_llm)."""

    def __init__(self, config: PengiBridgeConfig, llm_width: int, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        prompt_rngs = nnx.Rngs(params=c.prompt_encoder_seed)
        if isinstance(c.prompt_encoder, CLIPTextConfig):  # (its weights are Frozen as built)
            self.prompt_tower = CLIPTextTower(c.prompt_encoder, rngs=prompt_rngs)
        else:
            self.prompt_tower = PromptTower(c.prompt_encoder, c.pad_id, rngs=prompt_rngs)
        self.audio_projection = Projection(
            c.encoder_width, c.projection_width, c.projection_dropout, rngs=rngs
        )
        self.prompt_projection = Projection(
            c.prompt_width, c.projection_width, c.projection_dropout, rngs=rngs
        )
        self.audio_mapper = PrefixMapper(c, llm_width, rngs=rngs)
        self.prompt_mapper = PrefixMapper(c, llm_width, rngs=rngs)

    def __call__(
        self,
        frames_bfd: jax.Array,
        frame_mask_bf: jax.Array,
        instruction_ids_bl: jax.Array | None,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        """The soft prompt (B, 2 * prefix_length, D_llm): the audio prefix, then the prompt prefix."""
        if instruction_ids_bl is None:
            raise ValueError("the Pengi bridge needs the instruction (its prompt prefix encodes it)")
        pooled = segment_means(frames_bfd, frame_mask_bf, 1)[:, 0]
        audio = l2_normalize(self.audio_projection(pooled, rngs))
        # (CLIP: right-padded ids, its causal attention and first-EOS pooling need no mask)
        prompt_embedding = jax.lax.stop_gradient(self.prompt_tower(instruction_ids_bl))
        prompt = l2_normalize(self.prompt_projection(prompt_embedding, rngs))
        return jnp.concatenate([self.audio_mapper(audio), self.prompt_mapper(prompt)], axis=1)

    def match_output_scale(self, target_rms: jax.Array) -> None:
        """Starts both mappers' learned prefix constants with element RMS ~ `target_rms` (Pengi draws them
        from N(0, 1), several times an LLM's token embeddings); the layers' residual updates start near that
        scale too."""
        for mapper in (self.audio_mapper, self.prompt_mapper):
            mapper.prefix_const[...] = mapper.prefix_const[...] * target_rms.astype(jnp.float32)
