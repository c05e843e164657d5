"""Pengi (Deshmukh et al. 2023, arXiv 2305.11834; microsoft/Pengi) at paper scale: HTSAT audio encoder,
CLIP's text tower on the prompt, their embeddings mapped to 40 + 40 prefix tokens for a frozen GPT-2 base;
every task is text generation. One stage (no Q-Former pretraining).

Commands (weights and data are yours to fetch; README: Recipes, Data):

    slit data build --source clotho --manual-dir DOWNLOADS/clotho --sample-rate 44100
    slit data build --source clotho_aqa --manual-dir DOWNLOADS/clotho_aqa --sample-rate 44100
    slit train --config configs/pengi_gpt2.py --workdir runs/pengi \\
        --config.audio_encoder.path=WEIGHTS/clap --config.bridge.prompt_encoder_path=WEIGHTS/clip \\
        --config.llm.path=WEIGHTS/gpt2
    slit eval --workdir runs/pengi --data clotho

WEIGHTS/clap is a Hugging Face CLAP directory (ClapModel / ClapAudioModel, safetensors; its
preprocessor_config.json sets the log-mel), WEIGHTS/clip a CLIPModel or CLIPTextModelWithProjection
directory with its tokenizer (openai/clip-vit-base-patch16's text tower, as Pengi), WEIGHTS/gpt2 a GPT-2
base directory with its tokenizer. Pengi's released checkpoint gives all three (and the bridge):
`slit convert-torch base.pth pengi.safetensors`, then `slit import-pengi` (README: Recipes). At synthetic
scale on a 2-core CPU: configs/pengi_gpt2_synthetic.py.

Pengi's setting (its configs/base.yml and models/), and where this differs:
- audio: HTSAT, 44.1 kHz, 7 s clips, its pooled 768-d embedding; trained with the bridge (Pengi's
  `freeze_audio_encoder_weights: False`), so features are computed every step. Here the log-mel is
  CLAP's (ClapFeatureExtractor's, set by the directory's preprocessor_config.json), not torchlibrosa's.
- prompt: CLIP's text tower, frozen; its projected pooled output.
- each embedding: Projection (Linear, GELU, Linear, dropout 0.5, LayerNorm) to 1024, L2-normalised, a
  4-layer, 8-head transformer mapper (MLP ratio 2) from 40 mapper inputs to 40 prefix tokens; GPT-2 base
  frozen; the LM sees [audio prefix; prompt prefix; answer]; beam search with 3 beams, 30 tokens.
- data: Pengi trains on 3.4M audio-text pairs of many datasets; here Clotho captions and Clotho-AQA
  questions (a `data.mixture` of both, 50/50). The learning rate, batch and schedule of Pengi are not
  known here: slit's stage-two AdamW (peak 1e-4, cosine) at batch 64.

Expected result: not measured (weights and data cannot be fetched here). Pengi reports Clotho captioning
CIDEr 0.416 / SPICE 0.126 / SPIDEr 0.271 and ClothoAQA binary accuracy 0.645 (its own training data).
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage2_synthetic.py")
USER_WEIGHTS = ("audio_encoder.path", "bridge.prompt_encoder_path", "llm.path")  # not installable offline


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)
    c.data.name = ""
    c.data.mixture = [
        {"name": "clotho", "weight": 0.5},
        {"name": "clotho_aqa", "weight": 0.5},
    ]
    c.data.sample_rate = 44100
    c.data.max_seconds = 7.0
    c.data.max_qformer_instruction_length = 40  # CLIP tokens of the prompt (Pengi: 40)
    c.data.max_answer_length = 40
    c.tasks.weights = ml_collections.ConfigDict({"caption": 0.5, "qa": 0.5, "classify": 0.0})
    c.audio_encoder.kind = "htsat"
    c.audio_encoder.path = ""  # required: a Hugging Face CLAP directory
    c.audio_encoder.trainable = True  # Pengi trains its audio encoder
    c.audio_encoder.hidden_layer = -1
    c.features = "compute"
    c.bridge.kind = "pengi"
    c.bridge.prompt_encoder = "clip"
    c.bridge.prompt_encoder_path = ""  # required: a CLIP directory with its tokenizer
    c.bridge.projection_width = 1024
    c.bridge.prefix_length = 40
    c.bridge.clip_length = 40
    c.bridge.mapper_layers = 4
    c.bridge.mapper_heads = 8
    c.bridge.mapper_mlp_ratio = 2.0
    c.bridge.projection_dropout = 0.5
    c.bridge.instruction_to_llm = False
    c.llm.kind = "hf"
    c.llm.path = ""  # required: a GPT-2 base directory with its tokenizer
    c.llm.match_embedding_scale = False  # Pengi's prefix constants start at N(0, 1)
    c.optimizer.lr_multipliers = ""
    c.optimizer.learning_rate = 1e-4
    c.optimizer.min_learning_rate = 1e-5
    c.optimizer.warmup_steps = 2000
    c.batch_size = 64
    c.total_steps = 20000
    c.log_every_steps = 50
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 1000
    c.eval.max_clips = 0
    c.eval.num_beams = 3
    c.eval.max_new_tokens = 30
    return c
