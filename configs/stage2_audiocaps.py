"""Stage two on AudioCaps: the Q-Former of a configs/stage1_audiocaps.py run prompts a frozen LLM,
instruction-tuned on captioning (AudioCaps holds captions only), at BLIP-2's stage-two settings.

Commands (after configs/stage1_audiocaps.py; the same feature cache):

    slit train --config configs/stage2_audiocaps.py --workdir runs/stage2_audiocaps \\
        --config.init_from=runs/stage1_audiocaps
    slit eval --workdir runs/stage2_audiocaps --data audiocaps --task captioning

BLIP-2's stage two (Li et al. 2023, salesforce/LAVIS `blip2_t5` / `blip2_opt` configs) and InstructBLIP's
decoding, and where this differs:
- the Q-Former (from stage one) and one linear projection train, AdamW with peak learning rate 1e-4
  after 2,000 warmup steps, cosine decay, weight decay 0.05; the instruction also enters the Q-Former
  (InstructBLIP); beam search with 5 beams at test time. Same here.
- The LLM: SLIT uses Flan-T5-XL (--config.llm.kind=hf --config.llm.path=<a Flan-T5 directory>; slit
  reads T5 as a prefix LM). The default is the packaged SmolLM2-135M-Instruct, which installs offline.
- 64 clips a batch for ~10 epochs (7,600 steps); BLIP-2 trains far longer on far more pairs.

Expected result: not measured here (the dataset cannot be fetched on the development machines), and no
SLIT number to quote (the paper's result tables could not be read). The captioning report prints the
audio-blind baseline (one training caption for every clip) beside CIDEr-D: a model that does not beat it
has not learned to read the audio. On the synthetic sounds, 400 steps of stage two are not enough for
that (README: Stage two: a frozen LLM answers (instruction tuning)).
"""

import pathlib

import ml_collections

from slit import config as config_lib

STAGE_ONE = pathlib.Path(__file__).with_name("stage1_audiocaps.py")
STAGE_TWO = pathlib.Path(__file__).with_name("stage2_synthetic.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(STAGE_TWO)
    config_lib.continue_stage_one(c, STAGE_ONE)  # its data, frozen encoder, Q-Former and feature cache
    c.data.max_qformer_instruction_length = 32  # WordPiece tokens of the instruction
    c.data.max_answer_length = 40  # LLM tokens of a caption, EOS included
    c.tasks.weights = ml_collections.ConfigDict({"caption": 1.0, "qa": 0.0, "classify": 0.0})
    c.batch_size = 64
    c.total_steps = 7600
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.eval.max_clips = 0
    c.checkpoint_every_steps = 500
    c.optimizer.learning_rate = 1e-4
    c.optimizer.min_learning_rate = 1e-5
    # BLIP-2: one learning rate; configs/stage2_synthetic.py measured the Q-Former at 0.1 to pay at CPU scale.
    c.optimizer.lr_multipliers = ""
    c.optimizer.warmup_steps = 2000
    c.eval.tasks = ("captioning",)
    c.eval.num_beams = 5
    c.eval.max_new_tokens = 40
    return c
