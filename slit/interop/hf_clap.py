"""Hugging Face CLAP checkpoints -> slit's HTSAT audio encoder (slit.models.audio.htsat).

A `save_pretrained` directory of `ClapModel` (config.json `model_type` "clap", the audio settings under
`audio_config`), `ClapAudioModel` or `ClapAudioModelWithProjection` ("clap_audio_model"), with safetensors
weights (one file or shards; PyTorch pickles are refused). The feature extractor's settings come from
preprocessor_config.json (or the `feature_extractor` entry of processor_config.json); without either,
`ClapFeatureExtractor`'s defaults (48 kHz, n_fft 1024, hop 480, 64 mels, 0-14 kHz, 10 s, truncation
"fusion" i.e. HTK filters, padding "repeatpad"). Fusion models (`enable_fusion`) are refused.

Tensor layout (HF name under `audio_encoder.`, itself under `audio_model.` in the two larger models ->
slit path in `HTSATEncoder`; text tower, projections and logit scales are ignored):

    batch_norm.{weight, bias, running_mean, running_var}  -> batch_norm.{scale, bias}, folded:
        scale = w / sqrt(var + 1e-5), bias = b - mean * scale
    patch_embed.proj.{weight (C0, 1, p, p), bias}         -> patch_embed.{kernel (p, p, 1, C0), bias}
    patch_embed.norm                                      -> patch_embed.norm
    layers.{i}.blocks.{j}.layernorm_before / _after       -> stages.{i}.blocks.{j}.norm1 / norm2
    layers.{i}.blocks.{j}.attention.self.{query,key,value} -> stages.{i}.blocks.{j}.{query,key,value}
    layers.{i}.blocks.{j}.attention.self.relative_position_bias_table -> same name under the block
    layers.{i}.blocks.{j}.attention.output.dense          -> stages.{i}.blocks.{j}.out
    layers.{i}.blocks.{j}.intermediate.dense / output.dense -> stages.{i}.blocks.{j}.fc1 / fc2
    layers.{i}.downsample.{norm, reduction}               -> stages.{i}.downsample.{norm, reduction}
    norm                                                  -> norm

Linear weights (out, in) become (in, out) kernels. `relative_position_index` (a constant) and
`batch_norm.num_batches_tracked` are not read.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.typing import DTypeLike

from slit.errors import UserError
from slit.models.audio.clap_frontend import PADDING_MODES, TRUNCATION_MODES, ClapFrontendConfig
from slit.models.audio.htsat import HTSATConfig, HTSATEncoder
from slit.models.llm.loading import read_json

__all__ = [
    "clap_frontend_config_from_hf",
    "htsat_config_from_hf",
    "htsat_params_from_hf",
    "load_htsat",
    "read_frontend_config",
]

BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default
_ANCHOR = "audio_encoder.patch_embed.proj.weight"
_BLOCK = {
    "norm1": "layernorm_before",
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "out": "attention.output.dense",
    "norm2": "layernorm_after",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}

Params = dict[str, Any]


def clap_frontend_config_from_hf(
    options: Mapping[str, Any], *, source: str = "preprocessor_config.json"
) -> ClapFrontendConfig:
    """`ClapFrontendConfig` from a `ClapFeatureExtractor`'s saved settings (missing keys: its defaults)."""
    d = ClapFrontendConfig()
    truncation = options.get("truncation", d.truncation)
    padding = options.get("padding", d.padding)
    if truncation not in TRUNCATION_MODES:
        raise UserError(f"{source}: truncation {truncation!r} is not one of {list(TRUNCATION_MODES)}")
    if padding not in PADDING_MODES:
        raise UserError(f"{source}: padding {padding!r} is not one of {list(PADDING_MODES)}")
    try:
        return ClapFrontendConfig(
            sample_rate=int(options.get("sampling_rate", d.sample_rate)),
            n_fft=int(options.get("fft_window_size", d.n_fft)),
            hop_length=int(options.get("hop_length", d.hop_length)),
            num_mel_bins=int(options.get("feature_size", d.num_mel_bins)),
            fmin=float(options.get("frequency_min", d.fmin)),
            fmax=float(options.get("frequency_max", d.fmax)),
            max_length_s=int(options.get("max_length_s", d.max_length_s)),
            truncation=truncation,
            padding=padding,
            mel_sample_rate=int(options.get("slit_mel_sample_rate", 0) or 0),
        )
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


