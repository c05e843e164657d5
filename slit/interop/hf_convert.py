"""Hugging Face PyTorch checkpoints -> slit parameters (numpy only, no torch import).

Each converter takes a PyTorch-style state dict (`Mapping[str, np.ndarray]`, keys as Hugging Face names, e.g.
`{k: v.numpy() for k, v in model.state_dict().items()}`) and returns slit's pure-dict params: the nested
dict that `nnx.to_pure_dict(nnx.state(module))` returns, with numpy leaves. Load it with `load_params`.

The target structure and shapes come from the slit module itself (built abstractly with `nnx.eval_shape`),
and a table per model maps slit module paths to Hugging Face module paths. Leaf names and layouts:

    slit `kernel` (in, out)        <- HF `weight` (out, in), transposed (nn.Linear)
    slit `kernel` (k, in, out)     <- HF `weight` (out, in, k), transposed (nn.Conv1d)
    slit `scale` / `bias`          <- HF `weight` / `bias` (nn.LayerNorm; `bias` also for Linear / Conv1d)
    slit `embedding` (n, d)        <- HF `weight` (n, d) (nn.Embedding)

Every problem is reported at once in a `ValueError`: each missing tensor and each shape mismatch with the
Hugging Face name and the expected (Hugging Face layout) shape, and the unused keys under the model's prefix
(with `strict=False`, unused keys only produce a warning).
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from slit.models.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from slit.models.qformer import BERT_LAYER_NORM_EPS, QFormer, QFormerConfig

__all__ = [
    "blip2_qformer_config",
    "blip2_qformer_params",
    "blip2_retrieval_params",
    "export_qformer",
    "qformer_hf_state_dict",
    "load_params",
    "whisper_encoder_config",
    "whisper_encoder_params",
]

StateDict = Mapping[str, Any]  # HF name -> array-like (np.ndarray; anything `np.asarray` takes)
Params = dict[str, Any]  # nested pure dict, as `nnx.to_pure_dict` returns
Path = tuple[str | int, ...]

# slit leaf name -> HF parameter name, inside a mapped module.
_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}

# ---------------------------------------------------------------------------------------------------------
# Name tables: slit module path -> HF module path ("{i}" is the layer index).

_WHISPER_TOP = {
    "conv1": "conv1",
    "conv2": "conv2",
    "final_norm": "layer_norm",
}
_WHISPER_LAYER = {
    "attention_norm": "self_attn_layer_norm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",  # no bias, in HF as in slit
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "mlp_norm": "final_layer_norm",
    "fc1": "fc1",
    "fc2": "fc2",
}
# Leaves that are variables of the top module itself (no module path): slit leaf -> HF parameter.
_WHISPER_LEAVES = {"position_embeddings": "embed_positions.weight"}

# Q-Former: a BertAttentionBlock (self_attention -> `attention`, cross_attention -> `crossattention`).
_QFORMER_ATTENTION = {
    "query": "attention.query",
    "key": "attention.key",
    "value": "attention.value",
    "output": "output.dense",
    "norm": "output.LayerNorm",
}
# FeedForward blocks: ffn_query (always in HF) and ffn_text (only with `use_qformer_text_input=True`).
_QFORMER_FFN_QUERY = {
    "intermediate": "intermediate_query.dense",
    "output": "output_query.dense",
    "norm": "output_query.LayerNorm",
}
_QFORMER_FFN_TEXT = {
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "norm": "output.LayerNorm",
}


def _whisper_module_table(num_layers: int) -> dict[str, str]:
    table = dict(_WHISPER_TOP)
    for i in range(num_layers):
        table.update(
            {f"layers.{i}.{ours}": f"layers.{i}.{theirs}" for ours, theirs in _WHISPER_LAYER.items()}
        )
    return table


def _qformer_module_table(
    config: QFormerConfig, with_text_ffn: bool, instructblip: bool = False
) -> dict[str, str]:
    # BLIP-2 keeps the embedding LayerNorm at the top of the Q-Former, InstructBLIP inside its embeddings.
    table = {"embedding_norm": "embeddings.layernorm" if instructblip else "layernorm"}
    for i in range(config.num_layers):
        blocks = {"self_attention": ("attention", _QFORMER_ATTENTION), "ffn_query": ("", _QFORMER_FFN_QUERY)}
        if i % config.cross_attention_freq == 0:
            blocks["cross_attention"] = ("crossattention", _QFORMER_ATTENTION)
        if with_text_ffn:
            blocks["ffn_text"] = ("", _QFORMER_FFN_TEXT)
        for ours, (theirs, subs) in blocks.items():
            hf_block = f"encoder.layer.{i}." + (f"{theirs}." if theirs else "")
            table.update({f"layers.{i}.{ours}.{o}": hf_block + t for o, t in subs.items()})
    return table


# ---------------------------------------------------------------------------------------------------------
# Machinery.


def _hf_layout(leaf: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(shape in the HF tensor, permutation HF -> slit or None) for a slit leaf of `shape`."""
    if leaf == "kernel" and len(shape) == 2:  # Linear: (out, in) -> (in, out)
        return (shape[1], shape[0]), (1, 0)
    if leaf == "kernel" and len(shape) == 3:  # Conv1d: (out, in, k) -> (k, in, out)
        return (shape[2], shape[1], shape[0]), (2, 1, 0)
    return shape, None


