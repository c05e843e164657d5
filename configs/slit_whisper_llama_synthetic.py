"""SLIT with Whisper and a Llama-family LLM at synthetic scale (2-core CPU): the pretrained Whisper base
encoder, a MiniLM-initialised Q-Former and the frozen SmolLM2-135M-Instruct (Llama architecture), on the
built-in synthetic sounds. The recipe of configs/slit_whisper_llama.py at a size this machine trains.

Commands (nothing is downloaded):

    slit cache-features --config configs/stage1_whisper_base.py
    slit train --config configs/stage1_whisper_base.py --workdir runs/stage1_whisper_base
    slit train --config configs/slit_whisper_llama_synthetic.py --workdir runs/slit_whisper_llama_synthetic \\
        --config.init_from=runs/stage1_whisper_base

Expected (2-core CPU, measured 2026-12-05 with the stage-two settings of configs/stage2_whisper_base.py,
which this config is): stage one 13 min, text->audio R@1 43.1%; stage two 1,000 steps in ~50 min, on the
250 test clips QA 71.6% against 48.0% for each question type's majority answer, captioning CIDEr-D 0.528
against 0.513 for the audio-blind baseline (README: Stage two on real encoders).

Differs from the paper-scale variant in the data (synthetic sounds), the Q-Former (MiniLM-L6, not
BERT-base), the LLM's size (135M) and the schedule (1,000 steps, the Q-Former at a tenth of the projection's
learning rate).
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage2_whisper_base.py")


def get_config() -> ml_collections.ConfigDict:
    return config_lib.load_config_file(BASE)
