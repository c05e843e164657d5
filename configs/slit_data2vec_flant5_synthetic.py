"""SLIT stage two at synthetic scale (2-core CPU): the Q-Former of a
configs/slit_data2vec_flant5_synthetic_stage1.py run prompts a small random T5 (Flan-T5's layout: an
encoder-decoder read as a prefix LM), instruction-tuned on the synthetic sounds' captions and questions.

Commands (after the stage-one run; the same feature cache):

    slit train --config configs/slit_data2vec_flant5_synthetic.py --workdir runs/slit_synthetic \\
        --config.init_from=runs/slit_synthetic_stage1

Where this differs from the paper-scale recipe (configs/slit_data2vec_flant5.py): the LLM is a random T5
of width 64, 2 layers (Flan-T5-XL does not install offline) with a word-level vocabulary over the synthetic
data's words, so what it measures is whether the bridge learns to steer a frozen encoder-decoder, not
language quality; the encoder and Q-Former are the synthetic stage one's.

Expected (2-core CPU, measured 2026-12-05, alone): 1,000 steps in 2 min 1 s with the test evaluation; loss
20 -> 6; QA 36.4% (majority 48.0%), CIDEr-D 0.026 (audio-blind 0.513), classification 30.4% of 5 classes: a
random LM does not beat the baselines (README: Recipes).
"""

import pathlib

import ml_collections

from slit import config as config_lib

STAGE_ONE = pathlib.Path(__file__).with_name("slit_data2vec_flant5_synthetic_stage1.py")
BASE = pathlib.Path(__file__).with_name("stage2_synthetic.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)
    config_lib.continue_stage_one(c, STAGE_ONE)  # its data, encoder, Q-Former shape and feature cache
    c.llm.kind = "random"
    c.llm.arch = "t5"
    c.llm.width = 64
    c.llm.layers = 2
    c.llm.heads = 4
    c.llm.mlp_dim = 256
    c.llm.match_embedding_scale = True
    return c
