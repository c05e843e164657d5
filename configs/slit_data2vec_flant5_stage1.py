"""SLIT stage one (arXiv 2402.07485) at paper scale: a frozen data2vec-audio-large encoder and a BERT-base
Q-Former with 32 queries, trained on AudioCaps with BLIP-2's three losses from cached encoder features.

Commands (weights and data are yours to fetch: nothing is downloaded; README: Data, Recipes):

    slit data build --source audiocaps --manual-dir DOWNLOADS/audiocaps
    slit cache-features --config configs/slit_data2vec_flant5_stage1.py \\
        --config.audio_encoder.path=WEIGHTS/data2vec-audio-large --config.qformer.init=WEIGHTS/bert-base
    slit train --config configs/slit_data2vec_flant5_stage1.py --workdir runs/slit_stage1 \\
        --config.audio_encoder.path=WEIGHTS/data2vec-audio-large --config.qformer.init=WEIGHTS/bert-base

WEIGHTS/data2vec-audio-large is a Hugging Face `Data2VecAudioModel` directory (facebook/data2vec-audio-large,
safetensors; `slit convert-torch` turns a .bin into one) and WEIGHTS/bert-base a BERT directory
(bert-base-uncased) with its vocab. Then stage two: configs/slit_data2vec_flant5.py. At synthetic scale on
a 2-core CPU: configs/slit_data2vec_flant5_synthetic_stage1.py.

The paper's setting as far as it is known, and where this differs:
- SLIT: frozen data2vec-audio encoder, Q-Former, frozen Flan-T5-XL, BLIP-2's two stages. The paper's body
  (Q-Former size, data, hyperparameters) could not be read: everything else follows BLIP-2's stage one
  (salesforce/LAVIS `blip2_pretrain.yaml`): BERT-base Q-Former (12 layers, 768 wide) from BERT weights,
  32 queries, cross-attention every 2 layers to the encoder's second-to-last hidden state through a
  trainable LayerNorm, ITC + ITM + ITG with equal weights, AdamW (beta2 0.98, weight decay 0.05), peak
  1e-4 after 2,000 warmup steps, cosine decay; re-ranking by the matching head (k = 128) at test time.
- Data: AudioCaps (~49k training clips) for ~20 epochs at batch 256; BLIP-2 trains on 129M pairs.
- data2vec-audio-large reads 16 kHz waveforms normalised per clip (its preprocessor_config.json says so).

Expected result: not measured (the weights and AudioCaps cannot be fetched on the development machines),
and no SLIT number to quote (its result tables could not be read). `slit eval` prints each retrieval
metric beside chance.
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage1_audiocaps.py")

USER_WEIGHTS = ("audio_encoder.path",)  # fields a user must set: the weights are not installable offline


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)  # AudioCaps at BLIP-2's stage-one settings
    c.audio_encoder.kind = "wav2vec2"  # the wav2vec2 family: data2vec-audio here
    c.audio_encoder.path = ""  # required: a Hugging Face data2vec-audio-large directory
    c.audio_encoder.hidden_layer = -2  # BLIP-2's choice: the second-to-last hidden state
    # BLIP-2's size: a BERT-base directory (--config.qformer.init=DIR; its sizes and text weights). The
    # default is the packaged MiniLM-L6 (6 layers, 384 wide), which installs offline.
    c.qformer.init = "minilm"
    c.qformer.num_queries = 32
    c.qformer.cross_attention_freq = 2
    c.qformer.dropout = 0.1
    c.qformer.initializer_range = 0.02
    return c
