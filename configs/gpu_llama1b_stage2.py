"""Stage two through a ~1B frozen Llama on one accelerator, architecture only: the step that
`slit bench stage2 --size 1b --dtype bfloat16` times, as a config `slit plan` reads.

    slit plan --config configs/gpu_llama1b_stage2.py --devices 1 --memory-per-device 80

Expected result (measured 2026-12-05 on the 2-core CPU machine, in 26 s): fits, 18.95 GiB a device of 80
(arguments 4.08 GiB: trained 0.67, frozen 2.13, AdamW state 1.33; temporaries 14.87 GiB from XLA's CPU
compiler). XLA counts the scanned layer once ("at least 1.84 TFLOP"); with
`--config.llm.scan_layers=false` the same step is 17.51 GiB (temporaries 13.43) and 9.50 TFLOP a step.
The benchmark prints its device memory and XLA's memory analysis on the device beside it (README:
Benchmarks says what one H100 has shown so far).

The model (no weights: random architectures, slit/train/random_models.py):
- cached features of Whisper base's width (512) for 10 s clips (500 frames), as the benchmark's batch;
- a BERT-base-size Q-Former (12 layers, 768 wide, 12 heads, mlp 3072, cross-attention every 2 layers,
  32 queries, instruction-aware; bert-base-uncased's vocabulary, 30,522 words + [DEC], from the packaged
  MiniLM-L6's tokenizer), trained, and its projection to the LLM;
- a Llama of TinyLlama-1.1B's sizes (22 layers, 2048 wide, 32 heads, 4 key/value heads, SwiGLU 5632,
  vocabulary 32,000), frozen, stored in bfloat16 (the benchmark's ties its output layer to the
  embedding; this one has its own, 65.5 M more frozen weights, 0.13 GB), its 22 layers stacked and run
  by one scan (as the benchmark's 1b size: an accelerator compiles one layer rather than 22);
- bf16 matmul inputs everywhere (compute_dtype), float32 master weights, AdamW moments and losses;
- batch 32, instructions of 16 Q-Former and 16 LLM tokens, answers of 16 (the benchmark's lengths).
"""

import pathlib

import ml_collections

from slit import config as config_lib

BASE = pathlib.Path(__file__).with_name("stage2_synthetic.py")  # the benchmark's config


def get_config() -> ml_collections.ConfigDict:
    from slit.interop.pretrained import minilm_directory

    c = config_lib.load_config_file(BASE)
    c.unlock()
    c.features = "cached"
    a = c.audio_encoder
    a.kind, a.arch, a.path = "random", "whisper", ""
    a.width, a.layers, a.heads, a.mlp_dim, a.num_mel_bins = 512, 6, 8, 2048, 80  # Whisper base
    c.data.max_seconds = 10.0
    q = c.qformer
    q.init = ""
    q.layers, q.width, q.heads, q.mlp_dim, q.max_text_positions = 12, 768, 12, 3072, 512
    q.num_queries, q.cross_attention_freq, q.instruction = 32, 2, True
    c.tokenizer.kind = "directory"  # the Q-Former's: bert-base-uncased's WordPiece vocabulary (+ [DEC])
    c.tokenizer.path = str(minilm_directory())
    c.data.max_qformer_instruction_length = 16
    c.data.max_instruction_length = 16
    c.data.max_answer_length = 16
    llm = c.llm
    llm.kind, llm.arch, llm.path = "random", "llama", ""
    llm.width, llm.layers, llm.heads, llm.kv_heads, llm.mlp_dim = 2048, 22, 32, 4, 5632
    llm.vocab_size = 32000
    llm.param_dtype = "bfloat16"
    llm.scan_layers = True
    c.compute_dtype = "bfloat16"
    c.batch_size = 32
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c
