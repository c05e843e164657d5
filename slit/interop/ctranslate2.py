"""CTranslate2 model directories (faster-whisper) -> slit's Whisper encoder, without CTranslate2 itself.

A CTranslate2 model directory holds `model.bin` (every weight, in CTranslate2's own binary format), a
`config.json` (generation settings, not sizes) and a vocabulary. Large `model.bin` files are sometimes
split into byte ranges (`model.bin.part1`, `model.bin.part2`, ...; or parts shipped in different places):
`read_model_bin` reads the parts in order as one stream, never joining them on disk or in memory.

The binary format (CTranslate2 `python/ctranslate2/specs/model_spec.py` writes it,
`src/models/model.cc` reads it), little-endian:

    uint32 binary_version                        (1 .. 6)
    if version >= 2: string spec_name, uint32 spec_revision
    uint32 num_variables, then per variable:
        string name; uint8 rank; uint32 dims[rank]
        version >= 4: uint8 dtype_id, uint32 num_bytes
        version <  4: uint8 item_size (4 float32, 2 int16, 1 int8), uint32 num_items
        bytes data (row-major)
    if version >= 3: uint32 num_aliases, then per alias: string alias, string target_name
    string := uint16 length (including the trailing NUL), bytes, NUL

dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Quantized weights `.../weight`
come with `.../weight_scale`: int8 has one float scale per output row (per output channel for convolutions),
int16 one scalar; the float value is `quantized / scale`, as CTranslate2's Dequantize op computes it.
fp16 and bf16 are widened to float32 exactly.

Whisper encoder variables (CTranslate2 `WhisperEncoderSpec`), W = width, M = mel bins, F = mlp dim:

    encoder/num_heads                                    int16 scalar
    encoder/conv{1,2}/{weight,bias}                      (W, M or W, 3), (W,)
    encoder/position_encodings/encodings                 (max_positions, W)
    encoder/layer_{i}/self_attention/layer_norm/{gamma,beta}
    encoder/layer_{i}/self_attention/linear_0/{weight,bias}   fused q|k|v (3W, W), (3W,) (k bias is 0)
    encoder/layer_{i}/self_attention/linear_1/{weight,bias}   output (W, W)
    encoder/layer_{i}/ffn/layer_norm/{gamma,beta}
    encoder/layer_{i}/ffn/linear_0/{weight,bias}         (F, W)
    encoder/layer_{i}/ffn/linear_1/{weight,bias}         (W, F)
    encoder/layer_norm/{gamma,beta}
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import struct
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np

from slit.errors import UserError
from slit.models.audio.whisper import WhisperEncoderConfig

__all__ = [
    "CT2Model",
    "find_model_bin_parts",
    "read_model_bin",
    "whisper_encoder_config",
    "whisper_encoder_params",
]

MODEL_BIN = "model.bin"
_SUPPORTED_BINARY_VERSIONS = range(1, 7)
_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16: the upper 16 bits of a float32
}
_DTYPE_BY_ITEM_SIZE = {4: 0, 2: 2, 1: 1}  # binary versions < 4
_PART_SUFFIX = re.compile(r"^model\.bin\.part(\d+)$")


class _ChainedReader:
    """Reads a sequence of files as one byte stream; skipping seeks instead of reading."""

    def __init__(self, paths: Sequence[pathlib.Path]):
        self.paths = list(paths)
        self.sizes = [p.stat().st_size for p in self.paths]
        self.total = sum(self.sizes)
        self.position = 0
        self._index = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> _ChainedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, index: int, offset: int) -> BinaryIO:
        if self._index != index or self._file is None:
            if self._file is not None:
                self._file.close()
            self._file = open(self.paths[index], "rb")  # noqa: SIM115 (closed on switch and in __exit__)
            self._index = index
        self._file.seek(offset)
        return self._file

    def _locate(self, position: int) -> tuple[int, int]:
        for index, size in enumerate(self.sizes):
            if position < size:
                return index, position
            position -= size
        return len(self.sizes), 0

    def read(self, n: int, what: str) -> bytes:
        """Exactly `n` bytes, across file boundaries; a clear error when the stream ends first."""
        if self.position + n > self.total:
            raise UserError(
                f"{_describe(self.paths)} ends after {self.total} bytes while reading {what} "
                f"({n} bytes at offset {self.position}): the file is truncated"
                + (" or a part is missing" if len(self.paths) > 1 else "")
                + "; re-download or re-convert the model"
            )
        chunks = []
        while n:
            index, offset = self._locate(self.position)
            take = min(n, self.sizes[index] - offset)
            chunks.append(self._open(index, offset).read(take))
            self.position += take
            n -= take
        return b"".join(chunks)

    def skip(self, n: int, what: str) -> None:
        if self.position + n > self.total:
            self.read(n, what)  # raises
        self.position += n

    def unpack(self, fmt: str, what: str) -> Any:
        values = struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))
        return values[0] if len(values) == 1 else values

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        raw = self.read(length, what)
        return raw.rstrip(b"\0").decode("utf-8")


def _describe(paths: Sequence[pathlib.Path]) -> str:
    if len(paths) == 1:
        return f"CTranslate2 model file {str(paths[0])!r}"
    return f"CTranslate2 model file in {len(paths)} parts ({', '.join(repr(str(p)) for p in paths)})"


@dataclasses.dataclass
class CT2Model:
    """The contents of a `model.bin`: spec name and revision, and its variables as numpy arrays.

    `variables` maps each name to its stored array (dtype as stored; bfloat16 as uint16 bits); aliases
    are resolved to the array they name.
    """

    spec: str
    spec_revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    source: str

    def float32(self, name: str) -> np.ndarray:
        """Variable `name` as float32, dequantized as CTranslate2 does (see the module docstring)."""
        if name not in self.variables:
            raise UserError(
                f"{self.source} has no variable {name!r}; is it a {self.spec} model of this kind?"
            )
        value = self.variables[name]
        if value.dtype == np.float32:
            return value
        if value.dtype == np.float16:
            return value.astype(np.float32)
        if value.dtype == np.uint16:  # bfloat16 bits
            return (value.astype(np.uint32) << 16).view(np.float32)
        if value.dtype in (np.int8, np.int16):
            scale = self.variables.get(name + "_scale")
            if scale is None:
                raise UserError(
                    f"{self.source}: quantized variable {name!r} ({value.dtype}) has no {name + '_scale'!r}"
                )
            scale = scale.astype(np.float32)
            if value.dtype == np.int8 and scale.ndim == 1:  # one scale per output row / channel
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            return value.astype(np.float32) / scale
        raise UserError(f"{self.source}: variable {name!r} has dtype {value.dtype}, not a float weight")


def find_model_bin_parts(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """`[directory/model.bin]`, or the numbered parts `model.bin.part1, part2, ...` in numeric order.

    Raises FileNotFoundError when there is neither, and UserError when part numbers have gaps.
    """
    directory = pathlib.Path(directory)
    if (directory / MODEL_BIN).is_file():
        return [directory / MODEL_BIN]
    parts = {}
    if directory.is_dir():
        for path in directory.iterdir():
            match = _PART_SUFFIX.match(path.name)
            if match:
                parts[int(match.group(1))] = path
    if not parts:
        raise FileNotFoundError(
            f"no {MODEL_BIN} (or {MODEL_BIN}.part1, .part2, ...) in {str(directory)!r}; "
            "point to a CTranslate2 / faster-whisper model directory"
        )
    numbers = sorted(parts)
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))) or numbers[0] not in (0, 1):
        raise UserError(
            f"{MODEL_BIN} parts in {str(directory)!r} are numbered {numbers}: a part is missing "
            "(expected consecutive numbers from 1)"
        )
    return [parts[n] for n in numbers]


def _read_variables(stream: _ChainedReader, version: int, keep: Any) -> Iterator[tuple[str, np.ndarray]]:
    count = stream.unpack("I", "the number of variables")
    for i in range(count):
        name = stream.string(f"the name of variable #{i}")
        rank = stream.unpack("B", f"the rank of {name!r}")
        shape = struct.unpack(f"<{rank}I", stream.read(4 * rank, f"the shape of {name!r}"))
        if version >= 4:
            dtype_id, num_bytes = stream.unpack("BI", f"the dtype of {name!r}")
        else:
            item_size, num_items = stream.unpack("BI", f"the dtype of {name!r}")
            if item_size not in _DTYPE_BY_ITEM_SIZE:
                raise UserError(f"{stream.paths[0]}: variable {name!r} has items of {item_size} bytes")
            dtype_id, num_bytes = _DTYPE_BY_ITEM_SIZE[item_size], num_items * item_size
        if dtype_id not in _DTYPES:
            raise UserError(
                f"{_describe(stream.paths)}: variable {name!r} has unknown dtype id {dtype_id} "
                f"(known: {sorted(_DTYPES)}); the file may be newer than this reader or corrupt"
            )
        dtype = _DTYPES[dtype_id]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if num_bytes != expected:
            raise UserError(
                f"{_describe(stream.paths)}: variable {name!r} of shape {shape} and dtype {dtype} "
                f"should hold {expected} bytes, the file says {num_bytes}: the file is corrupt"
            )
        if keep(name):
            data = stream.read(num_bytes, f"the data of {name!r}")
            yield name, np.frombuffer(data, dtype).reshape(shape)
        else:
            stream.skip(num_bytes, f"the data of {name!r}")


def read_model_bin(
    paths: str | pathlib.Path | Sequence[str | pathlib.Path], *, prefix: str | None = None
) -> CT2Model:
    """Reads a CTranslate2 `model.bin` (one file, or its byte-range parts in order), streaming.

    Args:
      paths: the `model.bin` file, a model directory, or the list of parts in order.
      prefix: keep only variables whose name starts with it (e.g. `"encoder/"`); the others are skipped
        (seeked over) without being read. Aliases of kept variables are kept too.

    Raises:
      FileNotFoundError: a path does not exist.
      UserError: the file is not a CTranslate2 model, is newer than this reader, or is truncated.
    """
    if isinstance(paths, (str, pathlib.Path)):
        path = pathlib.Path(paths)
        paths = find_model_bin_parts(path) if path.is_dir() else [path]
    paths = [pathlib.Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"CTranslate2 model file {str(p)!r} does not exist")
    source = _describe(paths)
    with _ChainedReader(paths) as stream:
        version = stream.unpack("I", "the binary version")
        if version not in _SUPPORTED_BINARY_VERSIONS:
            raise UserError(
                f"{source} has binary version {version}; this reader knows versions 1 to "
                f"{_SUPPORTED_BINARY_VERSIONS[-1]} (is it a CTranslate2 model.bin at all?)"
            )
        spec, revision = "", 1
        if version >= 2:
            spec = stream.string("the spec name")
            revision = stream.unpack("I", "the spec revision")
        variables = dict(_read_variables(stream, version, lambda name: name.startswith(prefix or "")))
        if version >= 3:
            for i in range(stream.unpack("I", "the number of aliases")):
                alias = stream.string(f"alias #{i}")
                target = stream.string(f"the target of alias {alias!r}")
                for suffix in ("", "_scale"):
                    if target + suffix in variables:
                        variables[alias + suffix] = variables[target + suffix]
    return CT2Model(spec, revision, version, variables, source)


# ---------------------------------------------------------------------------------------------------------
# Whisper.


def _layer_indices(model: CT2Model) -> list[int]:
    found = {int(m.group(1)) for n in model.variables if (m := re.match(r"encoder/layer_(\d+)/", n))}
    indices = sorted(found)
    if indices != list(range(len(indices))):
        raise UserError(f"{model.source}: encoder layers {indices} are not numbered 0..{len(indices) - 1}")
    return indices


def whisper_encoder_config(model: CT2Model) -> WhisperEncoderConfig:
    """Encoder sizes inferred from the variables: layers, width, heads, mel bins, MLP width, positions.

    Raises UserError when the file is not a CTranslate2 Whisper model.
    """
    if model.spec and model.spec != "WhisperSpec":
        raise UserError(f"{model.source} holds a {model.spec!r} model, not Whisper ('WhisperSpec')")
    if "encoder/conv1/weight" not in model.variables:
        raise UserError(f"{model.source} has no 'encoder/conv1/weight': not a Whisper encoder")
    layers = _layer_indices(model)
    if not layers:
        raise UserError(f"{model.source} has no encoder layers ('encoder/layer_0/...')")
    width, num_mel_bins, _ = model.variables["encoder/conv1/weight"].shape
    num_heads = model.variables.get("encoder/num_heads")
    if num_heads is None:
        raise UserError(f"{model.source} has no 'encoder/num_heads'; cannot tell the number of heads")
    positions = model.variables.get("encoder/position_encodings/encodings")
    return WhisperEncoderConfig(
        num_mel_bins=int(num_mel_bins),
        width=int(width),
        num_layers=len(layers),
        num_heads=int(num_heads),
        mlp_dim=int(model.variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_positions=int(positions.shape[0]) if positions is not None else 1500,
    )


def whisper_encoder_state_dict(model: CT2Model, config: WhisperEncoderConfig) -> dict[str, np.ndarray]:
    """The encoder's weights under Hugging Face `WhisperEncoder` names (float32, PyTorch layouts).

    The fused q|k|v projection is split in three; the key bias (zero in Whisper) is dropped. Raises
    UserError if the fused key bias is not zero (the model would not be a Whisper encoder).
    """
    w = config.width
    sd: dict[str, np.ndarray] = {}
    for i in range(config.num_layers):
        src, dst = f"encoder/layer_{i}/", f"layers.{i}."
        qkv_w = model.float32(src + "self_attention/linear_0/weight")
        qkv_b = model.float32(src + "self_attention/linear_0/bias")
        if qkv_w.shape != (3 * w, w) or qkv_b.shape != (3 * w,):
            raise UserError(
                f"{model.source}: {src}self_attention/linear_0 has shapes {qkv_w.shape}, {qkv_b.shape}; "
                f"expected the fused q|k|v projection ({3 * w}, {w}), ({3 * w},)"
            )
        if np.any(qkv_b[w : 2 * w]):
            raise UserError(f"{model.source}: {src}self_attention/linear_0 has a key bias; Whisper has none")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{dst}self_attn.{proj}.weight"] = qkv_w[j * w : (j + 1) * w]
            if proj != "k_proj":
                sd[f"{dst}self_attn.{proj}.bias"] = qkv_b[j * w : (j + 1) * w]
        pairs = {
            "self_attn.out_proj": "self_attention/linear_1",
            "fc1": "ffn/linear_0",
            "fc2": "ffn/linear_1",
        }
        for hf, ct2 in pairs.items():
            sd[f"{dst}{hf}.weight"] = model.float32(f"{src}{ct2}/weight")
            sd[f"{dst}{hf}.bias"] = model.float32(f"{src}{ct2}/bias")
        for hf, ct2 in {
            "self_attn_layer_norm": "self_attention/layer_norm",
            "final_layer_norm": "ffn/layer_norm",
        }.items():
            sd[f"{dst}{hf}.weight"] = model.float32(f"{src}{ct2}/gamma")
            sd[f"{dst}{hf}.bias"] = model.float32(f"{src}{ct2}/beta")
    for conv in ("conv1", "conv2"):
        sd[f"{conv}.weight"] = model.float32(f"encoder/{conv}/weight")
        sd[f"{conv}.bias"] = model.float32(f"encoder/{conv}/bias")
    sd["layer_norm.weight"] = model.float32("encoder/layer_norm/gamma")
    sd["layer_norm.bias"] = model.float32("encoder/layer_norm/beta")
    if "encoder/position_encodings/encodings" in model.variables:
        sd["embed_positions.weight"] = model.float32("encoder/position_encodings/encodings")
    return sd


def whisper_encoder_params(model: CT2Model, config: WhisperEncoderConfig | None = None) -> dict[str, Any]:
    """Params of slit's `WhisperEncoder` (pure dict, float32 numpy) from a read CTranslate2 Whisper model.

    Every encoder variable must be used and have the expected shape (errors name the variable).
    """
    from slit.interop import hf_convert  # late: hf_convert imports the Q-Former too

    config = config or whisper_encoder_config(model)
    state_dict = whisper_encoder_state_dict(model, config)
    if "embed_positions.weight" not in state_dict:  # older conversions: sinusoids are implied
        from slit.models.audio.whisper import sinusoids

        state_dict["embed_positions.weight"] = sinusoids(config.max_positions, config.width)
    try:
        return hf_convert.whisper_encoder_params(state_dict, config, prefix="")
    except ValueError as e:
        raise UserError(f"{model.source}: {e}") from None
