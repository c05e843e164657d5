"""Parity of slit's GPT-2 (slit/models/llm/gpt2.py) with transformers' GPT2LMHeadModel.

transformers writes two small random checkpoints with `save_pretrained`: GPT-2 as published (tied
output layer, gelu_new, 4x MLP) and a variant with a separate lm_head, a narrower MLP, exact GELU
and `scale_attn_by_inverse_layer_idx` (written sharded). Weights are drawn wider than the default
(std 0.25) so that attention is peaked; LayerNorm weights and biases are randomised too.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.models.layers import Frozen  # noqa: E402
from slit.models.llm import gpt2, loading  # noqa: E402

ATOL = 1e-4
VOCAB = 89
T = 11

_COMMON = dict(
    vocab_size=VOCAB,
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    initializer_range=0.25,
    bos_token_id=None,
    eos_token_id=None,  # random models: no early stop in `generate`
    pad_token_id=0,
)
VARIANTS = {
    "gpt2": dict(),
    "gpt2_untied_variant": dict(
        tie_word_embeddings=False,
        n_inner=40,
        activation_function="gelu",
        scale_attn_by_inverse_layer_idx=True,
    ),
}


def _write(directory, variant: str, **save_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**_COMMON, **VARIANTS[variant])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(directory, **save_kwargs)
    return model


def _inputs(length: int = T, pads: tuple[int, ...] = (0, 3, 6)):
    """Left-padded ids, mask and positions [B, T] (positions count real tokens only, from 0)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, (len(pads), length)).astype(np.int32)
    mask = np.arange(length)[None, :] >= np.array(pads)[:, None]
    ids = np.where(mask, ids, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def _hf_logits(model, ids, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            position_ids=torch.from_numpy(positions).long(),
        )
    return out.logits.numpy()


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
    directory = tmp_path_factory.mktemp(request.param)
    save_kwargs = {"max_shard_size": "30KB"} if request.param == "gpt2_untied_variant" else {}
    hf = _write(directory, request.param, **save_kwargs)
    return request.param, hf, directory, gpt2.gpt2_from_hf(directory)


def test_logits_match_transformers_on_left_padded_batch(pair):
    variant, hf, directory, lm = pair
    if variant == "gpt2_untied_variant":  # written sharded
        assert (directory / loading.INDEX_FILE).exists() and not (directory / loading.SINGLE_FILE).exists()
    ids, mask, positions = _inputs()
    expected = _hf_logits(hf, ids, mask, positions)
    got = _slit_logits(lm, ids, mask, positions)
    assert got.shape == expected.shape == (3, T, VOCAB) and got.dtype == np.float32
    err = np.abs(got - expected)[mask].max()  # outputs at padded positions are meaningless in both
    print(f"{variant}: max abs logit diff {err:.2e} (logit std {expected.std():.2f})")
    assert err < ATOL
    with torch.no_grad():  # row 0 is unpadded: transformers' default positions 0..T-1 agree
        plain = hf(input_ids=torch.from_numpy(ids[:1]).long()).logits.numpy()
    assert np.abs(got[0] - plain[0]).max() < ATOL


def test_greedy_through_cache_matches_generate_and_full_forward(pair):
    """Prompt in two chunks of 3 through the KV cache, then one token per step (a tiny greedy loop).

    Tokens must equal transformers' `generate` on the left-padded batch (which derives positions
    from the attention mask as `_inputs` does); every step's logits must equal slit's full forward.
    """
    variant, hf, _, lm = pair
    prompt_len, new_tokens = 6, T - 6 + 1
    ids, mask, positions = _inputs(length=prompt_len, pads=(0, 2, 4))
    with torch.no_grad():
        expected = hf.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=new_tokens,
            do_sample=False,
        )[:, prompt_len:].numpy()

    cache = lm.init_cache(batch_size=3, max_length=T)
    pieces = []
    for start in (0, 3):
        chunk = (jnp.asarray(a[:, start : start + 3]) for a in (ids, positions, mask))
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

    full_mask = np.concatenate([mask, np.ones((3, T - prompt_len), bool)], axis=1)
    full_ids = np.concatenate([ids, got[:, :-1]], axis=1).astype(np.int32)
    full_positions = np.concatenate([positions, next_position + np.arange(T - prompt_len)], axis=1)
    full = _slit_logits(lm, full_ids, full_mask, full_positions)
    err = np.abs(np.concatenate(pieces, axis=1) - full)[full_mask].max()
    print(f"{variant}: cache-incremental vs full forward: max abs diff {err:.2e}")
    assert err < 1e-5


