"""Stage one on the built-in synthetic sounds: a tiny Q-Former learns audio-text retrieval.

Command (the dataset is generated on first use, about 25 s; nothing is downloaded):

    slit train --config configs/stage1_synthetic.py --workdir runs/stage1_synthetic

Expected on a 2-core CPU (measured 2026-12-05: 3 min 41 s with the dataset built, ~5 steps/s; up to
10 minutes on a loaded machine), ending with a retrieval table on the 250-clip test split: text->audio
R@1 ~29%, R@10 ~92% (chance R@1: 0.4%); audio->text R@1 ~30%. Validation text->audio R@1 ~9% at step
300, ~32% at step 600. The re-ranked table after it is worse (text->audio R@1 ~21%): at this scale the
matching head separates the re-scored pairs worse than the contrastive similarity (ROC AUC 0.68 vs 0.81,
printed with it), so the contrastive table is the headline.

The frozen audio encoder is a tiny randomly initialised Whisper (seeded, so every run and every
resume sees the same one); the Q-Former follows BLIP-2 with 16 queries, 2 layers, width 128.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.trainer = "stage1"
    c.seed = 0
    c.total_steps = 900
    c.batch_size = 16  # global
    # Compute-dtype policy (README "Parallelism"): "bfloat16" runs every tower's matmuls (audio encoder,
    # Q-Former/bridge, LLM) on bf16 inputs with float32 accumulation; trainable master weights, optimizer
    # state, norms, softmax and losses stay float32. Frozen weights may be stored in bf16 besides
    # (llm.param_dtype). "float32": the plain path.
    c.compute_dtype = "float32"
    # Gradient accumulation: one optimizer update from k micro-batches of batch_size / k rows (rows i,
    # i + k, ...), scanned inside the step, so activations are one micro-batch's; the data, total_steps
    # (optimizer updates), the schedule and checkpoints are those of batch_size. Each micro-batch's
    # contrastive and matching losses take their negatives from that micro-batch (B / k - 1 of them, as
    # LAVIS's accumulation): the gradients' mean, not the full batch's loss. batch_size must divide by
    # k x the data-parallel size.
    c.grad_accum_steps = 1
    c.log_every_steps = 25
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    # Final test: also re-rank each query's top k by the matching head (0: off), reported after the
    # contrastive table with the head's accuracy and ROC AUC on the re-scored pairs.
    c.retrieval_rerank_k = 16
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
    c.features = "compute"
    c.features_dir = ""

    c.data = ml_collections.ConfigDict()
    c.data.name = "slit_synthetic_sounds"  # TFDS name, optionally with /config
    c.data.data_dir = ""  # "" = the TFDS default (~/tensorflow_datasets)
    c.data.sample_rate = 16000
    c.data.max_seconds = 10.0  # clips are zero-padded (masked) or cropped to this
    c.data.max_text_length = 24  # captions have at most 20 words
    c.data.worker_count = 0  # grain worker processes (0: threads in the trainer process)
    # Splits of data.name. Without the validation split, training is not validated (a note says so before
    # step 1); ESC-50, say: train_split="fold1+fold2+fold3+fold4", test_split="fold5".
    c.data.train_split = "train"
    c.data.validation_split = "validation"
    c.data.test_split = "test"

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "synthetic_words"  # the synthetic sounds' words; "train_words": the words of the
    # training captions (of data.name, at least tokenizer.min_count times); "directory": a BERT tokenizer
    # directory in tokenizer.path
    c.tokenizer.path = ""
    c.tokenizer.min_count = 1  # train_words: a word's fewest occurrences in the training captions
    # The run stops before step 1 when more of the training captions' words than this are [UNK] (the
    # rate is printed at the start of every run).
    c.tokenizer.max_unknown_fraction = 0.05

    # The frozen encoder (slit/train/pretrained.py): "random" (a tiny random encoder of audio_encoder.arch),
    # "whisper" (path: "tiny.en", "base", or a CTranslate2 / HF Whisper directory) or "wav2vec2" (path: a
    # HF wav2vec2 / HuBERT / data2vec-audio directory); pretrained encoders bring their own sizes.
    c.audio_encoder = ml_collections.ConfigDict()
    c.audio_encoder.kind = "random"
    # kind=random: the architecture of the random encoder: "whisper", "wav2vec2", "hubert", "data2vec-audio"
    # or "htsat" (slit/train/random_models.py); sizes from width/layers/heads/mlp_dim below.
    c.audio_encoder.arch = "whisper"
    c.audio_encoder.path = ""
    c.audio_encoder.hidden_layer = -1  # hidden state for the Q-Former: -1 the output, -2 BLIP-2's choice
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
    c.audio_encoder.init_seed = 1234  # the frozen random encoder is a function of this seed
    c.audio_encoder.conv_dim = 64  # random wav2vec2 / hubert / data2vec-audio: channels of each of the
    # feature encoder's 7 convolutions (released models: 512)
    c.audio_encoder.depths = (2, 2, 6, 2)  # random htsat: Swin blocks in each of its 4 stages (released)

    c.qformer = ml_collections.ConfigDict()
    # "" (random), "minilm" (packaged MiniLM-L6) or a HF BERT directory: BERT's sizes, text weights and
    # tokenizer (+ [DEC]); layers/width/heads/mlp_dim/max_text_positions below are then not used.
    c.qformer.init = ""
    c.qformer.num_queries = 16
    c.qformer.layers = 2
    c.qformer.width = 128
    c.qformer.heads = 4
    c.qformer.mlp_dim = 256
    c.qformer.cross_attention_freq = 2
    c.qformer.embed_dim = 64
    c.qformer.max_text_positions = 64
    c.qformer.dropout = 0.0
    c.qformer.remat_policy = "none"  # none | dots_saveable | everything (rematerialise Q-Former layers)
    c.qformer.initializer_range = 0.08  # ~1/sqrt(width); BLIP-2's BERT-base uses 0.02

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.1
    c.loss.temperature_init = 0.07
    c.loss.temperature_min = 0.001
    c.loss.temperature_max = 0.5

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3
    c.optimizer.min_learning_rate = 1e-5
    c.optimizer.warmup_steps = 50
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


def get_sweep() -> list[dict[str, object]]:
    """An ablation of the number of Q-Former queries (8, 16, 32), each with two seeds (the seed changes the
    Q-Former's initialisation and the data order; the frozen encoder stays the same, init_seed): six runs of
    this config, one after another. Run, then compare:

        python launch/sweep.py configs/stage1_synthetic.py --root runs/sweep_queries
        slit report runs/sweep_queries --out runs/sweep_queries/report --metric text_to_audio_R@1
    """
    return [{"qformer.num_queries": q, "seed": s} for q in (8, 16, 32) for s in (0, 1)]
