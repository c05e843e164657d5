"""Parity of slit's Q-Former (weights converted by `slit.interop.hf_convert`) with transformers' BLIP-2."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings  # noqa: E402

from slit.interop import hf_convert  # noqa: E402
from slit.models.masks import bidirectional_mask  # noqa: E402
from slit.models.qformer import QFormer  # noqa: E402

ATOL = 1e-4
B, Q, FRAMES, ENC_WIDTH, TEXT_LEN = 2, 8, 20, 48, 7


def _hf_qformer(use_text: bool) -> tuple[transformers.Blip2QFormerModel, Blip2TextEmbeddings | None]:
    """A small random Blip2QFormerModel in eval mode (1-D params randomised too), and its text embeddings."""
    torch.manual_seed(0)
    config = transformers.Blip2QFormerConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        cross_attention_frequency=2,
        encoder_hidden_size=ENC_WIDTH,
        max_position_embeddings=32,
        layer_norm_eps=1e-12,
        use_qformer_text_input=use_text,
    )
    model = transformers.Blip2QFormerModel(config).eval()
    embeddings = Blip2TextEmbeddings(config).eval() if use_text else None
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model, embeddings


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _slit_qformer(hf: transformers.Blip2QFormerModel, query_tokens: np.ndarray, **embeddings) -> QFormer:
    config = hf_convert.blip2_qformer_config(hf.config, num_queries=Q)
    module = QFormer(config, rngs=nnx.Rngs(0))
    params = hf_convert.blip2_qformer_params(_numpy(hf), config, query_tokens=query_tokens, **embeddings)
    assert "encoder_norm" not in params  # BLIP-2's ln_vision is not part of Blip2QFormerModel
    params["encoder_norm"] = dict(zip(("scale", "bias"), _ln_vision(), strict=True))
    hf_convert.load_params(module, params)
    return module


def _ln_vision() -> tuple[np.ndarray, np.ndarray]:
    """Random weights of the encoder LayerNorm (slit's `encoder_norm`, BLIP-2's `ln_vision`).

    A LayerNorm is not the identity even with scale 1 and bias 0, so the HF side applies it explicitly.
    """
    rng = np.random.default_rng(2)
    scale = 1.0 + 0.1 * rng.standard_normal(ENC_WIDTH)
    return scale.astype(np.float32), (0.1 * rng.standard_normal(ENC_WIDTH)).astype(np.float32)


def _hf_encoder_states(encoder: np.ndarray) -> torch.Tensor:
    """ln_vision(encoder), as BLIP-2 feeds the Q-Former (eps 1e-5, like slit's `encoder_norm`)."""
    scale, bias = (torch.from_numpy(a) for a in _ln_vision())
    return torch.nn.functional.layer_norm(torch.from_numpy(encoder), (ENC_WIDTH,), scale, bias, eps=1e-5)


def _inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    query_tokens = rng.standard_normal((1, Q, 64)).astype(np.float32)
    encoder = rng.standard_normal((B, FRAMES, ENC_WIDTH)).astype(np.float32)
    encoder_mask = np.ones((B, FRAMES), bool)
    encoder_mask[1, 13:] = False  # the tail of example 1 is padding
    return query_tokens, encoder, encoder_mask


def test_queries_only_pass_matches_blip2_qformer():
    hf, _ = _hf_qformer(use_text=False)
    query_tokens, encoder, encoder_mask = _inputs()
    with torch.no_grad():
        expected = hf(
            query_embeds=torch.from_numpy(query_tokens).expand(B, -1, -1),
            encoder_hidden_states=_hf_encoder_states(encoder),
            encoder_attention_mask=torch.from_numpy(encoder_mask.astype(np.int64)),
        ).last_hidden_state.numpy()

    qformer = _slit_qformer(hf, query_tokens)
    assert (
        "ffn_text"
        not in hf_convert.blip2_qformer_params(_numpy(hf), qformer.config, query_tokens)["layers"][0]
    )
    got = np.asarray(
        qformer(
            with_queries=True, encoder_bfd=jnp.asarray(encoder), encoder_mask_bf=jnp.asarray(encoder_mask)
        )
    )
    assert got.shape == expected.shape == (B, Q, 64)
    err = np.abs(got - expected).max()
    print(f"q-former queries-only pass: max abs diff {err:.2e}")
    assert err < ATOL
    # The mask matters: without it the padded example differs.
    unmasked = np.asarray(qformer(with_queries=True, encoder_bfd=jnp.asarray(encoder)))
    assert np.abs(unmasked[1] - expected[1]).max() > 1e-2


def test_text_and_queries_pass_matches_blip2_qformer():
    """[queries; text] with bidirectional attention and text padding (BLIP-2's image-text matching pass)."""
    hf, embeddings = _hf_qformer(use_text=True)
    query_tokens, encoder, encoder_mask = _inputs()
    rng = np.random.default_rng(1)
    text_ids = rng.integers(1, 100, (B, TEXT_LEN))
    text_valid = np.ones((B, TEXT_LEN), bool)
    text_valid[0, 4:] = False
    text_ids[~text_valid] = 0

    with torch.no_grad():
        embeds = embeddings(
            input_ids=torch.from_numpy(text_ids),
            query_embeds=torch.from_numpy(query_tokens).expand(B, -1, -1),
        )
        attention_mask = np.concatenate([np.ones((B, Q), np.int64), text_valid.astype(np.int64)], axis=1)
        # transformers 5.23 builds a 2-D encoder_attention_mask into a (B, 1, Q + T, F) mask, which breaks
        # the cross-attention of the Q query rows; a prepared 4-D additive (B, 1, Q, F) mask is used as is.
        cross_mask = np.where(encoder_mask, 0.0, np.finfo(np.float32).min).astype(np.float32)
        cross_mask = np.broadcast_to(cross_mask[:, None, None, :], (B, 1, Q, FRAMES)).copy()
        expected = hf(
            query_embeds=embeds,
            query_length=Q,
            attention_mask=torch.from_numpy(attention_mask),
            encoder_hidden_states=_hf_encoder_states(encoder),
            encoder_attention_mask=torch.from_numpy(cross_mask),
        ).last_hidden_state.numpy()

    emb = _numpy(embeddings)
    qformer = _slit_qformer(
        hf,
        query_tokens,
        word_embeddings=emb["word_embeddings.weight"],
        position_embeddings=emb["position_embeddings.weight"],
    )
    got = np.asarray(
        qformer(
            text_ids_bl=jnp.asarray(text_ids),
            with_queries=True,
            attention_mask_bll=bidirectional_mask(Q, jnp.asarray(text_valid)),
            encoder_bfd=jnp.asarray(encoder),
            encoder_mask_bf=jnp.asarray(encoder_mask),
        )
    )
    assert got.shape == expected.shape == (B, Q + TEXT_LEN, 64)
    err_valid = np.abs(got - expected)[np.concatenate([np.ones((B, Q), bool), text_valid], 1)].max()
    err = np.abs(got - expected).max()
    print(f"q-former [queries; text] pass: max abs diff {err:.2e} (non-padding positions {err_valid:.2e})")
    assert err < ATOL


def test_full_blip2_state_dict_supplies_embeddings():
    """With `qformer.`-prefixed keys, query tokens and text embeddings are found next to the prefix."""
    hf, embeddings = _hf_qformer(use_text=True)
    query_tokens, _, _ = _inputs()
    sd = {f"qformer.{k}": v for k, v in _numpy(hf).items()}
    sd.update({f"embeddings.{k}": v for k, v in _numpy(embeddings).items()})
    sd["query_tokens"] = query_tokens
    sd["text_projection.weight"] = np.zeros((16, 64), np.float32)  # outside the prefix: ignored
    config = hf_convert.blip2_qformer_config(hf.config, num_queries=Q)
    params = hf_convert.blip2_qformer_params(sd, config)
    np.testing.assert_array_equal(params["query_tokens"], query_tokens[0])
    np.testing.assert_array_equal(
        params["word_embeddings"]["embedding"], sd["embeddings.word_embeddings.weight"]
    )
    np.testing.assert_array_equal(
        params["layers"][0]["cross_attention"]["key"]["kernel"],
        sd["qformer.encoder.layer.0.crossattention.attention.key.weight"].T,
    )
    assert set(params["layers"][0]) == {"self_attention", "cross_attention", "ffn_query", "ffn_text"}
    assert "cross_attention" not in params["layers"][1]


def test_missing_and_misshapen_tensors_are_named():
    hf, _ = _hf_qformer(use_text=False)
    config = hf_convert.blip2_qformer_config(hf.config, num_queries=Q)
    sd = _numpy(hf)

    missing = {k: v for k, v in sd.items() if k != "encoder.layer.2.crossattention.attention.value.weight"}
    with pytest.raises(
        ValueError, match=r"encoder\.layer\.2\.crossattention\.attention\.value\.weight.*\(64, 48\)"
    ):
        hf_convert.blip2_qformer_params(missing, config)

    key = "encoder.layer.3.output_query.dense.weight"
    wrong = dict(sd, **{key: sd[key].T})
    with pytest.raises(ValueError, match=r"encoder\.layer\.3\.output_query\.dense\.weight.*\(64, 128\)"):
        hf_convert.blip2_qformer_params(wrong, config)

    with pytest.raises(ValueError, match=r"query_tokens.*\(1, 8, 64\)"):
        hf_convert.blip2_qformer_params(sd, config, query_tokens=np.zeros((1, 4, 64), np.float32))

    with pytest.raises(ValueError, match="eps"):
        hf_convert.blip2_qformer_config(dict(hf.config.to_dict(), layer_norm_eps=1e-6), num_queries=Q)
