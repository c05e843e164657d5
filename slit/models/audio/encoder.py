"""The audio encoder component (frozen unless the config trains it), the same in both stages.

`AudioEncoderConfig` says everything that shapes the encoder: its architecture (Whisper, a
wav2vec2-family model or CLAP's HTSAT, chosen by the type of `arch`), which hidden state feeds the
bridge, windowed encoding, and the wav2vec2 options. `make_audio_tower` builds the tower it describes and
`encode_audio` runs it, window by window when asked (SALMONN-style). Weights are loaded elsewhere
(slit.train.pretrained); this module reads no files.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from slit.models.audio.htsat import HTSATAudioTower, HTSATConfig
from slit.models.audio.wav2vec2 import Wav2Vec2AudioTower, Wav2Vec2Config
from slit.models.audio.whisper import WhisperAudioTower, WhisperEncoderConfig
from slit.models.layers import COMPUTE_DTYPES, REMAT_POLICIES, unfreeze

AudioTower = WhisperAudioTower | Wav2Vec2AudioTower | HTSATAudioTower


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """The frozen audio encoder.

    arch: the encoder's architecture (Whisper, wav2vec2-family: wav2vec2, HuBERT, data2vec-audio, or
      CLAP's HTSAT, which takes no hidden_layer).
    hidden_layer: its hidden state that feeds the bridge (transformers' numbering; None: the output).
    window_samples: > 0: encode audio in windows of this many samples (0: the whole clip at once).
    normalize, mask_padding: wav2vec2-family options (see `Wav2Vec2AudioTower`).
    weights: where pretrained weights come from (`kind:path`, slit.train.pretrained; "": random, made
      from the run's seed). The model never reads it; it keys the frozen weights' identity.
    trainable: the encoder's weights are `nnx.Param`s and train with the bridge (`audio_encoder.trainable`);
      by default they are `Frozen` and no gradient reaches them.
    scan_layers: the transformer layers are stored stacked and run by one `jax.lax.scan` (Whisper and the
      wav2vec2 family; `audio_encoder.scan_layers`): compiled once for all layers.
    remat_policy: rematerialise each layer's activations in the backward pass (`audio_encoder.remat_policy`,
      slit.models.layers.REMAT_POLICIES); matters when the encoder trains.
    compute_dtype: the matmul input dtype (the top-level `compute_dtype`; float32 accumulation).
    """

    arch: WhisperEncoderConfig | Wav2Vec2Config | HTSATConfig
    hidden_layer: int | None = None
    window_samples: int = 0
    normalize: bool = True
    mask_padding: bool = True
    weights: str = ""
    trainable: bool = False
    scan_layers: bool = False
    remat_policy: str = "none"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"audio remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; choose one of {COMPUTE_DTYPES}")
        if self.scan_layers and isinstance(self.arch, HTSATConfig):
            raise ValueError(
                "audio_encoder.scan_layers: the htsat encoder's Swin stages differ in width and shift, so "
                "its blocks are not scanned; use scan_layers=false (remat_policy applies)"
            )

    @property
    def width(self) -> int:
        """The width of the features the bridge reads."""
        return self.arch.width


def make_audio_tower(config: AudioEncoderConfig, rngs: nnx.Rngs) -> AudioTower:
    """The tower `config.arch` describes: waveform (B, S) -> features (B, F, D), mask (B, F); its weights
    are `Frozen`, or `nnx.Param`s with `config.trainable`."""
    levers = dict(remat_policy=config.remat_policy, compute_dtype=config.compute_dtype)
    if isinstance(config.arch, Wav2Vec2Config):
        tower = Wav2Vec2AudioTower(
            config.arch,
            rngs=rngs,
            hidden_layer=config.hidden_layer,
            normalize=config.normalize,
            mask_padding=config.mask_padding,
            scan_layers=config.scan_layers,
            **levers,
        )
    elif isinstance(config.arch, HTSATConfig):
        tower = HTSATAudioTower(config.arch, rngs=rngs, hidden_layer=config.hidden_layer, **levers)
    else:
        tower = WhisperAudioTower(
            config.arch, rngs=rngs, hidden_layer=config.hidden_layer, scan_layers=config.scan_layers, **levers
        )
    return unfreeze(tower) if config.trainable else tower


def window_lengths(num_samples_b: jax.Array, num_windows: int, window: int) -> jax.Array:
    """(B,) clip lengths -> (B, num_windows) samples of each clip in each window of `window` samples."""
    starts = jnp.arange(num_windows) * window
    return jnp.clip(num_samples_b[:, None] - starts[None, :], 0, window)


def encode_audio(
    tower: AudioTower, window: int, audio_bs: jax.Array, num_samples_b: jax.Array, trainable: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Encoder features (B, frames, D) and their mask (B, frames); no gradient flows back unless
    `trainable` (the tower's weights are then `nnx.Param`s).

    With `window` = W > 0 and S > W samples, the audio is zero-padded to K = ceil(S / W) windows; each
    window is encoded as a clip of its own (its length: the clip's samples inside it, possibly 0), and
    the K windows' frames and masks are concatenated along time: (B, K * F_W, D).
    """
    batch, samples = audio_bs.shape
    if not window or samples <= window:
        features, mask = tower(audio_bs, num_samples_b)
        return (features if trainable else jax.lax.stop_gradient(features)), mask
    count = -(-samples // window)
    padded = jnp.pad(audio_bs, ((0, 0), (0, count * window - samples)))
    lengths = window_lengths(num_samples_b, count, window)
    features, mask = tower(padded.reshape(batch * count, window), lengths.reshape(-1))
    features = features.reshape(batch, count * features.shape[1], features.shape[2])
    return (features if trainable else jax.lax.stop_gradient(features)), mask.reshape(batch, -1)
