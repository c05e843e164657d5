"""Hugging Face CLIP checkpoints -> slit's frozen CLIP text tower (`slit.models.text.clip`).

A `save_pretrained` directory of `CLIPModel`, `CLIPTextModel` or `CLIPTextModelWithProjection`:
`config.json` (for `CLIPModel` the tower's sizes are under `text_config`, and `projection_dim` is at the
top) and safetensors weights (one file or shards with `model.safetensors.index.json`; PyTorch pickles are
refused: convert them with `slit convert-torch`). The text tower's tensors sit under `text_model.`
(`CLIPModel`, `CLIPTextModelWithProjection`, and `CLIPTextModel` as transformers 4 wrote it) or at the
top (`CLIPTextModel` as transformers 5 writes it); `text_projection.weight` is at the top. Vision
tensors, `logit_scale` and `visual_projection` are ignored.

`load_clip_text` returns the text tensors under the names of a bare `CLIPTextModel` (prefix removed),
plus `text_projection.weight` when the checkpoint has one (then `projection_dim` is its output width;
without it, 0):

    embeddings.token_embedding.weight (V, D)              -> token_embedding.embedding
    embeddings.position_embedding.weight (P, D)           -> position_embedding
    encoder.layers.{i}.layer_norm1 / layer_norm2          -> layers.{i}.attention_norm / mlp_norm
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj         -> layers.{i}.{q,k,v,out}_proj
    encoder.layers.{i}.mlp.fc1 / fc2                      -> layers.{i}.fc1 / fc2
    final_layer_norm                                      -> final_norm
    text_projection.weight (E, D)                         -> projection.kernel

Linear weights (out, in) become (in, out) kernels; LayerNorm weight / bias become scale / bias.
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
from slit.models.llm.loading import read_json
from slit.models.text.clip import ACTIVATIONS, CLIPTextConfig, CLIPTextTower

__all__ = [
    "PROJECTION",
    "clip_text_config_from_hf",
    "clip_text_params",
    "load_clip_text",
    "load_clip_text_tower",
    "place_clip_text_weights",
]

Params = dict[str, Any]

PROJECTION = "text_projection.weight"
_ANCHOR = "embeddings.token_embedding.weight"
_IGNORED = ("embeddings.position_ids",)  # a buffer that transformers 4 checkpoints may hold
_LAYER = {
    "attention_norm": "layer_norm1",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "mlp_norm": "layer_norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_TEXT_MODEL_TYPES = ("clip", "clip_text_model")


def clip_text_config_from_hf(
    hf_config: Mapping[str, Any], projection_dim: int, *, source: str = "config.json"
) -> CLIPTextConfig:
    """`CLIPTextConfig` from a `CLIPModel` config (its `text_config`) or a `CLIPTextConfig` dict.

    Missing fields take transformers' `CLIPTextConfig` defaults (which are `CLIPTextConfig`'s here).
    `projection_dim`: the output width of the checkpoint's `text_projection` (0: none).

    Raises:
      UserError: a vision-only or non-CLIP config, or an unsupported activation; `source` named.
    """
    model_type = hf_config.get("model_type")
    if model_type == "clip_vision_model":
        raise UserError(
            f"{source} describes a vision-only CLIP model ({hf_config.get('architectures')}), which has no "
            "text tower; point to a CLIPModel, CLIPTextModel or CLIPTextModelWithProjection checkpoint"
        )
    if model_type not in _TEXT_MODEL_TYPES:
        raise UserError(
            f"{source} describes a {model_type!r} model; a CLIP text tower needs model_type 'clip' "
            "(CLIPModel) or 'clip_text_model' (CLIPTextModel, CLIPTextModelWithProjection)"
        )
    text = (hf_config.get("text_config") or {}) if model_type == "clip" else hf_config
    defaults = CLIPTextConfig()
    act = text.get("hidden_act", defaults.hidden_act)
    if act not in ACTIVATIONS:
        raise UserError(f"{source}: hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    try:
        return CLIPTextConfig(
            vocab_size=int(text.get("vocab_size", defaults.vocab_size)),
            width=int(text.get("hidden_size", defaults.width)),
            num_layers=int(text.get("num_hidden_layers", defaults.num_layers)),
            num_heads=int(text.get("num_attention_heads", defaults.num_heads)),
            intermediate_size=int(text.get("intermediate_size", defaults.intermediate_size)),
            max_positions=int(text.get("max_position_embeddings", defaults.max_positions)),
            eos_token_id=int(text.get("eos_token_id", defaults.eos_token_id)),
            projection_dim=int(projection_dim),
            layer_norm_eps=float(text.get("layer_norm_eps", defaults.layer_norm_eps)),
            hidden_act=act,
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None


def _text_prefix(names: list[str], source: str) -> str:
    found = sorted(k[: -len(_ANCHOR)] for k in names if k == _ANCHOR or k.endswith("." + _ANCHOR))
    found = [p for p in found if p in ("", "text_model.")] or found
    if len(found) == 1:
        return found[0]
    if not found:
        vision = any(k.startswith(("vision_model.", "embeddings.patch_embedding")) for k in names)
        raise UserError(
            f"{source} has no CLIP text tower (no tensor {'text_model.' + _ANCHOR!r} or {_ANCHOR!r})"
            + ("; it is a vision-only checkpoint" if vision else "")
            + ": point to a CLIPModel, CLIPTextModel or CLIPTextModelWithProjection checkpoint"
        )
    raise UserError(f"{source} holds several text towers (prefixes {found}); slit reads one")


def load_clip_text(directory: str | pathlib.Path) -> tuple[CLIPTextConfig, dict[str, np.ndarray]]:
    """The CLIP text tower of a `save_pretrained` directory: its config and tensors.

    Returns:
      (config, tensors): tensors keyed by bare `CLIPTextModel` names (`embeddings.token_embedding.weight`,
      `encoder.layers.0.self_attn.q_proj.weight`, ..., `final_layer_norm.bias`) plus
      `text_projection.weight` (E, D) when the checkpoint has one; float32 numpy (bfloat16 widened).

    Raises:
      UserError: no directory, no config.json, no safetensors (pickles only: convert them), a vision-only
        checkpoint, or a `text_projection.weight` that disagrees with config.json's projection_dim.
    """
    from slit.interop.pretrained import read_safetensors

    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise UserError(f"CLIP checkpoint directory {str(directory)!r} does not exist")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"no config.json in {str(directory)!r}: point to a Hugging Face CLIPModel / CLIPTextModel "
            "directory written by save_pretrained"
        )
    hf_config = read_json(config_file)
    clip_text_config_from_hf(hf_config, 0, source=str(config_file))  # vision-only / non-CLIP configs first
    try:
        tensors = read_safetensors(directory)
    except FileNotFoundError as e:
        raise UserError(f"{e}; for a PyTorch .pt/.bin file run `slit convert-torch` first") from None
    prefix = _text_prefix(list(tensors), str(directory))
    text = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k != PROJECTION}
    text = {k: v for k, v in text.items() if not k.startswith("vision_model.") and k not in _IGNORED}
    projection_dim = 0
    if PROJECTION in tensors:
        text[PROJECTION] = tensors[PROJECTION]
        projection_dim = int(np.shape(tensors[PROJECTION])[0])
        declared = hf_config.get("projection_dim")
        if declared is not None and int(declared) != projection_dim:
            raise UserError(
                f"{config_file}: projection_dim {declared}, but {PROJECTION} in {str(directory)!r} has shape "
                f"{tuple(np.shape(tensors[PROJECTION]))}; use the config.json that came with these weights"
            )
    config = clip_text_config_from_hf(hf_config, projection_dim, source=str(config_file))
    text = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in text.items()}
    return config, text


def read_clip_text_config(directory: str | pathlib.Path) -> CLIPTextConfig:
    """`load_clip_text`'s config without reading the weights: config.json, and the projection's width from
    the safetensors headers (for building a model's config; `load_clip_text` checks the rest)."""
    from safetensors import safe_open

    from slit.interop.pretrained import _safetensors_files

    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"no config.json in {str(directory)!r}: point to a Hugging Face CLIPModel / CLIPTextModel "
            "directory written by save_pretrained"
        )
    projection_dim = 0
    try:
        files = _safetensors_files(directory)
    except FileNotFoundError as e:
        raise UserError(f"{e}; for a PyTorch .pt/.bin file run `slit convert-torch` first") from None
    for path in files:
        with safe_open(str(path), framework="np") as f:
            if PROJECTION in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                projection_dim = int(f.get_slice(PROJECTION).get_shape()[0])
    return clip_text_config_from_hf(read_json(config_file), projection_dim, source=str(config_file))