def _detect_prefix(state_dict: StateDict, anchor: str, what: str, prefix: str | None) -> str:
    """The prefix (e.g. `model.encoder.`) in front of `anchor`, the name of a tensor every model has."""
    if prefix is not None:
        return prefix
    found = sorted(k[: -len(anchor)] for k in state_dict if k == anchor or k.endswith("." + anchor))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"no {what} in the state dict: no key ends with {anchor!r} "
            f"(first keys: {sorted(state_dict)[:8]}); pass `prefix=` explicitly"
        )
    raise ValueError(f"several {what} prefixes end with {anchor!r}: {found}; pass `prefix=` explicitly")


class _Collector:
    """Takes tensors out of a state dict by name, checking shapes and remembering what was used."""

    def __init__(self, state_dict: StateDict, prefix: str):
        self.state_dict = state_dict
        self.prefix = prefix
        self.used: set[str] = set()
        self.errors: list[str] = []

    def take(self, name: str, shape: tuple[int, ...], target: str) -> np.ndarray | None:
        """The tensor `prefix + name` if present with `shape`; else records an error and returns None."""
        return self.take_key(self.prefix + name, shape, target)

    def take_key(self, key: str, shape: tuple[int | None, ...], target: str) -> np.ndarray | None:
        """As `take`, for a full key (which may lie outside the prefix); None in `shape` matches any size."""
        if key not in self.state_dict:
            self.errors.append(f"missing tensor {key!r} (expected shape {shape}) for slit {target!r}")
            return None
        self.used.add(key)
        value = np.asarray(self.state_dict[key])
        if len(value.shape) != len(shape) or any(
            e is not None and e != d for d, e in zip(value.shape, shape, strict=True)
        ):
            self.errors.append(
                f"tensor {key!r} has shape {value.shape}, expected shape {shape} (for slit {target!r})"
            )
            return None
        return value

    def unused(self) -> list[str]:
        return sorted(k for k in self.state_dict if k.startswith(self.prefix) and k not in self.used)

    def finish(self, what: str, strict: bool) -> None:
        """Raises for missing / mismatched tensors (and unused ones when `strict`); warns otherwise."""
        unused = self.unused()
        if self.errors or (unused and strict):
            lines = list(self.errors)
            if unused:
                lines.append(f"{len(unused)} unused key(s) under prefix {self.prefix!r}: {unused}")
            raise ValueError(f"cannot convert {what}:\n  " + "\n  ".join(lines))
        if unused:
            warnings.warn(
                f"{what}: {len(unused)} unused key(s) under prefix {self.prefix!r}: {unused}", stacklevel=3
            )


def _target_shapes(build: Callable[[], nnx.Module]) -> dict[Path, Any]:
    """Flat {path: ShapeDtypeStruct} of every variable of the module `build()` makes, without allocating."""
    abstract = nnx.eval_shape(build)
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))


def _convert(
    collector: _Collector,
    targets: dict[Path, Any],
    module_table: Mapping[str, str],
    leaf_table: Mapping[str, str],
) -> Params:
    """Fills every slit leaf whose module (or leaf) path is in a table; leaves not in a table are skipped."""
    flat: dict[Path, np.ndarray] = {}
    for path, struct in targets.items():
        dotted = ".".join(map(str, path))
        module, leaf = ".".join(map(str, path[:-1])), str(path[-1])
        if dotted in leaf_table:
            hf_name = leaf_table[dotted]
        elif module in module_table:
            hf_name = f"{module_table[module]}.{_LEAF_NAMES[leaf]}"
        else:
            continue
        hf_shape, perm = _hf_layout(leaf, tuple(struct.shape))
        value = collector.take(hf_name, hf_shape, dotted)
        if value is not None:
            flat[path] = np.ascontiguousarray(value.transpose(perm) if perm else value).astype(struct.dtype)
    return traverse_util.unflatten_dict(flat)


