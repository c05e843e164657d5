"""Parity of slit's T5 / Flan-T5 (slit/models/llm/t5.py) with transformers' T5ForConditionalGeneration.

transformers writes two small random checkpoints with `save_pretrained`: T5 v1.0 style (`relu`
feed-forward, output layer tied to the shared embedding with the d_model**-0.5 rescale) and Flan-T5
style (`gated-gelu`, separate `lm_head`, no rescale; written as a sharded checkpoint). The reference
is transformers' model loaded back from the same directory that slit reads.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.models.layers import Frozen  # noqa: E402
from slit.models.llm import loading  # noqa: E402
from slit.models.llm import t5 as slit_t5  # noqa: E402
from slit.models.llm.base import KVCache  # noqa: E402

ATOL = 1e-4
VOCAB, D_MODEL = 96, 32

VARIANTS = {
    # T5 v1.0: relu, tied output layer (rescaled); few buckets and a short max distance, so that
    # short sequences reach the logarithmic and the saturated buckets.
    "t5_v1_0": dict(
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
    ),
    # Flan-T5 / T5 v1.1: gated tanh-GELU, separate lm_head, T5's default buckets.
    "flan_t5": dict(
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    ),
}


# ---------------------------------------------------------------------------------------------------
# Checkpoints written by transformers, read back by the test (config.json + safetensors, sharded or not).


def _write_checkpoint(directory: pathlib.Path, variant: str) -> None:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=D_MODEL,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **VARIANTS[variant],
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # initialised to ones: randomise them so that they are checked
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
        if not VARIANTS[variant]["tie_word_embeddings"]:  # transformers 5 ties anyway: untie it here
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, D_MODEL) * D_MODEL**-0.5)
    sharded = variant == "flan_t5"
    model.save_pretrained(directory, max_shard_size="40KB" if sharded else "1GB")
    assert (directory / "model.safetensors.index.json").exists() == sharded


def _hf_model(directory: pathlib.Path) -> "transformers.T5ForConditionalGeneration":
    hf_class = transformers.T5ForConditionalGeneration
    return hf_class.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (variant, checkpoint directory, transformers model, slit model), each built once."""
    built = {}

    def get(variant: str):
        if variant not in built:
            directory = tmp_path_factory.mktemp(variant)
            _write_checkpoint(directory, variant)
            _, tensors = loading.read_hf_checkpoint(directory)
            assert ("lm_head.weight" in tensors) == (variant == "flan_t5")
            model = slit_t5.t5_from_hf(directory)
            built[variant] = variant, directory, _hf_model(directory), model
        return built[variant]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, checkpoints):
    return checkpoints(request.param)


@pytest.fixture(scope="module")
def flan(checkpoints):
    """The Flan-T5-style checkpoint only (SLIT's LLM), for the checks that do not depend on the variant."""
    return checkpoints("flan_t5")


# ---------------------------------------------------------------------------------------------------
# Inputs: a padded batch (right padding in two rows, left padding in one) and decoder tokens. Token
# inputs and [soft prompt; tokens] inputs have the same length, so that they share compiled code.

ENC_LENGTH, PROMPT_LENGTH, MAX_NEW_TOKENS = 16, 5, 12


