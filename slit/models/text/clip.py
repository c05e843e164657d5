"""CLIP's text tower (HF `CLIPTextModel`, plus the `text_projection` of `CLIPModel` /
`CLIPTextModelWithProjection`), frozen, in NNX; and CLIP's prompt tokenizer.

The tower, as transformers computes it:

- token embedding + learned absolute position embedding (positions 0..L-1, L <= `max_positions`);
- `num_layers` pre-LN transformer layers (LayerNorm, causal self-attention, residual; LayerNorm, MLP with
  `hidden_act` (`quick_gelu`: x * sigmoid(1.702 x), as OpenAI's CLIP; or `gelu`), residual). A query
  attends to the keys at or before it that the padding mask marks as real;
- the final LayerNorm (`hidden_states`);
- pooling: the final state at the end-of-text token. transformers picks it two ways, and so does slit:
  when the config's `eos_token_id` is 2 (configs written before transformers PR #24773, e.g. OpenAI's
  released ones), the position of the largest id in each row (`<|endoftext|>` is the largest id of the
  CLIP vocabulary); otherwise the first position whose id is `eos_token_id` (position 0 when none is);
- `text_projection` (Linear, no bias) to `projection_dim`, when the checkpoint has one (`__call__`).

Pengi (microsoft/Pengi, `TextEncoder`) embeds its prompt as `text_projection(CLIPTextModel(...)[1])`,
which is `CLIPTextTower.__call__`.

Every weight is a `slit.models.layers.Frozen` variable; `slit.models.layers.unfreeze` makes them train.
Weights are read by `slit.interop.hf_clip`.

Shapes: B batch, L tokens, D width, E output width (projection_dim, or D without a projection).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from slit.errors import UserError
from slit.models.layers import (
    Dense,
    Embed,
    Frozen,
    LayerNorm,
    dot_product_attention,
    merge_heads,
    normal,
    split_heads,
    weight,
)

__all__ = [
    "ACTIVATIONS",
    "CLIPPromptTokenizer",
    "CLIPTextConfig",
    "CLIPTextTower",
    "LEGACY_EOS_TOKEN_ID",
    "pooling_positions",
]

# Activation names as transformers' ACT2FN spells them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# transformers pools at the largest id (argmax) when a config says eos_token_id == 2.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower. Defaults are openai/clip-vit-base-patch32's.

    `projection_dim` 0: no `text_projection` (a bare `CLIPTextModel`); the tower then outputs the pooled
    state itself. `eos_token_id` decides the pooling rule (see the module docstring).
    """

    vocab_size: int = 49408
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    intermediate_size: int = 2048
    max_positions: int = 77
    eos_token_id: int = 49407
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0: no projection), got {self.projection_dim}")
        for name in ("vocab_size", "width", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def output_width(self) -> int:
        """E: projection_dim, or width without a projection."""
        return self.projection_dim or self.width


def pooling_positions(ids_bl: jax.Array, eos_token_id: int) -> jax.Array:
    """(B, L) int ids -> (B,) int: the position whose final state CLIP pools, as transformers picks it.

    `eos_token_id` 2 (legacy configs): the first position of each row's largest id; otherwise the first
    position of `eos_token_id` (0 when the row has none).
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(ids_bl, axis=-1)
    return jnp.argmax(ids_bl == eos_token_id, axis=-1)


class CLIPTextLayer(nnx.Module):
    """Pre-LN layer: x + attn(LN(x)), then x + mlp(LN(x)). (B, L, D) -> (B, L, D)."""

    def __init__(self, c: CLIPTextConfig, *, rngs: nnx.Rngs):
        frozen = dict(rngs=rngs, param_type=Frozen)
        self.num_heads = c.num_heads
        self.activation = c.hidden_act
        self.attention_norm = LayerNorm(c.width, eps=c.layer_norm_eps, **frozen)
        self.q_proj = Dense(c.width, c.width, axes=("embed", "heads"), **frozen)
        self.k_proj = Dense(c.width, c.width, axes=("embed", "heads"), **frozen)
        self.v_proj = Dense(c.width, c.width, axes=("embed", "heads"), **frozen)
        self.out_proj = Dense(c.width, c.width, axes=("heads", "embed"), **frozen)
        self.mlp_norm = LayerNorm(c.width, eps=c.layer_norm_eps, **frozen)
        self.fc1 = Dense(c.width, c.intermediate_size, axes=("embed", "mlp"), **frozen)
        self.fc2 = Dense(c.intermediate_size, c.width, axes=("mlp", "embed"), **frozen)

    def __call__(self, x_bld: jax.Array, mask_bll: jax.Array) -> jax.Array:
        h = self.attention_norm(x_bld)
        q, k, v = (split_heads(p(h), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        x_bld = x_bld + self.out_proj(merge_heads(dot_product_attention(q, k, v, mask_bll)))
        h = self.fc2(ACTIVATIONS[self.activation](self.fc1(self.mlp_norm(x_bld))))
        return x_bld + h


class CLIPTextTower(nnx.Module):
    """Token ids (B, L) + padding mask (B, L) -> CLIP text embedding (B, E), every weight `Frozen`.

    `dtype` is the compute dtype of the activations (weights are cast to it; norms and softmax run in
    float32).
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32):
        c = config
        self.config = c
        self.dtype = dtype
        frozen = dict(rngs=rngs, param_type=Frozen)
        self.token_embedding = Embed(c.vocab_size, c.width, axes=("vocab", "embed"), **frozen)
        self.position_embedding = weight(
            Frozen, normal(0.01), rngs, (c.max_positions, c.width), (None, "embed")
        )
        self.layers = nnx.List([CLIPTextLayer(c, rngs=rngs) for _ in range(c.num_layers)])
        self.final_norm = LayerNorm(c.width, eps=c.layer_norm_eps, **frozen)
        self.projection = (
            Dense(c.width, c.projection_dim, axes=("embed", None), use_bias=False, **frozen)
            if c.projection_dim
            else None
        )

    @property
    def output_width(self) -> int:
        """E, the width of `__call__`'s embedding: projection_dim, or width without a projection."""
        return self.config.output_width

    def hidden_states(self, ids_bl: jax.Array, mask_bl: jax.Array | None = None) -> jax.Array:
        """The final-LayerNorm states (B, L, D) (transformers' `last_hidden_state`).

        Args:
          ids_bl: (B, L) int token ids, L <= max_positions.
          mask_bl: (B, L) bool / int, True (1) for real tokens (transformers' `attention_mask`); padded
            keys are never attended to. None: every token is real (causal mask only). Rows are expected
            right-padded, as `CLIPPromptTokenizer` writes them: a left-padded row's padding positions
            would have no key to attend to.
        """
        c = self.config
        length = ids_bl.shape[1]
        if length > c.max_positions:
            raise ValueError(f"{length} tokens are more than the tower's max_positions {c.max_positions}")
        x = self.token_embedding(ids_bl).astype(self.dtype)
        x = x + self.position_embedding[...][:length].astype(self.dtype)[None]
        mask_bll = jnp.broadcast_to(
            jnp.tril(jnp.ones((length, length), bool))[None], (ids_bl.shape[0], length, length)
        )
        if mask_bl is not None:
            mask_bll = mask_bll & jnp.asarray(mask_bl).astype(bool)[:, None, :]
        for layer in self.layers:
            x = layer(x, mask_bll)
        return self.final_norm(x)

    def pooled(self, ids_bl: jax.Array, mask_bl: jax.Array | None = None) -> jax.Array:
        """(B, D): the final state at the end-of-text position (transformers' `pooler_output`)."""
        states = self.hidden_states(ids_bl, mask_bl)
        positions = pooling_positions(ids_bl, self.config.eos_token_id)
        return jnp.take_along_axis(states, positions[:, None, None], axis=1)[:, 0]

    def __call__(self, ids_bl: jax.Array, mask_bl: jax.Array | None = None) -> jax.Array:
        """(B, L) ids, (B, L) mask -> (B, E): `text_projection(pooled)` (the pooled state itself without a
        projection); `CLIPModel.get_text_features` / `CLIPTextModelWithProjection`'s `text_embeds`."""
        pooled = self.pooled(ids_bl, mask_bl)
        return pooled if self.projection is None else self.projection(pooled)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer.

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