def load_params(module: nnx.Module, params: Params) -> None:
    """Writes a (possibly partial) pure-dict `params` into `module`'s variables, in place.

    Paths must exist in the module and shapes must match; variables not in `params` keep their values.
    """
    state = nnx.state(module)
    current = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    for path, value in traverse_util.flatten_dict(params).items():
        if path not in current:
            raise ValueError(f"{'.'.join(map(str, path))!r} is not a variable of {type(module).__name__}")
        if tuple(np.shape(value)) != tuple(current[path].shape):
            raise ValueError(
                f"{'.'.join(map(str, path))!r}: value of shape {np.shape(value)}, "
                f"the module's variable has shape {current[path].shape}"
            )
    nnx.replace_by_pure_dict(state, params, lambda var, v: var.replace(np.asarray(v, var.dtype)))
    nnx.update(module, state)


def _get(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, Mapping) else getattr(config, name)


# ---------------------------------------------------------------------------------------------------------
# Whisper encoder.


def whisper_encoder_config(hf_config: Any) -> WhisperEncoderConfig:
    """`WhisperEncoderConfig` from a `transformers.WhisperConfig` (or its `to_dict()`).

    Raises ValueError for an encoder activation other than exact GELU (the only one slit implements).
    """
    activation = _get(hf_config, "activation_function")
    if activation != "gelu":
        raise ValueError(f"slit's Whisper encoder uses exact GELU, the checkpoint uses {activation!r}")
    return WhisperEncoderConfig(
        num_mel_bins=_get(hf_config, "num_mel_bins"),
        width=_get(hf_config, "d_model"),
        num_layers=_get(hf_config, "encoder_layers"),
        num_heads=_get(hf_config, "encoder_attention_heads"),
        mlp_dim=_get(hf_config, "encoder_ffn_dim"),
        max_positions=_get(hf_config, "max_source_positions"),
    )


def whisper_encoder_params(
    state_dict: StateDict, config: WhisperEncoderConfig, *, prefix: str | None = None, strict: bool = True
) -> Params:
    """Params of slit's `WhisperEncoder` from a HF Whisper state dict.

    Accepts the state dict of `WhisperEncoder` (no prefix), `WhisperModel` (`encoder.`) or
    `WhisperForConditionalGeneration` (`model.encoder.`); the prefix is found from `conv1.weight` unless
    given. Keys outside the prefix (the decoder, ...) are ignored. Tensors, with W = width, M = mels,
    F = mlp_dim, P = max_positions:

        conv1.weight (W, M, 3) / conv2.weight (W, W, 3)  -> conv{1,2}.kernel (3, in, W); .bias (W,)
        embed_positions.weight (P, W)                     -> position_embeddings (P, W)
        layers.{i}.self_attn.{q,k,v,out}_proj.weight (W, W) -> layers.{i}.{q,k,v,out}_proj.kernel (W, W)
        layers.{i}.self_attn.{q,v,out}_proj.bias (W,)    -> ....bias (k_proj has no bias)
        layers.{i}.self_attn_layer_norm.{weight,bias}    -> layers.{i}.attention_norm.{scale,bias}
        layers.{i}.fc1.weight (F, W) / fc2.weight (W, F) -> layers.{i}.fc1.kernel (W, F) / fc2.kernel (F, W)
        layers.{i}.final_layer_norm.{weight,bias}        -> layers.{i}.mlp_norm.{scale,bias}
        layer_norm.{weight,bias}                         -> final_norm.{scale,bias}

    For `WhisperAudioTower`, nest the result: `{"encoder": params}`.

    Returns:
      The complete pure dict of `WhisperEncoder(config)` (all `Frozen` variables), float32 numpy leaves.

    Raises:
      ValueError: naming every missing tensor and shape mismatch (with the expected HF shape), and listing
        unused keys under the prefix (unless `strict=False`, which only warns about those).
    """
    prefix = _detect_prefix(state_dict, "conv1.weight", "Whisper encoder", prefix)
    targets = _target_shapes(lambda: WhisperEncoder(config, rngs=nnx.Rngs(0)))
    collector = _Collector(state_dict, prefix)
    params = _convert(collector, targets, _whisper_module_table(config.num_layers), _WHISPER_LEAVES)
    collector.finish("Whisper encoder", strict)
    return params


