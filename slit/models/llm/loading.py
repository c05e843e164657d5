"""Reading Hugging Face LLM checkpoint directories, and checking converted weights before use.

A checkpoint directory holds `config.json` and its weights as safetensors: one `model.safetensors`,
or shards listed in `model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`).
PyTorch pickles (`pytorch_model.bin`, `*.pt`) are never read: a directory holding only those is
refused with a message saying how to convert it.

Converters (llama.py, gpt2.py, gguf.py, t5.py) follow one pattern:

    config, tensors = read_hf_checkpoint(directory)
    source = TensorSource(tensors, origin=str(directory))
    build = lambda: Model(cfg, rngs=nnx.Rngs(0))
    for path, struct in expected_shapes(build).items():   # what the module needs
        value = source.take(hf_name(path), hf_shape(struct.shape), target=".".join(path))
        ...                                               # -> nested pure dict `params`, numpy leaves
    module = build_frozen(build, params, what="Llama", origin=..., source=source, names=...)

`build_frozen` compares the params against the shapes the module expects and raises one
`UserError` that lists every missing, unexpected and mis-shaped tensor (by checkpoint name), then
builds the module without ever allocating random weights.
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from jax.typing import DTypeLike

from slit.errors import UserError
from slit.models.llm.base import TokenIds

__all__ = [
    "Params",
    "TensorSource",
    "build_frozen",
    "check_params",
    "expected_shapes",
    "load_tokenizer",
    "read_hf_checkpoint",
    "read_safetensors_file",
    "token_ids_from_config",
]

Params = dict[str, Any]  # nested pure dict, as `nnx.to_pure_dict` returns
Path = tuple[str | int, ...]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# safetensors dtypes numpy lacks; read through ml_dtypes (a jax dependency).
_EXTRA_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def _dotted(path: Path) -> str:
    return ".".join(map(str, path))


# ---------------------------------------------------------------------------------------------------------
# Reading files.


def read_json(path: pathlib.Path) -> dict[str, Any]:
    """A JSON object from `path`; UserError naming the file when it is not valid JSON."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-save or re-download it") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def read_safetensors_file(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy arrays, in their stored dtype (bf16 via ml_dtypes).

    Raises UserError naming the file when it is not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    needs_raw: list[str] = []
    try:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                try:
                    tensors[name] = f.get_tensor(name)
                except TypeError:  # a dtype numpy does not know (bf16, fp8)
                    needs_raw.append(name)
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read safetensors file {path}: {e}; re-download or re-convert it") from None
    if needs_raw:
        tensors.update(_read_raw(path, needs_raw))
    return tensors


def _read_raw(path: pathlib.Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Tensors whose dtype numpy lacks, read from the safetensors layout (u64 header size, JSON, data)."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    out = {}
    for name in names:
        info = header[name]
        dtype = _EXTRA_DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(
                f"tensor {name!r} in {path} has dtype {info['dtype']}, which slit cannot read; "
                f"supported: numpy dtypes and {sorted(_EXTRA_DTYPES)}"
            )
        start, end = info["data_offsets"]
        out[name] = np.array(data[start:end]).view(dtype).reshape(info["shape"])
    return out


def read_hf_checkpoint(directory: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: numpy array}) of a Hugging Face checkpoint directory.

    Reads `model.safetensors`, or every shard named in `model.safetensors.index.json`. Arrays keep their
    stored dtype (float32, float16 or bfloat16); converters cast them.

    Raises:
      FileNotFoundError: the directory, its config.json, or a shard the index names does not exist.
      UserError: only PyTorch pickles are present (convert them to safetensors), no weights at all, an
        unreadable file, or an index whose shards lack tensors it lists.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json; a Hugging Face checkpoint directory holds config.json "
            f"and {SINGLE_FILE} (or {INDEX_FILE} and its shards)"
        )
    config = read_json(config_path)
    index_path = directory / INDEX_FILE
    if (directory / SINGLE_FILE).is_file():
        tensors = read_safetensors_file(directory / SINGLE_FILE)
    elif index_path.is_file():
        tensors = _read_sharded(directory, index_path)
    else:
        pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in directory.glob(pattern))
        if pickles:
            raise UserError(
                f"{directory} holds PyTorch pickles only ({', '.join(pickles)}); slit never reads pickles. "
                f"Convert them to safetensors, e.g. in Python: "
                f"`transformers.AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)` "
                f"(writes {SINGLE_FILE} by default)"
            )
        raise UserError(f"{directory} has no {SINGLE_FILE} and no {INDEX_FILE}: no weights to load")
    return config, tensors


