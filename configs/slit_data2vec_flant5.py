"""SLIT stage two (arXiv 2402.07485) at paper scale: the Q-Former of a configs/slit_data2vec_flant5_stage1.py
run prompts a frozen Flan-T5-XL, instruction-tuned on AudioCaps captions.

Commands (after the stage-one run; the same feature cache; weights are yours to fetch):

    slit train --config configs/slit_data2vec_flant5.py --workdir runs/slit_stage2 \\
        --config.init_from=runs/slit_stage1 --config.audio_encoder.path=WEIGHTS/data2vec-audio-large \\
        --config.qformer.init=WEIGHTS/bert-base --config.llm.path=WEIGHTS/flan-t5-xl
    slit eval --workdir runs/slit_stage2 --data audiocaps --task captioning

WEIGHTS/flan-t5-xl is a Hugging Face T5 directory (google/flan-t5-xl, safetensors, with its tokenizer). At
synthetic scale on a 2-core CPU: configs/slit_data2vec_flant5_synthetic.py.

The paper's setting as far as it is known, and where this differs:
- SLIT: Flan-T5-XL frozen; the Q-Former's 32 outputs, projected by one linear layer, lead the T5 encoder's
  input with the instruction (a prefix LM: the decoder predicts the answer); the instruction also enters
  the Q-Former (InstructBLIP). The rest follows BLIP-2 / InstructBLIP (salesforce/LAVIS `blip2_t5`): AdamW,
  peak 1e-4 after 2,000 warmup steps, cosine decay, weight decay 0.05; beam search with 5 beams at test time.
- The LLM's weights are bfloat16 here (Flan-T5-XL was trained in bfloat16; 5.6 GB instead of 11).
- Data: AudioCaps captions only (its clips hold no questions); 64 clips a batch for ~10 epochs.

Expected result: not measured (weights and data cannot be fetched here), and no SLIT number to quote.
The captioning report prints the audio-blind baseline beside CIDEr-D.
"""

import pathlib

import ml_collections

from slit import config as config_lib

STAGE_ONE = pathlib.Path(__file__).with_name("slit_data2vec_flant5_stage1.py")
BASE = pathlib.Path(__file__).with_name("stage2_audiocaps.py")

USER_WEIGHTS = (
    "audio_encoder.path",
    "llm.path",
)  # fields a user must set: the weights are not installable offline


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)  # AudioCaps at BLIP-2's stage-two settings
    config_lib.continue_stage_one(c, STAGE_ONE)  # its data, encoder, Q-Former shape and feature cache
    c.llm.kind = "hf"
    c.llm.path = ""  # required: a Hugging Face Flan-T5-XL directory
    c.llm.param_dtype = "bfloat16"
    c.eval.num_beams = 5
    return c