# ---------------------------------------------------------------------------------------------------------
# BLIP-2 Q-Former.


def blip2_qformer_config(hf_config: Any, num_queries: int | None = None) -> QFormerConfig:
    """`QFormerConfig` from a `transformers.Blip2QFormerConfig` (or a `Blip2Config`, or either's dict).

    `num_queries` defaults to the `Blip2Config`'s `num_query_tokens` when a full config is given.
    Raises ValueError for what slit does not implement: an activation other than exact GELU, or a LayerNorm
    eps other than BERT's 1e-12.
    """
    if num_queries is None:
        try:
            num_queries = _get(hf_config, "num_query_tokens")
        except (KeyError, AttributeError):
            raise ValueError("pass num_queries (a Blip2QFormerConfig does not hold it)") from None
    try:
        hf_config = _get(hf_config, "qformer_config")
    except (KeyError, AttributeError):
        pass
    if _get(hf_config, "hidden_act") != "gelu":
        raise ValueError(
            f"slit's Q-Former uses exact GELU, the checkpoint uses {_get(hf_config, 'hidden_act')!r}"
        )
    if _get(hf_config, "layer_norm_eps") != BERT_LAYER_NORM_EPS:
        raise ValueError(
            f"slit's Q-Former LayerNorms use eps {BERT_LAYER_NORM_EPS}, "
            f"the checkpoint uses {_get(hf_config, 'layer_norm_eps')}"
        )
    return QFormerConfig(
        vocab_size=_get(hf_config, "vocab_size"),
        num_queries=num_queries,
        num_layers=_get(hf_config, "num_hidden_layers"),
        width=_get(hf_config, "hidden_size"),
        num_heads=_get(hf_config, "num_attention_heads"),
        mlp_dim=_get(hf_config, "intermediate_size"),
        cross_attention_freq=_get(hf_config, "cross_attention_frequency"),
        encoder_width=_get(hf_config, "encoder_hidden_size"),
        max_text_positions=_get(hf_config, "max_position_embeddings"),
        dropout_rate=_get(hf_config, "hidden_dropout_prob"),
    )