class CLIPPromptTokenizer:
    """CLIP's tokenizer from a directory's `tokenizer.json` (the `tokenizers` library; transformers is not
    used), giving the ids `CLIPTokenizerFast` gives with `padding="max_length", truncation=True`.

    Ids are `<|startoftext|> text <|endoftext|>` (the tokenizer.json's post-processor), then padding with
    the pad token of tokenizer_config.json (`<|endoftext|>` by default, as transformers' CLIP tokenizer);
    a text longer than `length` keeps its first `length - 2` text tokens and the end token.
    """

    def __init__(self, directory: str | pathlib.Path):
        import tokenizers

        directory = pathlib.Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(
                f"no tokenizer.json in {str(directory)!r}: point to a CLIP tokenizer directory (one written "
                "by `CLIPTokenizerFast.save_pretrained`)"
            )
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception)
            raise UserError(f"{path} is not a readable tokenizers file: {e}") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        options = self._options(directory / "tokenizer_config.json")
        self.bos_id = self._token_id(path, options.get("bos_token") or BOS_TOKEN, "bos_token")
        self.eos_id = self._token_id(path, options.get("eos_token") or EOS_TOKEN, "eos_token")
        self.pad_id = self._token_id(path, options.get("pad_token") or EOS_TOKEN, "pad_token")

    @staticmethod
    def _options(path: pathlib.Path) -> dict:
        if not path.is_file():
            return {}
        try:
            options = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        # Special tokens may be written as {"content": ...} (AddedToken).
        return {k: v["content"] if isinstance(v, dict) and "content" in v else v for k, v in options.items()}

    def _token_id(self, path: pathlib.Path, token: str, what: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"{path} has no {what} {token!r}; point to a CLIP tokenizer directory")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (ids, mask), both int32 (len(texts), length); mask 1 for BOS, text and EOS tokens."""
        if length < 2:
            raise ValueError(f"length must leave room for the start and end tokens (>= 2), got {length}")
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for i, encoding in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=True)):
            row = encoding.ids
            if len(row) > length:
                row = row[: length - 1] + [self.eos_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def __call__(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Same as `encode`."""
        return self.encode(texts, length)
