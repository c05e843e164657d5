"""The wav2vec2 family of raw-waveform audio encoders (wav2vec 2.0, HuBERT, data2vec-audio), frozen, in NNX.

One implementation; the three families differ only in `Wav2Vec2Config` switches, as in HF `transformers`:

- **Feature encoder**: 1-D convolutions over the waveform (`conv_dim`, `conv_kernel`, `conv_stride`,
  optional bias, no padding), each followed by GELU. `feature_norm="group"`: a GroupNorm with one group
  per channel (statistics over time) after the first convolution only (wav2vec2-base, HuBERT-base);
  `"layer"`: a LayerNorm over channels after every convolution (large "lv60" models, data2vec-audio).
- **Feature projection**: LayerNorm (absent in HuBERT with `feat_proj_layer_norm=False`) + Linear to the
  transformer width.
- **Convolutional relative position embedding**: grouped convolution(s) over time with "same" padding (one
  frame dropped at the end when the kernel is even), then GELU, added to the input of the transformer.
  wav2vec2 / HuBERT: one convolution (its weight norm is folded into a plain kernel when the checkpoint is
  read), optionally preceded by a BatchNorm (HuBERT's `conv_pos_batch_norm`, folded into a per-channel
  affine map). data2vec-audio: a stack of convolutions, each followed by a LayerNorm without parameters.
- **Transformer**: post-LN layers with a LayerNorm before the first layer (`stable_layer_norm=False`), or
  pre-LN ("stable") layers with a LayerNorm after the last (`stable_layer_norm=True`).
- **Padding**: frames are valid as transformers' `_get_feat_extract_output_lengths` counts them
  (`length = (length - kernel) // stride + 1` per convolution); padded frames are zeroed before the
  position convolution and are never attended to as keys. GroupNorm statistics cover the whole padded
  length, as in transformers.

Hidden states are numbered as transformers' `output_hidden_states` numbers them: 0 is the input of the
first layer, i (1..num_layers) the output of layer i - 1; with `stable_layer_norm` the final LayerNorm is
not part of any of them (only of the last hidden state). The forward pass stops at the chosen one.

Shapes: B batch, S samples, F frames, C conv channels, D width, H heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from slit.models.layers import (
    Dense,
    Frozen,
    LayerNorm,
    compute_dtype_scope,
    dot_product_attention,
    merge_heads,
    normal,
    ones,
    remat_call,
    scan_layers,
    split_heads,
    stack_layers,
    weight,
    zeros,
)

__all__ = [
    "ACTIVATIONS",
    "Wav2Vec2AudioTower",
    "Wav2Vec2Config",
    "Wav2Vec2Encoder",
    "feature_lengths",
    "frame_mask",
    "normalize_waveform",
    "resolve_hidden_layer",
]

# Activation names as transformers' ACT2FN spells them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# torch's defaults, which transformers uses for these norms regardless of `layer_norm_eps`.
CONV_NORM_EPS = 1e-5  # GroupNorm / LayerNorm of the feature encoder, LayerNorm of data2vec's position convs
WAVEFORM_NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation

_conv_init = jax.nn.initializers.he_normal(in_axis=(0, 1), out_axis=2)
_dense_init = jax.nn.initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """Architecture of a wav2vec2-family encoder. Defaults are wav2vec2-base (and HuBERT-base)."""

    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feature_norm: str = "group"  # "group" (first conv only) or "layer" (every conv)
    feature_activation: str = "gelu"
    projection_norm: bool = True  # LayerNorm before the feature projection
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    position_conv_kernel: int = 128
    position_conv_groups: int = 16
    position_conv_layers: int = 1  # data2vec-audio: a stack (5 in the released models)
    position_conv_layer_norm: bool = False  # data2vec-audio: LayerNorm without parameters after each conv
    position_batch_norm: bool = False  # HuBERT `conv_pos_batch_norm`: per-channel affine before the conv
    stable_layer_norm: bool = False  # pre-LN layers + final LayerNorm

    def __post_init__(self) -> None:
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError(
                f"conv_dim {self.conv_dim}, conv_kernel {self.conv_kernel} and conv_stride "
                f"{self.conv_stride} must have one entry per convolution"
            )
        if self.feature_norm not in ("group", "layer"):
            raise ValueError(f"feature_norm must be 'group' or 'layer', got {self.feature_norm!r}")
        for name in ("feature_activation", "activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {sorted(ACTIVATIONS)}")
        if self.width % self.num_heads or self.width % self.position_conv_groups:
            raise ValueError(
                f"width {self.width} must be divisible by num_heads {self.num_heads} and by "
                f"position_conv_groups {self.position_conv_groups}"
            )

    @property
    def hop_samples(self) -> int:
        """Samples between consecutive frames (320 for the released models: 20 ms at 16 kHz)."""
        hop = 1
        for stride in self.conv_stride:
            hop *= stride
        return hop

    @property
    def receptive_field(self) -> int:
        """Samples seen by one frame (400 for the released models); shorter clips give no frame."""
        field, hop = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride, strict=True):
            field += (kernel - 1) * hop
            hop *= stride
        return field


# ---------------------------------------------------------------------------------------------------------
# Lengths, masks, waveform normalisation.


def feature_lengths(num_samples: jax.Array | int, config: Wav2Vec2Config) -> jax.Array | int:
    """Frames the feature encoder makes from `num_samples` samples: transformers'
    `_get_feat_extract_output_lengths`, `length = (length - kernel) // stride + 1` for each convolution.

    Works on Python ints, NumPy and JAX integer arrays of any shape. Negative for clips shorter than the
    receptive field (as in transformers); `frame_mask` treats those as zero frames.
    """
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        num_samples = (num_samples - kernel) // stride + 1
    return num_samples


def frame_mask(num_samples_b: jax.Array, total_frames: int, config: Wav2Vec2Config) -> jax.Array:
    """bool (B, total_frames): True for the first `feature_lengths(num_samples)` frames of each clip."""
    lengths = feature_lengths(jnp.asarray(num_samples_b), config)
    return jnp.arange(total_frames)[None, :] < lengths[:, None]


def normalize_waveform(waveform_bs: jax.Array, num_samples_b: jax.Array) -> jax.Array:
    """Zero mean, unit variance over each clip's real samples; padding stays 0.

    As `Wav2Vec2FeatureExtractor(do_normalize=True)` with an attention mask:
    `(x - mean) / sqrt(var + 1e-7)` over `x[:num_samples]`. (B, S) float -> (B, S) float32.
    """
    x = waveform_bs.astype(jnp.float32)
    valid = jnp.arange(x.shape[1])[None, :] < num_samples_b[:, None]
    count = jnp.maximum(num_samples_b, 1).astype(jnp.float32)[:, None]
    mean = jnp.where(valid, x, 0.0).sum(-1, keepdims=True) / count
    var = jnp.where(valid, jnp.square(x - mean), 0.0).sum(-1, keepdims=True) / count
    return jnp.where(valid, (x - mean) * jax.lax.rsqrt(var + WAVEFORM_NORM_EPS), 0.0)


def resolve_hidden_layer(hidden_layer: int | None, num_layers: int) -> int | None:
    """Maps a hidden-state index (negative counts from the end, as in Python) to 0..num_layers.

    None stays None (the last hidden state, after the final LayerNorm of stable-layer-norm models).
    Raises ValueError for an index outside [-(num_layers + 1), num_layers].
    """
    if hidden_layer is None:
        return None
    count = num_layers + 1
    if not -count <= hidden_layer < count:
        raise ValueError(
            f"hidden_layer {hidden_layer} is out of range: this encoder has {count} hidden states "
            f"(0 = input of the first layer ... {num_layers} = output of the last; "
            "negative counts from the end)"
        )
    return hidden_layer % count


# ---------------------------------------------------------------------------------------------------------
# Modules.


def _normalize(x32: jax.Array, axis: int, eps: float) -> jax.Array:
    mean = x32.mean(axis, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


class Conv1d(nnx.Module):
    """1-D (optionally grouped) convolution over time, (B, T, in) -> (B, T', out); kernel (k, in/groups, out).

    `padding` zeros on both sides; `trim_end` output frames dropped at the end ("same" padding of an even
    kernel, transformers' `SamePadLayer`).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        *,
        rngs: nnx.Rngs,
        stride: int = 1,
        groups: int = 1,
        padding: int = 0,
        trim_end: int = 0,
        use_bias: bool = True,
    ):
        self.stride, self.groups, self.padding, self.trim_end = stride, groups, padding, trim_end
        shape = (kernel_size, in_ch // groups, out_ch)
        self.kernel = weight(Frozen, _conv_init, rngs, shape, (None, None, "embed"))
        self.bias = weight(Frozen, zeros, rngs, (out_ch,), ("embed",)) if use_bias else None

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x_btc,
            self.kernel[...].astype(x_btc.dtype),
            window_strides=(self.stride,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
        )
        if self.trim_end:
            y = y[:, : y.shape[1] - self.trim_end]
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class GroupNormPerChannel(nnx.Module):
    """GroupNorm with one group per channel: each channel normalised over time, then scaled and shifted."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.scale = weight(Frozen, ones, rngs, (channels,), ("embed",))
        self.bias = weight(Frozen, zeros, rngs, (channels,), ("embed",))

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        y = _normalize(x_btc.astype(jnp.float32), axis=1, eps=CONV_NORM_EPS)
        return (y * self.scale[...] + self.bias[...]).astype(x_btc.dtype)


class ChannelAffine(nnx.Module):
    """`x * scale + bias` per channel: an inference-mode BatchNorm with its statistics folded in."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.scale = weight(Frozen, ones, rngs, (channels,), ("embed",))
        self.bias = weight(Frozen, zeros, rngs, (channels,), ("embed",))

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        return x_btc * self.scale[...].astype(x_btc.dtype) + self.bias[...].astype(x_btc.dtype)


class FeatureConvLayer(nnx.Module):
    """Convolution, optional norm ("group", "layer" or None), activation."""

    def __init__(self, c: Wav2Vec2Config, index: int, norm: str | None, *, rngs: nnx.Rngs):
        in_ch = c.conv_dim[index - 1] if index > 0 else 1
        out_ch = c.conv_dim[index]
        self.activation = c.feature_activation
        self.conv = Conv1d(
            in_ch, out_ch, c.conv_kernel[index], stride=c.conv_stride[index], use_bias=c.conv_bias, rngs=rngs
        )
        if norm == "group":
            self.norm = GroupNormPerChannel(out_ch, rngs=rngs)
        elif norm == "layer":
            self.norm = LayerNorm(out_ch, eps=CONV_NORM_EPS, rngs=rngs, param_type=Frozen)
        else:
            self.norm = None

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        x = self.conv(x_btc)
        if self.norm is not None:
            x = self.norm(x)
        return ACTIVATIONS[self.activation](x)


class FeatureEncoder(nnx.Module):
    """Waveform (B, S, 1) -> conv features (B, F, conv_dim[-1])."""

    def __init__(self, c: Wav2Vec2Config, *, rngs: nnx.Rngs):
        def norm(i: int) -> str | None:
            return "layer" if c.feature_norm == "layer" else ("group" if i == 0 else None)

        self.layers = nnx.List([FeatureConvLayer(c, i, norm(i), rngs=rngs) for i in range(len(c.conv_dim))])

    def __call__(self, x_bs1: jax.Array) -> jax.Array:
        for layer in self.layers:
            x_bs1 = layer(x_bs1)
        return x_bs1


class FeatureProjection(nnx.Module):
    """(B, F, C) -> (B, F, D): optional LayerNorm, then Linear."""

    def __init__(self, c: Wav2Vec2Config, *, rngs: nnx.Rngs):
        frozen = dict(rngs=rngs, param_type=Frozen)
        self.norm = LayerNorm(c.conv_dim[-1], eps=c.layer_norm_eps, **frozen) if c.projection_norm else None
        self.dense = Dense(c.conv_dim[-1], c.width, axes=(None, "embed"), kernel_init=_dense_init, **frozen)

    def __call__(self, x_bfc: jax.Array) -> jax.Array:
        if self.norm is not None:
            x_bfc = self.norm(x_bfc)
        return self.dense(x_bfc)


class PositionConvEmbedding(nnx.Module):
    """(B, F, D) -> (B, F, D): the convolutional relative position embedding (added by the caller)."""

    def __init__(self, c: Wav2Vec2Config, *, rngs: nnx.Rngs):
        k = c.position_conv_kernel
        self.activation = c.feature_activation
        self.layer_norm = c.position_conv_layer_norm
        self.batch_norm = ChannelAffine(c.width, rngs=rngs) if c.position_batch_norm else None
        self.layers = nnx.List(
            [
                Conv1d(
                    c.width,
                    c.width,
                    k,
                    groups=c.position_conv_groups,
                    padding=k // 2,
                    trim_end=1 if k % 2 == 0 else 0,
                    rngs=rngs,
                )
                for _ in range(c.position_conv_layers)
            ]
        )

    def __call__(self, x_bfd: jax.Array) -> jax.Array:
        if self.batch_norm is not None:
            x_bfd = self.batch_norm(x_bfd)
        for conv in self.layers:
            x_bfd = conv(x_bfd)
            if self.layer_norm:
                x_bfd = _normalize(x_bfd.astype(jnp.float32), axis=-1, eps=CONV_NORM_EPS).astype(x_bfd.dtype)
            x_bfd = ACTIVATIONS[self.activation](x_bfd)
        return x_bfd


class EncoderLayer(nnx.Module):
    """Self-attention and feed-forward blocks with residuals; post-LN, or pre-LN when `stable_layer_norm`."""

    def __init__(self, c: Wav2Vec2Config, *, rngs: nnx.Rngs):
        frozen = dict(rngs=rngs, param_type=Frozen)
        dense = dict(frozen, kernel_init=_dense_init)
        self.num_heads = c.num_heads
        self.pre_norm = c.stable_layer_norm
        self.activation = c.activation
        self.attention_norm = LayerNorm(c.width, eps=c.layer_norm_eps, **frozen)
        self.q_proj = Dense(c.width, c.width, axes=("embed", "heads"), **dense)
        self.k_proj = Dense(c.width, c.width, axes=("embed", "heads"), **dense)
        self.v_proj = Dense(c.width, c.width, axes=("embed", "heads"), **dense)
        self.out_proj = Dense(c.width, c.width, axes=("heads", "embed"), kernel_init=normal(0.02), **frozen)
        self.mlp_norm = LayerNorm(c.width, eps=c.layer_norm_eps, **frozen)
        self.fc1 = Dense(c.width, c.mlp_dim, axes=("embed", "mlp"), **dense)
        self.fc2 = Dense(c.mlp_dim, c.width, axes=("mlp", "embed"), kernel_init=normal(0.02), **frozen)

    def _attention(self, x_bfd: jax.Array, mask_bff: jax.Array | None) -> jax.Array:
        q, k, v = (split_heads(p(x_bfd), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(dot_product_attention(q, k, v, mask_bff)))

    def _mlp(self, x_bfd: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x_bfd)))

    def __call__(self, x_bfd: jax.Array, mask_bff: jax.Array | None) -> jax.Array:
        if self.pre_norm:
            x_bfd = x_bfd + self._attention(self.attention_norm(x_bfd), mask_bff)
            return x_bfd + self._mlp(self.mlp_norm(x_bfd))
        x_bfd = self.attention_norm(x_bfd + self._attention(x_bfd, mask_bff))
        return self.mlp_norm(x_bfd + self._mlp(x_bfd))


class Wav2Vec2Encoder(nnx.Module):
    """Waveform (B, S) -> hidden states (B, F, D), all weights `Frozen`.

    `dtype` is the compute dtype of the activations (weights are cast to it; norms and softmax run in
    float32). The weights keep whatever dtype they are loaded in (e.g. bfloat16, see
    `slit.interop.hf_wav2vec2`).
    """

    def __init__(
        self,
        config: Wav2Vec2Config,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
        scan_layers: bool = False,
        remat_policy: str = "none",
    ):
        """scan_layers: transformer layers stored stacked and run by one `jax.lax.scan`
        (`slit.models.layers.stack_layers`; same weights from the same `rngs`); remat_policy: rematerialise
        each transformer layer's activations in the backward pass (`slit.models.layers.REMAT_POLICIES`)."""
        c = config
        self.config = c
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.feature_encoder = FeatureEncoder(c, rngs=rngs)
        self.feature_projection = FeatureProjection(c, rngs=rngs)
        self.position_conv = PositionConvEmbedding(c, rngs=rngs)
        # HF `encoder.layer_norm`: before the first layer (post-LN), or after the last (stable).
        self.encoder_norm = LayerNorm(c.width, eps=c.layer_norm_eps, rngs=rngs, param_type=Frozen)
        layers = [EncoderLayer(c, rngs=rngs) for _ in range(c.num_layers)]
        self.layers = stack_layers(layers) if scan_layers else nnx.List(layers)

    def __call__(
        self,
        waveform_bs: jax.Array,
        num_samples_b: jax.Array | None = None,
        *,
        hidden_layer: int | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Encodes a batch of waveforms (already normalised if the model expects it).

        Args:
          waveform_bs: (B, S) float, zero-padded after each clip.
          num_samples_b: (B,) int, each clip's length in samples; padded frames are zeroed before the
            position convolution and masked as attention keys (transformers with `attention_mask`). None:
            every sample is real and nothing is masked (transformers without `attention_mask`).
          hidden_layer: which hidden state to return, numbered as transformers' `output_hidden_states`
            (negative from the end); layers after it are not run. None: the last hidden state.

        Returns:
          hidden states (B, F, D) and a bool mask (B, F) of frames with real audio, where
          F = feature_lengths(S).
        """
        c = self.config
        stop = resolve_hidden_layer(hidden_layer, c.num_layers)
        x = self.feature_encoder(waveform_bs.astype(self.dtype)[..., None])
        frames = x.shape[1]
        if frames < 1:
            raise ValueError(
                f"{waveform_bs.shape[1]} samples are shorter than the encoder's receptive field "
                f"({c.receptive_field} samples)"
            )
        if num_samples_b is None:
            mask_bf = jnp.ones(x.shape[:2], bool)
            attention_mask = None
        else:
            mask_bf = frame_mask(num_samples_b, frames, c)
            attention_mask = jnp.broadcast_to(mask_bf[:, None, :], (x.shape[0], frames, frames))
        x = self.feature_projection(x)
        if num_samples_b is not None:
            x = jnp.where(mask_bf[..., None], x, jnp.zeros((), x.dtype))
        x = x + self.position_conv(x)
        if not c.stable_layer_norm:
            x = self.encoder_norm(x)
        if self.scan_layers:
            x, _ = scan_layers(
                self.layers,
                lambda layer, x, _: (layer(x, attention_mask), None),
                x,
                remat_policy=self.remat_policy,
                stop=stop,
            )
        for layer in [] if self.scan_layers else list(self.layers)[: c.num_layers if stop is None else stop]:
            x = remat_call(layer, self.remat_policy, x, attention_mask)
        if stop is None and c.stable_layer_norm:
            x = self.encoder_norm(x)
        return x, mask_bf


class Wav2Vec2AudioTower(nnx.Module):
    """Zero-padded 16 kHz waveform -> (optionally normalised) -> frozen wav2vec2-family encoder.

    The same interface as `WhisperAudioTower`. `hidden_layer` picks the hidden state that feeds the
    Q-Former (transformers' numbering; BLIP-2 takes the second-to-last, -2; None: the last hidden state).
    `normalize`: zero-mean unit-variance per clip, as the checkpoint's feature extractor does with
    `do_normalize`. `mask_padding`: pass the padding mask into the encoder, as transformers does when the
    feature extractor returns an attention mask (`return_attention_mask`, true for the "layer"-norm
    checkpoints); the returned frame mask marks real frames either way.
    """

    def __init__(
        self,
        config: Wav2Vec2Config,
        *,
        rngs: nnx.Rngs,
        hidden_layer: int | None = None,
        normalize: bool = True,
        mask_padding: bool = True,
        dtype: DTypeLike = jnp.float32,
        scan_layers: bool = False,
        remat_policy: str = "none",
        compute_dtype: str = "float32",
    ):
        """scan_layers, remat_policy: see `Wav2Vec2Encoder`; compute_dtype: the matmul input dtype of the
        transformer layers and projections (`slit.models.layers.compute_dtype_scope`)."""
        resolve_hidden_layer(hidden_layer, config.num_layers)  # fail early on a bad index
        self.encoder = Wav2Vec2Encoder(
            config, rngs=rngs, dtype=dtype, scan_layers=scan_layers, remat_policy=remat_policy
        )
        self.hidden_layer = hidden_layer
        self.compute_dtype = compute_dtype
        self.normalize = normalize
        self.mask_padding = mask_padding

    @property
    def width(self) -> int:
        return self.encoder.config.width

    def __call__(self, waveform_bs: jax.Array, num_samples_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes zero-padded 16 kHz waveforms.

        Args:
          waveform_bs: (batch, samples) float in [-1, 1], zero-padded after each clip.
          num_samples_b: (batch,) int, the true length of each clip in samples.

        Returns:
          features (batch, frames, width) and a bool mask (batch, frames) of frames with real audio.
        """
        if self.normalize:
            waveform_bs = normalize_waveform(waveform_bs, num_samples_b)
        with compute_dtype_scope(self.compute_dtype):
            features, _ = self.encoder(
                waveform_bs, num_samples_b if self.mask_padding else None, hidden_layer=self.hidden_layer
            )
        return features, frame_mask(num_samples_b, features.shape[1], self.encoder.config)