def blip2_qformer_params(
    state_dict: StateDict,
    config: QFormerConfig,
    query_tokens: np.ndarray | None = None,
    word_embeddings: np.ndarray | None = None,
    position_embeddings: np.ndarray | None = None,
    *,
    prefix: str | None = None,
    strict: bool = True,
) -> Params:
    """Params of slit's `QFormer` from a HF `Blip2QFormerModel` state dict.

    Accepts the state dict of `Blip2QFormerModel` (no prefix) or of a model holding it as `qformer.` (the
    prefix is found from `encoder.layer.0.attention.attention.query.weight` unless given); keys outside the
    prefix are ignored. Tensors, with W = width, E = encoder width,
    F = mlp_dim; cross-attention only on layers i % cross_attention_freq == 0:

        HF (under encoder.layer.{i}.)                       slit (under layers.{i}.)
        attention.attention.{query,key,value} (W, W)       self_attention.{query,key,value} (W, W)
        attention.output.dense (W, W), .LayerNorm          self_attention.output, .norm
        crossattention.attention.query (W, W)              cross_attention.query (W, W)
        crossattention.attention.{key,value} (W, E)        cross_attention.{key,value} (E, W)
        crossattention.output.dense, .LayerNorm            cross_attention.output, .norm
        intermediate_query.dense (F, W)                    ffn_query.intermediate (W, F)
        output_query.dense (W, F), output_query.LayerNorm  ffn_query.output (F, W), ffn_query.norm
        intermediate.dense, output.dense, output.LayerNorm ffn_text.{intermediate,output,norm}
        (top level) layernorm.{weight,bias} (W,)           embedding_norm.{scale,bias}

    The text FFN exists in HF only with `use_qformer_text_input=True`; it is converted when layer 0 has
    `intermediate.dense.weight`, else `ffn_text` is left out. The embeddings live outside
    `Blip2QFormerModel`; each is taken from the argument when given, else from the state dict when it is
    there (a full BLIP-2 state dict: `query_tokens`, `embeddings.{word,position}_embeddings.weight` next to
    the `qformer.` prefix), else left out:

        query_tokens (1, Q, W) or (Q, W)            -> query_tokens (Q, W)
        word_embeddings (vocab_size, W)             -> word_embeddings.embedding
        position_embeddings (max_text_positions, W) -> position_embeddings.embedding

    `encoder_norm` (BLIP-2's `ln_vision`, outside the Q-Former) is always left out (see
    `blip2_retrieval_params` for a full `Blip2ForImageTextRetrieval` state dict).

    InstructBLIP: a `InstructBlipQFormerModel` state dict (prefix found the same way; `qformer.` inside
    `InstructBlipForConditionalGeneration`) is recognised by `embeddings.layernorm.*`, which becomes
    `embedding_norm`; its word / position embeddings are inside the prefix (`embeddings.*`), its query
    tokens next to it (`query_tokens`).

    Returns:
      A pure dict of `QFormer(config)`'s `nnx.Param`s, float32 numpy leaves; partial where noted above, so
      load it into an initialised module (`load_params`).

    Raises:
      ValueError: naming every missing tensor and shape mismatch (with the expected HF shape), and listing
        unused keys under the prefix (unless `strict=False`, which only warns about those).
    """
    prefix = _detect_prefix(
        state_dict, "encoder.layer.0.attention.attention.query.weight", "Q-Former", prefix
    )
    with_text_ffn = f"{prefix}encoder.layer.0.intermediate.dense.weight" in state_dict
    instructblip = f"{prefix}embeddings.layernorm.weight" in state_dict
    targets = _target_shapes(lambda: QFormer(config, rngs=nnx.Rngs(0)))
    collector = _Collector(state_dict, prefix)
    params = _convert(collector, targets, _qformer_module_table(config, with_text_ffn, instructblip), {})

    # Embeddings: inside InstructBLIP's Q-Former; outside BLIP-2's, next to the `qformer.` prefix.
    root = prefix[: -len("qformer.")] if prefix.endswith("qformer.") and not instructblip else prefix
    if instructblip and prefix.endswith("qformer."):
        query_tokens_key = prefix[: -len("qformer.")] + "query_tokens"
        if query_tokens is None and query_tokens_key in state_dict:
            query_tokens = collector.take_key(
                query_tokens_key, (1, config.num_queries, config.width), "query_tokens"
            )
    q, w = config.num_queries, config.width
    extras = {
        ("query_tokens",): (query_tokens, "query_tokens", (1, q, w)),
        ("word_embeddings", "embedding"): (word_embeddings, "embeddings.word_embeddings.weight", None),
        ("position_embeddings", "embedding"): (
            position_embeddings,
            "embeddings.position_embeddings.weight",
            None,
        ),
    }
    flat = traverse_util.flatten_dict(params)
    for path, (given, hf_name, hf_shape) in extras.items():
        struct, target = targets[path], ".".join(path)
        hf_shape = hf_shape or tuple(struct.shape)
        if given is not None:
            value = np.asarray(given)
            if value.shape not in (hf_shape, tuple(struct.shape)):
                collector.errors.append(
                    f"argument {path[0]} has shape {value.shape}, "
                    f"expected shape {hf_shape} (for slit {target!r})"
                )
                continue
        elif root + hf_name in state_dict:
            value = collector.take_key(root + hf_name, hf_shape, target)
            if value is None:
                continue
        else:
            continue
        flat[path] = np.ascontiguousarray(value.reshape(struct.shape)).astype(struct.dtype)
    collector.finish("BLIP-2 Q-Former", strict)
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------------
# BLIP-2 retrieval heads, and export (slit -> Hugging Face).

# slit Stage1Model head -> Blip2ForImageTextRetrieval module (nn.Linear, weight (out, in)).
_RETRIEVAL_HEADS = {
    "audio_projection": "vision_projection",
    "text_projection": "text_projection",
    "itm_head": "itm_head",
}
# BLIP-2's `ln_vision` (slit's `encoder_norm`) is HF's `vision_model.post_layernorm`.
_ENCODER_NORM = "vision_model.post_layernorm"
QFORMER_LAYOUTS = ("blip2-qformer", "instructblip-qformer", "blip2-retrieval")


