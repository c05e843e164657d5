"""Config files, command-line overrides and validation.

A config is a Python file in `configs/` with `get_config() -> ml_collections.ConfigDict`. Any field
can be overridden on the command line as `--config.a.b=value`. The resolved config is validated
before anything compiles, then written to `<workdir>/config.json`.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib
import types
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from slit.errors import UserError


class ConfigError(UserError):
    """A config that cannot work. The message lists every problem and what to do about it."""


def configs_dir(needed: str = "stage1_synthetic.py") -> pathlib.Path:
    """The repository's configs/ (slit is installed from its checkout), checked to hold `needed`."""
    here = pathlib.Path(__file__).resolve().parents[1] / "configs"
    if not (here / needed).is_file():
        raise UserError(
            f"{here / needed} is missing: this command reads the configs of a checkout of the repository "
            "(pip install -e .)"
        )
    return here


def config_module(path: str | pathlib.Path) -> types.ModuleType:
    """The config file `path` imported as a module (its get_config(), and get_sweep() where it has one)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; the shipped configs are in configs/")
    spec = importlib.util.spec_from_file_location(f"slit_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports `path` and returns its `get_config()`, locked so that unknown keys cannot be added."""
    module = config_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    config = module.get_config()
    config.lock()
    return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, full + "."))
    return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parses `text` into the type of the field's current value."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected a number") from None
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key}={text}: expected a Python literal like {current!r}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]]) -> None:
    """Applies (dotted key, value text) overrides in place; unknown keys are refused with suggestions."""
    known = _all_keys(config)
    for key, text in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key --config.{key}{hint}")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} is a group of fields; set one of its fields instead")
        with node.unlocked():
            node[leaf] = _parse_value(key, text, node[leaf])


def parse_override_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """Parses `--config.a.b=value` and `--config.a.b value` arguments into (key, value) pairs."""
    overrides, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --config.a.b=value")
        body = arg[len("--config.") :]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args):
            key, value = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
        overrides.append((key, value))
        i += 1
    return overrides


def continue_stage_one(stage_two: ml_collections.ConfigDict, stage_one_file: str | pathlib.Path) -> None:
    """Sets a stage-two config's data, frozen audio encoder, Q-Former shape and feature cache to those of
    the stage-one config file (what `init_from` a run of it checks), with features=cached: the two
    stages read the same cache."""
    stage_one = load_config_file(stage_one_file)
    for key in ("name", "data_dir", "sample_rate", "max_seconds"):
        stage_two.data[key] = stage_one.data[key]
    stage_two.audio_encoder = stage_one.audio_encoder
    for key in ("init", "num_queries", "cross_attention_freq", "dropout", "initializer_range"):
        stage_two.qformer[key] = stage_one.qformer[key]
    stage_two.features = "cached"
    stage_two.features_dir = stage_one.features_dir


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def validate_stage1(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Checks everything that can be checked before compiling; raises ConfigError listing all problems."""
    from slit.train import harness, pretrained  # the checks every trainer shares; the components'
    from slit.train.accumulation import accumulation_problems

    problems = harness.common_problems(config, num_devices, num_processes)
    problems += accumulation_problems(config, harness.data_parallel_size(config, num_devices))
    if config.batch_size < 2:
        problems.append(f"batch_size={config.batch_size}: contrastive and matching losses need at least 2")
    elif config.batch_size < 2 * int(config.get("grad_accum_steps", 1)):
        problems.append(
            f"batch_size={config.batch_size} with grad_accum_steps={config.grad_accum_steps}: each "
            "micro-batch is a contrastive batch of its own and needs at least 2 rows"
        )
    q = config.qformer
    problems.extend(pretrained.audio_problems(config))
    problems.extend(pretrained.qformer_problems(config))
    if q.num_queries < 1:
        problems.append(f"qformer.num_queries={q.num_queries} must be at least 1")
    features = config.get("features", "compute")
    if features not in ("compute", "cached"):
        problems.append(
            f"features={features!r}: use 'compute' (run the frozen encoder every step) or 'cached' "
            "(read `slit cache-features` output)"
        )
    if not 0 <= q.dropout < 1:
        problems.append(f"qformer.dropout={q.dropout} must be in [0, 1)")
    tok = config.tokenizer
    if not q.get("init", "") and tok.kind not in ("synthetic_words", "train_words", "directory"):
        problems.append(f"tokenizer.kind={tok.kind!r}: use 'synthetic_words', 'train_words' or 'directory'")
    if not 0 <= float(tok.get("max_unknown_fraction", 1.0)) <= 1:
        problems.append(f"tokenizer.max_unknown_fraction={tok.max_unknown_fraction} must be in [0, 1]")
    if int(tok.get("min_count", 1)) < 1:
        problems.append(f"tokenizer.min_count={tok.min_count} must be at least 1")
    loss = config.loss
    if not 0 < loss.temperature_min <= loss.temperature_init <= loss.temperature_max:
        problems.append("loss: need 0 < temperature_min <= temperature_init <= temperature_max")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