def _read_sharded(directory: pathlib.Path, index_path: pathlib.Path) -> dict[str, np.ndarray]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path} has no 'weight_map' object mapping tensor names to shard files")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = directory / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard} named in {index_path} does not exist in {directory}")
        tensors.update(read_safetensors_file(shard_path))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise UserError(
            f"{index_path} lists {len(absent)} tensor(s) that its shards do not hold: {absent[:10]}; "
            "the download is incomplete or the index is stale"
        )
    return tensors


def load_tokenizer(directory: str | pathlib.Path) -> Any:
    """The tokenizer saved in a checkpoint directory (transformers `AutoTokenizer`, local files only).

    Raises FileNotFoundError when the directory holds no tokenizer files.
    """
    directory = pathlib.Path(directory)
    known = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
    if not any((directory / name).is_file() for name in known):
        raise FileNotFoundError(
            f"{directory} holds no tokenizer (none of {', '.join(known)}); save one next to the weights "
            "with `tokenizer.save_pretrained(dir)`"
        )
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def token_ids_from_config(
    config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
) -> TokenIds:
    """Special token ids from config.json (and generation_config.json, whose eos list wins when given)."""
    generation_config = generation_config or {}
    eos = _ids(generation_config.get("eos_token_id")) or _ids(config.get("eos_token_id"))
    bos = generation_config.get("bos_token_id", config.get("bos_token_id"))
    pad = generation_config.get("pad_token_id", config.get("pad_token_id"))
    return TokenIds(bos=bos, eos=eos, pad=_ids(pad)[0] if _ids(pad) else None)


def read_generation_config(directory: str | pathlib.Path) -> dict[str, Any]:
    """generation_config.json of a checkpoint directory, or {} when it has none."""
    path = pathlib.Path(directory) / "generation_config.json"
    return read_json(path) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------
# Checking converted weights.