def blip2_retrieval_params(state_dict: StateDict, config: QFormerConfig, *, strict: bool = True) -> Params:
    """Stage-one params (`Stage1Model` pure-dict subset) from a `Blip2ForImageTextRetrieval` state dict.

    Returns `{"qformer": ..., "audio_projection": ..., "text_projection": ..., "itm_head": ...}`: the
    Q-Former with query tokens, text embeddings and (from `vision_model.post_layernorm`, BLIP-2's
    `ln_vision`) `encoder_norm`, and the heads (`vision_projection` -> `audio_projection`). Keys of the
    image tower (`vision_model.*` except `post_layernorm`) are ignored: slit's audio encoder replaces it.
    HF has no temperature and no generation head; they stay as initialised.
    """
    qformer = blip2_qformer_params(state_dict, config, prefix="qformer.", strict=strict)
    w = config.width
    collector = _Collector(state_dict, "")
    params: Params = {"qformer": qformer}
    for ours, theirs in _RETRIEVAL_HEADS.items():
        weight = collector.take_key(f"{theirs}.weight", (None, w), ours)
        bias = collector.take_key(f"{theirs}.bias", (None,), ours)
        if weight is not None and bias is not None:
            params[ours] = {
                "kernel": np.ascontiguousarray(weight.T, np.float32),
                "bias": bias.astype(np.float32),
            }
    if f"{_ENCODER_NORM}.weight" in state_dict:
        scale = collector.take_key(f"{_ENCODER_NORM}.weight", (config.encoder_width,), "qformer.encoder_norm")
        bias = collector.take_key(f"{_ENCODER_NORM}.bias", (config.encoder_width,), "qformer.encoder_norm")
        if scale is not None and bias is not None:
            qformer["encoder_norm"] = {"scale": scale.astype(np.float32), "bias": bias.astype(np.float32)}
    if collector.errors:
        raise ValueError("cannot convert BLIP-2 retrieval heads:\n  " + "\n  ".join(collector.errors))
    return params


def qformer_hf_state_dict(
    params: Params, config: QFormerConfig, *, instructblip: bool = False, with_text_ffn: bool = True
) -> dict[str, np.ndarray]:
    """HF `Blip2QFormerModel` (or, with `instructblip`, `InstructBlipQFormerModel`) tensors from slit's
    Q-Former params: the inverse of `blip2_qformer_params`, float32, PyTorch layouts, no prefix.

    InstructBLIP's also holds `embeddings.{word,position}_embeddings.weight`. `query_tokens` and
    `encoder_norm` live outside both HF modules and are not included. Raises ValueError naming what
    `params` lacks.
    """
    instructblip_text = instructblip or with_text_ffn
    table = _qformer_module_table(config, instructblip_text, instructblip)
    flat = traverse_util.flatten_dict(params)
    out: dict[str, np.ndarray] = {}
    missing = []
    for slit_module, hf_module in table.items():
        path = tuple(int(p) if p.isdigit() else p for p in slit_module.split("."))
        for leaf, hf_leaf in (("kernel", "weight"), ("scale", "weight"), ("bias", "bias")):
            if path + (leaf,) not in flat:
                continue
            value = np.asarray(flat[path + (leaf,)], np.float32)
            _, perm = _hf_layout(leaf, value.shape)
            out[f"{hf_module}.{hf_leaf}"] = np.ascontiguousarray(value.transpose(perm) if perm else value)
        if not any(k.startswith(hf_module + ".") for k in out):
            missing.append(slit_module)
    if instructblip:
        for name in ("word_embeddings", "position_embeddings"):
            if (name, "embedding") in flat:
                out[f"embeddings.{name}.weight"] = np.asarray(flat[(name, "embedding")], np.float32)
            else:
                missing.append(f"{name}.embedding")
    if missing:
        raise ValueError(f"slit Q-Former params lack {missing}")
    return out


def _qformer_hf_config_kwargs(config: QFormerConfig) -> dict[str, Any]:
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        hidden_act="gelu",
        hidden_dropout_prob=config.dropout_rate,
        attention_probs_dropout_prob=config.dropout_rate,
        max_position_embeddings=config.max_text_positions,
        initializer_range=config.initializer_range,
        layer_norm_eps=BERT_LAYER_NORM_EPS,
        cross_attention_frequency=config.cross_attention_freq,
        encoder_hidden_size=config.encoder_width,
    )


