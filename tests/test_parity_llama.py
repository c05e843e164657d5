"""Parity of slit's Llama family (slit/models/llm/llama.py) with transformers' PyTorch models.

transformers writes small random checkpoints with `save_pretrained` (Llama with grouped-query
attention and a separate lm_head, Llama with tied embeddings and an explicit head_dim, Llama with
llama3 RoPE scaling and biases, Qwen2 with QKV bias, Mistral with a sliding window that the test
sequences exceed; one written sharded). Weights are drawn wider than transformers' default (std
0.25 instead of 0.02) so that attention is peaked and a wrong position or mask shows in the
logits; every 1-D weight (norms, biases) is randomised too.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.models.layers import Frozen  # noqa: E402
from slit.models.llm import llama, loading  # noqa: E402

ATOL = 1e-4
VOCAB = 97
T = 11  # > the Mistral sliding window below, and > llama3's original_max_position_embeddings / 2

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.25,
    bos_token_id=None,
    eos_token_id=None,  # random models: no early stop in `generate`
    pad_token_id=0,
)
VARIANTS = {
    "llama_gqa": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama_tied_head_dim": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=True, num_key_value_heads=4, head_dim=12, rope_theta=500.0),
    ),
    "llama3_rope_bias": (
        transformers.LlamaConfig,
        dict(
            attention_bias=True,
            mlp_bias=True,
            max_position_embeddings=64,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen2_qkv_bias": (transformers.Qwen2Config, dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=4)),
}


def _write(directory: pathlib.Path, variant: str, **save_kwargs) -> torch.nn.Module:
    config_cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**_COMMON, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(directory, **save_kwargs)
    return model


def _inputs(batch: int = 3, length: int = T, pads: tuple[int, ...] = (0, 3, 6)):
    """Left-padded ids, mask and positions [B, T] (positions count real tokens only, from 0)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, (batch, length)).astype(np.int32)
    mask = np.arange(length)[None, :] >= np.array(pads)[:, None]
    ids = np.where(mask, ids, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def _hf_logits(model: torch.nn.Module, ids, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            position_ids=torch.from_numpy(positions).long(),
        )
    return out.logits.float().numpy()


@nnx.jit
def _forward(lm, ids, positions, mask):
    logits, cache = lm(lm.embed(ids), positions, mask)
    assert cache is None
    return logits


@nnx.jit
def _step(lm, ids, positions, mask, cache):
    return lm(lm.embed(ids), positions, mask, cache)


def _slit_logits(lm, ids, mask, positions) -> np.ndarray:
    return np.asarray(_forward(lm, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask)))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(variant, transformers model, slit model loaded from the directory transformers wrote)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf = _write(directory, request.param)
    return request.param, hf, llama.llama_from_hf(directory)


def test_logits_match_transformers_on_left_padded_batch(pair):
    variant, hf, lm = pair
    ids, mask, positions = _inputs()
    expected = _hf_logits(hf, ids, mask, positions)
    got = _slit_logits(lm, ids, mask, positions)
    assert got.shape == expected.shape == (3, T, VOCAB) and got.dtype == np.float32
    err = np.abs(got - expected)[mask].max()  # outputs at padded positions are meaningless in both
    print(f"{variant}: max abs logit diff {err:.2e} (logit std {expected.std():.2f})")
    assert err < ATOL
    # Row 0 has no padding: compare with transformers' plain forward too (no mask, positions 0..T-1).
    with torch.no_grad():
        plain = hf(input_ids=torch.from_numpy(ids[:1]).long()).logits.numpy()
    assert np.abs(got[0] - plain[0]).max() < ATOL


