"""Hugging Face wav2vec2-family checkpoints (wav2vec2, HuBERT, data2vec-audio) -> slit's frozen encoder.

A checkpoint directory holds `config.json` (its `model_type` says the family), safetensors weights (one
file or shards with `model.safetensors.index.json`; PyTorch pickles are refused) and, usually,
`preprocessor_config.json` (the feature extractor: `do_normalize`, `return_attention_mask`). The weights
of the bare model (`Wav2Vec2Model`, ...) or of a model holding it (`Wav2Vec2ForCTC` under `wav2vec2.`,
`HubertForCTC` under `hubert.`, `Data2VecAudioForCTC` under `data2vec_audio.`, ...) are accepted; the
prefix is found from the first feature-encoder convolution, and keys outside it (heads) are ignored.

Tensor layout (HF name under the prefix -> slit path in `Wav2Vec2Encoder`):

    feature_extractor.conv_layers.{i}.conv.{weight (C_i, C_i-1, k), bias}  -> feature_encoder.layers.{i}.conv
    feature_extractor.conv_layers.{i}.layer_norm.{weight, bias}            -> feature_encoder.layers.{i}.norm
        (GroupNorm on layer 0 only, or LayerNorm on every layer)
    feature_projection.layer_norm / .projection                            -> feature_projection.norm / .dense
    encoder.pos_conv_embed.conv.{weight_g (1, 1, k), weight_v (D, D/G, k)} -> position_conv.layers.0.kernel
        (or .parametrizations.weight.original0 / original1, as transformers 5 writes them, or a plain
        .weight): the weight norm is folded, kernel = g * v / ||v||, the norm over all dims but the last
    encoder.pos_conv_embed.batch_norm.{weight, bias, running_mean, running_var} -> position_conv.batch_norm
        (HuBERT `conv_pos_batch_norm`): folded, scale = w / sqrt(var + 1e-5), bias = b - mean * scale
    encoder.pos_conv_embed.layers.{j}.conv.{weight, bias}                  -> position_conv.layers.{j}
        (data2vec-audio)
    encoder.layer_norm                                                     -> encoder_norm
    encoder.layers.{i}.attention.{q,k,v,out}_proj                          -> layers.{i}.{q,k,v,out}_proj
    encoder.layers.{i}.layer_norm                                          -> layers.{i}.attention_norm
    encoder.layers.{i}.final_layer_norm                                    -> layers.{i}.mlp_norm
    encoder.layers.{i}.feed_forward.intermediate_dense / .output_dense     -> layers.{i}.fc1 / fc2

Linear weights (out, in) become (in, out) kernels; convolution weights (out, in/groups, k) become
(k, in/groups, out) kernels. `masked_spec_embed` (SpecAugment, training only) is ignored.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.typing import DTypeLike

from slit.errors import UserError
from slit.models.audio.wav2vec2 import (
    ACTIVATIONS,
    Wav2Vec2AudioTower,
    Wav2Vec2Config,
    Wav2Vec2Encoder,
    resolve_hidden_layer,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "load_wav2vec2_encoder",
    "load_wav2vec2_tower",
    "read_preprocessor_options",
    "wav2vec2_config_from_hf",
    "wav2vec2_params_from_hf",
]

SUPPORTED_MODEL_TYPES = ("data2vec-audio", "hubert", "wav2vec2")
BATCH_NORM_EPS = 1e-5  # torch.nn.BatchNorm1d's default, which HuBERT uses

Params = dict[str, Any]

_ANCHOR = "feature_extractor.conv_layers.0.conv.weight"
_IGNORED = ("masked_spec_embed", "encoder.pos_conv_embed.batch_norm.num_batches_tracked")
_WEIGHT_NORM_NAMES = (  # (g, v) spellings of the position conv's weight norm
    ("conv.parametrizations.weight.original0", "conv.parametrizations.weight.original1"),
    ("conv.weight_g", "conv.weight_v"),
)
_LAYER = {
    "attention_norm": "layer_norm",
    "q_proj": "attention.q_proj",
    "k_proj": "attention.k_proj",
    "v_proj": "attention.v_proj",
    "out_proj": "attention.out_proj",
    "mlp_norm": "final_layer_norm",
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


# ---------------------------------------------------------------------------------------------------------
# config.json


def _field(hf_config: Mapping[str, Any], name: str, source: str) -> Any:
    if name not in hf_config:
        raise UserError(f"{source}: missing field {name!r}; use the config.json that came with the weights")
    return hf_config[name]


def wav2vec2_config_from_hf(hf_config: Mapping[str, Any], *, source: str = "config.json") -> Wav2Vec2Config:
    """`Wav2Vec2Config` from a HF config.json (dict) of a wav2vec2, HuBERT or data2vec-audio model.

    Raises:
      UserError: an unknown `model_type`, a missing field, or something slit does not implement (an
        adapter, attention adapters, an unknown activation or feature-encoder norm), naming the field.
    """
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{source}: model_type {model_type!r} is not a supported wav2vec2-family encoder; "
            f"supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    if hf_config.get("add_adapter"):
        raise UserError(
            f"{source}: add_adapter=true (a convolutional adapter after the encoder) is not supported"
        )
    if hf_config.get("adapter_attn_dim") is not None:
        raise UserError(f"{source}: adapter_attn_dim is set (attention adapters, as in MMS); not supported")
    for name in ("hidden_act", "feat_extract_activation"):
        if hf_config.get(name, "gelu") not in ACTIVATIONS:
            raise UserError(
                f"{source}: {name} {hf_config[name]!r} is not supported; supported: {sorted(ACTIVATIONS)}"
            )

    def get(name: str) -> Any:
        return _field(hf_config, name, source)

    common = dict(
        conv_dim=tuple(get("conv_dim")),
        conv_kernel=tuple(get("conv_kernel")),
        conv_stride=tuple(get("conv_stride")),
        conv_bias=bool(hf_config.get("conv_bias", False)),
        feature_activation=hf_config.get("feat_extract_activation", "gelu"),
        width=get("hidden_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        mlp_dim=get("intermediate_size"),
        activation=hf_config.get("hidden_act", "gelu"),
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-5)),
        position_conv_groups=get("num_conv_pos_embedding_groups"),
    )
    if model_type == "data2vec-audio":
        family = dict(
            feature_norm="layer",
            position_conv_kernel=get("conv_pos_kernel_size"),
            position_conv_layers=get("num_conv_pos_embeddings"),
            position_conv_layer_norm=True,
        )
    else:
        family = dict(
            feature_norm=hf_config.get("feat_extract_norm", "group"),
            projection_norm=bool(hf_config.get("feat_proj_layer_norm", True)),
            position_conv_kernel=get("num_conv_pos_embeddings"),
            position_batch_norm=bool(hf_config.get("conv_pos_batch_norm", False)),
            stable_layer_norm=bool(hf_config.get("do_stable_layer_norm", False)),
        )
    try:
        return Wav2Vec2Config(**common, **family)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Weights.


def _detect_prefix(tensors: Mapping[str, Any], source: str) -> str:
    found = sorted(k[: -len(_ANCHOR)] for k in tensors if k == _ANCHOR or k.endswith("." + _ANCHOR))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(
            f"{source}: no wav2vec2-family feature encoder: no tensor named {_ANCHOR!r} (or ending in it); "
            f"first names: {sorted(tensors)[:8]}"
        )
    raise UserError(f"{source}: several feature encoders ({found}); pass `prefix=` to choose one")


def _name_table(config: Wav2Vec2Config) -> dict[str, str]:
    """slit module path -> HF module path, for every plainly copied module (not the position conv)."""
    table = {}
    for i in range(len(config.conv_dim)):
        table[f"feature_encoder.layers.{i}.conv"] = f"feature_extractor.conv_layers.{i}.conv"
        table[f"feature_encoder.layers.{i}.norm"] = f"feature_extractor.conv_layers.{i}.layer_norm"
    table["feature_projection.norm"] = "feature_projection.layer_norm"
    table["feature_projection.dense"] = "feature_projection.projection"
    table["encoder_norm"] = "encoder.layer_norm"
    for i in range(config.num_layers):
        table.update(
            {f"layers.{i}.{ours}": f"encoder.layers.{i}.{theirs}" for ours, theirs in _LAYER.items()}
        )
    if config.position_conv_layer_norm:  # data2vec-audio: plain convs
        for j in range(config.position_conv_layers):
            table[f"position_conv.layers.{j}"] = f"encoder.pos_conv_embed.layers.{j}.conv"
    return table


def _hf_shape(leaf: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(shape of the HF tensor, permutation HF -> slit or None) for a slit leaf of `shape`."""
    if leaf == "kernel" and len(shape) == 2:  # Linear (out, in) -> (in, out)
        return shape[::-1], (1, 0)
    if leaf == "kernel" and len(shape) == 3:  # Conv1d (out, in/groups, k) -> (k, in/groups, out)
        return shape[::-1], (2, 1, 0)
    return shape, None


