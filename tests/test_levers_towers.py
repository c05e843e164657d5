"""The large-model levers of the towers (README "Parallelism"), each against the plain path:
scanned layers (`llm.scan_layers`, `audio_encoder.scan_layers`), rematerialisation (`audio_encoder.`,
`qformer.`, `llm.remat_policy`) and the compute-dtype policy (`compute_dtype`).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slit.models.audio.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder
from slit.models.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from slit.models.layers import Frozen, compute_dtype_scope, to_layout, unfreeze
from slit.models.llm.gpt2 import GPT2, GPT2Config
from slit.models.llm.llama import Llama, LlamaConfig
from slit.models.llm.t5 import T5, T5Config
from slit.models.stage2 import Stage2Batch
from slit.train import sharding, stage1, stage1_model
from tests.conftest import tiny_config, train_batches
from tests.test_train_stage2 import Built, stage2_config

TOL = 1e-5
LLM = {
    "llm.kind": "random",
    "llm.arch": "llama",
    "llm.width": 32,
    "llm.layers": 2,
    "llm.heads": 4,
    "llm.kv_heads": 2,
    "llm.mlp_dim": 64,
    "llm.max_positions": 64,
    "llm.init_seed": 7,
}


def close(a: object, b: object, tol: float = TOL) -> None:
    """Every leaf of a and b within tol (absolute, relative to the leaf's scale when larger than 1)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert x.shape == y.shape
        scale = max(1.0, float(np.abs(x).max(initial=0.0)))
        np.testing.assert_allclose(x, y, atol=tol * scale, rtol=0)


def plain_layout(module: nnx.Module) -> dict:
    """A module's weights as a pure dict in the per-layer layout (scanned towers' stacks split)."""
    return nnx.to_pure_dict(nnx.state(module))


# --------------------------------------------------------------------------------------------------------
# Scanned layers: each tower kind, forward and gradients, plus generation with a KV cache.


def _llms() -> dict:
    llama = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
        head_dim=8, sliding_windows=(None, 3, None),
    )  # fmt: skip
    gpt2 = GPT2Config(vocab_size=40, max_positions=16, hidden_size=32, num_layers=3, num_heads=4, mlp_dim=48)
    t5 = T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4)
    return {"llama": (Llama, llama), "gpt2": (GPT2, gpt2), "t5": (T5, t5)}


@pytest.mark.parametrize(
    "arch",
    ["llama", pytest.param("gpt2", marks=pytest.mark.slow), pytest.param("t5", marks=pytest.mark.slow)],
)
def test_a_scanned_llm_matches_the_plain_one_forward_backward_and_with_a_cache(arch):
    cls, config = _llms()[arch]
    plain = cls(config, rngs=nnx.Rngs(0))
    scanned = cls(config, rngs=nnx.Rngs(0), scan_layers=True)
    # same weights from the same rngs; the stacked layout converts back to the per-layer one exactly
    close(to_layout(plain_layout(scanned), plain_layout(plain)), plain_layout(plain), 0.0)
    b, t = 2, 5
    x = jax.random.normal(jax.random.key(1), (b, t, 32))
    mask = jnp.ones((b, t), bool).at[0, :2].set(False)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    ids = jax.random.randint(jax.random.key(2), (b, 3), 0, 40)
    dec_pos = jnp.broadcast_to(jnp.arange(3), (b, 3))

    def loss(model: nnx.Module, x: jax.Array) -> jax.Array:
        if arch == "t5":
            logits, _ = model.decode(ids, dec_pos, model.encode(x, mask), mask)
        else:
            logits, _ = model(x, positions, mask)
        return jnp.sum(jnp.tanh(logits)), logits

    scanned.remat_policy = "everything"  # (the scan body rematerialised too)
    (_, logits0), g0 = jax.jit(jax.value_and_grad(lambda x: loss(plain, x), has_aux=True))(x)
    (_, logits1), g1 = jax.jit(jax.value_and_grad(lambda x: loss(scanned, x), has_aux=True))(x)
    close(logits0, logits1)
    close(g0, g1)
    # incremental decoding: a prefill then one step, with the cache
    caches = [m.init_cache(b, 8) for m in (plain, scanned)]
    outs = []
    for model, cache in zip((plain, scanned), caches, strict=True):
        if arch == "t5":
            cross = model.cross_attention_cache(model.encode(x, mask))
            first, cache = model.decode(ids[:, :2], dec_pos[:, :2], cross, mask, cache)
            second, cache = model.decode(ids[:, 2:], dec_pos[:, 2:], cross, mask, cache)
        else:
            first, cache = model(x, positions, mask, cache)
            second, cache = model(x[:, :1], positions[:, -1:] + 1, mask[:, :1], cache)
        outs.append((first, second, cache.keys))
    close(outs[0], outs[1])


def test_a_scanned_gpt2_that_scales_attention_by_layer_is_refused():
    _, config = _llms()["gpt2"]
    with pytest.raises(Exception, match="scale_attn_by_inverse_layer_idx"):
        GPT2(
            dataclasses.replace(config, scale_attn_by_inverse_layer_idx=True),
            rngs=nnx.Rngs(0),
            scan_layers=True,
        )


