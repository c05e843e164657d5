"""SLIT stage two (arXiv 2402.07485) at paper scale, architectures only, for `slit plan`: does it fit?

    slit plan --config configs/paper_slit_stage2.py --devices 8 --memory-per-device 16 --search

Expected result (measured 2026-12-05 on the 2-core CPU machine, shared with other jobs): yes. The search
prints in 204 s (10 meshes estimated from their shardings, 3 compiled) and recommends data=1 x fsdp=2 x
tensor=4, with 9.09 GiB of 16 to spare:

    | mesh (data x fsdp x tensor) | params + frozen + optimizer | activations + temporaries | total |
    | 1 x 2 x 4 | 1.19 GiB | 5.76 GiB | 6.91 GiB |
    | 1 x 1 x 8 | 1.35 GiB | 5.99 GiB | 7.41 GiB |
    | 2 x 1 x 4 | 2.38 GiB | 5.95 GiB | 8.12 GiB |

Per chip on 1 x 2 x 4: trainable 0.12 GiB (183.7 M weights), frozen 0.83 GiB (3,163 M: T5 0.66, the
encoder 0.16), optimizer 0.24 GiB, batch 0.12 GiB (from the shardings); XLA: arguments 1.15 GiB,
temporaries 5.76 GiB, total 6.91 GiB, at least 2.41 TFLOP a chip (one micro-batch: XLA counts the
accumulation loop's body once; the plain step: 9.63 TFLOP); compiled in 47 s. The plain step (one batch of
128, grad_accum_steps=1) does not fit: 19.3 GiB a chip on 1 x 4 x 2, 20.2 on 2 x 4 x 1, 28.5 on 1 x 8 x 1
(the same day), mostly Flan-T5's weights gathered for the matmuls as float32 and 32 rows' activations.

The model (no weights: random architectures of the released sizes, slit/train/random_models.py):
- data2vec-audio-large (24 layers, 1024 wide, 16 heads, mlp 4096, 7 convolutions of 512 channels), frozen,
  its second-to-last hidden state read (BLIP-2's choice), 10 s clips at 16 kHz (499 frames);
- a BERT-base-size Q-Former (12 layers, 768 wide, 12 heads, mlp 3072, cross-attention every 2 layers,
  32 queries; bert-base-uncased's vocabulary, 30,522 words + [DEC], from the packaged MiniLM-L6's
  tokenizer, which shares it; no BERT weights are read), trained, and its linear projection to the LLM;
- Flan-T5-XL (d_model 2048, 24 encoder + 24 decoder layers, 32 heads of 64, gated-GELU d_ff 5120,
  vocabulary 32,128), frozen, in bfloat16;
- AdamW with float32 moments for the trained weights (the Q-Former and projection: 183.7 M; BLIP-2
  reports 188 M for its Q-Former).
It follows configs/slit_data2vec_flant5.py (the recipe with weights), but for the batch: 128 clips a global
batch (the recipe's 64 trains on 4 chips), in 4 micro-batches of 32 (grad_accum_steps: the same update),
on the mesh the search recommends. As the recipe, the encoder's features come from the feature cache
(features=cached: the step runs the Q-Former and T5, not the encoder; its weights are still held on every
chip, though XLA prunes them from the step's arguments); --config.features=compute plans the step that
runs the frozen encoder too. Instructions of 32 Q-Former tokens and 24 T5 tokens, answers of 40.
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("slit_data2vec_flant5.py")
GROUPS = pathlib.Path(__file__).with_name("stage2_synthetic.py")  # the random encoder's and LLM's fields


def get_config() -> ml_collections.ConfigDict:
    from slit.interop.pretrained import minilm_directory

    c = config_lib.load_config_file(BASE)  # the SLIT recipe (its data, optimizer, lengths, cached features)
    c.unlock()
    c.audio_encoder = config_lib.load_config_file(GROUPS).audio_encoder
    a = c.audio_encoder
    a.kind = "random"  # architecture only: no weights read
    a.arch = "data2vec-audio"
    a.path = ""
    a.width, a.layers, a.heads, a.mlp_dim, a.conv_dim = 1024, 24, 16, 4096, 512
    a.hidden_layer = -2
    q = c.qformer
    q.init = ""  # BERT-base's sizes, random values (slit plan reads no weights)
    q.layers, q.width, q.heads, q.mlp_dim, q.max_text_positions = 12, 768, 12, 3072, 512
    q.num_queries, q.cross_attention_freq = 32, 2
    c.tokenizer.kind = "directory"  # bert-base-uncased's WordPiece vocabulary (+ [DEC])
    c.tokenizer.path = str(minilm_directory())
    c.data.max_qformer_instruction_length = 32
    c.data.max_instruction_length = 24
    c.data.max_answer_length = 40
    llm = c.llm
    llm.kind = "random"
    llm.arch = "t5"
    llm.path = ""
    llm.width, llm.layers, llm.heads, llm.mlp_dim = 2048, 24, 32, 5120
    llm.vocab_size = 32128
    llm.param_dtype = "bfloat16"
    c.batch_size = 128
    c.eval.batch_size = 128
    # What `slit plan --search` recommends for 8 chips of 16 GiB (docstring): weights over fsdp and tensor,
    # and the batch in 4 micro-batches of 32 (grad_accum_steps: the same update as one batch of 128).
    c.grad_accum_steps = 4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 4
    return c