class TensorSource:
    """Hands out a checkpoint's tensors by name, recording what was used, missing or mis-shaped."""

    def __init__(self, tensors: Mapping[str, Any], origin: str):
        self.tensors = tensors
        self.origin = origin
        self.used: set[str] = set()
        self.problems: dict[str, str] = {}  # checkpoint name -> what is wrong with it

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: Sequence[int] | None = None, target: str = "") -> np.ndarray | None:
        """The tensor `name` as numpy; None (and a recorded problem) when absent or not of `shape`.

        `shape` is in the checkpoint's layout; `target` names the slit weight it is for, for messages.
        """
        for_target = f" (for slit {target!r})" if target else ""
        if name not in self.tensors:
            want = f", expected shape {tuple(shape)}" if shape is not None else ""
            self.problems[name] = f"missing tensor {name!r}{want}{for_target}"
            return None
        self.used.add(name)
        value = np.asarray(self.tensors[name])
        if shape is not None and value.shape != tuple(shape):
            self.problems[name] = (
                f"tensor {name!r} has shape {value.shape}, expected {tuple(shape)}{for_target}"
            )
            return None
        return value

    def mark_used(self, names: Iterable[str]) -> None:
        """Counts `names` as used (tensors the model does not need, e.g. cached rotary frequencies)."""
        self.used.update(names)

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def expected_shapes(build: Callable[[], nnx.Module]) -> dict[Path, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of every variable `build()` would create, without allocating it."""
    abstract = nnx.eval_shape(build)
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))


def check_params(
    params: Params,
    expected: Mapping[Path, Any],
    *,
    what: str,
    origin: str,
    names: Mapping[Path, str] | None = None,
    source_problems: Mapping[str, str] | None = None,
    unused_tensors: Iterable[str] = (),
) -> None:
    """Raises one UserError listing every problem of a converted param tree, or returns None.

    Args:
      params: nested pure dict (leaves with `.shape`), as converted; a leaf may be None when its
        checkpoint tensor was missing.
      expected: flat {path: anything with `.shape`}, e.g. from `expected_shapes`.
      what, origin: the model name and the file/directory, for the message.
      names: slit path -> checkpoint tensor name, to name tensors as the checkpoint spells them.
      source_problems: checkpoint name -> problem found while taking it (`TensorSource.problems`);
        params from those tensors are not reported a second time.
      unused_tensors: checkpoint tensors no slit weight took.
    """
    names = names or {}
    flat = traverse_util.flatten_dict(params) if params else {}
    problems: list[str] = []

    def label(path: Path) -> str:
        return f"{names[path]!r} (slit {_dotted(path)!r})" if path in names else f"slit {_dotted(path)!r}"

    source_problems = source_problems or {}
    problems.extend(source_problems[name] for name in sorted(source_problems))
    for path, want in expected.items():
        got = flat.get(path)
        if got is None and names.get(path) in source_problems:
            continue
        if got is None:
            problems.append(f"missing tensor {label(path)}, expected shape {tuple(want.shape)}")
        elif tuple(np.shape(got)) != tuple(want.shape):
            shape = tuple(np.shape(got))
            problems.append(f"tensor {label(path)} has shape {shape}, expected {tuple(want.shape)}")
    for path in sorted(set(flat) - set(expected), key=_dotted):
        problems.append(f"unexpected {label(path)} (the model has no such weight)")
    unused = sorted(unused_tensors)
    if unused:
        problems.append(f"{len(unused)} unused checkpoint tensor(s): {unused}")
    if problems:
        raise UserError(
            f"cannot load {what} from {origin}: {len(problems)} problem(s):\n  "
            + "\n  ".join(problems)
            + "\nThe checkpoint does not match its config.json (or the architecture slit builds from it)."
        )


def build_frozen(
    build: Callable[[], nnx.Module],
    params: Params,
    *,
    what: str,
    origin: str,
    source: TensorSource | None = None,
    names: Mapping[Path, str] | None = None,
    dtype: DTypeLike | None = None,
    strict: bool = True,
    layout_build: Callable[[], nnx.Module] | None = None,
) -> nnx.Module:
    """The module `build()` would make, with every variable set from `params` (checked first).

    No random weights are allocated: the module is built abstractly and filled. Leaves are cast to
    `dtype` when given (e.g. bfloat16 for frozen weights), else to the dtype the module declares.

    Raises:
      UserError: from `check_params`, listing all missing, unexpected and mis-shaped tensors (and the
        checkpoint tensors nothing used, when `strict`).
    """
    expected = expected_shapes(build)
    check_params(
        params,
        expected,
        what=what,
        origin=origin,
        names=names,
        source_problems=source.problems if source else None,
        unused_tensors=source.unused() if (source and strict) else (),
    )
    if layout_build is not None:
        from slit.models.layers import to_layout

        build = layout_build
        expected = expected_shapes(build)
        like = traverse_util.unflatten_dict(expected)
        params = to_layout(traverse_util.unflatten_dict(traverse_util.flatten_dict(params)), like)
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    flat = traverse_util.flatten_dict(params)
    filled = {
        path: jax.numpy.asarray(np.asarray(flat[path]), dtype=dtype or struct_.dtype)
        for path, struct_ in expected.items()
    }
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(filled))
    return nnx.merge(graphdef, state)