AUDIO = {
    "whisper": (
        WhisperEncoder, WhisperEncoderConfig(num_mel_bins=8, width=16, num_layers=3, num_heads=2, mlp_dim=32)
    ),
    "wav2vec2": (
        Wav2Vec2Encoder,
        Wav2Vec2Config(
            width=16, num_layers=3, num_heads=2, mlp_dim=32, conv_dim=(8, 8), conv_kernel=(10, 3),
            conv_stride=(5, 2), position_conv_kernel=4, position_conv_groups=2,
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "hidden_layer"),
    [
        ("whisper", -2),
        pytest.param("whisper", None, marks=pytest.mark.slow),
        pytest.param("wav2vec2", -2, marks=pytest.mark.slow),
    ],
)
def test_a_scanned_audio_encoder_matches_the_plain_one_forward_and_weight_gradients(arch, hidden_layer):
    cls, config = AUDIO[arch]
    plain = unfreeze(cls(config, rngs=nnx.Rngs(0)))  # trainable: gradients reach every layer's weights
    scanned = unfreeze(cls(config, rngs=nnx.Rngs(0), scan_layers=True, remat_policy="dots_saveable"))
    if arch == "whisper":
        x = jax.random.normal(jax.random.key(1), (2, 12, 8))
        call = lambda m: m(x, hidden_layer)  # noqa: E731
    else:
        x = jax.random.normal(jax.random.key(1), (2, 400))
        call = lambda m: m(x, jnp.array([400, 250]), hidden_layer=hidden_layer)[0]  # noqa: E731

    def value_and_grads(model: nnx.Module) -> tuple:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(params: nnx.State) -> tuple:
            out = call(nnx.merge(graphdef, params, rest))
            return jnp.sum(jnp.sin(out)), out

        (_, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return out, nnx.to_pure_dict(grads)

    out0, g0 = value_and_grads(plain)
    out1, g1 = value_and_grads(scanned)
    close(out0, out1)
    close(g0, to_layout(g1, g0))


# --------------------------------------------------------------------------------------------------------
# Rematerialisation of every tower: a stage-one and a stage-two loss and its gradients.


def _stage_one_loss_and_grads(tiny_data_dir: str, **extra: object) -> tuple:
    config = tiny_config(tiny_data_dir, **extra)
    tokenizer = stage1_model.make_tokenizer(config, pathlib.Path("/nonexistent"))
    cfg = stage1_model.model_config(config, tokenizer)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    parts = stage1_model.create_model(
        cfg, 0, config.audio_encoder.init_seed, mesh, sharding.rules_dict(config.sharding_rules)
    )
    batch = {
        k: jnp.asarray(v) for k, v in train_batches(config, tokenizer, 1)[0].items() if k in stage1.BATCH_KEYS
    }
    grads, metrics = jax.jit(stage1.loss_and_grads, static_argnums=(0, 6))(
        parts.graphdef, parts.params, parts.frozen, batch, jax.random.key(0), jnp.int32(0), True
    )
    return metrics["loss"], grads


@pytest.mark.slow  # ~100 s on the 2-core machine (stage two's test below covers the same levers)
def test_remat_of_the_audio_encoder_and_the_q_former_gives_the_plain_stage_one_loss_and_grads(tiny_data_dir):
    trainable = {"audio_encoder.trainable": True, "qformer.dropout": 0.1}  # dropout: rngs through the remat
    loss0, g0 = _stage_one_loss_and_grads(tiny_data_dir, **trainable)
    loss1, g1 = _stage_one_loss_and_grads(
        tiny_data_dir,
        **trainable,
        **{"audio_encoder.remat_policy": "everything", "qformer.remat_policy": "dots_saveable"},
    )
    close(loss0, loss1)
    close(g0, g1)


def _stage_two_loss_and_grads(built: Built) -> tuple:
    parts, batch = built.setup.parts, Stage2Batch(**built.batches[0])

    def f(params: dict) -> tuple:
        return nnx.merge(parts.graphdef, params, parts.frozen)(batch, rngs=None)

    (loss, _), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(built.setup.state["params"])
    return loss, grads


def test_remat_of_every_tower_gives_the_plain_stage_two_loss_and_grads(tiny_data_dir):
    common = {**LLM, "audio_encoder.trainable": True}
    plain = Built(stage2_config(tiny_data_dir, pathlib.Path("unused"), **common), num_batches=1)
    levers = {"audio_encoder.remat_policy": "everything", "qformer.remat_policy": "everything"}
    remat = Built(
        stage2_config(
            tiny_data_dir, pathlib.Path("unused"), **common, **levers, **{"llm.remat_policy": "dots_saveable"}
        ),
        num_batches=1,
    )
    loss0, g0 = _stage_two_loss_and_grads(plain)
    loss1, g1 = _stage_two_loss_and_grads(remat)
    close(loss0, loss1)
    close(g0, g1)


# --------------------------------------------------------------------------------------------------------
# The compute-dtype policy.


def test_bf16_policy_matmuls_take_bf16_inputs_and_stay_within_bf16_rounding(tiny_data_dir):
    """Tolerance: bf16 keeps 8 significant bits, so each rounded matmul input is off by at most 2^-9
    relative, and a product's relative error is ~2 * 2^-9 ~ 0.4% per element; accumulated in float32 over a
    reduction of length K, independent rounding errors grow like sqrt(K) of the terms but the sum's error
    relative to sum |terms| stays <= 2^-8. Through a handful of layers (LayerNorms renormalise after each)
    the loss may move by a few times that: we allow 5% relative on the loss, and ask the gradients to keep
    their direction (cosine > 0.95) rather than each element, since tiny elements have no relative bound."""
    config = stage2_config(tiny_data_dir, pathlib.Path("unused"), **LLM)
    plain = Built(config, num_batches=1)
    bf16 = Built(
        stage2_config(tiny_data_dir, pathlib.Path("unused"), **LLM, compute_dtype="bfloat16"), num_batches=1
    )
    loss0, g0 = _stage_two_loss_and_grads(plain)
    loss1, g1 = _stage_two_loss_and_grads(bf16)
    assert abs(float(loss1) - float(loss0)) <= 0.05 * abs(float(loss0))
    flat0 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g0)])
    flat1 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g1)])
    assert flat1.dtype == np.float32
    assert np.dot(flat0, flat1) / (np.linalg.norm(flat0) * np.linalg.norm(flat1)) > 0.95
    # master weights, optimizer state and gradients are float32
    for tree in (bf16.setup.state["params"], bf16.setup.state["opt_state"], g1):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    # every tower's matmuls take bf16 operands (and accumulate to f32): count dot_generals in the loss
    parts = bf16.setup.parts

    def loss(params: dict) -> jax.Array:
        return nnx.merge(parts.graphdef, params, parts.frozen)(Stage2Batch(**bf16.batches[0]), rngs=None)[0]

    dots = [
        e
        for e in _equations(jax.make_jaxpr(loss)(bf16.setup.state["params"]).jaxpr)
        if e.primitive.name == "dot_general"
    ]
    bf16_dots = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in bf16_dots)
    # the audio encoder's, the Q-Former's and the LLM's projections all run in bf16; what stays float32 is
    # the small rest (the waveform frontend's filterbank, the audio/stage heads outside the towers)
    assert len(bf16_dots) >= 0.8 * len(dots), (len(bf16_dots), len(dots))