def _encoder_inputs(length: int = ENC_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [3, length] and their mask: row 0 full, row 1 right-, row 2 left-padded."""
    ids = np.random.default_rng(1).integers(2, VOCAB, (3, length)).astype(np.int32)
    mask = np.ones((3, length), bool)
    mask[1, length - 4 :] = False
    mask[2, : length - 5] = False
    ids[1, length - 5] = 1  # eos, then padding
    ids[~mask] = 0
    return ids, mask


def _prompted_inputs(model) -> tuple[np.ndarray, np.ndarray]:
    """[soft prompt; embedded tokens] float32 [3, ENC_LENGTH, D] (as stage two feeds the encoder), mask."""
    ids, mask = _encoder_inputs(ENC_LENGTH - PROMPT_LENGTH)
    prompt = np.random.default_rng(3).standard_normal((3, PROMPT_LENGTH, D_MODEL)).astype(np.float32)
    embeds = np.concatenate([prompt, np.asarray(model.embed(jnp.asarray(ids)))], axis=1)
    return embeds, np.concatenate([np.ones((3, PROMPT_LENGTH), bool), mask], axis=1)


def _decoder_inputs(length: int = 6) -> np.ndarray:
    ids = np.random.default_rng(2).integers(2, VOCAB, (3, length)).astype(np.int32)
    ids[:, 0] = 0  # decoder_start_token_id
    return ids


def _t(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.asarray(x))


@nnx.jit
def _forward(model, enc_embeds, enc_mask, dec_ids):
    encoder_out = model.encode(enc_embeds, enc_mask)
    positions = jnp.broadcast_to(jnp.arange(dec_ids.shape[1]), dec_ids.shape)
    logits, _ = model.decode(dec_ids, positions, encoder_out, enc_mask)
    return encoder_out, logits


def _max_diff(got, expected) -> float:
    got = np.asarray(got)
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


# ---------------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (16, 20)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance, bidirectional):
    relative = np.arange(-400, 401)
    expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        _t(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    got = slit_t5.relative_position_bucket(
        jnp.asarray(relative), bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    np.testing.assert_array_equal(np.asarray(got), expected)
    # The range reaches every bucket (but "distance 0, looking ahead", which cannot occur).
    unreachable = {num_buckets // 2} if bidirectional else set()
    assert set(expected.tolist()) == set(range(num_buckets)) - unreachable


def test_model_is_frozen_and_reads_its_config(pair):
    variant, _, hf, model = pair
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))
    assert jax.tree.leaves(nnx.state(model, Frozen))
    c = model.config
    assert (c.num_layers, c.num_decoder_layers, c.d_ff, c.num_heads) == (2, 3, 48, 4)
    assert c.tie_word_embeddings == (variant == "t5_v1_0") == c.scale_decoder_outputs
    assert c.scale_decoder_outputs == hf.config.scale_decoder_outputs
    assert model.token_ids.eos == (1,) and model.token_ids.pad == 0 and model.token_ids.decoder_start == 0
    assert model.vocab_size == VOCAB and model.hidden_size == D_MODEL


def _inputs(model, kind: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """(transformers encoder kwargs, slit encoder input embeddings, mask) for token or embedding inputs."""
    if kind == "tokens":
        ids, mask = _encoder_inputs()
        return {"input_ids": _t(ids).long()}, np.asarray(model.embed(jnp.asarray(ids))), mask
    embeds, mask = _prompted_inputs(model)
    return {"inputs_embeds": _t(embeds)}, embeds, mask


@pytest.mark.parametrize("kind", ["tokens", "embeddings"])
def test_encoder_and_logits_match(pair, kind):
    """Padded batch; encoder input given as token ids to transformers, or [soft prompt; tokens] as vectors."""
    variant, _, hf, model = pair
    hf_inputs, embeds, mask = _inputs(model, kind)
    dec = _decoder_inputs()
    with torch.no_grad():
        out = hf(**hf_inputs, attention_mask=_t(mask).long(), decoder_input_ids=_t(dec).long())
    enc, logits = _forward(model, jnp.asarray(embeds), jnp.asarray(mask), jnp.asarray(dec))
    enc_err = _max_diff(enc, out.encoder_last_hidden_state.numpy())
    logit_err = _max_diff(logits, out.logits.numpy())
    print(f"{variant} {kind}: encoder max abs diff {enc_err:.2e}, logits {logit_err:.2e}")
    assert logits.dtype == jnp.float32
    assert enc_err < ATOL and logit_err < ATOL


@nnx.jit
def _encode_for_decoding(model, enc_embeds, enc_mask):
    return model.cross_attention_cache(model.encode(enc_embeds, enc_mask))


@nnx.jit
def _decode_step(model, token_ids, positions, cross, enc_mask, cache):
    return model.decode(token_ids, positions, cross, enc_mask, cache)


def test_incremental_decoding_equals_full_pass(pair):
    """Through the KV cache, 2 tokens, then 1, 1 and 2: the same logits as one full decoder pass."""
    variant, _, _, model = pair
    _, embeds, mask = _inputs(model, "tokens")
    embeds, enc_mask, dec = jnp.asarray(embeds), jnp.asarray(mask), jnp.asarray(_decoder_inputs())
    _, full = _forward(model, embeds, enc_mask, dec)

    cross = _encode_for_decoding(model, embeds, enc_mask)
    cache = model.init_cache(3, MAX_NEW_TOKENS)  # the size the greedy test uses: the same compiled step
    positions = jnp.broadcast_to(jnp.arange(6), dec.shape)
    pieces = []
    for start, stop in ((0, 2), (2, 3), (3, 4), (4, 6)):
        chunk = slice(start, stop)
        logits, cache = _decode_step(model, dec[:, chunk], positions[:, chunk], cross, enc_mask, cache)
        pieces.append(logits)
    assert isinstance(cache, KVCache) and int(cache.length) == 6
    np.testing.assert_array_equal(np.asarray(cache.valid), np.arange(MAX_NEW_TOKENS)[None].repeat(3, 0) < 6)
    err = _max_diff(jnp.concatenate(pieces, axis=1), np.asarray(full))
    print(f"{variant} cached vs full decoder pass: max abs diff {err:.2e}")
    assert err < 1e-5

    # Only relative positions matter: every row's positions shifted (differently) change nothing.
    shifted = positions + jnp.array([[7], [0], [3]])
    cache = model.init_cache(3, MAX_NEW_TOKENS)
    logits, cache = _decode_step(model, dec[:, :2], shifted[:, :2], cross, enc_mask, cache)
    logits_next, _ = _decode_step(model, dec[:, 2:3], shifted[:, 2:3], cross, enc_mask, cache)
    assert _max_diff(jnp.concatenate([logits, logits_next], axis=1), np.asarray(full[:, :3])) < 1e-5


def _greedy(model, enc_embeds: np.ndarray, enc_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """A minimal greedy loop through the KV cache; finished rows get pad, as transformers does."""
    b, tid = enc_embeds.shape[0], model.token_ids
    enc_mask = jnp.asarray(enc_mask)
    cross = _encode_for_decoding(model, jnp.asarray(enc_embeds), enc_mask)
    cache = model.init_cache(b, max_new_tokens)
    token = jnp.full((b, 1), tid.decoder_start, jnp.int32)
    done = np.zeros(b, bool)
    out = []
    for i in range(max_new_tokens):
        logits, cache = _decode_step(model, token, jnp.full((b, 1), i, jnp.int32), cross, enc_mask, cache)
        nxt = np.where(done, tid.pad, np.asarray(jnp.argmax(logits[:, -1], axis=-1)))
        done |= np.isin(nxt, tid.eos)
        out.append(nxt)
        token = jnp.asarray(nxt[:, None], jnp.int32)
        if done.all():
            break
    return np.stack(out, axis=1)


@pytest.mark.parametrize("kind", ["tokens", "embeddings"])
def test_greedy_tokens_match_generate(pair, kind):
    variant, _, hf, model = pair
    hf_inputs, embeds, mask = _inputs(model, kind)
    with torch.no_grad():
        # use_cache=False: transformers sizes its generation cache by the encoder's depth (num_layers),
        # which fails for a decoder deeper than the encoder; without it, it reruns the whole decoder.
        expected = hf.generate(
            **hf_inputs,
            attention_mask=_t(mask).long(),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            use_cache=False,
        ).numpy()
    assert (expected[:, 0] == 0).all()  # transformers starts with decoder_start_token_id
    got = _greedy(model, embeds, mask, MAX_NEW_TOKENS)
    print(f"{variant} greedy from {kind}: {got.tolist()}")
    np.testing.assert_array_equal(got, expected[:, 1:])


def _hf_logits(hf, hf_inputs: dict, mask: np.ndarray, dec: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf(**hf_inputs, attention_mask=_t(mask).long(), decoder_input_ids=_t(dec).long())
    return out.logits.numpy()


def test_original_config_files(pair, tmp_path):
    """config.json as the original checkpoints have it: t5-small names no tie flag (tied, rescaled);
    Flan-T5 says `tie_word_embeddings: false` (separate lm_head, no rescale); neither has
    transformers 5's `scale_decoder_outputs`."""
    variant, directory, _, _ = pair
    directory = shutil.copytree(directory, tmp_path / variant)
    config = json.loads((directory / "config.json").read_text())
    del config["scale_decoder_outputs"], config["tie_word_embeddings"]
    if variant == "flan_t5":
        config["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(config))
    hf = _hf_model(directory)
    assert hf.config.scale_decoder_outputs == (variant == "t5_v1_0")

    model = slit_t5.t5_from_hf(directory)
    assert model.config.scale_decoder_outputs == (variant == "t5_v1_0")
    hf_inputs, embeds, mask = _inputs(model, "tokens")
    dec = _decoder_inputs()
    _, logits = _forward(model, jnp.asarray(embeds), jnp.asarray(mask), jnp.asarray(dec))
    assert _max_diff(logits, _hf_logits(hf, hf_inputs, mask, dec)) < ATOL


def test_bf16_weights(flan):
    """Frozen weights kept in bfloat16 compute what transformers computes in float32 with the same
    bf16-rounded weights; with bf16 matmuls too, logits stay close."""
    variant, directory, _, _ = flan
    model = slit_t5.t5_from_hf(directory, param_dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, Frozen))} == {jnp.dtype(jnp.bfloat16)}

    rounded = _hf_model(directory)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    hf_inputs, embeds, mask = _inputs(model, "tokens")
    dec = _decoder_inputs()
    expected = _hf_logits(rounded, hf_inputs, mask, dec)
    embeds, enc_mask, dec_ids = jnp.asarray(embeds), jnp.asarray(mask), jnp.asarray(dec)
    _, logits = _forward(model, embeds, enc_mask, dec_ids)
    err = _max_diff(logits, expected)
    print(f"{variant} bf16 weights, f32 compute vs transformers with the rounded weights: {err:.2e}")
    assert err < ATOL

    bf16 = slit_t5.t5_from_hf(directory, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    _, logits16 = _forward(bf16, embeds, enc_mask, dec_ids)
    assert logits16.dtype == jnp.float32
    rel = _max_diff(logits16, expected) / np.abs(expected).max()
    print(f"{variant} bf16 compute: max abs diff / max |logit| = {rel:.2e}")
    assert rel < 0.05


def test_gradient_wrt_encoder_inputs_matches_torch(flan):
    """Stage two trains through the frozen T5: d(loss)/d([soft prompt; tokens]) agrees with torch."""
    variant, _, hf, model = flan
    _, embeds, mask = _inputs(model, "embeddings")
    dec = _decoder_inputs()
    weights = np.random.default_rng(4).standard_normal((3, dec.shape[1], VOCAB)).astype(np.float32)

    x = _t(embeds).clone().requires_grad_(True)
    logits = hf(inputs_embeds=x, attention_mask=_t(mask).long(), decoder_input_ids=_t(dec).long()).logits
    (logits * _t(weights)).sum().backward()
    expected = x.grad.numpy()

    graphdef, state = nnx.split(model)

    def loss(e):
        m = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(dec.shape[1]), dec.shape)
        lg, _ = m.decode(jnp.asarray(dec), positions, m.encode(e, jnp.asarray(mask)), jnp.asarray(mask))
        return jnp.sum(lg * weights)

    got = jax.jit(jax.grad(loss))(jnp.asarray(embeds))
    err = _max_diff(got, expected)
    print(f"{variant} d/d(encoder input): max abs diff {err:.2e}, max |g| {np.abs(expected).max():.2f}")
    assert err < ATOL