def _name_table(config: CLIPTextConfig) -> dict[str, str]:
    """slit module path -> HF module path (bare `CLIPTextModel` names)."""
    table = {
        "token_embedding": "embeddings.token_embedding",
        "final_norm": "final_layer_norm",
    }
    for i in range(config.num_layers):
        table.update(
            {f"layers.{i}.{ours}": f"encoder.layers.{i}.{theirs}" for ours, theirs in _LAYER.items()}
        )
    return table


def clip_text_params(
    config: CLIPTextConfig,
    tensors: Mapping[str, Any],
    *,
    param_dtype: DTypeLike = jnp.float32,
    source: str = "the checkpoint",
) -> Params:
    """slit's pure-dict params of `CLIPTextTower(config)` from `load_clip_text`'s tensors.

    Raises:
      UserError: every missing tensor, shape mismatch (with the expected HF shape) and unexpected tensor,
        with `source` named.
    """
    abstract = nnx.eval_shape(lambda: CLIPTextTower(config, rngs=nnx.Rngs(0)))
    targets = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))
    table = _name_table(config)
    used: set[str] = set()
    problems: list[str] = []
    flat: dict[tuple[Any, ...], np.ndarray] = {}
    for path, struct in targets.items():
        module, leaf = ".".join(map(str, path[:-1])), str(path[-1])
        target = ".".join(map(str, path))
        shape = tuple(struct.shape)
        transpose = leaf == "kernel"
        if target == "position_embedding":
            name = "embeddings.position_embedding.weight"
        elif target == "projection.kernel":
            name = PROJECTION
        elif module in table:
            name = f"{table[module]}.{_LEAF[leaf]}"
        else:
            raise AssertionError(f"no Hugging Face name for slit {target!r}")  # a bug in the table
        hf_shape = shape[::-1] if transpose else shape
        if name not in tensors:
            problems.append(f"missing tensor {name!r} (expected shape {hf_shape}, for slit {target!r})")
            continue
        used.add(name)
        value = np.asarray(tensors[name])
        if value.shape != hf_shape:
            problems.append(
                f"tensor {name!r} has shape {value.shape}, expected {hf_shape} (for slit {target!r})"
            )
            continue
        flat[path] = np.ascontiguousarray(value.T if transpose else value).astype(param_dtype)
    unexpected = sorted(set(tensors) - used - set(_IGNORED))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {unexpected}")
    if problems:
        raise UserError(
            f"{source} does not match the CLIP text tower its config describes ({config.num_layers} layers, "
            f"width {config.width}, vocabulary {config.vocab_size}, {config.max_positions} positions, "
            f"projection_dim {config.projection_dim}):\n  "
            + "\n  ".join(problems)
            + "\nUse the config.json that came with these weights, or a complete checkpoint."
        )
    return traverse_util.unflatten_dict(flat)