def read_frontend_config(directory: str | pathlib.Path) -> ClapFrontendConfig:
    """The directory's feature-extractor settings (module docstring), or the extractor's defaults."""
    directory = pathlib.Path(directory)
    path = directory / "preprocessor_config.json"
    if path.is_file():
        return clap_frontend_config_from_hf(read_json(path), source=str(path))
    path = directory / "processor_config.json"
    options = read_json(path).get("feature_extractor") if path.is_file() else None
    if isinstance(options, dict):
        return clap_frontend_config_from_hf(options, source=str(path))
    return ClapFrontendConfig()


def htsat_config_from_hf(
    hf_config: Mapping[str, Any],
    frontend: ClapFrontendConfig | None = None,
    *,
    source: str = "config.json",
) -> HTSATConfig:
    """`HTSATConfig` from a CLAP config.json (dict): `ClapConfig` ("clap") or `ClapAudioConfig`
    ("clap_audio_model"); `frontend`: the feature extractor's settings (default: its defaults).

    Raises:
      UserError: another model type, a fusion model, or settings slit does not implement, naming the field.
    """
    model_type = hf_config.get("model_type")
    if model_type == "clap":
        audio = hf_config.get("audio_config")
        if not isinstance(audio, Mapping):
            raise UserError(
                f"{source}: a 'clap' config without 'audio_config'; use the config.json saved with it"
            )
        where = f"{source} (audio_config)"
    elif model_type == "clap_audio_model":
        audio, where = hf_config, source
    else:
        raise UserError(
            f"{source}: model_type {model_type!r} is not a CLAP model; audio_encoder.kind=htsat takes a "
            "ClapModel, ClapAudioModel or ClapAudioModelWithProjection directory"
        )
    if audio.get("enable_fusion", False):
        raise UserError(
            f"{where}: enable_fusion=true (CLAP's fused HTSAT) is not supported; use an unfused model"
        )
    for name, want in (("patch_embed_input_channels", 1), ("flatten_patch_embeds", True)):
        if audio.get(name, want) != want:
            raise UserError(f"{where}: {name}={audio[name]!r} is not supported (only {want!r})")

    def pair(name: str, default: int) -> int:
        value = audio.get(name, default)
        if isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise UserError(f"{where}: non-square {name} {value} is not supported")
            value = value[0]
        return int(value)

    frontend = frontend or ClapFrontendConfig()
    try:
        return HTSATConfig(
            num_mel_bins=int(audio.get("num_mel_bins", 64)),
            spec_size=int(audio.get("spec_size", 256)),
            patch_size=pair("patch_size", 4),
            patch_stride=pair("patch_stride", 4),
            patch_embeds_hidden_size=int(audio.get("patch_embeds_hidden_size", 96)),
            enable_patch_layer_norm=bool(audio.get("enable_patch_layer_norm", True)),
            depths=tuple(int(d) for d in audio.get("depths", (2, 2, 6, 2))),
            num_attention_heads=tuple(int(h) for h in audio.get("num_attention_heads", (4, 8, 16, 32))),
            window_size=int(audio.get("window_size", 8)),
            mlp_ratio=float(audio.get("mlp_ratio", 4.0)),
            qkv_bias=bool(audio.get("qkv_bias", True)),
            hidden_act=str(audio.get("hidden_act", "gelu")),
            layer_norm_eps=float(audio.get("layer_norm_eps", 1e-5)),
            frontend=frontend,
        )
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def _prefix(tensors: Mapping[str, Any], source: str) -> str:
    found = sorted(k[: -len(_ANCHOR)] for k in tensors if k == _ANCHOR or k.endswith("." + _ANCHOR))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(
            f"{source}: no CLAP audio encoder: no tensor named {_ANCHOR!r} (or ending in it); first names: "
            f"{sorted(tensors)[:6]}. Point audio_encoder.path to a ClapModel / ClapAudioModel directory"
        )
    raise UserError(f"{source}: several CLAP audio encoders ({found}); keep one")


def _hf_name(module: tuple[str, ...]) -> str:
    """slit module path (under HTSATEncoder) -> HF module path (under `audio_encoder.`)."""
    if module[0] == "stages":
        i, rest = module[1], module[2:]
        if rest[0] == "blocks":
            return f"layers.{i}.blocks.{rest[1]}.{_BLOCK[rest[2]]}"
        return f"layers.{i}.downsample.{rest[1]}"
    if module == ("patch_embed",):
        return "patch_embed.proj"
    return ".".join(module)  # patch_embed.norm, norm


