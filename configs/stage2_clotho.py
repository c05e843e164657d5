"""Stage two on Clotho v2.1: configs/stage2_audiocaps.py's recipe on the Q-Former of a
configs/stage1_clotho.py run.

Commands (after configs/stage1_clotho.py; the same feature cache):

    slit train --config configs/stage2_clotho.py --workdir runs/stage2_clotho \\
        --config.init_from=runs/stage1_clotho
    slit eval --workdir runs/stage2_clotho --data clotho --task captioning

Where this differs from BLIP-2: see configs/stage2_audiocaps.py; 32 clips a batch for ~20 epochs (2,400
steps, 500 warmup) on Clotho's 3,839 development clips.

Expected result: not measured here (the dataset cannot be fetched on the development machines), and no
SLIT number to quote. For scale, the Pengi paper (Deshmukh et al. 2023, arXiv 2305.11834) reports
Clotho captioning CIDEr 0.416, SPICE 0.126, SPIDEr 0.271 with its own encoders and GPT-2.
"""

import pathlib

import ml_collections

from slit import config as config_lib

STAGE_ONE = pathlib.Path(__file__).with_name("stage1_clotho.py")
STAGE_TWO = pathlib.Path(__file__).with_name("stage2_audiocaps.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(STAGE_TWO)
    config_lib.continue_stage_one(c, STAGE_ONE)  # its data, frozen encoder, Q-Former and feature cache
    c.data.max_answer_length = 48
    c.batch_size = 32
    c.total_steps = 2400
    c.eval_every_steps = 400
    c.optimizer.warmup_steps = 500
    return c