def test_bad_checkpoints_are_named(pair):
    variant, directory, _, _ = pair
    hf_config, tensors = loading.read_hf_checkpoint(directory)
    config = slit_t5.t5_config_from_hf(hf_config)

    def load(tensors, config=config):
        return slit_t5.t5_from_tensors(tensors, config, "ckpt-dir")

    missing = "decoder.block.2.layer.1.EncDecAttention.v.weight"
    with pytest.raises(UserError, match=rf"missing tensor '{missing}', expected shape \(32, 32\)") as info:
        load({k: v for k, v in tensors.items() if k != missing})
    assert "ckpt-dir" in str(info.value)

    ffn = "encoder.block.1.layer.1.DenseReluDense." + ("wi_1" if variant == "flan_t5" else "wi") + ".weight"
    with pytest.raises(UserError, match=rf"'{ffn}' has shape \(40, 32\), expected \(48, 32\)"):
        load(dict(tensors, **{ffn: tensors[ffn][:40]}))

    extra = "encoder.block.5.layer.0.SelfAttention.q.weight"
    with pytest.raises(UserError, match=rf"1 unused checkpoint tensor.*'{extra}'"):
        load(dict(tensors, **{extra: tensors["shared.weight"]}))

    # Fewer decoder layers in config.json than in the weights: the leftover tensors are listed.
    with pytest.raises(UserError, match=r"unused checkpoint tensor.*'decoder\.block\.2\.layer\.0\.Self"):
        load(tensors, slit_t5.t5_config_from_hf(dict(hf_config, num_decoder_layers=2)))

    if variant == "flan_t5":  # Flan-T5's config.json says untied: its lm_head must be there
        untied = slit_t5.t5_config_from_hf(dict(hf_config, tie_word_embeddings=False))
        with pytest.raises(UserError, match=r"missing tensor 'lm_head\.weight', expected shape \(96, 32\)"):
            load({k: v for k, v in tensors.items() if k != "lm_head.weight"}, untied)

    with pytest.raises(UserError, match=r"feed_forward_proj 'gated-gelu-x'"):
        slit_t5.t5_config_from_hf(dict(hf_config, feed_forward_proj="gated-gelu-x"))
    with pytest.raises(UserError, match=r"config.json lacks 'd_kv'"):
        slit_t5.t5_config_from_hf({k: v for k, v in hf_config.items() if k != "d_kv"})