def htsat_params_from_hf(
    config: HTSATConfig,
    tensors: Mapping[str, Any],
    *,
    param_dtype: DTypeLike = jnp.float32,
    source: str = "the checkpoint",
) -> Params:
    """slit's pure-dict params of `HTSATEncoder(config)` from HF tensors (name -> array-like); the prefix
    (`audio_encoder.` or `audio_model.audio_encoder.`) is found from the patch embedding.

    Raises:
      UserError: naming the first missing tensor or shape mismatch (with the expected HF shape), or
        unexpected tensors under the prefix.
    """
    prefix = _prefix(tensors, source) + "audio_encoder."
    used = {prefix + "batch_norm.num_batches_tracked"}
    used |= {k for k in tensors if k.startswith(prefix) and k.endswith("relative_position_index")}

    def take(name: str, shape: tuple[int, ...], target: str) -> np.ndarray:
        key = prefix + name
        if key not in tensors:
            raise UserError(
                f"{source}: missing tensor {key!r} (shape {shape}, for slit {target!r}); the weights do not "
                f"match their config.json ({len(config.depths)} stages {config.depths}, patch width "
                f"{config.patch_embeds_hidden_size}): use the complete checkpoint saved with it"
            )
        used.add(key)
        value = np.asarray(tensors[key])
        if value.shape != shape:
            raise UserError(
                f"{source}: tensor {key!r} has shape {value.shape}, expected {shape} (for slit {target!r}); "
                "use the config.json saved with these weights"
            )
        return value.astype(np.float64)

    abstract = nnx.eval_shape(lambda: HTSATEncoder(config, rngs=nnx.Rngs(0)))
    targets = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))
    flat: dict[tuple[Any, ...], np.ndarray] = {}
    norm = {
        n: take(f"batch_norm.{n}", (config.num_mel_bins,), "batch_norm")
        for n in ("weight", "bias", "running_mean", "running_var")
    }
    scale = norm["weight"] / np.sqrt(norm["running_var"] + BATCH_NORM_EPS)
    flat[("batch_norm", "scale")] = scale
    flat[("batch_norm", "bias")] = norm["bias"] - norm["running_mean"] * scale
    for path, struct in targets.items():
        module, leaf = tuple(map(str, path[:-1])), str(path[-1])
        target = ".".join(map(str, path))
        shape = tuple(struct.shape)
        if module[0] == "batch_norm":
            continue
        if leaf == "relative_position_bias_table":
            i, j = module[1], module[3]
            flat[path] = take(f"layers.{i}.blocks.{j}.attention.self.{leaf}", shape, target)
            continue
        name = f"{_hf_name(module)}.{_LEAF[leaf]}"
        if leaf == "kernel" and len(shape) == 2:  # Linear (out, in) -> (in, out)
            flat[path] = take(name, shape[::-1], target).T
        elif leaf == "kernel":  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
            flat[path] = take(name, (shape[3], shape[2], shape[0], shape[1]), target).transpose(2, 3, 1, 0)
        else:
            flat[path] = take(name, shape, target)
    unexpected = sorted(k for k in tensors if k.startswith(prefix) and k not in used)
    if unexpected:
        raise UserError(
            f"{source}: {len(unexpected)} tensor(s) under {prefix!r} that the encoder its config describes "
            f"does not have: {unexpected[:5]}; use the config.json saved with these weights"
        )
    return traverse_util.unflatten_dict(
        {k: np.ascontiguousarray(v).astype(param_dtype) for k, v in flat.items()}
    )


def load_htsat(directory: str | pathlib.Path) -> tuple[HTSATConfig, Params]:
    """(config, float32 numpy params of `HTSATEncoder`) from a CLAP `save_pretrained` directory.

    Raises:
      UserError: no config.json or safetensors, a config slit does not implement, or weights that do not
        fit it (the file or tensor named).
    """
    from slit.interop.pretrained import read_safetensors

    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"audio_encoder.path={str(directory)!r} has no config.json; point it to a Hugging Face CLAP "
            "directory (ClapModel / ClapAudioModel save_pretrained)"
        )
    config = htsat_config_from_hf(
        read_json(config_file), read_frontend_config(directory), source=str(config_file)
    )
    try:
        tensors = read_safetensors(directory)
    except FileNotFoundError as e:
        raise UserError(f"{directory}: {e}") from None
    if not tensors:
        raise UserError(f"{directory}: no safetensors weights (PyTorch .bin files are not read); re-save it")
    return config, htsat_params_from_hf(config, tensors, source=str(directory))