def test_greedy_through_cache_matches_generate_and_full_forward(pair):
    """A tiny greedy loop through the KV cache (the real decoder lives in slit/generate).

    The left-padded prompt (6 slots) goes in as two chunks of 3, then one token per
    step. Tokens must equal transformers' `generate`; the logits of every step must equal slit's
    full forward over the prompt plus the generated tokens.
    """
    variant, hf, lm = pair
    prompt_len, new_tokens = 6, T - 6 + 1
    ids, mask, positions = _inputs(length=prompt_len, pads=(0, 2, 4))
    with torch.no_grad():
        expected = hf.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=new_tokens,
            do_sample=False,
        )[:, prompt_len:].numpy()

    cache = lm.init_cache(batch_size=3, max_length=T + 2)
    pieces = []
    for start, end in ((0, 3), (3, prompt_len)):
        chunk = (jnp.asarray(a[:, start:end]) for a in (ids, positions, mask))
        logits, cache = _step(lm, *chunk, cache)
        pieces.append(np.asarray(logits))
    tokens, next_position = [], positions[:, -1:] + 1
    for i in range(new_tokens):
        tokens.append(np.asarray(jnp.argmax(logits[:, -1], axis=-1)))
        if i == new_tokens - 1:
            break
        step_inputs = (tokens[-1][:, None].astype(np.int32), next_position + i, np.ones((3, 1), bool))
        logits, cache = _step(lm, *map(jnp.asarray, step_inputs), cache)
        pieces.append(np.asarray(logits))
    got = np.stack(tokens, axis=1)
    print(f"{variant}: greedy tokens {got.tolist()}")
    np.testing.assert_array_equal(got, expected)

    assert int(cache.length) == T
    full_mask = np.concatenate([mask, np.ones((3, T - prompt_len), bool)], axis=1)
    np.testing.assert_array_equal(np.asarray(cache.valid), np.pad(full_mask, ((0, 0), (0, 2))))
    full_ids = np.concatenate([ids, got[:, :-1]], axis=1).astype(np.int32)
    full_positions = np.concatenate([positions, next_position + np.arange(T - prompt_len)], axis=1)
    full = _slit_logits(lm, full_ids, full_mask, full_positions)
    err = np.abs(np.concatenate(pieces, axis=1) - full)[full_mask].max()
    print(f"{variant}: cache-incremental vs full forward: max abs diff {err:.2e}")
    assert err < 1e-5


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf = _write(tmp_path, "llama_gqa", max_shard_size="20KB")
    index = json.loads((tmp_path / loading.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / loading.SINGLE_FILE).exists()
    lm = llama.llama_from_hf(tmp_path)
    ids, mask, positions = _inputs()
    err = np.abs(_slit_logits(lm, ids, mask, positions) - _hf_logits(hf, ids, mask, positions))[mask].max()
    assert err < ATOL


def test_frozen_weights_in_bfloat16(tmp_path):
    """bf16 storage: every weight is a bf16 `Frozen`; compute stays float32.

    The reference is transformers' model with the same weights rounded to bf16 and computing in
    float32, so the fp32 tolerance applies.
    """
    hf = _write(tmp_path, "llama_gqa")
    lm = llama.llama_from_hf(tmp_path, param_dtype=jnp.bfloat16)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    variables = nnx.state(lm, nnx.Variable).flat_state()
    assert variables and all(isinstance(v, Frozen) and v[...].dtype == jnp.bfloat16 for _, v in variables)
    assert not nnx.state(lm, nnx.Param).flat_state()  # nothing trainable
    ids, mask, positions = _inputs()
    expected = _hf_logits(hf, ids, mask, positions)
    got = _slit_logits(lm, ids, mask, positions)
    assert got.dtype == np.float32
    err = np.abs(got - expected)[mask].max()
    print(f"bf16 weights: max abs logit diff {err:.2e}")
    assert err < ATOL


def test_config_is_read_from_config_json(tmp_path):
    _write(tmp_path, "llama3_rope_bias")
    config = llama.llama_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 8)
    assert config.rope.kind == "llama3" and config.rope.original_max_positions == 16
    assert config.qkv_bias and config.output_bias and config.mlp_bias and not config.tie_word_embeddings
    _write(tmp_path / "q", "qwen2_qkv_bias")
    qwen = llama.llama_config_from_hf(json.loads((tmp_path / "q" / "config.json").read_text()))
    assert (
        qwen.qkv_bias and not qwen.output_bias and qwen.tie_word_embeddings and qwen.sliding_windows is None
    )


def test_missing_and_misshapen_tensors_are_all_named(tmp_path):
    _write(tmp_path, "llama_gqa")
    hf_config, tensors = loading.read_hf_checkpoint(tmp_path)
    config = llama.llama_config_from_hf(hf_config)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:8]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(UserError) as info:
        llama.llama_from_tensors(tensors, config, str(tmp_path))
    message = str(info.value)
    print(message)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight', expected shape (48, 32)" in message
    assert "'model.layers.0.self_attn.k_proj.weight' has shape (8, 32), expected (16, 32)" in message
    assert "model.layers.0.self_attn.extra.weight" in message  # unused
    assert str(tmp_path) in message


def test_bad_directories_and_configs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.read_hf_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        loading.read_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*never reads pickles.*safetensors"):
        loading.read_hf_checkpoint(tmp_path)
    base = {**_COMMON, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UserError, match="'yarn' is not supported"):
        llama.llama_config_from_hf(base)
    with pytest.raises(UserError, match="hidden_act='gelu'"):
        llama.llama_config_from_hf({**_COMMON, "model_type": "llama", "hidden_act": "gelu"})
    with pytest.raises(UserError, match="config.json lacks '"):
        llama.llama_config_from_hf({"model_type": "llama"})


