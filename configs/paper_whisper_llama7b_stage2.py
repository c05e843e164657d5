"""Stage two with Whisper-large-v3's encoder and a 7B Llama-family LLM, architectures only, for `slit plan`:
what does it need on 64 chips?

    slit plan --config configs/paper_whisper_llama7b_stage2.py --devices 64 --memory-per-device 16 --search

Expected result (measured 2026-12-05 on the 2-core CPU machine, shared with other jobs): the search
prints in 285 s (28 meshes estimated from their shardings, 3 compiled) and recommends data=1 x fsdp=8 x
tensor=8, which fits in 16 GiB per chip with 11.64 GiB to spare:

    | mesh (data x fsdp x tensor) | params + frozen + optimizer | activations + temporaries | total |
    | 1 x 8 x 8  | 0.30 GiB | 4.03 GiB | 4.36 GiB |
    | 2 x 4 x 8  | 0.60 GiB | 4.02 GiB | 4.62 GiB |
    | 1 x 4 x 16 | 0.34 GiB | 5.83 GiB | 6.29 GiB |

Per chip on 1 x 8 x 8: trainable 0.02 GiB (187.7 M weights), frozen 0.24 GiB (7,375 M: the LLM 0.20, the
encoder 0.04), optimizer 0.04 GiB, batch 0.08 GiB (from the shardings); XLA: arguments 0.34 GiB,
temporaries 4.03 GiB, total 4.36 GiB; compiled in 47 s. Without the levers it does not fit: the plain step
(float32 matmuls, one batch of 256, unscanned) needs 31.4 GiB a chip on 1 x 32 x 2 and 39.0 GiB on 1 x 64 x 1
(measured the same day), mostly the LLM's weights gathered for the matmuls and their float32 copies.
XLA counts the scanned layers' FLOPs once, so its FLOPs here are a lower bound.

The model (no weights: random architectures of the released sizes, slit/train/random_models.py):
- Whisper-large-v3's encoder (32 layers, 1280 wide, 20 heads, mlp 5120, 128 mel bins, 1500 positions:
  30 s windows), frozen, its second-to-last hidden state read (BLIP-2's choice), 10 s clips;
- the BERT-base-size Q-Former with 32 queries of configs/paper_slit_stage2.py, trained, and its linear
  projection to the LLM;
- a Llama-2-7B-size LLM (4096 wide, 32 layers, 32 heads and 32 key/value heads, SwiGLU mlp 11008,
  vocabulary 32,000), frozen, in bfloat16: the soft prompt and the instruction lead, the loss is on the
  answer tokens (configs/slit_whisper_llama.py, the recipe with weights);
- AdamW with float32 moments for the trained weights.
Batch: 256 clips a global batch (4 per chip on 64 chips); features from the feature cache as the recipe's
(--config.features=compute plans the step that runs the frozen encoder too).
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("paper_slit_stage2.py")  # the Q-Former, optimizer and lengths


def get_config() -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(BASE)
    c.unlock()
    a = c.audio_encoder
    a.arch = "whisper"
    a.width, a.layers, a.heads, a.mlp_dim = 1280, 32, 20, 5120
    a.num_mel_bins, a.max_positions = 128, 1500
    a.hidden_layer = -2
    llm = c.llm
    llm.arch = "llama"
    llm.width, llm.layers, llm.heads, llm.kv_heads, llm.mlp_dim = 4096, 32, 32, 32, 11008
    llm.max_positions = 4096
    llm.vocab_size = 32000
    llm.param_dtype = "bfloat16"
    # One compiled layer instead of 32 (README: Parallelism): the plan prints in minutes, not tens. XLA's
    # cost analysis then counts the layers' FLOPs once (the table says "at least").
    llm.scan_layers = True
    a.scan_layers = True
    c.batch_size = 256
    c.eval.batch_size = 256
    # The levers a 7B needs (README: Parallelism): bf16 matmul inputs (float32 master weights, optimizer
    # state and losses) and the batch in 4 micro-batches of 64 (the same update as one batch of 256).
    c.compute_dtype = "bfloat16"
    c.grad_accum_steps = 4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 8  # what `slit plan --search` recommends (docstring)
    return c
