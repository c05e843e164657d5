"""HTSAT, the audio encoder of CLAP (transformers' `ClapAudioModel`, non-fusion), in NNX; the encoder Pengi
uses (one pooled vector per clip, 768-d in the released checkpoints).

The forward pass, as transformers computes it:

- **Frontend** (slit.models.audio.clap_frontend): the clip fitted to `max_length_s` (repeat-padded by
  default), log-mel in dB, (B, T, M) with T = 1001 and M = 64 at the defaults.
- **BatchNorm over mel bins** in inference mode: its running statistics and affine weights are folded into
  a per-bin `scale` and `bias` when the checkpoint is read (`batch_norm`).
- **Mel to image** (`reshape_mel2img`): with `freq_ratio = spec_size // num_mel_bins` (4), the mel is
  resized along time to `spec_size * freq_ratio` frames (1024) by bicubic interpolation (torch's, A = -0.75,
  `align_corners=True`) when it is shorter, then cut into `freq_ratio` consecutive time chunks stacked
  along frequency: a (spec_size, spec_size) image whose row `k * M + m` is mel bin m of chunk k and whose
  column is the time within the chunk.
- **Patch embedding**: a `patch_size` convolution with stride `patch_stride` (4: a 64 x 64 grid of
  `patch_embeds_hidden_size` = 96 channels), then a LayerNorm.
- **Swin stages** (`depths` = (2, 2, 6, 2) blocks, `num_attention_heads` = (4, 8, 16, 32)): each block is
  pre-LN window attention over `window_size` x `window_size` windows with a learnt relative position bias,
  on every other block the windows shifted by `window_size // 2` (a cyclic roll, with transformers' -100
  mask between regions that the roll brought together), then a pre-LN MLP (`mlp_ratio`). A stage whose
  grid is not larger than the window uses one window the size of the grid and no shift. Between stages a
  patch merging (2 x 2 neighbours concatenated, LayerNorm, Linear to twice the width) halves the grid.
- **Final LayerNorm**, on the last stage's (spec_size / patch_stride / 2 ** (stages - 1))^2 tokens (8 x 8)
  of width `width` = patch_embeds_hidden_size * 2 ** (stages - 1) (768).

**Frames.** transformers regroups the final grid as (width, F', T') with T' = freq_ratio * grid columns
(time, 32) and F' = grid rows / freq_ratio (frequency bands, 2), and `pooler_output` is the mean over all
of them. slit's frames are those tokens in time order, each time step's frequency bands in turn: frame
`t * F' + f` is `last_hidden_state[:, :, f, t]`, (B, T' * F', width) = (B, 64, 768). A frame covers
1 / T' of the `max_length_s` window (0.32 s of the 10 s at the defaults) and 1 / F' of the mel bins.
The mean over frames is transformers' `pooler_output`.

Shapes: B batch, S samples, T mel frames, M mel bins, H x W token grid, C width, N tokens per window.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from slit.models.audio.clap_frontend import ClapFrontendConfig, clap_log_mel
from slit.models.audio.wav2vec2 import ACTIVATIONS
from slit.models.layers import (
    Dense,
    Frozen,
    LayerNorm,
    compute_dtype_scope,
    normal,
    ones,
    remat_call,
    weight,
    zeros,
)

__all__ = ["HTSATAudioTower", "HTSATConfig", "HTSATEncoder", "bicubic_matrix"]

PATCH_NORM_EPS = 1e-5  # torch's LayerNorm default: patch embedding, patch merging, final norm
SHIFT_MASK = -100.0  # transformers' additive mask between shifted-window regions

_dense_init = normal(0.02)


@dataclasses.dataclass(frozen=True)
class HTSATConfig:
    """The `ClapAudioConfig` fields that shape the encoder (defaults: laion CLAP's HTSAT-base), and the
    feature extractor's settings (`frontend`)."""

    num_mel_bins: int = 64
    spec_size: int = 256
    patch_size: int = 4
    patch_stride: int = 4
    patch_embeds_hidden_size: int = 96
    enable_patch_layer_norm: bool = True
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_attention_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    frontend: ClapFrontendConfig = ClapFrontendConfig()

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_attention_heads) or not self.depths:
            raise ValueError(
                f"depths {self.depths} and num_attention_heads {self.num_attention_heads} differ"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.frontend.num_mel_bins != self.num_mel_bins:
            raise ValueError(
                f"the feature extractor's feature_size {self.frontend.num_mel_bins} "
                f"(preprocessor_config.json) is not the model's num_mel_bins {self.num_mel_bins}"
            )
        if self.spec_size % self.num_mel_bins:
            raise ValueError(
                f"spec_size {self.spec_size} is not a multiple of num_mel_bins {self.num_mel_bins} "
                "(transformers then also interpolates along frequency; not supported)"
            )
        if self.patch_size != self.patch_stride:
            raise ValueError(
                f"patch_size {self.patch_size} != patch_stride {self.patch_stride}: not supported"
            )
        if self.frontend.num_frames > self.spec_width:
            raise ValueError(
                f"{self.frontend.num_frames} mel frames (max_length_s {self.frontend.max_length_s}) are more "
                f"than the model's spec_size * freq_ratio = {self.spec_width}"
            )
        for i, (res, heads) in enumerate(zip(self.resolutions, self.num_attention_heads, strict=True)):
            dim = self.patch_embeds_hidden_size * 2**i
            if dim % heads:
                raise ValueError(f"stage {i}: width {dim} is not divisible by {heads} heads")
            if res < self.window_size or res % self.window_size:
                raise ValueError(
                    f"stage {i}: a {res} x {res} grid does not tile into {self.window_size} x "
                    f"{self.window_size} windows"
                )
            if i < len(self.depths) - 1 and res % 2:
                raise ValueError(f"stage {i}: a {res} x {res} grid cannot be merged 2 x 2")
        if self.resolutions[-1] % self.freq_ratio:
            raise ValueError(
                f"the final {self.resolutions[-1]} x {self.resolutions[-1]} grid does not split into "
                f"freq_ratio {self.freq_ratio} time chunks"
            )

    @property
    def freq_ratio(self) -> int:
        """Time chunks stacked along frequency in the image (spec_size // num_mel_bins: 4)."""
        return self.spec_size // self.num_mel_bins

    @property
    def spec_width(self) -> int:
        """Mel frames the image holds (spec_size * freq_ratio: 1024); shorter mels are interpolated."""
        return self.spec_size * self.freq_ratio

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Each stage's (square) grid size: 64, 32, 16, 8."""
        grid = self.spec_size // self.patch_stride
        return tuple(grid // 2**i for i in range(len(self.depths)))

    @property
    def num_layers(self) -> int:
        """Swin blocks in all."""
        return sum(self.depths)

    @property
    def width(self) -> int:
        """The frames' width, the bridge's input (768)."""
        return self.patch_embeds_hidden_size * 2 ** (len(self.depths) - 1)

    @property
    def num_frames(self) -> int:
        """Frames per clip (64): the final grid's tokens."""
        return self.resolutions[-1] ** 2

    @property
    def sample_rate(self) -> int:
        """The audio's sample rate in Hz (the feature extractor's `sampling_rate`: 48000)."""
        return self.frontend.sample_rate


# ---------------------------------------------------------------------------------------------------------
# Static helpers.


@functools.lru_cache(maxsize=8)
def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float64: torch's bicubic resize along one axis (A = -0.75, align_corners=True,
    edge indices clamped) as a matrix, `y = matrix @ x`."""
    a = -0.75
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        real = np.float32(scale) * np.float32(i)  # torch computes the source position in float32
        idx = int(np.floor(real))
        t = float(real - idx)

        def near(x: float) -> float:
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x: float) -> float:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t)), strict=True):
            matrix[i, min(max(idx + offset, 0), size_in - 1)] += w
    return matrix


@functools.lru_cache(maxsize=16)
def relative_position_index(window: int) -> np.ndarray:
    """(N, N) int: Swin's index into the ((2w - 1)^2, heads) bias table for each query/key pair."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


@functools.lru_cache(maxsize=16)
def shift_mask(size: int, window: int, shift: int) -> np.ndarray:
    """(num_windows, N, N) float32: transformers' additive mask of a cyclically shifted square grid (0 within
    a region, -100 across regions)."""
    idx = np.arange(size)
    region = (idx >= size - window).astype(int) + (idx >= size - shift).astype(int)
    img = region[:, None] * 3 + region[None, :]  # (size, size)
    n = size // window
    windows = img.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, window * window)
    return np.where(windows[:, None, :] != windows[:, :, None], SHIFT_MASK, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Modules.


class ChannelAffine(nnx.Module):
    """`x * scale + bias` over the last axis: an inference-mode BatchNorm with its statistics folded in."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.scale = weight(Frozen, ones, rngs, (channels,), (None,))
        self.bias = weight(Frozen, zeros, rngs, (channels,), (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class PatchEmbed(nnx.Module):
    """Image (B, Hi, Wi) -> tokens (B, H, W, C0): a patch convolution, then a LayerNorm."""

    def __init__(self, c: HTSATConfig, *, rngs: nnx.Rngs):
        p, d = c.patch_size, c.patch_embeds_hidden_size
        self.stride = c.patch_stride
        self.kernel = weight(Frozen, _dense_init, rngs, (p, p, 1, d), (None, None, None, "embed"))
        self.bias = weight(Frozen, zeros, rngs, (d,), ("embed",))
        self.norm = (
            LayerNorm(d, eps=PATCH_NORM_EPS, rngs=rngs, param_type=Frozen)
            if c.enable_patch_layer_norm
            else None
        )

    def __call__(self, image_bhw: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            image_bhw[..., None],
            self.kernel[...].astype(image_bhw.dtype),
            window_strides=(self.stride, self.stride),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + self.bias[...].astype(y.dtype)
        return self.norm(y) if self.norm is not None else y


class SwinBlock(nnx.Module):
    """(B, H, W, C) -> (B, H, W, C): (shifted) window attention and MLP, pre-LN, with residuals."""

    def __init__(
        self, c: HTSATConfig, dim: int, heads: int, resolution: int, shifted: bool, *, rngs: nnx.Rngs
    ):
        frozen = dict(rngs=rngs, param_type=Frozen)
        dense = dict(frozen, kernel_init=_dense_init)
        w = c.window_size
        # transformers' `set_shift_and_window_size`: a grid not larger than the window is one window.
        self.window = min(resolution, w)
        self.shift = w // 2 if shifted and resolution > w else 0
        self.heads = heads
        self.activation = c.hidden_act
        self.norm1 = LayerNorm(dim, eps=c.layer_norm_eps, **frozen)
        self.query = Dense(dim, dim, axes=("embed", "heads"), use_bias=c.qkv_bias, **dense)
        self.key = Dense(dim, dim, axes=("embed", "heads"), use_bias=c.qkv_bias, **dense)
        self.value = Dense(dim, dim, axes=("embed", "heads"), use_bias=c.qkv_bias, **dense)
        self.relative_position_bias_table = weight(
            Frozen, zeros, rngs, ((2 * w - 1) ** 2, heads), (None, None)
        )
        self.out = Dense(dim, dim, axes=("heads", "embed"), **dense)
        self.norm2 = LayerNorm(dim, eps=c.layer_norm_eps, **frozen)
        hidden = int(c.mlp_ratio * dim)
        self.fc1 = Dense(dim, hidden, axes=("embed", "mlp"), **dense)
        self.fc2 = Dense(hidden, dim, axes=("mlp", "embed"), **dense)

    def _attention(self, x_bhwc: jax.Array) -> jax.Array:
        b, h, w, ch = x_bhwc.shape
        ws, s = self.window, self.shift
        if s:
            x_bhwc = jnp.roll(x_bhwc, (-s, -s), axis=(1, 2))
        nh, nw = h // ws, w // ws
        windows = x_bhwc.reshape(b, nh, ws, nw, ws, ch).transpose(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(b, nh * nw, ws * ws, ch)  # (B, nW, N, C)
        hd = ch // self.heads

        def heads(proj: Dense) -> jax.Array:
            return proj(windows).reshape(b, nh * nw, ws * ws, self.heads, hd)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        n = ws * ws
        # HTSATConfig checks that every grid tiles into windows of the configured size.
        table = self.relative_position_bias_table[...].astype(jnp.float32)
        bias = table[relative_position_index(ws).reshape(-1)].reshape(n, n, self.heads).transpose(2, 0, 1)
        scores = scores + bias[None, None]
        if s:
            scores = scores + jnp.asarray(shift_mask(h, ws, s))[None, :, None]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(b, nh * nw, n, ch)
        out = self.out(out)
        out = out.reshape(b, nh, nw, ws, ws, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, ch)
        if s:
            out = jnp.roll(out, (s, s), axis=(1, 2))
        return out

    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        x_bhwc = x_bhwc + self._attention(self.norm1(x_bhwc))
        hidden = ACTIVATIONS[self.activation](self.fc1(self.norm2(x_bhwc)))
        return x_bhwc + self.fc2(hidden)


class PatchMerging(nnx.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): 2 x 2 neighbours concatenated (transformers' order), LayerNorm,
    Linear without bias."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        frozen = dict(rngs=rngs, param_type=Frozen)
        self.norm = LayerNorm(4 * dim, eps=PATCH_NORM_EPS, **frozen)
        self.reduction = Dense(
            4 * dim, 2 * dim, axes=("mlp", "embed"), use_bias=False, kernel_init=_dense_init, **frozen
        )

    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        parts = [x_bhwc[:, row::2, col::2] for col in range(2) for row in range(2)]
        return self.reduction(self.norm(jnp.concatenate(parts, axis=-1)))


class Stage(nnx.Module):
    """Swin blocks (every other one shifted), then a patch merging unless it is the last stage."""

    def __init__(self, c: HTSATConfig, index: int, *, rngs: nnx.Rngs, remat_policy: str = "none"):
        dim = c.patch_embeds_hidden_size * 2**index
        self.remat_policy = remat_policy
        res, heads = c.resolutions[index], c.num_attention_heads[index]
        self.blocks = nnx.List(
            [SwinBlock(c, dim, heads, res, shifted=j % 2 == 1, rngs=rngs) for j in range(c.depths[index])]
        )
        self.downsample = PatchMerging(dim, rngs=rngs) if index < len(c.depths) - 1 else None

    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        for block in self.blocks:
            x_bhwc = remat_call(block, self.remat_policy, x_bhwc)
        return self.downsample(x_bhwc) if self.downsample is not None else x_bhwc


class HTSATEncoder(nnx.Module):
    """Log-mel (B, T, M) -> frames (B, num_frames, width), all weights `Frozen` (see the module docstring).

    `dtype`: the compute dtype of the activations (norms and softmax run in float32).
    """

    def __init__(
        self,
        config: HTSATConfig,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike = jnp.float32,
        remat_policy: str = "none",
    ):
        """remat_policy: rematerialise each Swin block's activations in the backward pass
        (`slit.models.layers.REMAT_POLICIES`). Its blocks are not scanned: the stages differ in width and
        every other block is shifted."""
        c = config
        self.config = c
        self.dtype = dtype
        self.batch_norm = ChannelAffine(c.num_mel_bins, rngs=rngs)
        self.patch_embed = PatchEmbed(c, rngs=rngs)
        self.stages = nnx.List(
            [Stage(c, i, rngs=rngs, remat_policy=remat_policy) for i in range(len(c.depths))]
        )
        self.norm = LayerNorm(c.width, eps=PATCH_NORM_EPS, rngs=rngs, param_type=Frozen)

    def image(self, mel_btm: jax.Array) -> jax.Array:
        """Normalised log-mel (B, T, M) -> the (B, spec_size, spec_size) image (`reshape_mel2img`)."""
        c = self.config
        b, t, m = mel_btm.shape
        if t > c.spec_width or m != c.num_mel_bins:
            raise ValueError(
                f"mel of shape {(t, m)}: need at most {c.spec_width} frames of {c.num_mel_bins} bins"
            )
        x = mel_btm.astype(jnp.float32)
        if t < c.spec_width:
            resize = jnp.asarray(bicubic_matrix(t, c.spec_width), jnp.float32)
            x = jnp.einsum("ut,btm->bum", resize, x, precision=jax.lax.Precision.HIGHEST)
        r = c.freq_ratio
        x = x.reshape(b, r, c.spec_width // r, m).transpose(0, 1, 3, 2)  # (B, r, M, time in chunk)
        return x.reshape(b, r * m, c.spec_width // r)

    def __call__(self, mel_btm: jax.Array) -> jax.Array:
        """Log-mel (B, T, M) with T <= spec_width -> the final norm's tokens as frames (B, F, width), in the
        order of the module docstring (time-major, frequency bands within)."""
        c = self.config
        x = self.batch_norm(mel_btm.astype(jnp.float32))
        x = self.patch_embed(self.image(x).astype(self.dtype))
        for stage in self.stages:
            x = stage(x)
        x = self.norm(x)  # (B, Hf, Wf, C): rows k * F' + f (chunk k, band f), columns w
        b, hf, wf, ch = x.shape
        r = c.freq_ratio
        x = x.reshape(b, r, hf // r, wf, ch).transpose(0, 1, 3, 2, 4)  # (B, chunk, w, band, C)
        return x.reshape(b, hf * wf, ch)


class HTSATAudioTower(nnx.Module):
    """Zero-padded waveform at the encoder's sample rate -> CLAP log-mel -> HTSAT frames.

    The same call as `WhisperAudioTower`. Every clip is fitted to the feature extractor's `max_length_s`
    (repeat-padded by default, slit.models.audio.clap_frontend), so each clip gives `num_frames` (64)
    frames of `width` (768), all marked real; a clip of 0 samples (a window past the end of its clip, with
    `audio_encoder.window_seconds`) gives frames marked padding. `hidden_layer` must be None: the encoder's
    intermediate stages have other widths and grids.
    """

    def __init__(
        self,
        config: HTSATConfig,
        *,
        rngs: nnx.Rngs,
        hidden_layer: int | None = None,
        dtype: DTypeLike = jnp.float32,
        remat_policy: str = "none",
        compute_dtype: str = "float32",
    ):
        """remat_policy: see `HTSATEncoder`; compute_dtype: the matmul input dtype
        (`slit.models.layers.compute_dtype_scope`)."""
        if hidden_layer is not None:
            raise ValueError(
                f"hidden_layer {hidden_layer}: the htsat encoder feeds only its last hidden state (after the "
                "final norm); its stages have other widths. Use hidden_layer -1 (None)"
            )
        self.encoder = HTSATEncoder(config, rngs=rngs, dtype=dtype, remat_policy=remat_policy)
        self.compute_dtype = compute_dtype

    @property
    def width(self) -> int:
        return self.encoder.config.width

    def __call__(self, waveform_bs: jax.Array, num_samples_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes zero-padded waveforms.

        Args:
          waveform_bs: (batch, samples) float in [-1, 1] at `config.sample_rate`, zero-padded after each
            clip; samples <= the frontend's `max_samples` (max_length_s).
          num_samples_b: (batch,) int, the true length of each clip in samples.

        Returns:
          features (batch, num_frames, width) and a bool mask (batch, num_frames): True for clips with audio.
        """
        mel = clap_log_mel(waveform_bs, num_samples_b, self.encoder.config.frontend)
        with compute_dtype_scope(self.compute_dtype):
            features = self.encoder(mel)
        mask = jnp.broadcast_to((num_samples_b > 0)[:, None], features.shape[:2])
        return features, mask
