"""Pengi's released weights (microsoft/Pengi, `base.pth`) -> the parts slit loads.

Input: the checkpoint's state dict as safetensors, which `slit convert-torch base.pth base.safetensors`
writes (the `PENGI` module's names; a DataParallel `module.` prefix is dropped). `import_pengi` writes:

- `clap/`: a transformers `ClapAudioModel` directory (config.json, model.safetensors,
  preprocessor_config.json) for `audio_encoder.kind=htsat`;
- `clip/`: a transformers `CLIPTextModelWithProjection` directory for `bridge.prompt_encoder=clip`;
- `gpt2/`: a transformers `GPT2LMHeadModel` directory for `llm.kind=hf`;
- `bridge.safetensors` (the bridge's trainable weights in slit's names, for `bridge.init`) and
  `bridge.json` (its sizes);
- `pengi.json`: what was written, what was skipped, and the `slit train` overrides that use it.

Names (Pengi -> written):

    audio_encoder.base.htsat.X         -> clap/ audio_encoder.X, with
        bn0                            -> batch_norm
        layers.i.blocks.j.norm1 / norm2 -> layers.i.blocks.j.layernorm_before / layernorm_after
        layers.i.blocks.j.attn.qkv     -> ...attention.self.{query,key,value} (rows [q; k; v]: Pengi
                                          reshapes the qkv output to (..., 3, heads, head_dim))
        layers.i.blocks.j.attn.relative_position_{bias_table,index} -> ...attention.self.same
        layers.i.blocks.j.attn.proj    -> ...attention.output.dense
        layers.i.blocks.j.mlp.fc1 / fc2 -> ...intermediate.dense / output.dense
        patch_embed.*, layers.i.downsample.*, norm.* -> same names
    audio_encoder.projection.{linear1, linear2, layer_norm} -> bridge audio_projection.{linear1,
                                          linear2, norm} (kernels transposed to (in, out); weight -> scale)
    caption_encoder.base.X             -> clip/ text_model.X (transformers' CLIPTextTransformer names)
    caption_encoder.clip_text_projection.weight -> clip/ text_projection.weight
    caption_encoder.projection.*       -> bridge prompt_projection.*
    caption_decoder.gpt.X              -> gpt2/ X (GPT2LMHeadModel names)
    caption_decoder.{audio,text}_project.* -> bridge {audio,prompt}_mapper.*:
        linear, prefix_const           -> linear (transposed), prefix_const
        transformer.layers.N.norm1 / norm2 -> layers.N.norm1 / norm2
        transformer.layers.N.attn.to_queries -> layers.N.query
        transformer.layers.N.attn.to_keys_values -> layers.N.key (rows [:D]), layers.N.value (rows [D:]):
                                          Pengi reshapes its output to (..., 2, heads, head_dim)
        transformer.layers.N.attn.project -> layers.N.output
        transformer.layers.N.mlp.fc1 / fc2 -> layers.N.fc1 / fc2

Deliberately skipped: HTSAT's token-semantic head (`tscam_conv`, `head`: transformers' ClapAudioModel
has no classification head, and Pengi uses the pooled latent only), its shifted-window `attn_mask`
buffers (transformers rebuilds them), torchlibrosa's frontend constants (`spectrogram_extractor.stft.conv_*`
DFT kernels and `logmel_extractor.melW`, checked against the frontend written to preprocessor_config.json
and reported); CLIP's `position_ids` buffer; GPT-2's
`attn.bias` / `attn.masked_bias` causal-mask buffers and `lm_head.weight` when it equals the token
embedding (tied). Any other tensor, a missing one or a misshapen one is a `UserError` naming it.

Sizes are read off the tensors. Not in any shape: attention heads. The mapper has 8 (Pengi's
`TransformerMapper` builds `Transformer(dim_embedding, 8, ...)`); CLIP's text tower and GPT-2 get
width / 64 (every released size has 64-wide heads) unless the tokenizer directory given for them holds a
config.json of that model, whose head count and special-token ids are then used.

The frontend: Pengi's configs/base.yml declares 44.1 kHz audio, 7 s clips, a 1024-sample Hann window,
hop 320, 64 mels from 50 Hz to 8 kHz, and torchlibrosa's log-mel (librosa's Slaney mel scale and area
normalisation, power to dB with ref 1.0, amin 1e-10, no top_db). That is `ClapFeatureExtractor` with
truncation "rand_trunc" (its Slaney filter bank; longer clips cropped at random as Pengi's loader does)
and padding "repeat" (a shorter clip tiled and cut, as Pengi's loader does). But Pengi's `HTSATWrapper`
builds its torchlibrosa extractor from models/config.py (32 kHz, 50 Hz-14 kHz), not from base.yml, so the
released filter bank may be the 32 kHz one applied to 44.1 kHz audio. The checkpoint's `melW` is
compared with both and the result reported (`frontend` in pengi.json). When it is the 32 kHz bank, the
written preprocessor_config.json says so (`frequency_min`/`frequency_max` 50/14000 and slit's own key
`slit_mel_sample_rate` 32000), so that slit's CLAP frontend applies the same filters to the 44.1 kHz audio;
transformers' ClapFeatureExtractor has no such setting and ignores the key.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
import shutil
from collections.abc import Callable

import numpy as np

from slit.errors import UserError
from slit.models.llm.loading import read_json

__all__ = ["MAPPER_HEADS", "PengiFrontend", "PengiImport", "import_pengi", "read_pengi_state_dict"]

MAPPER_HEADS = 8  # TransformerMapper: Transformer(dim_embedding, 8, num_layers)
HEAD_WIDTH = 64  # CLIP text and GPT-2: 64-wide attention heads in every released size
PROMPT_TOKENS = 40  # configs/base.yml dataset_config.enc_text_len: CLIP tokens of the prompt
HTSAT = "audio_encoder.base.htsat."
CLIP = "caption_encoder.base."
GPT2 = "caption_decoder.gpt."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
EOS_TEXT = "<|endoftext|>"  # CLIP's and GPT-2's end-of-text token


@dataclasses.dataclass(frozen=True)
class PengiFrontend:
    """Pengi's log-mel as configs/base.yml declares it (torchlibrosa's, on 44.1 kHz audio, 7 s clips)."""

    sample_rate: int = 44100
    n_fft: int = 1024
    hop_length: int = 320
    num_mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 8000.0
    max_length_s: int = 7

    def extractor_config(self) -> dict:
        """preprocessor_config.json of a transformers `ClapFeatureExtractor` with these settings."""
        return {
            "feature_extractor_type": "ClapFeatureExtractor",
            "feature_size": self.num_mel_bins,
            "sampling_rate": self.sample_rate,
            "fft_window_size": self.n_fft,
            "hop_length": self.hop_length,
            "frequency_min": self.fmin,
            "frequency_max": self.fmax,
            "max_length_s": self.max_length_s,
            "truncation": "rand_trunc",  # Slaney mel + Slaney norm (librosa's, torchlibrosa's); random crop
            "padding": "repeat",  # tile a shorter clip and cut it, as Pengi's loader does
            "padding_value": 0.0,
            "return_attention_mask": False,
            "top_db": None,
        }


HTSAT_32K = dict(sample_rate=32000, fmin=50.0, fmax=14000.0)  # Pengi's models/config.py


@dataclasses.dataclass
class PengiImport:
    """What `import_pengi` wrote: `sizes` (bridge.json), `overrides` (for `slit train`), `skipped` (the
    deliberately unused tensors), `frontend` (the melW check), `notes` (tokenizers and such)."""

    out: pathlib.Path
    sizes: dict
    overrides: dict[str, str]
    skipped: list[str]
    frontend: str
    notes: list[str]

    def summary(self) -> str:
        """Lines for people: what was written, the frontend check, the override flags."""
        lines = [
            f"wrote {self.out}/clap (HTSAT, ClapAudioModel), {self.out}/clip (CLIPTextModelWithProjection), "
            f"{self.out}/gpt2 (GPT2LMHeadModel), {self.out}/bridge.safetensors + bridge.json, "
            f"{self.out}/pengi.json",
            "bridge: " + ", ".join(f"{k}={v}" for k, v in self.sizes.items()),
            f"skipped {len(self.skipped)} tensors on purpose (listed in pengi.json)",
            f"frontend: {self.frontend}",
            *self.notes,
            "train with:",
            "  slit train --config configs/stage2_synthetic.py --workdir RUN \\",
            "    " + " \\\n    ".join(override_flags(self.overrides)),
            *(
                [
                    "or, with configs/pengi_gpt2.py (Pengi's sizes and settings at paper scale):",
                    "  slit train --config configs/pengi_gpt2.py --workdir RUN \\",
                    "    " + " \\\n    ".join(override_flags(paper_scale_overrides(self.overrides))),
                ]
                if published_sizes(self.sizes)
                else []
            ),
            "(slit eval --workdir RUN --data NAME reads these from the run's config)",
        ]
        return "\n".join(lines)


def published_sizes(sizes: dict) -> bool:
    """Whether the bridge has Pengi's published sizes (those configs/pengi_gpt2.py sets)."""
    published = {"projection_width": 1024, "prefix_length": 40, "clip_length": 40, "mapper_layers": 4}
    return all(sizes.get(k) == v for k, v in published.items()) and sizes.get("mapper_mlp_ratio") == 2.0