def _equations(jaxpr: object) -> list:
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for sub in _sub_jaxprs(eqn):
            out.extend(_equations(sub))
    return out


def _sub_jaxprs(eqn: object) -> list:
    subs = []
    for value in eqn.params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                subs.append(v.jaxpr)
            elif isinstance(v, jax.extend.core.Jaxpr):
                subs.append(v)
    return subs


def test_the_compute_dtype_scope_is_float32_outside_and_bf16_inside():
    from slit.models.layers import Dense

    dense = Dense(4, 3, axes=("embed", "mlp"), rngs=nnx.Rngs(0), param_type=Frozen)
    x = jnp.ones((2, 4))
    with compute_dtype_scope("bfloat16"):
        jaxpr = jax.make_jaxpr(dense)(x)
    dot = next(e for e in jaxpr.eqns if e.primitive.name == "dot_general")
    assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert dot.outvars[0].aval.dtype == jnp.float32
    dot = next(e for e in jax.make_jaxpr(lambda x: dense(x))(x).eqns if e.primitive.name == "dot_general")
    assert [v.aval.dtype for v in dot.invars] == [jnp.float32, jnp.float32]


# --------------------------------------------------------------------------------------------------------
# The levers together: the real stage-two trainer, its checkpoint and a bundle of the scanned run.


@pytest.mark.slow  # ~1-2 min on the 2-core machine
def test_stage_two_trains_with_every_lever_and_its_scanned_run_exports_a_bundle(tiny_data_dir, tmp_path):
    from slit import config as config_lib
    from slit import export
    from slit.train import stage2

    workdir = tmp_path / "run"
    workdir.mkdir()
    levers = {
        "llm.scan_layers": True,
        "llm.remat_policy": "everything",
        "audio_encoder.scan_layers": True,
        "audio_encoder.trainable": True,
        "audio_encoder.remat_policy": "dots_saveable",
        "qformer.remat_policy": "everything",
        "compute_dtype": "bfloat16",
    }
    config = stage2_config(
        tiny_data_dir,
        pathlib.Path("unused"),
        total_steps=2,
        checkpoint_every_steps=2,
        **LLM,
        **levers,
        **{"eval.max_clips": 4, "eval.batch_size": 4, "eval.tasks": ("captioning",)},
    )
    stage2.validate(config, num_devices=1)
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    stage2.train(config, workdir)
    run = export.read_run(workdir)
    stacked = run.params["audio_tower"]["encoder"]["layers"]  # the trained tower's stacked layout
    assert np.shape(stacked["fc1"]["kernel"])[0] == config.audio_encoder.layers
    rebuilt, _, info = export.load_bundle(export.export(workdir, "bundle", tmp_path / "bundle"))
    assert info["frozen_models"]["llm"]["fingerprint"]
