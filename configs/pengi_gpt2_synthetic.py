"""Pengi at synthetic scale (2-core CPU): configs/pengi_gpt2.py's recipe with a small random HTSAT (trained
with the bridge, as Pengi trains its encoder), a random BERT prompt encoder and a small random GPT-2, on the
built-in synthetic sounds. One stage.

Command (nothing is downloaded):

    slit train --config configs/pengi_gpt2_synthetic.py --workdir runs/pengi_synthetic

Where this differs from the paper-scale recipe: every tower is random (HTSAT, CLIP and GPT-2 weights do not
install offline): HTSAT at its released geometry but 32 wide at its last stage with one block per stage,
on a 16 kHz log-mel; the prompt encoder a frozen random BERT of the qformer group's sizes with the synthetic
word vocabulary (a CLIP tokenizer does not install offline either); GPT-2 of width 64, 2 layers, with a
word-level vocabulary. The mappers are Pengi's shape at a smaller size (8 + 8 prefix tokens, 2 layers).
What it measures is the recipe's plumbing and whether the prefix learns to steer a frozen random LM.

Expected (2-core CPU, measured 2026-12-05, alone): 600 steps in 2 min 53 s with the test evaluation (100
clips, 3 beams); QA 42.0% (majority 49.0%), CIDEr-D 0.001 (audio-blind 0.517), classification 29.0% of 5
classes: a random LM does not beat the baselines (README: Recipes).
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage2_synthetic.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)
    c.total_steps = 600
    c.audio_encoder.kind = "random"
    c.audio_encoder.arch = "htsat"
    c.audio_encoder.width = 32  # the last stage's; 4 at the first
    c.audio_encoder.heads = 1
    c.audio_encoder.mlp_dim = 64
    c.audio_encoder.depths = (1, 1, 1, 1)
    c.audio_encoder.trainable = True  # Pengi trains its audio encoder
    c.features = "compute"
    c.bridge.kind = "pengi"
    c.bridge.prompt_encoder = "bert"
    c.bridge.prefix_length = 8
    c.bridge.clip_length = 8
    c.bridge.projection_width = 128
    c.bridge.mapper_layers = 2
    c.bridge.mapper_heads = 4
    c.llm.kind = "random"
    c.llm.arch = "gpt2"
    c.llm.width = 64
    c.llm.layers = 2
    c.llm.heads = 4
    c.llm.mlp_dim = 256
    c.llm.max_positions = 128
    c.optimizer.lr_multipliers = ""
    c.eval.num_beams = 3  # Pengi's
    c.eval.max_new_tokens = 24
    c.eval.max_clips = 100
    return c