def paper_scale_overrides(overrides: dict[str, str]) -> dict[str, str]:
    """The overrides configs/pengi_gpt2.py still needs: the three directories and bridge.init."""
    keys = ("audio_encoder.path", "bridge.prompt_encoder_path", "llm.path", "bridge.init")
    return {k: overrides[k] for k in keys}


def override_flags(overrides: dict[str, str]) -> list[str]:
    """`--config.key=value` flags, values quoted for a POSIX shell where they need it."""
    return [f"--config.{k}={shlex.quote(v)}" for k, v in overrides.items()]


def read_pengi_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, a `module.` prefix every name has removed. Refuses pickles."""
    path = pathlib.Path(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise UserError(
            f"{path}: a PyTorch pickle; convert it first: "
            f"slit convert-torch {path} {path.with_suffix('.safetensors')}"
        )
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    from slit.models.llm.loading import read_safetensors_file

    tensors = read_safetensors_file(path)
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return {
        k: np.asarray(v, np.float32) if v.dtype.kind == "f" else np.asarray(v) for k, v in tensors.items()
    }


class _Source:
    """The state dict, consumed key by key: `take` names a missing or misshapen key in a UserError."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors
        self.used: set[str] = set()
        self.skipped: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
        if key not in self.tensors:
            raise UserError(f"Pengi checkpoint: missing tensor {key}")
        value = self.tensors[key]
        if shape is not None and (
            len(shape) != value.ndim
            or any(s is not None and s != d for s, d in zip(shape, value.shape, strict=True))
        ):
            want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
            raise UserError(f"Pengi checkpoint: {key} has shape {tuple(value.shape)}, expected {want}")
        self.used.add(key)
        return value

    def skip(self, key: str) -> None:
        self.used.add(key)
        self.skipped.append(key)

    def under(self, prefix: str) -> list[str]:
        return sorted(k for k in self.tensors if k.startswith(prefix))

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
            raise UserError(f"Pengi checkpoint: tensors this import does not know: {shown}")