def test_config_and_frozen_weights(pair):
    variant, _, directory, lm = pair
    config = gpt2.gpt2_config_from_hf(json.loads((directory / "config.json").read_text()))
    assert config == lm.config
    if variant == "gpt2":
        assert (config.mlp_dim, config.activation, config.tie_word_embeddings) == (128, "gelu_new", True)
        assert lm.lm_head is None
    else:
        assert (config.mlp_dim, config.activation, config.tie_word_embeddings) == (40, "gelu", False)
        assert config.scale_attn_by_inverse_layer_idx
    variables = nnx.state(lm, nnx.Variable).flat_state()
    assert all(isinstance(v, Frozen) for _, v in variables)


def test_missing_and_misshapen_tensors_are_all_named(tmp_path):
    _write(tmp_path, "gpt2")
    hf_config, tensors = loading.read_hf_checkpoint(tmp_path)
    config = gpt2.gpt2_config_from_hf(hf_config)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"][:, :64]
    with pytest.raises(UserError) as info:
        gpt2.gpt2_from_tensors(tensors, config, str(tmp_path))
    message = str(info.value)
    print(message)
    assert "missing tensor 'transformer.h.1.mlp.c_fc.bias', expected shape (128,)" in message
    assert "'transformer.h.0.attn.c_attn.weight' has shape (32, 64), expected (32, 96)" in message
    with pytest.raises(UserError, match="add_cross_attention"):
        gpt2.gpt2_config_from_hf({**hf_config, "add_cross_attention": True})


def test_original_checkpoint_names_without_prefix(tmp_path):
    """The original GPT-2 checkpoints name tensors without `transformer.` and keep mask buffers."""
    hf = _write(tmp_path, "gpt2")
    _, tensors = loading.read_hf_checkpoint(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    lm = gpt2.gpt2_from_tensors(tensors, gpt2.gpt2_config_from_hf(hf.config.to_dict()))
    ids, mask, positions = _inputs()
    assert (
        np.abs(_slit_logits(lm, ids, mask, positions) - _hf_logits(hf, ids, mask, positions))[mask].max()
        < ATOL
    )


def test_int8_layers_match_transformers_on_the_dequantised_weights(tmp_path):
    """llm.quantization=int8 on GPT-2: the attention's output projection and the MLP (Conv1D weights,
    (in, out)) are stored as int8 with a float32 scale per output column, the fused q/k/v kernel is not;
    logits equal transformers' model holding the dequantised weights of the definition (NumPy)."""
    from slit.models.llm import quantize

    hf = _write(tmp_path, "gpt2_untied_variant")
    lm = gpt2.gpt2_from_hf(tmp_path)
    assert quantize.quantize_layers(lm, "int8") == 6  # 2 layers x (attention out, fc, proj)

    def dequantised(weight_in_out: np.ndarray) -> np.ndarray:
        scale = np.abs(weight_in_out).max(axis=0, keepdims=True) / 127.0
        scale = np.where(scale > 0, scale, 1.0)
        return np.clip(np.rint(weight_in_out / scale), -127, 127) * scale

    with torch.no_grad():
        for block in hf.transformer.h:
            for conv in (block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                conv.weight.copy_(torch.from_numpy(dequantised(conv.weight.numpy())))
    assert lm.layers[0].attention.qkv_kernel[...].dtype == jnp.float32
    ids, mask, positions = _inputs()
    expected = _hf_logits(hf, ids, mask, positions)
    err = np.abs(_slit_logits(lm, ids, mask, positions) - expected)[mask].max()
    print(f"gpt2 int8 layers: max abs logit diff {err:.2e} (logit std {expected.std():.2f})")
    assert err < ATOL
