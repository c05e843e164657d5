"""The Pengi bridge: its output against a NumPy reference written from Pengi's definition (microsoft/Pengi
`models/pengi.py` Projection and `models/decoder.py` TransformerMapper / generate_prefix_inference), its
trainable/frozen split, its frozen BERT prompt encoder against transformers' BertModel, and a stage-two
run with it through evaluation and export."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slit import export, runs
from slit.data import pipeline, sources
from slit.generate import answerer
from slit.models.bridges.pengi import PengiBridge, PengiBridgeConfig
from slit.models.layers import Frozen
from slit.models.qformer import QFormerConfig
from tests.conftest import TINY_DATA, run_slit
from tests.test_bridges import bridge_run
from tests.test_train_stage2 import stage2_config, write_tiny_llama

LLM_WIDTH = 24
PROMPT = QFormerConfig(
    vocab_size=30, num_queries=1, num_layers=2, width=16, num_heads=2, mlp_dim=32, cross_attention_freq=2,
    encoder_width=12, max_text_positions=12, dropout_rate=0.0,
)  # fmt: skip
CONFIG = PengiBridgeConfig(
    encoder_width=12, prompt_encoder=PROMPT, pad_id=0, projection_width=20, prefix_length=3, clip_length=5,
    mapper_layers=2, mapper_heads=4, mapper_mlp_ratio=2.0,
)  # fmt: skip


# --- the reference, from Pengi's code ---------------------------------------------------------------


def ref_layer_norm(x: np.ndarray, p: dict, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def ref_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ref_projection(x: np.ndarray, p: dict) -> np.ndarray:
    """Pengi `Projection.forward` (dropout off): LayerNorm(e1 + gelu(e1) W2), e1 = x W1."""
    embed1 = x @ p["linear1"]["kernel"]
    embed2 = ref_gelu(embed1) @ p["linear2"]["kernel"]
    return ref_layer_norm(embed1 + embed2, p["norm"])


def ref_linear(x: np.ndarray, p: dict) -> np.ndarray:
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def ref_mapper(x: np.ndarray, p: dict, clip_length: int, heads: int) -> np.ndarray:
    """Pengi `TransformerMapper.forward`: linear -> view (B, clip_length, D) -> [x; prefix_const] ->
    pre-LN layers (MultiHeadAttention with softmax over keys, ReLU MLP) -> the prefix_const positions."""
    b = x.shape[0]
    h = ref_linear(x, p["linear"]).reshape(b, clip_length, -1)
    h = np.concatenate([h, np.broadcast_to(p["prefix_const"], (b, *p["prefix_const"].shape))], axis=1)
    n, c = h.shape[1], h.shape[2]
    for layer in p["layers"].values():
        y = ref_layer_norm(h, layer["norm1"])
        q = ref_linear(y, layer["query"]).reshape(b, n, heads, c // heads)
        k = ref_linear(y, layer["key"]).reshape(b, n, heads, c // heads)
        v = ref_linear(y, layer["value"]).reshape(b, n, heads, c // heads)
        att = np.einsum("bnhd,bmhd->bnmh", q, k) * (c // heads) ** -0.5
        att = np.exp(att - att.max(axis=2, keepdims=True))
        att = att / att.sum(axis=2, keepdims=True)
        out = np.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, n, c)
        h = h + ref_linear(out, layer["output"])
        y = ref_layer_norm(h, layer["norm2"])
        h = h + ref_linear(np.maximum(ref_linear(y, layer["fc1"]), 0.0), layer["fc2"])
    return h[:, clip_length:]


def ref_bridge(frames, mask, prompt_embedding, p: dict, c: PengiBridgeConfig) -> np.ndarray:
    """Pengi's `generate_prefix_inference` on the pooled audio (mean of the valid frames) and the prompt
    encoder's embedding: projections, L2 normalisation, one mapper each, [audio prefix; text prefix]."""
    pooled = (frames * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    audio = ref_projection(pooled, p["audio_projection"])
    text = ref_projection(prompt_embedding, p["prompt_projection"])
    audio = audio / np.linalg.norm(audio, axis=-1).reshape(-1, 1)
    text = text / np.linalg.norm(text, axis=-1).reshape(-1, 1)
    return np.concatenate(
        [
            ref_mapper(audio, p["audio_mapper"], c.clip_length, c.mapper_heads),
            ref_mapper(text, p["prompt_mapper"], c.clip_length, c.mapper_heads),
        ],
        axis=1,
    )


def _as_str_keys(tree: dict) -> dict:
    return {
        str(k): _as_str_keys(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in tree.items()
    }


def _inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(3, 7, CONFIG.encoder_width)).astype(np.float32)
    mask = np.arange(7)[None] < np.array([[7], [4], [1]])
    ids = np.array([[2, 5, 9, 3, 0, 0], [2, 7, 3, 0, 0, 0], [2, 11, 12, 13, 14, 3]], np.int32)
    return frames, mask, ids


def _bridge_with_random_weights() -> PengiBridge:
    bridge = PengiBridge(CONFIG, LLM_WIDTH, rngs=nnx.Rngs(params=0))
    state = nnx.state(bridge, nnx.Param)
    noise = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    # biases and LayerNorm parameters away from zeros and ones, so that they matter
    nnx.update(bridge, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(noise), x.shape), state))
    return bridge