def _count(source: _Source, prefix: str, pattern: str) -> int:
    """How many consecutive indices i have a key starting with prefix + pattern.format(i)."""
    n = 0
    while any(k.startswith(prefix + pattern.format(n)) for k in source.tensors):
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------
# HTSAT -> transformers ClapAudioModel.

_HTSAT_BLOCK = {  # Pengi name in a Swin block -> transformers' (both under layers.i.blocks.j.)
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "attn.relative_position_index": "attention.self.relative_position_index",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def _htsat(source: _Source, frontend: PengiFrontend) -> tuple[dict, dict[str, np.ndarray], str, dict]:
    """(ClapAudioConfig dict, ClapAudioModel tensors, the frontend check in words, the preprocessor_config
    changes that reproduce the checkpoint's filter bank)."""
    p = HTSAT
    out: dict[str, np.ndarray] = {}
    mels = source.take(p + "bn0.weight", (None,)).shape[0]
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[f"audio_encoder.batch_norm.{name}"] = source.take(p + f"bn0.{name}", (mels,))
    if source.has(p + "bn0.num_batches_tracked"):
        out["audio_encoder.batch_norm.num_batches_tracked"] = source.take(p + "bn0.num_batches_tracked")
    proj = source.take(p + "patch_embed.proj.weight", (None, 1, None, None))
    width, patch = proj.shape[0], proj.shape[2]
    out["audio_encoder.patch_embed.proj.weight"] = proj
    out["audio_encoder.patch_embed.proj.bias"] = source.take(p + "patch_embed.proj.bias", (width,))
    patch_norm = source.has(p + "patch_embed.norm.weight")
    if patch_norm:
        for name in ("weight", "bias"):
            out[f"audio_encoder.patch_embed.norm.{name}"] = source.take(
                p + f"patch_embed.norm.{name}", (width,)
            )
    stages = _count(source, p, "layers.{}.")
    if stages < 1:
        raise UserError(f"Pengi checkpoint: missing tensor {p}layers.0.blocks.0.norm1.weight")
    depths, heads, window, spec_size, mlp_ratio = [], [], None, None, None
    qkv_bias = source.has(p + "layers.0.blocks.0.attn.qkv.bias")
    dim = width
    for i in range(stages):
        depth = _count(source, p, f"layers.{i}.blocks.{{}}.")
        depths.append(depth)
        for j in range(depth):
            src, dst = f"{p}layers.{i}.blocks.{j}.", f"audio_encoder.layers.{i}.blocks.{j}."
            table = source.take(src + "attn.relative_position_bias_table", (None, None))
            if j == 0:
                heads.append(table.shape[1])
                if i == 0:
                    window = (int(round(np.sqrt(table.shape[0]))) + 1) // 2
            for a, b in _HTSAT_BLOCK.items():
                if a.startswith("attn.relative"):
                    if source.has(src + a) or a.endswith("table"):  # (the index: transformers rebuilds it)
                        out[dst + b] = source.take(src + a)
                    continue
                for kind in ("weight", "bias"):
                    out[f"{dst}{b}.{kind}"] = source.take(f"{src}{a}.{kind}")
            hidden = out[dst + "intermediate.dense.weight"].shape[0]
            mlp_ratio = hidden / dim
            qkv = source.take(src + "attn.qkv.weight", (3 * dim, dim))
            for k, name in enumerate(("query", "key", "value")):
                out[f"{dst}attention.self.{name}.weight"] = qkv[k * dim : (k + 1) * dim]
            if qkv_bias:
                qkv_b = source.take(src + "attn.qkv.bias", (3 * dim,))
                for k, name in enumerate(("query", "key", "value")):
                    out[f"{dst}attention.self.{name}.bias"] = qkv_b[k * dim : (k + 1) * dim]
            if source.has(src + "attn_mask"):  # (windows, w*w, w*w): windows = (resolution / w) ** 2
                mask = source.tensors[src + "attn_mask"]
                if spec_size is None and mask.ndim == 3:
                    side = int(round(np.sqrt(mask.shape[0]))) * int(round(np.sqrt(mask.shape[1])))
                    spec_size = side * (2**i) * patch
                source.skip(src + "attn_mask")
        if source.has(f"{p}layers.{i}.downsample.reduction.weight"):
            out[f"audio_encoder.layers.{i}.downsample.reduction.weight"] = source.take(
                f"{p}layers.{i}.downsample.reduction.weight", (2 * dim, 4 * dim)
            )
            for kind in ("weight", "bias"):
                out[f"audio_encoder.layers.{i}.downsample.norm.{kind}"] = source.take(
                    f"{p}layers.{i}.downsample.norm.{kind}", (4 * dim,)
                )
            dim *= 2
    for kind in ("weight", "bias"):
        out[f"audio_encoder.norm.{kind}"] = source.take(f"{p}norm.{kind}", (dim,))
    for key in source.under(p + "tscam_conv.") + source.under(p + "head."):
        source.skip(key)  # the classification head: transformers' ClapAudioModel has none
    check, filters = _check_frontend(source, frontend, mels)
    config = {
        "model_type": "clap_audio_model",
        "architectures": ["ClapAudioModel"],
        "spec_size": int(spec_size or 256),
        "num_mel_bins": int(mels),
        "window_size": int(window),
        "patch_size": int(patch),
        "patch_stride": [int(patch), int(patch)],
        "patch_embeds_hidden_size": int(width),
        "hidden_size": int(dim),
        "depths": depths,
        "num_attention_heads": heads,
        "mlp_ratio": float(mlp_ratio),
        "qkv_bias": bool(qkv_bias),
        "enable_patch_layer_norm": bool(patch_norm),
        "enable_fusion": False,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "drop_path_rate": 0.1,  # Pengi's HTSAT default (stochastic depth in training only)
        "hidden_dropout_prob": 0.0,  # Pengi's drop_rate (transformers' default is 0.1)
        "attention_probs_dropout_prob": 0.0,
    }
    return config, out, check, filters


def _check_frontend(source: _Source, frontend: PengiFrontend, mels: int) -> tuple[str, dict]:
    """Skips torchlibrosa's constants after checking their sizes, and says which filter bank melW is:
    (words, the preprocessor_config.json changes that make slit's frontend apply that bank)."""
    from slit.models.audio.clap_frontend import ClapFrontendConfig, clap_mel_filters

    bins = frontend.n_fft // 2 + 1
    if frontend.num_mel_bins != mels:
        raise UserError(
            f"Pengi checkpoint: bn0 has {mels} mel bins; the frontend has {frontend.num_mel_bins}"
        )
    for part in ("conv_real", "conv_imag"):
        key = f"{HTSAT}spectrogram_extractor.stft.{part}.weight"
        if source.has(key):
            source.take(key, (bins, 1, frontend.n_fft))
            source.skip(key)
    key = HTSAT + "logmel_extractor.melW"
    if not source.has(key):
        return "no melW in the checkpoint: not checked", {}
    mel_w = source.take(key, (bins, mels)).astype(np.float64)
    source.skip(key)
    candidates = {
        f"{frontend.sample_rate} Hz, {frontend.fmin:g}-{frontend.fmax:g} Hz (configs/base.yml)": {},
        "32000 Hz, 50-14000 Hz (models/config.py)": HTSAT_32K,
    }
    scale = max(float(np.abs(mel_w).max()), 1e-12)
    for words, change in candidates.items():
        fields = dataclasses.asdict(frontend) | change
        config = ClapFrontendConfig(
            sample_rate=int(fields["sample_rate"]),
            n_fft=frontend.n_fft,
            hop_length=frontend.hop_length,
            num_mel_bins=mels,
            fmin=float(fields["fmin"]),
            fmax=float(fields["fmax"]),
            max_length_s=frontend.max_length_s,
            truncation="rand_trunc",
        )
        if np.abs(clap_mel_filters(config) - mel_w).max() <= 1e-4 * scale:
            if change:
                design = {
                    "frequency_min": float(fields["fmin"]),
                    "frequency_max": float(fields["fmax"]),
                    "slit_mel_sample_rate": int(fields["sample_rate"]),
                }
                return (
                    f"melW is librosa's Slaney filter bank for {words}, applied by Pengi to "
                    f"{frontend.sample_rate} Hz audio (bands at 44.1/32 of those frequencies); "
                    "preprocessor_config.json says so (slit_mel_sample_rate), so slit's frontend applies "
                    "the same bank; transformers' ClapFeatureExtractor does not read that key"
                ), design
            return f"melW equals the preprocessor_config.json filter bank ({words})", {}
    return (
        "melW matches neither 44.1 kHz 50-8000 Hz nor 32 kHz 50-14000 Hz Slaney filters: check the frontend"
    ), {}


# ---------------------------------------------------------------------------------------------------------
# CLIP's text tower and GPT-2.


def _tokenizer_model_config(directory: pathlib.Path | None, model_type: str) -> dict:
    """The `model_type` config.json in the tokenizer directory (a CLIPModel's `text_config`), or {}."""
    if directory is None or not (directory / "config.json").is_file():
        return {}
    config = read_json(directory / "config.json")
    if config.get("model_type") == "clip":
        return config.get("text_config") or {}
    return config if config.get("model_type") in (model_type, "clip_text_model") else {}


def _eos_id(directory: pathlib.Path | None) -> int | None:
    """The id of `<|endoftext|>` in the directory's tokenizer.json, if it has one."""
    if directory is None or not (directory / "tokenizer.json").is_file():
        return None
    data = read_json(directory / "tokenizer.json")
    for token in data.get("added_tokens", []):
        if token.get("content") == EOS_TEXT:
            return int(token["id"])
    vocab = (data.get("model") or {}).get("vocab")
    return int(vocab[EOS_TEXT]) if isinstance(vocab, dict) and EOS_TEXT in vocab else None


def _clip(source: _Source, tokenizer: pathlib.Path | None) -> tuple[dict, dict[str, np.ndarray]]:
    """(CLIPTextConfig dict, CLIPTextModelWithProjection tensors)."""
    vocab, width = source.take(CLIP + "embeddings.token_embedding.weight", (None, None)).shape
    positions = source.take(CLIP + "embeddings.position_embedding.weight", (None, width)).shape[0]
    layers = _count(source, CLIP, "encoder.layers.{}.")
    hidden = source.take(CLIP + "encoder.layers.0.mlp.fc1.weight", (None, width)).shape[0]
    projection = source.take("caption_encoder.clip_text_projection.weight", (None, width))
    out = {"text_projection.weight": projection}
    for key in source.under(CLIP):
        if key == CLIP + "embeddings.position_ids":
            source.skip(key)
            continue
        out["text_model." + key[len(CLIP) :]] = source.take(key)
    given = _tokenizer_model_config(tokenizer, "clip_text_model")
    eos = _eos_id(tokenizer)
    config = {
        "model_type": "clip_text_model",
        "architectures": ["CLIPTextModelWithProjection"],
        "vocab_size": int(vocab),
        "hidden_size": int(width),
        "intermediate_size": int(hidden),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(given.get("num_attention_heads", max(1, width // HEAD_WIDTH))),
        "max_position_embeddings": int(positions),
        "projection_dim": int(projection.shape[0]),
        "hidden_act": given.get("hidden_act", "quick_gelu"),
        "layer_norm_eps": float(given.get("layer_norm_eps", 1e-5)),
        # (2: transformers' legacy pooling at the highest id, which is <|endoftext|> in CLIP's vocabulary)
        "eos_token_id": int(given.get("eos_token_id", 2 if eos is None else eos)),
        "bos_token_id": int(given.get("bos_token_id", 0)),
        "pad_token_id": int(given.get("pad_token_id", 1)),
    }
    return config, out


def _gpt2(source: _Source, tokenizer: pathlib.Path | None) -> tuple[dict, dict[str, np.ndarray]]:
    """(GPT2Config dict, GPT2LMHeadModel tensors)."""
    vocab, width = source.take(GPT2 + "transformer.wte.weight", (None, None)).shape
    positions = source.take(GPT2 + "transformer.wpe.weight", (None, width)).shape[0]
    layers = _count(source, GPT2, "transformer.h.{}.")
    inner = source.take(GPT2 + "transformer.h.0.mlp.c_fc.weight", (width, None)).shape[1]
    out: dict[str, np.ndarray] = {}
    tied = True
    for key in source.under(GPT2):
        name = key[len(GPT2) :]
        if re.fullmatch(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)", name):
            source.skip(key)  # the causal mask buffers of older transformers
        elif name == "lm_head.weight":
            head = source.take(key, (vocab, width))
            tied = bool(np.array_equal(head, source.tensors[GPT2 + "transformer.wte.weight"]))
            if tied:
                source.skip(key)
            else:
                out[name] = head
        else:
            out[name] = source.take(key)
    given = _tokenizer_model_config(tokenizer, "gpt2")
    eos = _eos_id(tokenizer)
    eos = int(given.get("eos_token_id", 50256 if eos is None else eos))
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": int(vocab),
        "n_positions": int(positions),
        "n_embd": int(width),
        "n_layer": int(layers),
        "n_head": int(given.get("n_head", max(1, width // HEAD_WIDTH))),
        "n_inner": None if inner == 4 * width else int(inner),
        "activation_function": given.get("activation_function", "gelu_new"),
        "layer_norm_epsilon": float(given.get("layer_norm_epsilon", 1e-5)),
        "bos_token_id": int(given.get("bos_token_id", eos)),
        "eos_token_id": eos,
        "tie_word_embeddings": tied,
    }
    return config, out


# ---------------------------------------------------------------------------------------------------------
# The bridge.


def _projection(source: _Source, prefix: str, dst: str, width: int) -> tuple[int, dict[str, np.ndarray]]:
    """Pengi's `Projection` at `prefix` -> slit's (`dst`): (output width, tensors)."""
    w1 = source.take(prefix + "linear1.weight", (None, width))
    out_width = w1.shape[0]
    return out_width, {
        f"{dst}.linear1.kernel": w1.T,
        f"{dst}.linear2.kernel": source.take(prefix + "linear2.weight", (out_width, out_width)).T,
        f"{dst}.norm.scale": source.take(prefix + "layer_norm.weight", (out_width,)),
        f"{dst}.norm.bias": source.take(prefix + "layer_norm.bias", (out_width,)),
    }


def _mapper(source: _Source, prefix: str, dst: str, projection: int, width: int) -> tuple[dict, dict]:
    """Pengi's `TransformerMapper` at `prefix` -> slit's `PrefixMapper` (`dst`): (sizes, tensors)."""
    linear = source.take(prefix + "linear.weight", (None, projection))
    if linear.shape[0] % width:
        raise UserError(
            f"Pengi checkpoint: {prefix}linear.weight has {linear.shape[0]} rows, not a multiple of {width}"
        )
    out = {
        f"{dst}.linear.kernel": linear.T,
        f"{dst}.linear.bias": source.take(prefix + "linear.bias", (linear.shape[0],)),
        f"{dst}.prefix_const": source.take(prefix + "prefix_const", (None, width)),
    }
    t = prefix + "transformer.layers."
    layers = _count(source, t, "{}.")
    if layers < 1:
        raise UserError(f"Pengi checkpoint: missing tensor {t}0.norm1.weight")
    hidden = source.take(f"{t}0.mlp.fc1.weight", (None, width)).shape[0]
    for n in range(layers):
        src, d = f"{t}{n}.", f"{dst}.layers.{n}."
        for norm in ("norm1", "norm2"):
            out[d + norm + ".scale"] = source.take(f"{src}{norm}.weight", (width,))
            out[d + norm + ".bias"] = source.take(f"{src}{norm}.bias", (width,))
        out[d + "query.kernel"] = source.take(src + "attn.to_queries.weight", (width, width)).T
        kv = source.take(src + "attn.to_keys_values.weight", (2 * width, width))
        out[d + "key.kernel"], out[d + "value.kernel"] = kv[:width].T, kv[width:].T
        out[d + "output.kernel"] = source.take(src + "attn.project.weight", (width, width)).T
        out[d + "output.bias"] = source.take(src + "attn.project.bias", (width,))
        out[d + "fc1.kernel"] = source.take(src + "mlp.fc1.weight", (hidden, width)).T
        out[d + "fc1.bias"] = source.take(src + "mlp.fc1.bias", (hidden,))
        out[d + "fc2.kernel"] = source.take(src + "mlp.fc2.weight", (width, hidden)).T
        out[d + "fc2.bias"] = source.take(src + "mlp.fc2.bias", (width,))
    sizes = {
        "prefix_length": int(out[f"{dst}.prefix_const"].shape[0]),
        "clip_length": int(linear.shape[0] // width),
        "mapper_layers": int(layers),
        "mapper_mlp_ratio": hidden / width,
    }
    return sizes, out


def _bridge(source: _Source, encoder_width: int, prompt_width: int, llm_width: int) -> tuple[dict, dict]:
    """(bridge.json sizes, bridge tensors in slit's names, '.'-joined)."""
    width, out = _projection(source, "audio_encoder.projection.", "audio_projection", encoder_width)
    prompt_out, tensors = _projection(
        source, "caption_encoder.projection.", "prompt_projection", prompt_width
    )
    out |= tensors
    if prompt_out != width:
        raise UserError(
            f"Pengi checkpoint: caption_encoder.projection.linear1.weight maps to {prompt_out}, "
            f"audio_encoder.projection to {width}"
        )
    audio_sizes, tensors = _mapper(source, "caption_decoder.audio_project.", "audio_mapper", width, llm_width)
    out |= tensors
    prompt_sizes, tensors = _mapper(
        source, "caption_decoder.text_project.", "prompt_mapper", width, llm_width
    )
    out |= tensors
    if prompt_sizes != audio_sizes:
        raise UserError(f"Pengi checkpoint: the mappers differ in size: {audio_sizes} vs {prompt_sizes}")
    sizes = {
        "kind": "pengi",
        "projection_width": int(width),
        **audio_sizes,
        "mapper_heads": MAPPER_HEADS,
        "encoder_width": int(encoder_width),
        "prompt_width": int(prompt_width),
        "llm_width": int(llm_width),
    }
    if llm_width % MAPPER_HEADS:
        raise UserError(
            f"Pengi checkpoint: GPT-2 width {llm_width} is not a multiple of {MAPPER_HEADS} heads"
        )
    return sizes, out


# ---------------------------------------------------------------------------------------------------------
# Writing.


def _save(directory: pathlib.Path, config: dict, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        {k: np.array(v, order="C") for k, v in tensors.items()},  # (0-d stays 0-d)
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},  # (transformers' from_pretrained expects it)
    )


def _copy_tokenizer(src: pathlib.Path | None, dst: pathlib.Path, what: str, flag: str) -> str:
    """Copies the tokenizer files of `src` into `dst`; returns a note for people."""
    if src is None:
        return (
            f"{dst} has no tokenizer: copy {what}'s tokenizer files (tokenizer.json ...) into it, or rerun "
            f"with {flag} DIR"
        )
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{flag} {src}: no tokenizer.json in it")
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return f"{dst}: tokenizer from {src} ({', '.join(copied)})"


def import_pengi(
    src: str | pathlib.Path,
    out: str | pathlib.Path,
    clip_tokenizer: str | pathlib.Path | None = None,
    gpt2_tokenizer: str | pathlib.Path | None = None,
    frontend: PengiFrontend = PengiFrontend(),
    log: Callable[[str], None] | None = None,
) -> PengiImport:
    """Writes `out`/{clap, clip, gpt2, bridge.safetensors, bridge.json, pengi.json} from Pengi's state
    dict in safetensors `src` (module docstring). `frontend` is Pengi's declared log-mel (tests shrink it
    for tiny HTSATs). Raises UserError naming any missing, misshapen or unknown tensor."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out)
    clip_tok = pathlib.Path(clip_tokenizer) if clip_tokenizer else None
    gpt2_tok = pathlib.Path(gpt2_tokenizer) if gpt2_tokenizer else None
    source = _Source(read_pengi_state_dict(src))

    clap_config, clap, frontend_check, filters = _htsat(source, frontend)
    extractor = frontend.extractor_config() | filters
    clip_config, clip = _clip(source, clip_tok)
    gpt2_config, gpt2 = _gpt2(source, gpt2_tok)
    sizes, bridge = _bridge(
        source, clap_config["hidden_size"], clip_config["projection_dim"], gpt2_config["n_embd"]
    )
    source.check_all_used()

    out.mkdir(parents=True, exist_ok=True)
    _save(out / "clap", clap_config, clap)
    (out / "clap" / "preprocessor_config.json").write_text(json.dumps(extractor, indent=2) + "\n")
    _save(out / "clip", clip_config, clip)
    _save(out / "gpt2", gpt2_config, gpt2)
    notes = [
        _copy_tokenizer(clip_tok, out / "clip", "openai/clip-vit-base-patch16", "--clip-tokenizer"),
        _copy_tokenizer(gpt2_tok, out / "gpt2", "gpt2", "--gpt2-tokenizer"),
    ]
    save_file(
        {k: np.array(v, np.float32, order="C") for k, v in bridge.items()},
        str(out / "bridge.safetensors"),
        metadata={"source": pathlib.Path(src).name, "bridge": "pengi"},
    )
    (out / "bridge.json").write_text(json.dumps(sizes, indent=2) + "\n")
    overrides = {
        "audio_encoder.kind": "htsat",
        "audio_encoder.path": str(out / "clap"),
        "bridge.kind": "pengi",
        "bridge.prompt_encoder": "clip",
        "bridge.prompt_encoder_path": str(out / "clip"),
        "bridge.init": str(out / "bridge.safetensors"),
        **{f"bridge.{k}": str(sizes[k]) for k in ("projection_width", "prefix_length", "clip_length")},
        **{f"bridge.{k}": str(sizes[k]) for k in ("mapper_layers", "mapper_heads", "mapper_mlp_ratio")},
        "bridge.projection_dropout": "0.5",
        "llm.kind": "hf",
        "llm.path": str(out / "gpt2"),
        "llm.match_embedding_scale": "false",  # (bridge.init replaces the bridge anyway)
        "optimizer.lr_multipliers": "",  # the default names the Q-Former, which this bridge lacks
        "data.sample_rate": str(frontend.sample_rate),
        "data.max_seconds": str(float(frontend.max_length_s)),
        "data.max_qformer_instruction_length": str(
            min(PROMPT_TOKENS, clip_config["max_position_embeddings"])
        ),
    }
    result = PengiImport(out, sizes, overrides, sorted(source.skipped), frontend_check, notes)
    summary = {
        "source": str(src),
        "clap": {"config": clap_config, "frontend": extractor, "tensors": len(clap)},
        "clip": {"config": clip_config, "tensors": len(clip)},
        "gpt2": {"config": gpt2_config, "tensors": len(gpt2)},
        "bridge": {**sizes, "tensors": len(bridge)},
        "frontend": frontend_check,
        "notes": notes,
        "skipped": result.skipped,
        "overrides": overrides,
        "train_flags": override_flags(overrides),  # with configs/stage2_synthetic.py
        "pengi_gpt2_flags": override_flags(paper_scale_overrides(overrides))
        if published_sizes(sizes)
        else [],
    }
    (out / "pengi.json").write_text(json.dumps(summary, indent=2) + "\n")
    if log:
        log(result.summary())
    return result
