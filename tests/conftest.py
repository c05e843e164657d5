"""Shared fixtures: a tiny synthetic dataset and a tiny stage-one config."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from slit import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_DATA = "slit_synthetic_sounds/tiny"

# The `slit` commands the tests start run a few tiny steps each, so their time is XLA compilation, which
# the malloc settings of slit/train/host_memory.py make ~20% slower (they pay back only in long steps).
# tests/test_host_memory.py tests those settings with this variable removed.
os.environ.setdefault("SLIT_KEEP_FREED_MEMORY", "0")

# Most tests compile the same tiny steps: one persistent compilation cache for the whole session (both
# xdist workers and every `slit` command they start) loads them instead (slit/train/compile_cache.py).
# It lives in the checkout (gitignored), so a CI run on a clean clone starts empty.
os.environ.setdefault("SLIT_COMPILATION_CACHE", str(ROOT / ".jax_cache"))


# Tiny steps spend their time in XLA's compiler, not in running: without LLVM's optimisation passes the CPU
# backend compiles them ~25-30% faster (2026-12-05, 2 cores: a stage-one test 11.9 -> 8.2 s, the CLI's
# short run 55 -> 43 s). The programs are the same HLO, run unoptimised; the demo, which runs real models
# for longer, pays ~6% (162 -> 172 s). Every process the tests start inherits the flag; tests that set
# XLA_FLAGS for a device count use `xla_flags(n)` to keep it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process of `devices` simulated CPU devices, with the tests' own flags."""
    return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


def pytest_configure(config: pytest.Config) -> None:
    from slit.train import compile_cache

    compile_cache.enable_compilation_cache()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The `tiny` synthetic dataset (64/16/16 clips), built once per test session."""
    from slit.data import synthetic_builder

    data_dir = tmp_path_factory.mktemp("tfds")
    synthetic_builder.prepare(str(data_dir), "tiny", verbose=False)
    return str(data_dir)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: str) -> tuple:
    """(workdir, config) of a 2-step tiny stage-one run, with its checkpoint and test evaluation report."""
    from slit.train import stage1

    workdir = tmp_path_factory.mktemp("trained_run")
    config = tiny_config(tiny_data_dir, total_steps=2)
    stage1.train(config, workdir)
    return workdir, config


def tiny_overrides(data_dir: str, **extra: object) -> dict[str, object]:
    """Overrides that shrink configs/stage1_synthetic.py to seconds of CPU time."""
    overrides: dict[str, object] = {
        "data.name": TINY_DATA,
        "data.data_dir": data_dir,
        "data.max_seconds": 2.0,
        "batch_size": 8,
        "total_steps": 4,
        "log_every_steps": 2,
        "eval_every_steps": 0,
        "checkpoint_every_steps": 2,
        "optimizer.warmup_steps": 1,
        "audio_encoder.width": 32,
        "audio_encoder.layers": 1,
        "audio_encoder.heads": 2,
        "audio_encoder.mlp_dim": 64,
        "qformer.num_queries": 4,
        "qformer.layers": 2,
        "qformer.width": 32,
        "qformer.heads": 4,
        "qformer.mlp_dim": 64,
        "qformer.embed_dim": 16,
        "qformer.initializer_range": 0.15,
        "retrieval_rerank_k": 4,
    }
    overrides.update(extra)
    return overrides


def tiny_config(data_dir: str, **extra: object) -> ml_collections.ConfigDict:
    config = config_lib.load_config_file(ROOT / "configs" / "stage1_synthetic.py")
    config_lib.apply_overrides(config, [(k, str(v)) for k, v in tiny_overrides(data_dir, **extra).items()])
    return config


def train_batches(config: ml_collections.ConfigDict, tokenizer: object, count: int) -> list[dict]:
    """The first `count` training batches of `config`'s dataset (seed 0)."""
    from slit.data import pipeline, sources

    spec = pipeline.AudioSpec(config.data.sample_rate, int(config.data.max_seconds * config.data.sample_rate))
    source = sources.open_split(config.data.name, config.data.data_dir, "train")
    stream = pipeline.train_dataset(
        source,
        tokenizer,
        spec,
        max_text_length=config.data.max_text_length,
        global_batch_size=config.batch_size,
        seed=0,
    )
    it = iter(stream)
    return [next(it) for _ in range(count)]


def run_slit(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs the `slit` command line in a subprocess from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "slit.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