@nnx.jit
def _prefix(bridge: PengiBridge, frames, mask, ids):  # noqa: ANN001, ANN202
    return bridge(frames, mask, ids, rngs=None)


@nnx.jit
def _prompt_embedding(bridge: PengiBridge, ids):  # noqa: ANN001, ANN202
    return bridge.prompt_tower(ids)


def test_pengi_bridge_matches_the_reference_and_splits_trainable_from_frozen():
    bridge = _bridge_with_random_weights()
    frames, mask, ids = _inputs()
    got = np.asarray(_prefix(bridge, jnp.asarray(frames), jnp.asarray(mask), jnp.asarray(ids)))
    assert got.shape == (3, 2 * CONFIG.prefix_length, LLM_WIDTH)

    prompt_embedding = np.asarray(_prompt_embedding(bridge, jnp.asarray(ids)), np.float64)
    params = _as_str_keys(nnx.to_pure_dict(nnx.state(bridge, nnx.Param)))
    want = ref_bridge(frames.astype(np.float64), mask, prompt_embedding, params, CONFIG)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)

    # The prompt tower is frozen (and only it); everything else trains.
    frozen = nnx.to_pure_dict(nnx.state(bridge, Frozen))
    assert set(frozen) == {"prompt_tower"} and "prompt_tower" not in params
    assert set(params) == {"audio_projection", "prompt_projection", "audio_mapper", "prompt_mapper"}
    # Padding in the instruction does not change its embedding; its words do.
    padded = np.concatenate([ids, np.zeros((3, 3), np.int32)], axis=1)
    np.testing.assert_allclose(
        np.asarray(_prompt_embedding(bridge, jnp.asarray(padded))), prompt_embedding, atol=1e-5
    )
    other = ids.copy()
    other[:, 1] = 20
    assert not np.allclose(
        np.asarray(_prompt_embedding(bridge, jnp.asarray(other))), prompt_embedding, atol=1e-3
    )

    # Gradients reach every trainable part, from both prefixes.
    graphdef, trainable, rest = nnx.split(bridge, nnx.Param, ...)

    def loss(trainable):
        model = nnx.merge(graphdef, trainable, rest)
        return jnp.sum(model(jnp.asarray(frames), jnp.asarray(mask), jnp.asarray(ids), rngs=None) ** 2)

    grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(trainable))
    for part, tree in grads.items():
        assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(tree)), part


def test_projection_dropout_is_on_in_training_only():
    bridge = _bridge_with_random_weights()
    frames, mask, ids = _inputs()
    args = (jnp.asarray(frames), jnp.asarray(mask), jnp.asarray(ids))
    evaluated = bridge(*args, rngs=None)
    np.testing.assert_array_equal(np.asarray(bridge(*args, rngs=None)), np.asarray(evaluated))
    trained = bridge(*args, rngs=nnx.Rngs(dropout=0))
    assert trained.shape == evaluated.shape and not np.allclose(np.asarray(trained), np.asarray(evaluated))


# --- through stage two -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pengi_run(tmp_path_factory, tiny_data_dir) -> pathlib.Path:
    """A 2-step stage-two workdir with the Pengi bridge (random frozen prompt encoder), evaluated."""
    sizes = dict(prefix_length=3, clip_length=2, projection_width=24, mapper_layers=1, mapper_heads=4)
    return bridge_run(tmp_path_factory.mktemp("pengi_bridge"), tiny_data_dir, kind="pengi", **sizes)


