"""Parity of slit's Q-Former (weights converted by `slit.interop.hf_convert`) with transformers' BLIP-2."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx, traverse_util  # noqa: E402
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings  # noqa: E402

from slit.interop import bert_init, hf_convert, pretrained  # noqa: E402
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
    params = hf_convert.blip2_qformer_params(_numpy(hf), config, query_tokens=query_tokens, **embeddings)
    assert "encoder_norm" not in params  # BLIP-2's ln_vision is not part of Blip2QFormerModel
    params["encoder_norm"] = dict(zip(("scale", "bias"), _ln_vision(), strict=True))
    # Parts HF's module lacks (text FFN / embeddings of a queries-only Q-Former) drawn fresh; built without
    # eager random initialisation, which costs tens of seconds on a loaded 2-core machine.
    params = bert_init.complete_with_fresh_weights(params, config, np.random.default_rng(0))
    return pretrained.module_from_params(lambda: QFormer(config, rngs=nnx.Rngs(0)), params)


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


# ---------------------------------------------------------------------------------------------------------
# InstructBLIP import, export to transformers, BLIP-2 retrieval heads.


def _qformer_kwargs(**extra) -> dict:
    return dict(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        cross_attention_frequency=2,
        encoder_hidden_size=ENC_WIDTH,
        max_position_embeddings=32,
        layer_norm_eps=1e-12,
        **extra,
    )


def _randomise_1d(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


def _text_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    text_ids = rng.integers(1, 100, (B, TEXT_LEN))
    text_valid = np.ones((B, TEXT_LEN), bool)
    text_valid[0, 4:] = False
    text_ids[~text_valid] = 0
    return text_ids, text_valid


def _slit_bidirectional(qformer: QFormer, text_ids, text_valid, encoder, encoder_mask) -> np.ndarray:
    return np.asarray(
        qformer(
            text_ids_bl=jnp.asarray(text_ids),
            attention_mask_bll=bidirectional_mask(qformer.config.num_queries, jnp.asarray(text_valid)),
            encoder_bfd=jnp.asarray(encoder),
            encoder_mask_bf=None if encoder_mask is None else jnp.asarray(encoder_mask),
        )
    )


def _instructblip_reference(hf, query_tokens, text_ids, text_valid, encoder, encoder_mask) -> np.ndarray:
    attention_mask = np.concatenate([np.ones((B, Q), np.int64), text_valid.astype(np.int64)], axis=1)
    with torch.no_grad():
        return hf(
            input_ids=torch.from_numpy(text_ids),
            attention_mask=torch.from_numpy(attention_mask),
            query_embeds=torch.from_numpy(query_tokens).expand(B, -1, -1),
            encoder_hidden_states=_hf_encoder_states(encoder),
            encoder_attention_mask=torch.from_numpy(encoder_mask.astype(np.int64)),  # 2-D works here
        ).last_hidden_state.numpy()


def test_instructblip_qformer_import_matches():
    """An InstructBlipForConditionalGeneration-style state dict: `qformer.` (embeddings inside), queries."""
    torch.manual_seed(0)
    hf = transformers.InstructBlipQFormerModel(
        transformers.InstructBlipQFormerConfig(**_qformer_kwargs())
    ).eval()
    _randomise_1d(hf)
    query_tokens, encoder, encoder_mask = _inputs()
    text_ids, text_valid = _text_inputs()
    expected = _instructblip_reference(hf, query_tokens, text_ids, text_valid, encoder, encoder_mask)

    sd = {f"qformer.{k}": v for k, v in _numpy(hf).items()}
    sd["query_tokens"] = query_tokens
    sd["language_projection.weight"] = np.zeros((8, 64), np.float32)  # outside the Q-Former: ignored
    config = hf_convert.blip2_qformer_config(hf.config, num_queries=Q)
    params = hf_convert.blip2_qformer_params(sd, config)
    np.testing.assert_array_equal(
        params["embedding_norm"]["scale"], sd["qformer.embeddings.layernorm.weight"]
    )
    params["encoder_norm"] = dict(zip(("scale", "bias"), _ln_vision(), strict=True))
    qformer = pretrained.module_from_params(lambda: QFormer(config, rngs=nnx.Rngs(0)), params)
    got = _slit_bidirectional(qformer, text_ids, text_valid, encoder, encoder_mask)
    err = np.abs(got - expected).max()
    print(f"InstructBLIP Q-Former import: max abs diff {err:.2e}")
    assert err < ATOL


def _random_slit_qformer() -> tuple[QFormer, dict]:
    """A slit Q-Former with every parameter random (biases and LayerNorms too), as training leaves it."""
    config = hf_convert.blip2_qformer_config(
        transformers.Blip2QFormerConfig(**_qformer_kwargs()).to_dict(), num_queries=Q
    )
    targets = traverse_util.flatten_dict(
        nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: QFormer(config, rngs=nnx.Rngs(0)))))
    )
    rng = np.random.default_rng(4)
    flat = {}
    for path, struct in targets.items():
        base = 1.0 if path[-1] == "scale" else 0.0
        std = 0.1 if path[-1] in ("scale", "bias") else 0.05
        flat[path] = (base + std * rng.standard_normal(struct.shape)).astype(np.float32)
    params = traverse_util.unflatten_dict(flat)
    return pretrained.module_from_params(lambda: QFormer(config, rngs=nnx.Rngs(0)), params), params


def _assert_clean_load(info: dict) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.parametrize("layout", ["blip2-qformer", "instructblip-qformer"])
def test_exported_qformer_loads_in_transformers_and_matches(layout, tmp_path):
    qformer, params = _random_slit_qformer()
    directory = hf_convert.export_qformer(tmp_path / layout, params, qformer.config, layout=layout)
    cls = (
        transformers.Blip2QFormerModel if layout == "blip2-qformer" else transformers.InstructBlipQFormerModel
    )
    hf, info = cls.from_pretrained(str(directory), output_loading_info=True)
    _assert_clean_load(info)
    hf.eval()
    _, encoder, encoder_mask = _inputs()
    query_tokens = params["query_tokens"][None]
    text_ids, text_valid = _text_inputs()
    # BLIP-2's encoder LayerNorm (ln_vision) is outside both HF modules: applied to the HF input here.
    ln_vision = (params["encoder_norm"]["scale"], params["encoder_norm"]["bias"])
    with torch.no_grad():
        hf_encoder = torch.nn.functional.layer_norm(
            torch.from_numpy(encoder), (ENC_WIDTH,), *(torch.from_numpy(a) for a in ln_vision), eps=1e-5
        )
    if layout == "instructblip-qformer":
        attention_mask = np.concatenate([np.ones((B, Q), np.int64), text_valid.astype(np.int64)], axis=1)
        with torch.no_grad():
            expected = hf(
                input_ids=torch.from_numpy(text_ids),
                attention_mask=torch.from_numpy(attention_mask),
                query_embeds=torch.from_numpy(query_tokens).expand(B, -1, -1),
                encoder_hidden_states=hf_encoder,
                encoder_attention_mask=torch.from_numpy(encoder_mask.astype(np.int64)),
            ).last_hidden_state.numpy()
        mask = encoder_mask
    else:
        # Blip2QFormerModel takes embeddings: [query tokens; word + position embeddings of the text].
        text = (
            params["word_embeddings"]["embedding"][text_ids]
            + params["position_embeddings"]["embedding"][:TEXT_LEN]
        )
        embeds = np.concatenate([np.broadcast_to(query_tokens, (B, Q, 64)), text], axis=1).astype(np.float32)
        attention_mask = np.concatenate([np.ones((B, Q), np.int64), text_valid.astype(np.int64)], axis=1)
        with torch.no_grad():
            # transformers 5.23 turns a 2-D encoder_attention_mask into (B, 1, Q + T, F) rows when text is
            # present, which breaks the query rows' cross-attention: no encoder mask on this side.
            expected = hf(
                query_embeds=torch.from_numpy(embeds),
                query_length=Q,
                attention_mask=torch.from_numpy(attention_mask),
                encoder_hidden_states=hf_encoder,
            ).last_hidden_state.numpy()
        mask = None
    got = _slit_bidirectional(qformer, text_ids, text_valid, encoder, mask)
    err = np.abs(got - expected).max()
    print(f"slit -> {layout}: max abs diff {err:.2e}")
    assert err < ATOL


def _hf_retrieval() -> "transformers.Blip2ForImageTextRetrieval":
    torch.manual_seed(0)
    config = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=ENC_WIDTH,
            num_hidden_layers=1,
            intermediate_size=64,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
            layer_norm_eps=1e-5,
        ),
        qformer_config=_qformer_kwargs(use_qformer_text_input=True),
        num_query_tokens=Q,
        image_text_hidden_size=16,
    )
    model = transformers.Blip2ForImageTextRetrieval(config).eval()
    _randomise_1d(model)
    with torch.no_grad():
        model.query_tokens.normal_()
    return model


def _hf_retrieval_outputs(model, encoder, text_ids, text_valid) -> dict[str, np.ndarray]:
    """ITC audio / text embeddings and ITM logits, as Blip2ForImageTextRetrieval.forward computes them,
    from encoder features in place of the image tower's output (before its post_layernorm = ln_vision)."""
    with torch.no_grad():
        image = model.vision_model.post_layernorm(torch.from_numpy(encoder))
        queries = model.query_tokens.expand(B, -1, -1)
        query_out = model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        audio_emb = torch.nn.functional.normalize(model.vision_projection(query_out), dim=-1)
        mask = torch.from_numpy(text_valid.astype(np.int64))
        text_out = model.qformer(
            query_embeds=model.embeddings(input_ids=torch.from_numpy(text_ids)),
            query_length=0,
            attention_mask=mask,
        ).last_hidden_state
        text_emb = torch.nn.functional.normalize(model.text_projection(text_out[:, 0]), dim=-1)
        both = model.embeddings(input_ids=torch.from_numpy(text_ids), query_embeds=queries)
        both_mask = torch.cat([torch.ones(B, Q, dtype=torch.int64), mask], dim=1)
        itm_out = model.qformer(
            query_embeds=both, query_length=Q, attention_mask=both_mask, encoder_hidden_states=image
        ).last_hidden_state
        itm = model.itm_head(itm_out[:, :Q]).mean(dim=1)
    return {"audio": audio_emb.numpy(), "text": text_emb.numpy(), "itm": itm.numpy()}