def export_qformer(
    directory: str | pathlib.Path,
    params: Params,
    config: QFormerConfig,
    *,
    layout: str = "blip2-retrieval",
    embed_dim: int | None = None,
) -> pathlib.Path:
    """Writes slit's Q-Former as a Hugging Face checkpoint: `model.safetensors` + `config.json`.

    Args:
      directory: created if needed.
      params: for `blip2-qformer` / `instructblip-qformer`, the Q-Former's pure dict (or a stage-one
        dict holding it under `"qformer"`); for `blip2-retrieval`, a stage-one dict with `"qformer"`,
        `"audio_projection"`, `"text_projection"`, `"itm_head"`.
      layout: which transformers class loads the directory:
        - `blip2-qformer`: `Blip2QFormerModel` (with the text FFN, `use_qformer_text_input=True`); loads with
          no missing or unexpected keys. Query tokens and text embeddings are not part of that class.
        - `instructblip-qformer`: `InstructBlipQFormerModel` (embeddings inside); no missing or unexpected
          keys. Query tokens are not part of that class.
        - `blip2-retrieval`: `Blip2ForImageTextRetrieval`: query tokens, text embeddings, Q-Former, the
          projections and the ITM head, and `encoder_norm` as `vision_model.post_layernorm` (BLIP-2's
          `ln_vision`). The config declares a 0-layer image tower of the audio encoder's width; its patch /
          position embeddings are the only keys transformers reports missing: an audio model has no image
          tower. The temperature and generation head are not part of HF's BLIP-2 and are not written.
      embed_dim: the projections' width (`blip2-retrieval`); read from the params when None.

    Returns:
      The directory.
    """
    import transformers

    if layout not in QFORMER_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {QFORMER_LAYOUTS}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    qformer = params.get("qformer", params)
    kwargs = _qformer_hf_config_kwargs(config)
    if layout == "blip2-qformer":
        tensors = qformer_hf_state_dict(qformer, config)
        hf_config = transformers.Blip2QFormerConfig(**kwargs, use_qformer_text_input=True)
        hf_config.architectures = ["Blip2QFormerModel"]
    elif layout == "instructblip-qformer":
        tensors = qformer_hf_state_dict(qformer, config, instructblip=True)
        hf_config = transformers.InstructBlipQFormerConfig(**kwargs)
        hf_config.architectures = ["InstructBlipQFormerModel"]
    else:
        missing = [k for k in (*_RETRIEVAL_HEADS, "qformer") if k not in params]
        if missing:
            raise ValueError(f"layout 'blip2-retrieval' needs stage-one params with {missing}")
        tensors = {f"qformer.{k}": v for k, v in qformer_hf_state_dict(qformer, config).items()}
        tensors["query_tokens"] = np.asarray(qformer["query_tokens"], np.float32)[None]
        for name in ("word_embeddings", "position_embeddings"):
            tensors[f"embeddings.{name}.weight"] = np.asarray(qformer[name]["embedding"], np.float32)
        for ours, theirs in _RETRIEVAL_HEADS.items():
            tensors[f"{theirs}.weight"] = np.ascontiguousarray(
                np.asarray(params[ours]["kernel"], np.float32).T
            )
            tensors[f"{theirs}.bias"] = np.asarray(params[ours]["bias"], np.float32)
        tensors[f"{_ENCODER_NORM}.weight"] = np.asarray(qformer["encoder_norm"]["scale"], np.float32)
        tensors[f"{_ENCODER_NORM}.bias"] = np.asarray(qformer["encoder_norm"]["bias"], np.float32)
        embed_dim = embed_dim or tensors["vision_projection.weight"].shape[0]
        hf_config = transformers.Blip2Config(
            vision_config=dict(
                hidden_size=config.encoder_width, num_hidden_layers=0, layer_norm_eps=1e-5
            ),  # slit's encoder_norm eps
            qformer_config=dict(kwargs, use_qformer_text_input=True),
            num_query_tokens=config.num_queries,
            image_text_hidden_size=embed_dim,
        )
        hf_config.architectures = ["Blip2ForImageTextRetrieval"]
    return _write_hf_directory(directory, tensors, hf_config)


# ---------------------------------------------------------------------------------------------------------
# Stage two: the Q-Former and the projection of BLIP-2 / InstructBLIP for conditional generation.

GENERATION_LAYOUTS = ("blip2-generation", "instructblip-generation")