class _Reader:
    """Takes tensors by name, checking shapes, recording every problem and every name used."""

    def __init__(self, tensors: Mapping[str, Any], prefix: str):
        self.tensors, self.prefix = tensors, prefix
        self.used: set[str] = {prefix + name for name in _IGNORED}
        self.problems: list[str] = []

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def take(self, name: str, shape: tuple[int, ...], target: str) -> np.ndarray | None:
        key = self.prefix + name
        if key not in self.tensors:
            self.problems.append(f"missing tensor {key!r} (expected shape {shape}, for slit {target!r})")
            return None
        self.used.add(key)
        value = np.asarray(self.tensors[key])
        if value.shape != shape:
            self.problems.append(
                f"tensor {key!r} has shape {value.shape}, expected {shape} (for slit {target!r})"
            )
            return None
        return value.astype(np.float64)

    def unexpected(self) -> list[str]:
        return sorted(k for k in self.tensors if k.startswith(self.prefix) and k not in self.used)


def _position_conv_kernel(reader: _Reader, hf_shape: tuple[int, ...], target: str) -> np.ndarray | None:
    """The wav2vec2 / HuBERT position conv weight (out, in/groups, k), its weight norm folded."""
    base = "encoder.pos_conv_embed."
    for g_name, v_name in _WEIGHT_NORM_NAMES:
        if reader.has(base + g_name) or reader.has(base + v_name):
            g = reader.take(base + g_name, (1, 1, hf_shape[2]), target)
            v = reader.take(base + v_name, hf_shape, target)
            if g is None or v is None:
                return None
            return g * v / np.sqrt(np.square(v).sum(axis=(0, 1), keepdims=True))
    if reader.has(base + "conv.weight"):
        return reader.take(base + "conv.weight", hf_shape, target)
    reader.problems.append(
        f"missing tensor {reader.prefix + base}conv.weight_g / weight_v (or "
        f"conv.parametrizations.weight.original0 / original1, or conv.weight), weight shape {hf_shape}, "
        f"for slit {target!r}"
    )
    return None