def _slit_retrieval_outputs(params, config, encoder, text_ids, text_valid) -> dict[str, np.ndarray]:
    from slit.models import masks
    from slit.models.layers import Dense, l2_normalize

    qformer = pretrained.module_from_params(lambda: QFormer(config, rngs=nnx.Rngs(0)), params["qformer"])
    heads = {
        name: pretrained.module_from_params(
            lambda n=name: Dense(64, 2 if n == "itm_head" else 16, axes=("embed", None), rngs=nnx.Rngs(0)),
            params[name],
        )
        for name in ("audio_projection", "text_projection", "itm_head")
    }
    encoder, valid = jnp.asarray(encoder), jnp.asarray(text_valid)
    query_out = qformer(with_queries=True, encoder_bfd=encoder)
    text_out = qformer(
        text_ids_bl=jnp.asarray(text_ids), with_queries=False, attention_mask_bll=masks.text_only_mask(valid)
    )
    itm_out = _slit_bidirectional(qformer, text_ids, text_valid, np.asarray(encoder), None)
    return {
        "audio": np.asarray(l2_normalize(heads["audio_projection"](query_out))),
        "text": np.asarray(l2_normalize(heads["text_projection"](text_out[:, 0]))),
        "itm": np.asarray(heads["itm_head"](jnp.asarray(itm_out[:, :Q])).mean(axis=1)),
    }


