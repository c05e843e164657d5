"""Stage one on Clotho v2.1 (Drossos et al. 2020): configs/stage1_audiocaps.py's recipe (BLIP-2's
stage-one settings, the frozen Whisper base encoder, a MiniLM- or BERT-initialised Q-Former) on Clotho's
15-30 s clips, read whole (Whisper's 30 s window).

Commands (Clotho is not downloadable here: fetch its captions CSVs and audio yourself; README: Data):

    slit data build --source clotho --manual-dir DOWNLOADS/clotho
    slit cache-features --config configs/stage1_clotho.py
    slit train --config configs/stage1_clotho.py --workdir runs/stage1_clotho

Where this differs from BLIP-2 (see configs/stage1_audiocaps.py): Clotho's development split has 3,839
clips with 5 captions each, so 128 clips a batch for ~40 epochs (1,200 steps) with 400 warmup steps.

Expected result: not measured here (the dataset cannot be fetched on the development machines), and no
SLIT number to quote (the paper's result tables could not be read).
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage1_audiocaps.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)
    c.data.name = "clotho"  # built by `slit data build --source clotho`
    c.data.max_seconds = 30.0  # the longest Clotho clip; Whisper's window
    c.data.max_text_length = 48
    c.batch_size = 128
    c.total_steps = 1200
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.optimizer.warmup_steps = 400
    return c