def place_clip_text_weights(
    tower: CLIPTextTower, tensors: Mapping[str, Any], *, source: str = "the checkpoint"
) -> CLIPTextTower:
    """Puts `load_clip_text`'s tensors into `tower`'s variables, in place (each keeps its dtype and
    variable type: `Frozen`, or `nnx.Param` after `unfreeze`). Returns `tower`.

    Raises:
      UserError: tensors that do not fit `tower.config` (see `clip_text_params`).
    """
    params = clip_text_params(tower.config, tensors, source=source)
    state = nnx.state(tower)
    nnx.replace_by_pure_dict(state, params, lambda var, value: var.replace(jnp.asarray(value, var.dtype)))
    nnx.update(tower, state)
    return tower


def load_clip_text_tower(
    directory: str | pathlib.Path,
    *,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike = jnp.float32,
) -> CLIPTextTower:
    """A frozen `CLIPTextTower` with the weights of a CLIP checkpoint directory (see `load_clip_text`).

    The module is built abstractly and filled: no random initialisation runs. Weights are stored in
    `param_dtype`; activations are computed in `dtype`.
    """
    config, tensors = load_clip_text(directory)
    params = clip_text_params(config, tensors, param_dtype=param_dtype, source=str(directory))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CLIPTextTower(config, rngs=nnx.Rngs(0), dtype=dtype)))
    nnx.replace_by_pure_dict(state, params, lambda var, value: var.replace(jnp.asarray(value)))
    return nnx.merge(graphdef, state)
