"""A Q-Former initialised from a Hugging Face BERT checkpoint directory, the way BLIP-2 does it.

BLIP-2 (LAVIS `blip2.py`: `init_Qformer`) builds its Q-Former from `bert-base-uncased`: the text
self-attention, text FFN, embeddings and embedding LayerNorm are BERT's; each layer's query FFN
(`intermediate_query` / `output_query`) is a copy of its text FFN; cross-attention (and the query tokens)
start random; the tokenizer is BERT's plus a `[DEC]` token, and the word embedding table grows by one row
(new rows random, normal(0, initializer_range), as transformers' `resize_token_embeddings` did for BLIP-2).

One deliberate refinement: BERT adds its token-type-0 embedding to every token. LAVIS's Q-Former has no
token-type embeddings and drops that vector; slit folds it into the position embeddings (text positions
only, queries have none), so the Q-Former's text path computes exactly what the pretrained BERT computed.

BERT -> slit names (under the optional `bert.` prefix; `layers.{i}` of slit, `encoder.layer.{i}` of BERT):

    embeddings.word_embeddings (V, W)                 -> word_embeddings.embedding (rows 0..V-1)
    embeddings.position_embeddings (P, W)
      + embeddings.token_type_embeddings[0]           -> position_embeddings.embedding (P, W)
    embeddings.LayerNorm                              -> embedding_norm
    attention.self.{query,key,value}, attention.output.{dense,LayerNorm}
                                                      -> self_attention.{query,key,value,output,norm}
    intermediate.dense, output.dense, output.LayerNorm -> ffn_text.{intermediate,output,norm}
                                                      -> ffn_query.{...} (copies)
    cls.predictions.transform.{dense,LayerNorm}, cls.predictions.bias (if present)
                                                      -> MLM head (`Stage1Model.lm_head`)

Ignored: `pooler.*`, `embeddings.position_ids`, `cls.seq_relationship.*` (next-sentence head),
`cls.predictions.decoder.*` (tied to the word embeddings). Anything else unknown is an error.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from slit.errors import UserError
from slit.interop import hf_convert
from slit.models.qformer import BERT_LAYER_NORM_EPS, QFormer, QFormerConfig

__all__ = [
    "BertQFormer",
    "complete_with_fresh_weights",
    "init_qformer_from_bert",
    "lm_head_params_from_bert",
    "qformer_config_from_bert",
    "qformer_params_from_bert",
]

Params = dict[str, Any]

_ATTENTION = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "output": "attention.output.dense",
    "norm": "attention.output.LayerNorm",
}
_FFN = {"intermediate": "intermediate.dense", "output": "output.dense", "norm": "output.LayerNorm"}
_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.", "cls.predictions.decoder.")
_IGNORED_KEYS = ("embeddings.position_ids",)


def qformer_config_from_bert(
    bert_config: Mapping[str, Any],
    *,
    encoder_width: int,
    num_queries: int = 32,
    cross_attention_freq: int = 2,
    vocab_size: int | None = None,
    initializer_range: float | None = None,
) -> QFormerConfig:
    """A `QFormerConfig` with BERT's sizes (`config.json` as a dict) and the Q-Former's own settings.

    `vocab_size` defaults to BERT's plus one (`[DEC]`); `initializer_range` (std of the fresh
    cross-attention, query tokens and new embedding rows) defaults to BERT's. Raises UserError for what
    slit's Q-Former does not implement (an activation other than exact GELU, relative positions, a
    LayerNorm eps other than 1e-12).
    """

    def get(name: str, default: Any = None) -> Any:
        if name not in bert_config and default is None:
            raise UserError(f"BERT config has no {name!r}; is it a BERT config.json?")
        return bert_config.get(name, default)

    problems = []
    if get("hidden_act") != "gelu":
        problems.append(f"hidden_act is {get('hidden_act')!r}, slit's Q-Former uses exact 'gelu'")
    if get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type is {get('position_embedding_type')!r}, expected 'absolute'")
    if get("layer_norm_eps") != BERT_LAYER_NORM_EPS:
        problems.append(
            f"layer_norm_eps is {get('layer_norm_eps')}, slit's Q-Former uses {BERT_LAYER_NORM_EPS}"
        )
    if problems:
        raise UserError("cannot initialise a Q-Former from this BERT: " + "; ".join(problems))
    bert_vocab = get("vocab_size")
    vocab_size = vocab_size if vocab_size is not None else bert_vocab + 1
    if vocab_size < bert_vocab:
        raise UserError(f"vocab_size {vocab_size} is smaller than BERT's {bert_vocab}")
    return QFormerConfig(
        vocab_size=vocab_size,
        num_queries=num_queries,
        num_layers=get("num_hidden_layers"),
        width=get("hidden_size"),
        num_heads=get("num_attention_heads"),
        mlp_dim=get("intermediate_size"),
        cross_attention_freq=cross_attention_freq,
        encoder_width=encoder_width,
        max_text_positions=get("max_position_embeddings"),
        dropout_rate=get("hidden_dropout_prob"),
        initializer_range=initializer_range if initializer_range is not None else get("initializer_range"),
    )


def _bert_prefix(state_dict: Mapping[str, Any]) -> str:
    anchor = "embeddings.word_embeddings.weight"
    if anchor in state_dict:
        return ""
    if "bert." + anchor in state_dict:
        return "bert."
    raise UserError(
        f"not a BERT state dict: neither {anchor!r} nor {'bert.' + anchor!r} is there "
        f"(first keys: {sorted(state_dict)[:6]})"
    )


def qformer_params_from_bert(
    state_dict: Mapping[str, Any],
    config: QFormerConfig,
    *,
    new_rows: np.ndarray | None = None,
    strict: bool = True,
) -> Params:
    """The BERT-initialised part of `QFormer(config)`'s params (pure dict, float32 numpy).

    Args:
      state_dict: a HF BERT state dict (`BertModel` keys, or `bert.`-prefixed as in `BertForPreTraining` /
        `BertLMHeadModel`), arrays.
      config: the Q-Former's config (see `qformer_config_from_bert`); `config.vocab_size` >= BERT's V.
      new_rows: (config.vocab_size - V, W) rows appended to the word embeddings (`[DEC]`, ...); drawn from
        normal(0, config.initializer_range) with seed 0 when None.
      strict: raise for unknown keys (else warn).

    Returns:
      Everything except `query_tokens`, `encoder_norm` and every `cross_attention`, which stay as the
      module initialised them. Load with `hf_convert.load_params`.

    Raises:
      UserError: naming each missing or mis-shaped tensor (with the expected HF shape) and unknown keys.
    """
    prefix = _bert_prefix(state_dict)
    c = config
    w = c.width
    collector = hf_convert._Collector(state_dict, prefix)

    def linear(name: str, n_in: int, n_out: int, target: str) -> dict[str, np.ndarray] | None:
        weight = collector.take(f"{name}.weight", (n_out, n_in), target)
        bias = collector.take(f"{name}.bias", (n_out,), target)
        return None if weight is None or bias is None else {"kernel": weight.T.copy(), "bias": bias}

    def norm(name: str, target: str) -> dict[str, np.ndarray] | None:
        scale, bias = (
            collector.take(f"{name}.weight", (w,), target),
            collector.take(f"{name}.bias", (w,), target),
        )
        return None if scale is None or bias is None else {"scale": scale, "bias": bias}

    flat: dict[tuple, Any] = {}
    word = collector.take_key(prefix + "embeddings.word_embeddings.weight", (None, w), "word_embeddings")
    if word is not None:
        bert_vocab = word.shape[0]
        extra = c.vocab_size - bert_vocab
        if extra < 0:
            collector.errors.append(
                f"BERT has {bert_vocab} word embeddings, more than vocab_size {c.vocab_size}"
            )
        else:
            if new_rows is None:
                new_rows = np.random.default_rng(0).normal(0.0, c.initializer_range, (extra, w))
            if new_rows.shape != (extra, w):
                collector.errors.append(f"new_rows has shape {new_rows.shape}, expected {(extra, w)}")
            else:
                flat[("word_embeddings", "embedding")] = np.concatenate([word, new_rows]).astype(np.float32)
    position = collector.take("embeddings.position_embeddings.weight", (c.max_text_positions, w), "positions")
    token_type = collector.take_key(
        prefix + "embeddings.token_type_embeddings.weight", (None, w), "positions"
    )
    if position is not None and token_type is not None:
        flat[("position_embeddings", "embedding")] = position + token_type[0]
    embedding_norm = norm("embeddings.LayerNorm", "embedding_norm")
    if embedding_norm:
        flat.update({("embedding_norm", k): v for k, v in embedding_norm.items()})
    blocks: dict[tuple, Any] = {}
    for i in range(c.num_layers):
        src = f"encoder.layer.{i}."
        target = f"layers.{i}.self_attention"
        attention = {
            k: (linear(src + v, w, w, target) if k != "norm" else norm(src + v, target))
            for k, v in _ATTENTION.items()
        }
        ffn = {
            "intermediate": linear(src + _FFN["intermediate"], w, c.mlp_dim, f"layers.{i}.ffn_text"),
            "output": linear(src + _FFN["output"], c.mlp_dim, w, f"layers.{i}.ffn_text"),
            "norm": norm(src + _FFN["norm"], f"layers.{i}.ffn_text"),
        }
        blocks[("layers", i, "self_attention")] = attention
        blocks[("layers", i, "ffn_text")] = ffn
        blocks[("layers", i, "ffn_query")] = {k: dict(v) if v else v for k, v in ffn.items()}  # BLIP-2 copies
    for path, block in blocks.items():
        for sub_path, value in traverse_util.flatten_dict({k: v for k, v in block.items() if v}).items():
            flat[path + sub_path] = value

    # Keys known to be unused.
    for key in collector.unused():
        name = key[len(prefix) :]
        if name in _IGNORED_KEYS or name.startswith(_IGNORED_PREFIXES) or name.startswith("cls.predictions."):
            collector.used.add(key)
    try:
        collector.finish("Q-Former from BERT", strict)
    except ValueError as e:
        raise UserError(str(e)) from None
    return traverse_util.unflatten_dict(
        {k: np.asarray(v, np.float32) for k, v in flat.items() if v is not None}
    )


def lm_head_params_from_bert(state_dict: Mapping[str, Any], config: QFormerConfig) -> Params | None:
    """`Stage1Model.lm_head` params from BERT's MLM head (`cls.predictions.*`), or None if it has none.

    The output bias grows with the vocabulary (new entries 0); the output matrix is the word embedding
    table in both (tied).
    """
    base = "cls.predictions."
    if base + "transform.dense.weight" not in state_dict:
        return None
    w = config.width
    collector = hf_convert._Collector(state_dict, base)
    dense = collector.take("transform.dense.weight", (w, w), "lm_head.transform")
    dense_bias = collector.take("transform.dense.bias", (w,), "lm_head.transform")
    scale = collector.take("transform.LayerNorm.weight", (w,), "lm_head.norm")
    shift = collector.take("transform.LayerNorm.bias", (w,), "lm_head.norm")
    bias = collector.take_key(base + "bias", (None,), "lm_head.bias")
    if collector.errors:
        raise UserError("cannot read BERT's MLM head:\n  " + "\n  ".join(collector.errors))
    if bias.shape[0] > config.vocab_size:
        raise UserError(
            f"cls.predictions.bias has {bias.shape[0]} entries, more than vocab_size {config.vocab_size}"
        )
    bias = np.concatenate([bias, np.zeros(config.vocab_size - bias.shape[0], bias.dtype)])
    return {
        "transform": {"kernel": dense.T.astype(np.float32), "bias": dense_bias.astype(np.float32)},
        "norm": {"scale": scale.astype(np.float32), "bias": shift.astype(np.float32)},
        "bias": bias.astype(np.float32),
    }


def complete_with_fresh_weights(params: Params, config: QFormerConfig, rng: np.random.Generator) -> Params:
    """`params` completed with freshly drawn values for every variable of `QFormer(config)` it lacks.

    Drawn as `QFormer` initialises them (slit/models/qformer.py): weight matrices, tables and query tokens
    normal(0, initializer_range), biases 0, LayerNorm scales 1. Drawing them in numpy avoids building the
    module eagerly, which dispatches (and compiles) each random op separately: ~20 s on a 2-core CPU.
    """
    targets = hf_convert._target_shapes(lambda: QFormer(config, rngs=nnx.Rngs(0)))
    flat = traverse_util.flatten_dict(params)
    for path, struct in targets.items():
        if path in flat:
            continue
        leaf = str(path[-1])
        if leaf in ("kernel", "embedding", "query_tokens"):
            flat[path] = rng.normal(0.0, config.initializer_range, struct.shape).astype(np.float32)
        elif leaf == "scale":
            flat[path] = np.ones(struct.shape, np.float32)
        elif leaf == "bias":
            flat[path] = np.zeros(struct.shape, np.float32)
        else:
            raise ValueError(f"no fresh initialiser for Q-Former variable {'.'.join(map(str, path))!r}")
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass
class BertQFormer:
    """What `init_qformer_from_bert` returns."""

    qformer: QFormer
    tokenizer: Any  # slit.data.tokenizer.TextTokenizer
    config: QFormerConfig
    lm_head: Params | None  # MLM head params for `Stage1Model.lm_head`, when the checkpoint has one
    source: str


def init_qformer_from_bert(
    directory: str | pathlib.Path,
    *,
    encoder_width: int,
    num_queries: int = 32,
    cross_attention_freq: int = 2,
    initializer_range: float | None = None,
    seed: int = 0,
) -> BertQFormer:
    """A `QFormer` and its tokenizer from a HF BERT directory (`config.json`, safetensors, tokenizer files).

    The tokenizer (`tokenizer.json` or `vocab.txt`) gets `[DEC]`; the Q-Former's vocabulary is the
    tokenizer's size with `[DEC]`, which must be at least BERT's embedding rows. The tokenizer pads to the
    length asked of `encode`, whatever padding `tokenizer.json` configures. `seed` draws the fresh weights
    (cross-attention, query tokens, `[DEC]` row: normal(0, initializer_range); `encoder_norm`: identity).

    Raises:
      FileNotFoundError: no config.json / safetensors / tokenizer in `directory`.
      UserError: a BERT this Q-Former cannot take (named field or tensor).
    """
    from slit.data.tokenizer import TextTokenizer
    from slit.interop.pretrained import module_from_params
    from slit.models.llm.loading import read_hf_checkpoint

    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no config.json in {str(directory)!r}; point to a HF BERT checkpoint directory"
        )
    bert_config, state_dict = read_hf_checkpoint(directory)
    if bert_config.get("model_type") not in ("bert", None):
        raise UserError(f"{config_file} describes a {bert_config['model_type']!r} model, not 'bert'")
    tokenizer = TextTokenizer.from_directory(directory)
    if tokenizer.vocab_size < bert_config.get("vocab_size", 0) + 1:
        raise UserError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens with [DEC], fewer than BERT's "
            f"{bert_config.get('vocab_size')} embeddings + 1: tokenizer and weights do not belong together"
        )
    config = qformer_config_from_bert(
        bert_config,
        encoder_width=encoder_width,
        num_queries=num_queries,
        cross_attention_freq=cross_attention_freq,
        vocab_size=tokenizer.vocab_size,
        initializer_range=initializer_range,
    )
    rng = np.random.default_rng(seed)
    extra_rows = config.vocab_size - bert_config["vocab_size"]
    new_rows = rng.normal(0.0, config.initializer_range, (extra_rows, config.width)).astype(np.float32)
    try:
        params = qformer_params_from_bert(state_dict, config, new_rows=new_rows)
    except UserError as e:
        raise UserError(f"BERT checkpoint {str(directory)!r}: {e}") from None
    params = complete_with_fresh_weights(params, config, rng)
    qformer = module_from_params(lambda: QFormer(config, rngs=nnx.Rngs(0)), params)
    lm_head = lm_head_params_from_bert(state_dict, config)
    return BertQFormer(qformer, tokenizer, config, lm_head, str(directory))
