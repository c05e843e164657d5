"""Whisper's audio encoder as an NNX module with frozen weights.

Architecture as in OpenAI Whisper / HF `WhisperEncoder`: two 1-D convolutions over the log-mel
(kernel 3; the second has stride 2, halving the frame rate), GELU after each, fixed sinusoidal
position embeddings, pre-LayerNorm transformer layers (the key projection has no bias), and a final
LayerNorm. Inputs shorter than 30 s use the first `frames` position embeddings; which frames hold
real audio is returned as a mask, for the Q-Former's cross-attention.

Hidden states are numbered as transformers' `output_hidden_states` numbers them: 0 is the input of the
first layer, i (1..num_layers - 1) the output of layer i - 1, and num_layers (= -1) the last hidden
state, after the final LayerNorm. `hidden_layer=-2` (BLIP-2's second-to-last) stops one layer early.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from slit.models.audio import frontend
from slit.models.audio.wav2vec2 import resolve_hidden_layer
from slit.models.layers import (
    Dense,
    Frozen,
    LayerNorm,
    compute_dtype_scope,
    dot_product_attention,
    gelu,
    merge_heads,
    normal,
    remat_call,
    scan_layers,
    split_heads,
    stack_layers,
    weight,
)

WHISPER_LAYER_NORM_EPS = 1e-5

# A randomly initialised (not loaded) encoder must pass the audio through: convolutions and the
# input projections of each block preserve variance, and the blocks' output projections start small
# so that each random layer stays close to the identity. With BERT-style normal(0.02) everywhere, the
# convolutions shrank the log-mel ~20x, the sinusoidal position embeddings and the (unmasked) padded
# frames dominated, and only 0.01% of the feature variance depended on the clip. Loaded weights
# replace all of this.
_conv_init = jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
_dense_init = jax.nn.initializers.lecun_normal()
_residual_out_init = normal(0.02)


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """Sizes of a Whisper encoder. Defaults are Whisper base."""

    num_mel_bins: int = 80
    width: int = 512
    num_layers: int = 6
    num_heads: int = 8
    mlp_dim: int = 2048
    max_positions: int = 1500


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed position embeddings, (length, channels): [sin | cos]."""
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-log_timescale_increment * np.arange(channels // 2))
    scaled_time = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


class Conv1d(nnx.Module):
    """1-D convolution over time, (batch, time, in) -> (batch, time', out); kernel (k, in, out)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, *, rngs: nnx.Rngs):
        self.stride = stride
        self.kernel = weight(Frozen, _conv_init, rngs, (kernel_size, in_ch, out_ch), (None, None, "embed"))
        self.bias = weight(Frozen, jax.nn.initializers.zeros, rngs, (out_ch,), ("embed",))

    def __call__(self, x_btc: jax.Array) -> jax.Array:
        pad = self.kernel.shape[0] // 2
        y = jax.lax.conv_general_dilated(
            x_btc,
            self.kernel[...].astype(x_btc.dtype),
            window_strides=(self.stride,),
            padding=[(pad, pad)],
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + self.bias[...].astype(y.dtype)


class WhisperEncoderLayer(nnx.Module):
    """Pre-LN self-attention and pre-LN GELU MLP, each with a residual."""

    def __init__(self, c: WhisperEncoderConfig, *, rngs: nnx.Rngs):
        frozen = dict(rngs=rngs, param_type=Frozen)
        dense = dict(frozen, kernel_init=_dense_init)
        residual_out = dict(frozen, kernel_init=_residual_out_init)
        self.num_heads = c.num_heads
        self.attention_norm = LayerNorm(c.width, eps=WHISPER_LAYER_NORM_EPS, **frozen)
        self.q_proj = Dense(c.width, c.width, axes=("embed", "heads"), **dense)
        self.k_proj = Dense(c.width, c.width, axes=("embed", "heads"), use_bias=False, **dense)
        self.v_proj = Dense(c.width, c.width, axes=("embed", "heads"), **dense)
        self.out_proj = Dense(c.width, c.width, axes=("heads", "embed"), **residual_out)
        self.mlp_norm = LayerNorm(c.width, eps=WHISPER_LAYER_NORM_EPS, **frozen)
        self.fc1 = Dense(c.width, c.mlp_dim, axes=("embed", "mlp"), **dense)
        self.fc2 = Dense(c.mlp_dim, c.width, axes=("mlp", "embed"), **residual_out)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        h = self.attention_norm(x_btd)
        q, k, v = (split_heads(p(h), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        x_btd = x_btd + self.out_proj(merge_heads(dot_product_attention(q, k, v, None)))
        return x_btd + self.fc2(gelu(self.fc1(self.mlp_norm(x_btd))))


class WhisperEncoder(nnx.Module):
    """Log-mel (batch, mel_frames, mels) -> hidden states (batch, mel_frames / 2, width)."""

    def __init__(
        self,
        config: WhisperEncoderConfig,
        *,
        rngs: nnx.Rngs,
        scan_layers: bool = False,
        remat_policy: str = "none",
    ):
        """scan_layers: layers stored stacked and run by one `jax.lax.scan` (`slit.models.layers.
        stack_layers`; same weights from the same `rngs`); remat_policy: rematerialise each layer's
        activations in the backward pass (`slit.models.layers.REMAT_POLICIES`)."""
        c = config
        self.config = c
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.conv1 = Conv1d(c.num_mel_bins, c.width, 3, 1, rngs=rngs)
        self.conv2 = Conv1d(c.width, c.width, 3, 2, rngs=rngs)
        self.position_embeddings = Frozen(sinusoids(c.max_positions, c.width), out_sharding=(None, "embed"))
        layers = [WhisperEncoderLayer(c, rngs=rngs) for _ in range(c.num_layers)]
        self.layers = stack_layers(layers) if scan_layers else nnx.List(layers)
        self.final_norm = LayerNorm(c.width, eps=WHISPER_LAYER_NORM_EPS, rngs=rngs, param_type=Frozen)

    def __call__(self, mel_btm: jax.Array, hidden_layer: int | None = None) -> jax.Array:
        """mel (batch, mel_frames, num_mel_bins) -> (batch, ceil(mel_frames / 2), width).

        `hidden_layer`: which hidden state to return (transformers' numbering, negative from the end;
        layers after it are not run); None: the last one, after the final LayerNorm.
        """
        stop = resolve_hidden_layer(hidden_layer, self.config.num_layers)
        if stop is None:
            stop = self.config.num_layers
        x = gelu(self.conv1(mel_btm))
        x = gelu(self.conv2(x))
        frames = x.shape[1]
        if frames > self.config.max_positions:
            raise ValueError(
                f"{frames} encoder frames exceed Whisper's {self.config.max_positions} positions (30 s); "
                "use shorter audio or windowed encoding"
            )
        x = x + self.position_embeddings[...][:frames].astype(x.dtype)
        if self.scan_layers:
            x, _ = scan_layers(
                self.layers,
                lambda layer, x, _: (layer(x), None),
                x,
                remat_policy=self.remat_policy,
                stop=stop,
            )
        for layer in [] if self.scan_layers else list(self.layers)[:stop]:
            x = remat_call(layer, self.remat_policy, x)
        return self.final_norm(x) if stop == self.config.num_layers else x


class WhisperAudioTower(nnx.Module):
    """Waveform -> Whisper log-mel -> frozen Whisper encoder, with a mask of real-audio frames.

    The log-mel is computed on device, inside the jitted step. `hidden_layer` picks the hidden state
    that feeds the Q-Former (see `WhisperEncoder`; None: the encoder's output).
    """

    def __init__(
        self,
        config: WhisperEncoderConfig,
        *,
        rngs: nnx.Rngs,
        hidden_layer: int | None = None,
        scan_layers: bool = False,
        remat_policy: str = "none",
        compute_dtype: str = "float32",
    ):
        """scan_layers, remat_policy: see `WhisperEncoder`; compute_dtype: the matmul input dtype
        (`slit.models.layers.compute_dtype_scope`)."""
        resolve_hidden_layer(hidden_layer, config.num_layers)  # fail early on a bad index
        self.encoder = WhisperEncoder(config, rngs=rngs, scan_layers=scan_layers, remat_policy=remat_policy)
        self.hidden_layer = hidden_layer
        self.compute_dtype = compute_dtype

    @property
    def width(self) -> int:
        return self.encoder.config.width

    def __call__(self, waveform_bs: jax.Array, num_samples_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes zero-padded 16 kHz waveforms.

        Args:
          waveform_bs: (batch, samples) float32 in [-1, 1], zero-padded after each clip.
          num_samples_b: (batch,) int, the true length of each clip in samples.

        Returns:
          features (batch, frames, width) and a bool mask (batch, frames) of frames with real audio.
        """
        mel = frontend.log_mel_spectrogram(waveform_bs, num_mel_bins=self.encoder.config.num_mel_bins)
        with compute_dtype_scope(self.compute_dtype):
            features = self.encoder(mel, self.hidden_layer)
        mask = frontend.frame_mask(num_samples_b, mel.shape[1], downsample=2)
        return features, mask[:, : features.shape[1]]
