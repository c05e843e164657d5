"""Stage one on AudioCaps (Kim et al. 2019) at BLIP-2's stage-one settings: the frozen Whisper base
encoder (its second-to-last hidden state) and a BERT-initialised Q-Former with 32 queries, trained with
the contrastive, matching and grounded-generation losses from cached encoder features.

Commands (AudioCaps is not downloadable here: fetch its CSVs and clips yourself; README: Data):

    slit data build --source audiocaps --manual-dir DOWNLOADS/audiocaps
    slit cache-features --config configs/stage1_audiocaps.py
    slit train --config configs/stage1_audiocaps.py --workdir runs/stage1_audiocaps

BLIP-2's stage one (Li et al. 2023, salesforce/LAVIS `blip2_pretrain.yaml`) and where this differs:
- AdamW (beta2 0.98, weight decay 0.05), peak learning rate 1e-4 after 2,000 warmup steps, cosine
  decay; 32 queries; the three losses with equal weights; re-ranking by the matching head at test time.
  Same here.
- BLIP-2's Q-Former is BERT-base (12 layers, 768 wide). The default here is the packaged MiniLM-L6
  (6 layers, 384 wide) because BERT-base is not installable offline; give a BERT-base directory with
  --config.qformer.init=DIR for BLIP-2's size.
- BLIP-2 trains on 129M image-text pairs at batch 2,320 for 250k steps. AudioCaps has ~49k training
  clips: 256 clips a batch for 20 epochs (~3,800 steps) here.
- The encoder: SLIT uses data2vec-audio (--config.audio_encoder.kind=wav2vec2
  --config.audio_encoder.path=<a HF data2vec-audio directory>); Whisper base is the default because its
  weights install offline.

Expected result: not measured here (the dataset cannot be fetched on the development machines). The SLIT
paper's result tables could not be read, so there is no SLIT number to quote for this recipe. On the
built-in synthetic sounds the same encoder and Q-Former reach text->audio R@1 41% after 120 steps
(configs/stage1_whisper_base.py). At this scale, check the matching head's report before trusting the
re-ranked table (README: Stage one on the synthetic sounds).
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage1_whisper_base.py")


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)
    c.data.name = "audiocaps"  # built by `slit data build --source audiocaps`
    c.data.max_seconds = 10.0  # AudioCaps clips are 10 s YouTube segments
    c.data.max_text_length = 40  # WordPiece tokens of a caption
    c.features = "cached"
    c.batch_size = 256
    c.total_steps = 3800  # ~20 epochs of 49k clips
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.retrieval_rerank_k = 128  # BLIP-2's k
    c.optimizer.learning_rate = 1e-4
    c.optimizer.min_learning_rate = 1e-5
    c.optimizer.warmup_steps = 2000
    return c
