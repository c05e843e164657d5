"""SLIT stage one at synthetic scale (2-core CPU): configs/slit_data2vec_flant5_stage1.py's recipe with a
small random data2vec-audio encoder (the same architecture family: seven feature convolutions, layer
norms, a stack of positional convolutions) on the built-in synthetic sounds.

Commands (nothing is downloaded; the sweep builds the cache itself, one run needs it built first):

    slit cache-features --config configs/slit_data2vec_flant5_synthetic_stage1.py
    slit train --config configs/slit_data2vec_flant5_synthetic_stage1.py --workdir runs/slit_synthetic_stage1

Then stage two: configs/slit_data2vec_flant5_synthetic.py.

Where this differs from the paper-scale recipe: the encoder is random (data2vec-audio-large's weights do
not install offline), 2 layers of width 64 with 64-channel convolutions; its second-to-last hidden state
feeds the Q-Former, as BLIP-2; the Q-Former is configs/stage1_synthetic.py's (2 layers, 128 wide, 16
queries) from scratch, not BERT-base; the synthetic sounds, not AudioCaps.

Expected (2-core CPU, measured 2026-12-05, alone): the cache in 1 min 26 s (3,450 clips), 900 steps in 3 min
19 s with the evaluations; test text->audio R@1 11.5%, R@10 55.4% (chance R@1 0.4%; the tiny random Whisper
of configs/stage1_synthetic.py reaches ~29%). README: Recipes.
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage1_synthetic.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)
    c.audio_encoder.kind = "random"
    c.audio_encoder.arch = "data2vec-audio"
    c.audio_encoder.width = 64
    c.audio_encoder.layers = 2
    c.audio_encoder.heads = 2
    c.audio_encoder.mlp_dim = 256
    c.audio_encoder.conv_dim = 64
    c.audio_encoder.hidden_layer = -2
    c.features = "cached"
    return c