def test_pengi_bridge_trains_evaluates_and_its_bundle_generates_the_same_tokens(pengi_run, tmp_path):
    run = runs.load_run(pengi_run)
    assert set(run.params["bridge"]) == {
        "audio_projection",
        "prompt_projection",
        "audio_mapper",
        "prompt_mapper",
    }
    assert "bridge" in run.frozen_models and "prompt encoder" in run.frozen_models["bridge"]["source"]
    assert {p.name.split("-")[0] for p in (pengi_run / "eval").glob("*.json")} >= {"captioning", "aqa"}
    # The trainer logs the trained-weight count at step 0 (slit report's trained_params column).
    first = json.loads((pengi_run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    assert first["trained_parameters"] == sum(np.size(x) for x in jax.tree.leaves(run.params))

    trained = runs.load_trained(pengi_run)
    test = sources.open_split(TINY_DATA, trained.config.data.data_dir, "test")
    batch = next(pipeline.eval_audio_batches(test, trained.spec, 4))
    gen = answerer.generation_config(trained.config, num_beams=1, do_sample=False)
    instructions = ["describe the sound.", "what made the first sound?"] * 2
    want = trained.answer(batch["audio"], batch["num_samples"], instructions, gen)

    bundle = export.export(pengi_run, "bundle", tmp_path / "bundle")
    rebuilt, _, info = export.load_bundle(
        bundle
    )  # rebuilds the frozen prompt encoder, checks its fingerprint
    assert info["model"]["bridge"]["kind"] == "pengi"
    assert rebuilt.answer(batch["audio"], batch["num_samples"], instructions, gen) == want

    card_dir = tmp_path / "weights"
    result = run_slit(
        "export", "--workdir", str(pengi_run), "--format", "safetensors", "--out", str(card_dir)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    card = (card_dir / "README.md").read_text()
    assert "Pengi prefix" in card and "6 prefix tokens" in card
    assert json.loads((card_dir / "config.json").read_text())["model"]["bridge"]["kind"] == "pengi"


def test_pengi_llm_sees_the_instruction_only_through_the_prefix(pengi_run):
    """As published, the LLM's instruction tokens are masked out: changing them changes nothing, while
    the Q-Former-side (prompt encoder) ids change the prefix."""
    from slit.models.stage2 import Stage2Batch

    trained = runs.load_trained(pengi_run)
    a = trained.answerer
    model = nnx.merge(a.graphdef, trained.params, a.frozen)
    rng = np.random.default_rng(0)
    audio = jnp.asarray(rng.normal(size=(2, 8000)).astype(np.float32) * 0.1)
    lengths = jnp.asarray([8000, 5000], jnp.int32)
    qformer_ids = jnp.asarray([[2, 5, 6, 3], [2, 7, 3, 0]], jnp.int32)
    answers = jnp.asarray([[5, 6, 7, -1], [8, 9, -1, -1]], jnp.int32)

    def logits(instruction, qformer):
        batch = Stage2Batch(qformer, jnp.asarray(instruction, jnp.int32), answers, audio, lengths)
        return np.asarray(model.answer_logits(batch, rngs=None))

    base = logits([[-1, 4, 5], [3, 4, 5]], qformer_ids)
    np.testing.assert_allclose(logits([[-1, 9, 9], [9, 9, 9]], qformer_ids), base, atol=1e-6)
    assert not np.allclose(logits([[-1, 4, 5], [3, 4, 5]], qformer_ids.at[:, 1].set(9)), base, atol=1e-4)


def test_the_prompt_encoder_is_qformer_init_s_bert(tiny_data_dir, tmp_path):
    """With `qformer.init`, the frozen prompt encoder built for a stage-two model is that BERT: its [CLS]
    output equals transformers' BertModel's on a padded batch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.test_bert_init import VOCAB, _bert_config, _randomise, _save
    from tests.test_train_stage2 import Built

    torch.manual_seed(0)
    bert = transformers.BertModel(_bert_config(), add_pooling_layer=False).eval()
    _randomise(bert)
    _save(bert, tmp_path / "bert")
    overrides = {
        "qformer.init": str(tmp_path / "bert"),
        "bridge.kind": "pengi",
        "optimizer.lr_multipliers": "",
    }
    built = Built(
        stage2_config(tiny_data_dir, write_tiny_llama(tmp_path / "llm"), **overrides), num_batches=1
    )
    tower = built.model().bridge.prompt_tower

    rng = np.random.default_rng(0)
    ids = rng.integers(5, len(VOCAB), (2, 9))
    ids[:, 0] = 2  # [CLS]
    valid = np.ones(ids.shape, bool)
    valid[1, 6:] = False
    ids[~valid] = 0  # [PAD]
    with torch.no_grad():
        want = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(valid.astype(np.int64)))
    got = np.asarray(tower(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want.last_hidden_state[:, 0].numpy(), atol=1e-4)


def test_the_random_prompt_encoder_follows_its_own_seed_not_the_run_s():
    """A seed sweep changes the trained weights only: the frozen random prompt encoder comes from
    `prompt_encoder_seed`."""
    import dataclasses

    def split(seed: int, prompt_seed: int) -> tuple[dict, dict]:
        config = dataclasses.replace(CONFIG, prompt_encoder_seed=prompt_seed)
        bridge = PengiBridge(config, LLM_WIDTH, rngs=nnx.Rngs(params=seed))
        return nnx.to_pure_dict(nnx.state(bridge, nnx.Param)), nnx.to_pure_dict(nnx.state(bridge, Frozen))

    params0, frozen0 = split(0, 7)
    params1, frozen1 = split(1, 7)
    jax.tree.map(np.testing.assert_array_equal, frozen0, frozen1)
    assert not np.array_equal(
        params0["audio_mapper"]["prefix_const"], params1["audio_mapper"]["prefix_const"]
    )
    _, frozen2 = split(0, 8)
    assert not np.array_equal(
        frozen0["prompt_tower"]["qformer"]["word_embeddings"]["embedding"],
        frozen2["prompt_tower"]["qformer"]["word_embeddings"]["embedding"],
    )