def _batch_norm(reader: _Reader, width: int, target: str) -> tuple[np.ndarray, np.ndarray] | None:
    base = "encoder.pos_conv_embed.batch_norm."
    parts = {
        n: reader.take(base + n, (width,), target) for n in ("weight", "bias", "running_mean", "running_var")
    }
    if any(v is None for v in parts.values()):
        return None
    scale = parts["weight"] / np.sqrt(parts["running_var"] + BATCH_NORM_EPS)
    return scale, parts["bias"] - parts["running_mean"] * scale


def wav2vec2_params_from_hf(
    config: Wav2Vec2Config,
    tensors: Mapping[str, Any],
    *,
    prefix: str | None = None,
    param_dtype: DTypeLike = jnp.float32,
    source: str = "the checkpoint",
) -> Params:
    """slit's pure-dict params of `Wav2Vec2Encoder(config)` from HF tensors (name -> array-like).

    The prefix in front of the model's names (`""`, `"wav2vec2."`, ...) is found unless given; names
    outside it are ignored. See the module docstring for the layout. Leaves are numpy in `param_dtype`
    (folding is done in float64 first).

    Raises:
      UserError: listing every missing tensor and every shape mismatch (with the expected HF shape), and
        every unexpected tensor under the prefix, with `source` named.
    """
    prefix = _detect_prefix(tensors, source) if prefix is None else prefix
    abstract = nnx.eval_shape(lambda: Wav2Vec2Encoder(config, rngs=nnx.Rngs(0)))
    targets = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))
    table = _name_table(config)
    reader = _Reader(tensors, prefix)
    flat: dict[tuple[str | int, ...], np.ndarray] = {}
    for path, struct in targets.items():
        module, leaf = ".".join(map(str, path[:-1])), str(path[-1])
        target = f"{module}.{leaf}"
        hf_shape, perm = _hf_shape(leaf, tuple(struct.shape))
        if module in table:
            value = reader.take(f"{table[module]}.{_LEAF[leaf]}", hf_shape, target)
        elif module == "position_conv.layers.0" and leaf == "kernel":
            value = _position_conv_kernel(reader, hf_shape, target)
        elif module == "position_conv.layers.0" and leaf == "bias":
            value = reader.take("encoder.pos_conv_embed.conv.bias", hf_shape, target)
        elif module == "position_conv.batch_norm":
            if leaf == "bias":
                continue  # set together with the scale
            folded = _batch_norm(reader, config.width, target)
            if folded is not None:
                for name, array in zip(("scale", "bias"), folded, strict=True):
                    flat[(*path[:-1], name)] = array.astype(param_dtype)
            continue
        else:
            raise AssertionError(f"no Hugging Face name for slit {target!r}")  # a bug in the table
        if value is not None:
            flat[path] = np.ascontiguousarray(value.transpose(perm) if perm else value).astype(param_dtype)
    unexpected = reader.unexpected()
    if unexpected:
        reader.problems.append(
            f"{len(unexpected)} unexpected tensor(s) under prefix {prefix!r}: {unexpected}"
        )
    if reader.problems:
        raise UserError(
            f"{source} does not match the wav2vec2-family encoder its config describes ({config.num_layers} "
            f"layers, width {config.width}, {len(config.conv_dim)} feature convolutions, feature_norm "
            f"{config.feature_norm!r}, stable_layer_norm {config.stable_layer_norm}):\n  "
            + "\n  ".join(reader.problems)
            + "\nUse the config.json that came with these weights, or a complete checkpoint."
        )
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint directories.


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def read_preprocessor_options(directory: str | pathlib.Path) -> dict[str, bool]:
    """`{"normalize": ..., "mask_padding": ...}` from the directory's preprocessor_config.json.

    `do_normalize` -> normalize, `return_attention_mask` -> mask_padding; without the file, the
    feature extractor's defaults for normalize (True) and slit's for mask_padding (True).

    Raises:
      UserError: a sampling rate other than 16 kHz.
    """
    path = pathlib.Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return {"normalize": True, "mask_padding": True}
    options = _read_json(path)
    rate = options.get("sampling_rate", 16000)
    if rate != 16000:
        raise UserError(f"{path}: sampling_rate {rate}; slit's wav2vec2-family towers take 16 kHz audio")
    return {
        "normalize": bool(options.get("do_normalize", True)),
        "mask_padding": bool(options.get("return_attention_mask", True)),
    }