def blip2_generation_state_dict(
    qformer: Params, projection: Params, config: QFormerConfig, *, instructblip: bool
) -> dict[str, np.ndarray]:
    """The trainable part of `Blip2ForConditionalGeneration` (or, with `instructblip`,
    `InstructBlipForConditionalGeneration`) from slit's stage-two params, float32, PyTorch layouts:

        query_tokens (1, Q, W)                             <- qformer.query_tokens (Q, W)
        qformer.*  (Blip2QFormerModel without the text FFN; InstructBlipQFormerModel with it and its
                    embeddings)                            <- qformer.* (see `qformer_hf_state_dict`)
        vision_model.post_layernorm.{weight,bias} (E,)     <- qformer.encoder_norm (BLIP-2's ln_vision)
        language_projection.weight (D, W), .bias (D,)      <- bridge projection.kernel (W, D), .bias (D,)

    `qformer`, `projection`: slit's pure dicts (list indices as ints). BLIP-2's generation model runs the
    queries alone, so its Q-Former has no text FFN or word embeddings (`use_qformer_text_input=False`).
    """
    tensors = {
        f"qformer.{k}": v
        for k, v in qformer_hf_state_dict(
            qformer, config, instructblip=instructblip, with_text_ffn=instructblip
        ).items()
    }
    tensors["query_tokens"] = np.asarray(qformer["query_tokens"], np.float32)[None]
    tensors[f"{_ENCODER_NORM}.weight"] = np.asarray(qformer["encoder_norm"]["scale"], np.float32)
    tensors[f"{_ENCODER_NORM}.bias"] = np.asarray(qformer["encoder_norm"]["bias"], np.float32)
    tensors["language_projection.weight"] = np.ascontiguousarray(
        np.asarray(projection["kernel"], np.float32).T
    )
    tensors["language_projection.bias"] = np.asarray(projection["bias"], np.float32)
    return tensors


def export_blip2_generation(
    directory: str | pathlib.Path,
    qformer: Params,
    projection: Params,
    config: QFormerConfig,
    *,
    layout: str,
    text_config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes a stage-two Q-Former and its projection as a transformers checkpoint directory
    (`model.safetensors` + `config.json`); see `blip2_generation_state_dict` for the tensors.

    Args:
      directory: created if needed.
      qformer, projection: slit's params of the Q-Former and of the projection to the LLM width.
      layout: `blip2-generation` (`Blip2ForConditionalGeneration`: the queries alone enter the Q-Former)
        or `instructblip-generation` (`InstructBlipForConditionalGeneration`: the instruction's tokens join
        the queries; `InstructBlipQFormerModel` keeps the embeddings and their LayerNorm inside).
      text_config: the frozen LLM's transformers config (a dict with `model_type`).
      extra: more entries for config.json (e.g. where the frozen models came from).

    The config declares a 0-layer image tower of the audio encoder's width. Loading the directory with the
    class above reports as missing only the image tower's patch / position embeddings (an audio model has
    none) and the language model's weights (frozen, not written: load them from the LLM's own checkpoint).

    Returns:
      The directory.
    """
    import transformers

    if layout not in GENERATION_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {GENERATION_LAYOUTS}")
    instructblip = layout == "instructblip-generation"
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = blip2_generation_state_dict(qformer, projection, config, instructblip=instructblip)
    kwargs = _qformer_hf_config_kwargs(config)
    vision = dict(hidden_size=config.encoder_width, num_hidden_layers=0, layer_norm_eps=1e-5)
    if instructblip:
        hf_config = transformers.InstructBlipConfig(
            vision_config=vision,
            qformer_config=kwargs,
            text_config=dict(text_config),
            num_query_tokens=config.num_queries,
        )
        hf_config.architectures = ["InstructBlipForConditionalGeneration"]
    else:
        hf_config = transformers.Blip2Config(
            vision_config=vision,
            qformer_config=dict(kwargs, use_qformer_text_input=False),
            text_config=dict(text_config),
            num_query_tokens=config.num_queries,
        )
        hf_config.architectures = ["Blip2ForConditionalGeneration"]
    for key, value in (extra or {}).items():
        setattr(hf_config, key, value)
    return _write_hf_directory(directory, tensors, hf_config)


def _write_hf_directory(
    directory: pathlib.Path, tensors: dict[str, np.ndarray], hf_config: Any
) -> pathlib.Path:  # noqa: ANN401
    """`model.safetensors` (PyTorch's layout) and `config.json`, as `from_pretrained` reads them."""
    from safetensors.numpy import save_file

    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    hf_config.to_json_file(str(directory / "config.json"))
    return directory
