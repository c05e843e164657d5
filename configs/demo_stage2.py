"""The demo's stage two (`slit demo` runs it): the demo's stage-one Q-Former prompts the frozen
SmolLM2-135M-Instruct, instruction-tuned on the demo's task mix, from the same feature cache.

Commands (`slit demo` runs these for you, with the data directory and step counts of its size):

    slit train --config configs/demo_stage2.py --workdir runs/demo/stage2 \\
        --config.data.data_dir=runs/demo/tfds --config.init_from=runs/demo/stage1
    slit generate --workdir runs/demo/stage2 --audio clip.wav --prompt "what is said?"

Tasks: captioning ("describe the sound.") and questions, whose kinds come from the data: "what is
said?" (the transcript), "which animal is this?", "what kind of sound is this?", "which instrument is
playing?", how many notes, up or down, fast or slow, and the procedural sounds' questions. The
Q-Former learns at a tenth of the projection's rate, as in stage2_synthetic.py.

Expected: see the README's "What the demo does and what to expect" (measured figures with their date).
"""

import pathlib

import ml_collections

from slit import config as config_lib

HERE = pathlib.Path(__file__).parent


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(HERE / "stage2_synthetic.py")
    config_lib.continue_stage_one(c, HERE / "demo_stage1.py")  # data, frozen encoder, Q-Former, cache
    c.total_steps = 500  # ~2 s a step on 2 CPU cores
    c.checkpoint_every_steps = 100
    c.optimizer.warmup_steps = 50
    c.tasks.weights = ml_collections.ConfigDict({"caption": 0.3, "qa": 0.7, "classify": 0.0})
    c.data.max_qformer_instruction_length = 32  # WordPiece tokens of the instruction
    c.data.max_answer_length = 24  # LLM tokens: transcripts have up to 14 words
    c.eval.batch_size = 16
    c.eval.tasks = ("captioning", "aqa", "classification")
    return c