def test_tokenizer_loads_from_directory_files(tmp_path):
    """`load_tokenizer` reads tokenizer.json from the directory (no hub), as transformers saved it."""
    import tokenizers

    words = ["the", "cat", "sat", "on", "mat", "<unk>", "<s>", "</s>"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    saved = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>"
    )
    saved.save_pretrained(tmp_path)
    tokenizer = loading.load_tokenizer(tmp_path)
    assert tokenizer("the cat sat on the dog")["input_ids"] == [0, 1, 2, 3, 0, 5]
    assert tokenizer.eos_token_id == 7
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        loading.load_tokenizer(tmp_path / "empty")


def _int8_reference(weight_out_in: np.ndarray) -> np.ndarray:
    """The weight-only int8 definition written out on a PyTorch (out, in) weight: per output row,
    s = max |W| / 127, Q = round(W / s) in [-127, 127]; returns the dequantised Q * s."""
    scale = np.abs(weight_out_in).max(axis=1, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.rint(weight_out_in / scale), -127, 127) * scale


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
def test_int8_layers_match_transformers_on_the_dequantised_weights(tmp_path, scan):
    """llm.quantization=int8: slit's layers hold int8 kernels and a float32 scale per output channel;
    its logits equal transformers' model whose layers' linear weights were replaced by the dequantised
    values of the definition (NumPy, above), and greedy decoding gives the same tokens. The embedding
    and the separate output layer stay float32 (untouched in the reference too)."""
    from slit.generate import GenerationConfig, generate
    from slit.models.llm import quantize

    hf = _write(tmp_path, "llama3_rope_bias")  # biases on every projection, separate lm_head
    lm = llama.llama_from_hf(tmp_path, scan_layers=scan)
    assert quantize.quantize_layers(lm, "int8") == (7 if scan else 14)
    with pytest.raises(ValueError, match="int8 already"):  # a second pass would set every scale to 1
        quantize.quantize_layers(lm, "int8")
    changed = 0
    with torch.no_grad():
        for module in hf.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.from_numpy(_int8_reference(module.weight.numpy())))
                changed += 1
    assert changed == 14
    stored = {str(v[...].dtype) for _, v in nnx.state(lm, Frozen).flat_state()}
    assert stored == {"int8", "float32"}
    assert lm.lm_head.kernel[...].dtype == jnp.float32 and lm.embedding[...].dtype == jnp.float32
    ids, mask, positions = _inputs()
    expected = _hf_logits(hf, ids, mask, positions)
    err = np.abs(_slit_logits(lm, ids, mask, positions) - expected)[mask].max()
    print(f"int8 layers: max abs logit diff {err:.2e} (logit std {expected.std():.2f})")
    assert err < ATOL

    prompt_ids, prompt_mask, _ = _inputs(length=6, pads=(0, 2, 4))
    with torch.no_grad():
        want = hf.generate(
            input_ids=torch.from_numpy(prompt_ids).long(),
            attention_mask=torch.from_numpy(prompt_mask).long(),
            max_new_tokens=5,
            do_sample=False,
        )[:, 6:].numpy()
    config = GenerationConfig(max_new_tokens=5, eos_token_ids=(), pad_token_id=0)
    got = generate(lm, lm.embed(jnp.asarray(prompt_ids)), jnp.asarray(prompt_mask), config).tokens
    np.testing.assert_array_equal(np.asarray(got), want)


def test_int8_quantiser_is_the_definition():
    """slit's quantiser against the definition, on a (.., in, out) kernel with a zero channel and a
    stacked [L, in, out] one: the same int8 values and scales, and dequantised within half a step."""
    from slit.models.llm.quantize import int8_per_output_channel

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 5, 7)).astype(np.float32)
    kernel[1, :, 2] = 0.0
    q, scale = (np.asarray(a) for a in int8_per_output_channel(kernel))
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 7)
    for layer in range(3):
        np.testing.assert_allclose(
            q[layer].T * scale[layer][:, None], _int8_reference(kernel[layer].T), rtol=1e-6, atol=1e-7
        )
    assert np.all(np.abs(q.astype(np.float32) * scale[:, None, :] - kernel) <= scale[:, None, :] / 2 + 1e-7)
    assert scale[1, 2] == 1.0 and not q[1, :, 2].any()
    assert np.abs(q).max() == 127
