"""`slit bench stage1`: the stage-one train step, slit vs a PyTorch reference, same shapes, same machine.

The step is BLIP-2's (contrastive + matching with hard negatives + grounded generation, AdamW) on cached
encoder features, at the size of `--size` (base: a BERT-base Q-Former, 12 layers, 768 wide, 32 queries,
batch 8, 500 frames x 512 of Whisper base for 10 s, captions of 32 tokens; slit/bench/shapes.py).
slit's step is the one `slit train --config configs/stage1_synthetic.py --config.features=cached` jits,
resized to that shape (`--config.a.b=value` overrides apply on top, e.g. `--config.mesh.data=1`); the
reference is transformers' InstructBlipQFormerModel with BLIP-2's heads and losses in float32
(slit/bench/torch_reference.py). Both run float32 with dropout `--dropout` on the same random batch.

Reported (JSON): seconds per step (best, median, spread, every timed step) and slit's compile time;
`speedup` (the reference's median / slit's median); `mfu` (slit's model FLOPs per second over the f32
matmul peak measured in the run); the model FLOPs by kind (slit/bench/flops.py); XLA's own FLOP count of
the compiled step; memory (the train state's bytes: params, optimizer state, frozen weights; peak host
RSS after slit's warm-up and after the reference's; device memory on GPU/TPU).

    slit bench stage1 --out runs/bench/stage1.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

from slit.bench import flops, train_step
from slit.bench.shapes import SIZES, Stage1Shape

HELP = "the stage-one train step (BERT-base Q-Former, cached features): slit vs PyTorch, speedup and MFU"
READS_CONFIG = True  # --config.a.b=value overrides of configs/stage1_synthetic.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_step.add_common_arguments(parser)
    parser.add_argument("--text-length", type=int, default=0, help="caption tokens (0: the size's)")


def slit_setup(
    shape: Stage1Shape, dropout: float, overrides: list[tuple[str, str]], dtype: str = "float32"
) -> tuple:
    """(TrainingSetup, mesh, pad id): slit's stage-one training at `shape`, as `slit train` builds it."""
    from slit import config as config_lib
    from slit.data.synthetic import CAPTION_VOCABULARY
    from slit.data.tokenizer import TextTokenizer, word_level_tokenizer
    from slit.train import harness, sharding, stage1
    from slit.train.stage1_model import create_model, model_config

    config = train_step.sized_config(
        "stage1_synthetic.py", shape, dropout, {"qformer.embed_dim": shape.embed_dim}, overrides, dtype
    )
    q = shape.qformer
    config_lib.validate_stage1(config, _num_devices())
    tokenizer = TextTokenizer(word_level_tokenizer(CAPTION_VOCABULARY))
    cfg = model_config(config, tokenizer)
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, vocab_size=q.vocab_size))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)
    parts = create_model(cfg, config.seed, config.audio_encoder.init_seed, mesh, rules)
    make_step = functools.partial(stage1.make_train_step, dropout=dropout > 0)
    ranks = {k: stage1.BATCH_RANKS[k] for k in stage1.CACHED_BATCH_KEYS}
    setup = harness.build_training(config, parts, mesh, rules, ranks, make_step, model_config=cfg)
    return setup, mesh, tokenizer.pad_id


def _num_devices() -> int:
    import jax

    return jax.device_count()


def run(args: argparse.Namespace) -> dict:
    shape = train_step.resized(SIZES[args.size][0], args)
    if args.text_length:
        shape = dataclasses.replace(shape, text_length=args.text_length)
    setup, mesh, pad_id = slit_setup(shape, args.dropout, args.config_overrides, args.dtype)
    batch = train_step.stage1_batch(shape, pad_id=pad_id)

    def make_reference() -> object:
        from slit.bench import torch_reference

        device = train_step.torch_device()
        return torch_reference.stage1_reference(
            shape, batch, dropout=args.dropout, device=device, dtype=args.dtype
        )

    measured = train_step.measure(
        args,
        setup,
        batch,
        mesh,
        make_reference,
        "transformers InstructBlipQFormerModel + BLIP-2 heads and losses (PyTorch)",
        flops.stage1(shape),
        flops.stage1(shape, share_encoder_kv=False, generation_reuses_queries=False),
    )
    return {
        "step": "stage one: contrastive + matching + grounded generation, AdamW, cached features, "
        f"{args.dtype} matmuls",
        "shape": dataclasses.asdict(shape),
        "dropout": args.dropout,
        **measured,
    }


def table(result: dict, source: str) -> str:
    """The result as BENCHMARKS.md shows it (slit.bench.tables), for the terminal."""
    from slit.bench import tables

    return tables.bench_section(result, source)