def _read_checkpoint(directory: pathlib.Path) -> tuple[Wav2Vec2Config, dict[str, np.ndarray]]:
    from slit.interop.pretrained import read_safetensors

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no config.json in {str(directory)!r}: point to a Hugging Face wav2vec2 / HuBERT / "
            "data2vec-audio checkpoint directory"
        )
    config = wav2vec2_config_from_hf(_read_json(config_file), source=str(config_file))
    return config, read_safetensors(directory)


def load_wav2vec2_encoder(
    directory: str | pathlib.Path,
    *,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike = jnp.float32,
) -> Wav2Vec2Encoder:
    """A frozen `Wav2Vec2Encoder` from a HF checkpoint directory (config.json + safetensors).

    Weights are stored in `param_dtype` (e.g. jnp.bfloat16); activations are computed in `dtype`.
    No random initialisation happens: the module is built abstractly and filled.

    Raises:
      FileNotFoundError: no config.json, or no safetensors (pickles are never read).
      UserError: an unsupported config or weights that do not fit it (every tensor at fault named).
    """
    directory = pathlib.Path(directory)
    config, tensors = _read_checkpoint(directory)
    params = wav2vec2_params_from_hf(config, tensors, param_dtype=param_dtype, source=str(directory))
    return _filled(lambda: Wav2Vec2Encoder(config, rngs=nnx.Rngs(0), dtype=dtype), params)


def load_wav2vec2_tower(
    directory: str | pathlib.Path,
    *,
    hidden_layer: int | None = None,
    normalize: bool | None = None,
    mask_padding: bool | None = None,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike = jnp.float32,
) -> Wav2Vec2AudioTower:
    """A frozen `Wav2Vec2AudioTower` from a HF checkpoint directory.

    `hidden_layer` as transformers numbers `hidden_states` (-2: BLIP-2's second-to-last; None: the last
    hidden state). `normalize` / `mask_padding` default to the directory's preprocessor_config.json
    (`read_preprocessor_options`).

    Raises:
      FileNotFoundError, UserError: as `load_wav2vec2_encoder`; UserError also for a `hidden_layer`
        outside the encoder.
    """
    directory = pathlib.Path(directory)
    options = read_preprocessor_options(directory)
    config, tensors = _read_checkpoint(directory)
    try:
        resolve_hidden_layer(hidden_layer, config.num_layers)
    except ValueError as e:
        raise UserError(f"{directory}: {e}") from None
    params = wav2vec2_params_from_hf(config, tensors, param_dtype=param_dtype, source=str(directory))

    def build() -> Wav2Vec2AudioTower:
        return Wav2Vec2AudioTower(
            config,
            rngs=nnx.Rngs(0),
            hidden_layer=hidden_layer,
            normalize=options["normalize"] if normalize is None else normalize,
            mask_padding=options["mask_padding"] if mask_padding is None else mask_padding,
            dtype=dtype,
        )

    return _filled(build, {"encoder": params})


def _filled(build: Any, params: Params) -> Any:
    """The module `build()` makes, built abstractly and filled with the complete pure-dict `params`."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    nnx.replace_by_pure_dict(state, params, lambda variable, value: variable.replace(jnp.asarray(value)))
    return nnx.merge(graphdef, state)