def test_blip2_retrieval_heads_import_and_export(tmp_path):
    """Blip2ForImageTextRetrieval -> slit (outputs match) -> export -> transformers (tensors identical)."""
    model = _hf_retrieval()
    sd = _numpy(model)
    config = hf_convert.blip2_qformer_config(model.config)
    params = hf_convert.blip2_retrieval_params(sd, config)

    _, encoder, _ = _inputs()
    text_ids, text_valid = _text_inputs()
    expected = _hf_retrieval_outputs(model, encoder, text_ids, text_valid)
    got = _slit_retrieval_outputs(params, config, encoder, text_ids, text_valid)
    for name in expected:
        err = np.abs(got[name] - expected[name]).max()
        print(f"BLIP-2 retrieval {name}: max abs diff {err:.2e}")
        assert got[name].shape == expected[name].shape
        assert err < ATOL

    directory = hf_convert.export_qformer(tmp_path / "retrieval", params, config, layout="blip2-retrieval")
    reloaded, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(
        str(directory), output_loading_info=True
    )
    # The only keys an audio model cannot supply: the image tower's patch and position embeddings.
    assert info["missing_keys"] and all(
        k.startswith("vision_model.embeddings.") for k in info["missing_keys"]
    )
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded_sd = _numpy(reloaded)
    compared = [
        k for k in sd if not k.startswith("vision_model.") or k.startswith("vision_model.post_layernorm")
    ]
    assert len(compared) > 50
    for key in compared:
        np.testing.assert_array_equal(reloaded_sd[key], sd[key], err_msg=key)
