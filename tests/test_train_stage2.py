"""Stage two: a frozen LLM behind the Q-Former's soft prompt, the instruction-tuning mixture, the trainer
through the CLI (eval reports, resume) and `slit generate`.

The LLM is a tiny random Llama written here as a Hugging Face directory (config.json, safetensors, a
word-level tokenizer), or a tiny random T5 built in-process for the prefix-LM path.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from slit import config as config_lib
from slit import runs
from slit.models.stage2 import Stage2Batch
from slit.train import checkpoint, init_from, sharding, stage2, stage2_model
from tests.conftest import ROOT, TINY_DATA, run_slit, tiny_overrides

CONFIG_FILE = ROOT / "configs" / "stage2_synthetic.py"
WEIGHTS = (0.2, 0.5, 0.3)  # caption, qa, classify


# --------------------------------------------------------------------------------------------------
# A tiny random Llama as a HF checkpoint directory, and a tiny stage-two config around it
# --------------------------------------------------------------------------------------------------


def write_word_tokenizer(
    directory: pathlib.Path, specials: Sequence[str], bos: str, eos: str, words: Sequence[str] = ()
) -> dict[str, int]:
    """Saves into `directory` a transformers word-level tokenizer over the synthetic data's words, the
    prompt's punctuation and `words`, after `specials` (specials[0] is the unknown token); its vocabulary."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers

    from slit.data.synthetic import TOKENIZER_VOCABULARY

    directory.mkdir(parents=True, exist_ok=True)
    words = sorted(set(TOKENIZER_VOCABULARY) | {"Answer", ":", "?", ".", ","} | set(words))
    vocab = {t: i for i, t in enumerate([*specials, *words])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(specials))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=specials[0], bos_token=bos, eos_token=eos
    ).save_pretrained(str(directory))
    return vocab


def write_tiny_llama(directory: pathlib.Path, seed: int = 0, words: Sequence[str] = ()) -> pathlib.Path:
    """config.json + model.safetensors (2 layers, width 32, grouped-query attention, untied output
    layer) + a word-level tokenizer over the synthetic captions, questions and answers (and `words`)."""
    from safetensors.numpy import save_file

    vocab = write_word_tokenizer(directory, ["<unk>", "<s>", "</s>"], "<s>", "</s>", words)
    v, d, heads, kv_heads, mlp = len(vocab), 32, 4, 2, 64
    e = d // heads
    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": w(v, d, std=0.5),
        "model.norm.weight": np.ones(d, np.float32),
        "lm_head.weight": w(v, d, std=1.0),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            p + "self_attn.q_proj.weight": w(heads * e, d),
            p + "self_attn.k_proj.weight": w(kv_heads * e, d),
            p + "self_attn.v_proj.weight": w(kv_heads * e, d),
            p + "self_attn.o_proj.weight": w(d, heads * e),
            p + "mlp.gate_proj.weight": w(mlp, d),
            p + "mlp.up_proj.weight": w(mlp, d),
            p + "mlp.down_proj.weight": w(d, mlp),
        }
    save_file(tensors, str(directory / "model.safetensors"))
    hf_config = {
        "model_type": "llama",
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": mlp,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": vocab["<s>"],
        "eos_token_id": vocab["</s>"],
        "hidden_act": "silu",
    }
    (directory / "config.json").write_text(json.dumps(hf_config))
    return directory


def stage2_overrides(data_dir: str, llm_dir: pathlib.Path, **extra: object) -> dict[str, object]:
    """configs/stage2_synthetic.py shrunk to seconds: stage one's tiny sizes (conftest), the tiny LLM."""
    known = set(config_lib._all_keys(config_lib.load_config_file(CONFIG_FILE)))
    overrides = {k: v for k, v in tiny_overrides(data_dir).items() if k in known}
    overrides |= {
        "llm.kind": "hf",
        "llm.path": str(llm_dir),
        "llm.param_dtype": "float32",
        "data.max_qformer_instruction_length": 12,
        "data.max_instruction_length": 16,
        "data.max_answer_length": 10,
        "eval.batch_size": 8,
        "eval.max_new_tokens": 6,
        "eval.caption_metrics": ("BLEU", "ROUGE-L", "CIDEr-D"),
        # every task trains, whatever the demo config's mixture
        **weight_overrides((0.3, 0.6, 0.1)),
    }
    overrides.update(extra)
    return overrides


def weight_overrides(weights: tuple[float, float, float]) -> dict[str, float]:
    """`tasks.weights` overrides by name, from (caption, qa, classify)."""
    return {f"tasks.weights.{k}": w for k, w in zip(("caption", "qa", "classify"), weights, strict=True)}


def stage2_config(data_dir: str, llm_dir: pathlib.Path, **extra: object) -> ml_collections.ConfigDict:
    config = config_lib.load_config_file(CONFIG_FILE)
    config_lib.apply_overrides(
        config, [(k, str(v)) for k, v in stage2_overrides(data_dir, llm_dir, **extra).items()]
    )
    return config


def cli_args(overrides: dict[str, object]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def one_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


class Built:
    """Everything in-process tests need: config, tokenizers, encoders, training setup, batches."""

    def __init__(self, config: ml_collections.ConfigDict, num_batches: int = 2, llm: object = None):
        from slit.data import sources

        self.config = config
        self.qformer_tok = stage2_model.make_qformer_tokenizer(config, pathlib.Path("/nonexistent"))
        self.llm, self.llm_tok, self.llm_source = stage2_model.load_llm(config.llm)
        self.encoders = stage2_model.make_encoders(config, self.qformer_tok, self.llm, self.llm_tok)
        self.mesh = one_device_mesh()
        self.rules = sharding.rules_dict(config.sharding_rules)
        self.cfg = stage2_model.model_config(config, self.qformer_tok)
        self.setup = stage2.build_training(config, self.cfg, self.llm, self.mesh, self.rules)
        source = sources.open_split(config.data.name, config.data.data_dir, "train")
        it = iter(stage2.train_dataset(config, self.encoders, source))
        self.raw = [next(it) for _ in range(num_batches)]
        self.batches = [stage2.model_batch(b, config) for b in self.raw]

    def model(self, params: dict | None = None) -> nnx.Module:
        parts = self.setup.parts
        return nnx.merge(parts.graphdef, params or self.setup.state["params"], parts.frozen)


@pytest.fixture(scope="module")
def built(tiny_data_dir: str, llm_dir: pathlib.Path) -> Built:
    return Built(stage2_config(tiny_data_dir, llm_dir))


def flat(tree: object) -> dict[str, np.ndarray]:
    return {checkpoint.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------------------------------
# What trains and what stays frozen
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_step(built) -> dict:
    """The state after one train step from the fresh state (the fresh state is kept)."""
    state = jax.tree.map(lambda x: x.copy(), built.setup.state)
    state, metrics = built.setup.step_fn(state, built.setup.parts.frozen, built.batches[0], jax.random.key(0))
    return {"state": state, "metrics": jax.device_get(metrics)}


def adam_moments(opt_state: object) -> object:
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1
    return adam[0]


def test_llm_gets_no_gradients_or_optimizer_state_and_stays_bit_identical(built, first_step):
    parts = built.setup.parts
    llm_before = flat(jax.device_get(parts.frozen["llm"]))
    params_before = flat(jax.device_get(built.setup.state["params"]))
    # Only the Q-Former and the projection are trainable; the LLM and the audio tower are frozen.
    assert {"/".join(name.split("/")[:2]) for name in params_before} == {
        "bridge/qformer",
        "bridge/projection",
    }
    assert set(parts.frozen) == {"audio_tower", "llm"}
    assert len(llm_before) == 2 + 1 + 2 * 9  # embedding, final norm, lm_head, 2 layers x 9 tensors
    state, metrics = built.setup.step_fn(
        jax.tree.map(lambda x: x.copy(), first_step["state"]),
        parts.frozen,
        built.batches[1],
        jax.random.key(0),
    )
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(first_step["metrics"]["loss"])
    for name, value in flat(jax.device_get(parts.frozen["llm"])).items():
        np.testing.assert_array_equal(value, llm_before[name], err_msg=name)
    # The optimizer's moments mirror the trainable params only (nothing of the LLM's size).
    adam = adam_moments(state["opt_state"])
    assert set(flat(adam.mu)) == set(params_before) == set(flat(adam.nu))
    opt_elems = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    param_elems = sum(v.size for v in params_before.values())
    llm_elems = sum(v.size for v in llm_before.values())
    assert opt_elems < 2 * param_elems + 16 and llm_elems > param_elems / 4
    moved = [n for n, v in flat(jax.device_get(state["params"])).items() if np.any(v != params_before[n])]
    assert "bridge/projection/kernel" in moved and "bridge/qformer/query_tokens" in moved


def test_gradients_reach_the_projection_and_qformer_through_the_frozen_llm(built, first_step):
    """Every trainable weight gets a gradient through the LLM, except the last layer's text FFN: only
    query outputs are projected, so the instruction's last-layer outputs must not matter.

    The gradient of the first step is read from Adam's first moment: mu_1 = (1 - b1) * clipped
    gradient, zero exactly where the gradient is (clipping scales all of it by one factor)."""
    grads = flat(jax.device_get(adam_moments(first_step["state"]["opt_state"]).mu))
    last = built.config.qformer.layers - 1
    unused = {n for n in grads if n.startswith(f"bridge/qformer/layers/{last}/ffn_text/")}
    assert unused, sorted(grads)
    for name in unused:
        assert np.all(grads[name] == 0), name
    zero = [n for n, g in grads.items() if n not in unused and not np.any(g != 0)]
    assert not zero, zero
    assert np.abs(grads["bridge/projection/kernel"]).max() > 1e-7
    assert np.abs(grads["bridge/qformer/layers/0/cross_attention/query/kernel"]).max() > 1e-7


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def numpy_answer_loss(
    logits_btv: np.ndarray, answers_ba: np.ndarray, prompt_length: int, per_example: bool = False
) -> float:
    """Mean cross-entropy over the answer tokens, each predicted from the position before it; with
    per_example, the mean over examples of each example's mean."""
    losses = []
    for b in range(answers_ba.shape[0]):
        mine = []
        for j, token in enumerate(answers_ba[b]):
            if token < 0:
                continue
            row = logits_btv[b, prompt_length + j - 1].astype(np.float64)
            log_z = row.max() + np.log(np.exp(row - row.max()).sum())
            mine.append(log_z - row[token])
        losses.append(mine)
    if per_example:
        return float(np.mean([np.mean(x) for x in losses if x]))
    return float(np.mean([x for mine in losses for x in mine]))


def loss_and_full_logits(graphdef: object, weights: object, batch: Stage2Batch) -> tuple:
    """The model's loss, and the LLM's logits over [soft prompt; instruction; answer] built here by hand
    (padding masked, positions counting real tokens only)."""
    model = nnx.merge(graphdef, weights)
    loss, metrics = model(batch, rngs=None)
    soft = model.soft_prompt(batch.audio, batch.num_samples, batch.qformer_ids, None)
    instr, answers = batch.instruction_ids, batch.answer_ids
    embeds = jnp.concatenate(
        [soft, model.llm.embed(jnp.maximum(instr, 0)), model.llm.embed(jnp.maximum(answers, 0))], axis=1
    )
    mask = jnp.concatenate([jnp.ones(soft.shape[:2], bool), instr >= 0, answers >= 0], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, _ = model.llm(embeds, positions, mask)
    return loss, metrics["answer_tokens"], logits


def test_loss_is_cross_entropy_on_answer_tokens_only(built):
    raw = built.batches[0]
    instr, answers = raw["instruction_ids"], raw["answer_ids"]
    # The batch exercises the masks: left-padded instructions, right-padded answers of various lengths.
    assert (instr[:, 0] < 0).any() and (answers[:, -1] < 0).any()
    assert len({int((r >= 0).sum()) for r in answers}) > 1
    graphdef, weights = nnx.split(built.model())
    run = jax.jit(functools.partial(loss_and_full_logits, graphdef))
    batch = Stage2Batch(**{k: jnp.asarray(v) for k, v in raw.items()})
    loss, answer_tokens, logits = run(weights, batch)
    prompt_length = built.config.qformer.num_queries + instr.shape[1]
    assert float(loss) == pytest.approx(
        numpy_answer_loss(np.asarray(logits), answers, prompt_length), rel=1e-5
    )
    assert int(answer_tokens) == int((answers >= 0).sum())
    # The instruction reaches the LLM: other instruction tokens give another loss.
    other = dataclasses.replace(batch, instruction_ids=jnp.asarray(np.roll(instr, 1, axis=0)))
    assert abs(float(run(weights, other)[0]) - float(loss)) > 1e-4

    # loss_average="examples": each example's mean, then the mean over examples.
    model = built.model()
    model.config = dataclasses.replace(model.config, loss_average="examples")
    graphdef, weights = nnx.split(model)
    per_example, _, logits = jax.jit(functools.partial(loss_and_full_logits, graphdef))(weights, batch)
    want = numpy_answer_loss(np.asarray(logits), answers, prompt_length, per_example=True)
    assert float(per_example) == pytest.approx(want, rel=1e-5)
    assert abs(want - float(loss)) > 1e-3  # the two averages differ on this batch


def test_instruction_tokens_reach_the_qformer_only_when_configured(built):
    """Same weights, same audio: the query outputs change with the instruction with
    qformer.instruction=true, and are unaffected by it with false."""
    features_bfd = jax.random.normal(jax.random.key(1), (2, 20, built.config.audio_encoder.width))
    frames = jnp.ones((2, 20), bool)
    ids_a = jnp.asarray(
        built.encoders.qformer.encode(["describe the sound.", "is the pitch rising or falling?"])
    )
    ids_b = jnp.asarray(
        built.encoders.qformer.encode(["how many sounds are there?", "what is the first sound?"])
    )
    outputs = {}
    for flag in (True, False):
        model = built.model()
        model.bridge.config = dataclasses.replace(model.bridge.config, instruction_in_qformer=flag)
        graphdef, weights = nnx.split(model.bridge)
        query_outputs = jax.jit(
            lambda weights, ids, graphdef=graphdef: nnx.merge(graphdef, weights).query_outputs(
                features_bfd, frames, ids, None
            )
        )
        outputs[flag] = [np.asarray(query_outputs(weights, ids)) for ids in (ids_a, ids_b)]
    assert outputs[True][0].shape == (2, built.config.qformer.num_queries, built.config.qformer.width)
    assert np.abs(outputs[True][0] - outputs[True][1]).max() > 1e-3
    np.testing.assert_array_equal(outputs[False][0], outputs[False][1])
    assert np.abs(outputs[False][0] - outputs[True][0]).max() > 1e-3  # the instruction did something


def test_task_mixture_follows_the_configured_weights(tiny_data_dir, llm_dir, built):
    from slit.data import sources, synthetic

    config = stage2_config(tiny_data_dir, llm_dir, **weight_overrides(WEIGHTS), batch_size=16)
    source = sources.open_split(config.data.name, config.data.data_dir, "train")
    it = iter(stage2.train_dataset(config, built.encoders, source))
    batches = [next(it) for _ in range(25)]  # 400 examples
    task_ids = np.concatenate([b["task_id"] for b in batches])
    counts = np.bincount(task_ids, minlength=3) / len(task_ids)
    np.testing.assert_allclose(counts, WEIGHTS, atol=0.05)
    # Each task's rows really are that task: classification targets name kinds, QA answers are one word.
    for b in batches[:4]:
        for task, target in zip(b["task_id"], b["target_ids"], strict=True):
            words = (
                built.llm_tok.decode(target[target >= 0], skip_special_tokens=True).replace(",", " ").split()
            )
            if task == 2:
                assert words and set(words) <= set(synthetic.KINDS), words
            elif task == 1:
                assert len(words) == 1, words


def test_a_task_with_weight_zero_is_left_out(tiny_data_dir, llm_dir, built):
    from slit.data import sources

    config = stage2_config(tiny_data_dir, llm_dir, **weight_overrides((0.0, 1.0, 0.0)))
    source = sources.open_split(config.data.name, config.data.data_dir, "train")
    batch = next(iter(stage2.train_dataset(config, built.encoders, source)))
    answers = [built.llm_tok.decode(t[t >= 0], skip_special_tokens=True).split() for t in batch["target_ids"]]
    assert all(len(a) == 1 for a in answers), answers  # question answering only


def test_validate_names_every_bad_value(tiny_data_dir, llm_dir, tmp_path):
    config = stage2_config(
        tiny_data_dir,
        llm_dir,
        **{
            "llm.path": str(tmp_path / "no_llm"),
            "tasks.weights.qa": -1.0,
            "llm.remat_policy": "sometimes",
            "init_from": str(tmp_path / "no_run"),
            "eval.caption_metrics": ("CIDEr",),
        },
    )
    with pytest.raises(config_lib.ConfigError) as error:
        stage2.validate(config, num_devices=1)
    message = str(error.value)
    for needle in (
        "no_llm",
        "tasks.weights={",
        "weight of qa",
        "remat_policy='sometimes'",
        "no_run",
        "CIDEr",
    ):
        assert needle in message, (needle, message)


# --------------------------------------------------------------------------------------------------
# init_from a stage-one run
# --------------------------------------------------------------------------------------------------


def test_init_from_copies_the_stage_one_qformer(tmp_path, trained_run, built, capfd):
    stage1_dir, _ = trained_run
    config = ml_collections.ConfigDict(built.config.to_dict())
    config.init_from = str(stage1_dir)
    setup = built.setup
    identity = checkpoint.frozen_identity(
        setup.parts.frozen, stage2_model.frozen_sources(config, built.llm_source)
    )
    init_from.check_init_from_audio_tower(
        config.init_from, identity["audio_tower"], config
    )  # same tower as stage one
    ckpt = checkpoint.Checkpointer(tmp_path, config, identity)
    try:
        start = init_from.resolve_start(
            ckpt, config, setup.state, setup.state_shardings, None, built.qformer_tok
        )
    finally:
        ckpt.close()
    assert start.step == 0 and "init_from" in start.origin
    # The stage-one checkpoint, read directly with orbax.
    step_dir = max((stage1_dir / "checkpoints").iterdir(), key=lambda p: int(p.name))
    saved = flat(ocp.PyTreeCheckpointer().restore(step_dir / "state")["params"])
    got = flat(jax.device_get(start.state["params"]))
    fresh = flat(jax.device_get(setup.state["params"]))
    qformer = [n for n in got if n.startswith("bridge/qformer/") and n != init_from.WORD_EMBEDDINGS]
    assert len(qformer) > 30
    for name in qformer:  # stage one's qformer/... is the bridge's bridge/qformer/...
        np.testing.assert_array_equal(got[name], saved[name.removeprefix("bridge/")], err_msg=name)
    np.testing.assert_array_equal(got["bridge/projection/kernel"], fresh["bridge/projection/kernel"])
    # Word embeddings move by word: stage one's vocabulary (captions) into stage two's (+ instructions).
    old_vocab = json.loads((stage1_dir / "tokenizer.json").read_text())["model"]["vocab"]
    new_vocab = built.qformer_tok.tokenizer.get_vocab(with_added_tokens=True)
    table, old_table = (
        got[init_from.WORD_EMBEDDINGS],
        saved[init_from.WORD_EMBEDDINGS.removeprefix("bridge/")],
    )
    assert table.shape[0] == len(new_vocab) > old_table.shape[0]
    for word in ("beep", "loud", "[CLS]", "[SEP]", "[PAD]"):
        np.testing.assert_array_equal(table[new_vocab[word]], old_table[old_vocab[word]], err_msg=word)
    for word in ("describe", "how", "question"):  # instruction words stage one never saw: fresh rows
        assert word not in old_vocab
        np.testing.assert_array_equal(
            table[new_vocab[word]], fresh[init_from.WORD_EMBEDDINGS][new_vocab[word]]
        )
    assert "Initialised" in capfd.readouterr().err


# --------------------------------------------------------------------------------------------------
# The encoder-decoder path (T5 as a prefix LM)
# --------------------------------------------------------------------------------------------------


def test_stage_two_trains_with_an_encoder_decoder_llm_as_a_prefix_lm(built):
    from slit.models.llm.base import TokenIds
    from slit.models.llm.t5 import T5, T5Config

    vocab = 40
    t5_config = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        token_ids=TokenIds(bos=None, eos=(1,), pad=0, decoder_start=0),
    )
    t5 = T5(t5_config, rngs=nnx.Rngs(3))
    config = ml_collections.ConfigDict(built.config.to_dict())
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 3e-3
    setup = stage2.build_training(config, built.cfg, t5, built.mesh, built.rules)
    assert "llm" in setup.parts.frozen and not any(k.startswith("llm/") for k in flat(setup.state["params"]))
    rng = np.random.default_rng(0)
    raw = dict(built.batches[0])
    b = raw["audio"].shape[0]
    instr = rng.integers(2, vocab, raw["instruction_ids"].shape).astype(np.int32)
    instr[:, : instr.shape[1] // 2] = -1  # left padding
    answers = rng.integers(2, vocab, (b, 5)).astype(np.int32)
    answers[::2, 3:] = -1  # right padding on half the rows
    raw |= {"instruction_ids": instr, "answer_ids": answers}
    batch = Stage2Batch(**{k: jnp.asarray(v) for k, v in raw.items()})

    # The loss: encoder reads [soft prompt; instruction], decoder predicts the answer from the start token.
    def loss_and_decoder_logits(weights: object, batch: Stage2Batch) -> tuple:
        model = nnx.merge(graphdef, weights)
        soft = model.soft_prompt(batch.audio, batch.num_samples, batch.qformer_ids, None)
        enc_in = jnp.concatenate([soft, model.llm.embed(jnp.maximum(batch.instruction_ids, 0))], axis=1)
        enc_mask = jnp.concatenate([jnp.ones(soft.shape[:2], bool), batch.instruction_ids >= 0], axis=1)
        encoder_out = model.llm.encode(enc_in, enc_mask)
        dec_ids = jnp.concatenate(
            [jnp.zeros((b, 1), jnp.int32), jnp.maximum(batch.answer_ids[:, :-1], 0)], axis=1
        )
        positions = jnp.broadcast_to(jnp.arange(dec_ids.shape[1]), dec_ids.shape)
        logits, _ = model.llm.decode(dec_ids, positions, encoder_out, enc_mask)
        return model(batch, rngs=None)[0], logits

    graphdef, weights = nnx.split(nnx.merge(setup.parts.graphdef, setup.state["params"], setup.parts.frozen))
    loss, logits = jax.jit(loss_and_decoder_logits)(weights, batch)
    assert float(loss) == pytest.approx(numpy_answer_loss(np.asarray(logits), answers, 1), rel=1e-5)

    state, t5_before, losses = setup.state, flat(jax.device_get(setup.parts.frozen["llm"])), []
    for _ in range(6):
        state, metrics = setup.step_fn(state, setup.parts.frozen, raw, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    for name, value in flat(jax.device_get(setup.parts.frozen["llm"])).items():
        np.testing.assert_array_equal(value, t5_before[name], err_msg=name)


# --------------------------------------------------------------------------------------------------
# The trainer through the CLI: init_from, resume, eval reports; then `slit generate`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_data_dir, llm_dir, trained_run) -> dict:
    """Two invocations of the same command: 2 steps (init_from the stage-one run), then with
    total_steps=4, which resumes this workdir at step 2."""
    workdir = tmp_path_factory.mktemp("stage2_run")
    overrides = stage2_overrides(
        tiny_data_dir, llm_dir, init_from=trained_run[0], total_steps=2, checkpoint_every_steps=2
    )
    base = ["train", "--config", str(CONFIG_FILE), "--workdir", str(workdir)]
    first = run_slit(*base, *cli_args(overrides | {"eval.max_clips": 2}))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_slit(*base, *cli_args(overrides | {"total_steps": 4}))
    assert second.returncode == 0, second.stderr[-3000:]
    return {"workdir": workdir, "first": first, "second": second}


def test_cli_initialises_from_stage_one_then_resumes_its_own_checkpoint(cli_run):
    workdir, first, second = cli_run["workdir"], cli_run["first"], cli_run["second"]
    assert "Initialised" in first.stderr and "word embeddings" in first.stderr
    assert "Resuming from" in second.stderr and f"{checkpoint.CHECKPOINTS}/2 (step 2" in second.stderr
    assert "Initialised" not in second.stderr  # the workdir's own checkpoint wins over init_from
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in rows if "loss" in r]
    assert loss_steps == [2, 4], loss_steps  # the second run did steps 3-4 only
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 4


def test_cli_writes_captioning_and_qa_reports(cli_run, tiny_data_dir):
    from slit.data import sources
    from slit.eval.aqa import normalize_answer

    directory = cli_run["workdir"] / "eval"
    stem = TINY_DATA.replace("/", "_")
    for task in ("captioning", "aqa"):
        for ext in ("json", "md", "png"):
            path = directory / f"{task}-{stem}-test.{ext}"
            assert path.is_file() and path.stat().st_size > 100, path
    caption = json.loads((directory / f"captioning-{stem}-test.json").read_text())
    assert caption["checkpoint_step"] == 4 and caption["metrics"]["num_items"] == 16
    per_item = caption["metrics"]["per_item"]["CIDEr-D"]
    assert caption["metrics"]["CIDEr-D"] == pytest.approx(np.mean(list(per_item.values())))
    assert "| CIDEr-D |" in (directory / f"captioning-{stem}-test.md").read_text()
    qa = json.loads((directory / f"aqa-{stem}-test.json").read_text())["metrics"]
    assert qa["num_items"] == 16 and 0 <= qa["accuracy"] <= 1
    # The majority baseline, recomputed from the training split: per question type, the most common answer.
    train = sources.open_split(TINY_DATA, tiny_data_dir, "train")
    by_type = collections.defaultdict(collections.Counter)
    for i in range(len(train)):
        for t, a in zip(train[i]["question_types"], train[i]["answers"], strict=True):
            by_type[t.decode()][normalize_answer(a.decode())] += 1
    test = sources.open_split(TINY_DATA, tiny_data_dir, "test")
    hits = []
    for i in range(len(test)):
        k = i % len(test[i]["questions"])  # the trainer asks clip i its (i mod n)-th question
        t, a = test[i]["question_types"][k].decode(), test[i]["answers"][k].decode()
        hits.append(by_type[t].most_common(1)[0][0] == normalize_answer(a))
    assert qa["majority_baseline"]["per_question_type_accuracy"] == pytest.approx(np.mean(hits))
    assert sum(v["num_items"] for v in qa["by_type"].values()) == 16


def test_generate_prints_the_answer_the_trainer_evaluated(cli_run, tiny_data_dir, tmp_path):
    """`slit generate` on a test clip written as a WAV gives the caption the end-of-training eval
    generated for that clip (same checkpoint, same decoding, audio through the file decoder)."""
    import soundfile as sf

    from slit.data import sources
    from slit.data.tasks import DEFAULT_TEMPLATES as TASK_INSTRUCTIONS

    workdir = cli_run["workdir"]
    stem = TINY_DATA.replace("/", "_")
    examples = json.loads((workdir / "eval" / f"captioning-{stem}-test.json").read_text())["metrics"][
        "examples"
    ]
    predicted = {k: v["predicted"] for k, v in examples.items()}
    assert len(set(predicted.values())) > 1, predicted  # the captions depend on the audio
    # A clip whose caption no other clip got, when there is one (then only its own audio gives it).
    values = list(predicted.values())
    clip_id = next((k for k, v in predicted.items() if values.count(v) == 1), next(iter(predicted)))
    test = sources.open_split(TINY_DATA, tiny_data_dir, "test")
    pcm = next(test[i]["audio"] for i in range(len(test)) if test[i]["id"].decode() == clip_id)
    wav = tmp_path / "clip.wav"
    sf.write(str(wav), np.asarray(pcm), 16000, subtype="PCM_16")
    result = run_slit(
        "generate",
        "--workdir",
        str(workdir),
        "--audio",
        str(wav),
        "--prompt",
        TASK_INSTRUCTIONS["caption"][0],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == predicted[clip_id]
    assert "checkpoint step 4" in result.stderr


def test_generate_errors_name_the_missing_thing(tmp_path, cli_run):
    wav = tmp_path / "absent.wav"
    result = run_slit("generate", "--workdir", str(tmp_path / "nowhere"), "--audio", str(wav))
    assert result.returncode == 2 and "nowhere: no such directory" in result.stderr
    result = run_slit("generate", "--workdir", str(cli_run["workdir"]), "--audio", str(wav))
    assert result.returncode == 2 and "absent.wav: no such file" in result.stderr
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"trainer": "stage2"}))
    result = run_slit("generate", "--workdir", str(empty), "--audio", str(wav))
    assert result.returncode == 2 and "no checkpoint" in result.stderr


# --------------------------------------------------------------------------------------------------
# slit eval on the stage-two run
# --------------------------------------------------------------------------------------------------


def test_eval_captioning_and_aqa_repeat_what_the_trainer_generated(cli_run, tiny_data_dir):
    """`slit eval` on the same checkpoint gives the captions the end-of-training evaluation gave, and
    for each clip's question that the trainer asked, the same answer; every question is asked."""
    from slit.data import sources
    from slit.eval.aqa import normalize_answer

    workdir = cli_run["workdir"]
    stem = TINY_DATA.replace("/", "_")
    trained = {
        task: json.loads((workdir / "eval" / f"{task}-{stem}-test.json").read_text())["metrics"]
        for task in ("captioning", "aqa")
    }
    for task in ("captioning", "aqa"):
        result = run_slit("eval", "--workdir", str(workdir), "--task", task, "--data", TINY_DATA)
        assert result.returncode == 0, result.stderr[-3000:]
    ours = {
        task: json.loads((workdir / "eval" / f"{task}-{stem}-test.json").read_text())["metrics"]
        for task in ("captioning", "aqa")
    }
    for key, example in trained["captioning"]["examples"].items():
        assert ours["captioning"]["predictions"][key] == example["predicted"], key
    assert ours["captioning"]["CIDEr-D"] == pytest.approx(trained["captioning"]["CIDEr-D"])
    test = sources.open_split(TINY_DATA, tiny_data_dir, "test")
    ids = [test[i]["id"].decode() for i in range(len(test))]
    assert ours["aqa"]["num_items"] == sum(len(test[i]["questions"]) for i in range(len(test)))
    for key, example in trained["aqa"]["examples"].items():
        i = ids.index(key)
        assert ours["aqa"]["predictions"][f"{key}#{i % len(test[i]['questions'])}"] == example["predicted"]
    assert not (workdir / "eval" / "partial").exists()  # resumable state is removed once reported

    # Every question's majority baseline: the training split's most common answer of its type.
    train = sources.open_split(TINY_DATA, tiny_data_dir, "train")
    by_type = collections.defaultdict(collections.Counter)
    for i in range(len(train)):
        for t, a in zip(train[i]["question_types"], train[i]["answers"], strict=True):
            by_type[t.decode()][normalize_answer(a.decode())] += 1
    hits = collections.defaultdict(list)
    for i in range(len(test)):
        for t, a in zip(test[i]["question_types"], test[i]["answers"], strict=True):
            hits[t.decode()].append(by_type[t.decode()].most_common(1)[0][0] == normalize_answer(a.decode()))
    baseline = ours["aqa"]["majority_baseline"]
    assert baseline["per_question_type_accuracy"] == pytest.approx(np.mean(sum(hits.values(), [])))
    assert baseline["by_type"] == pytest.approx({t: np.mean(h) for t, h in hits.items()})
    assert "majority answer (%)" in (workdir / "eval" / f"aqa-{stem}-test.md").read_text()


def test_eval_classification_ranks_labels_by_the_training_loss(cli_run, tiny_data_dir):
    """Zero-shot classification by the LLM: each (clip, class) loss equals the trainer's own loss
    function (mean answer-token cross-entropy) times the answer's token count, one pair at a time; the
    report's accuracy follows from those losses."""
    from slit.data import sources
    from slit.data.tasks import DEFAULT_TEMPLATES as TASK_INSTRUCTIONS
    from slit.eval import classification, generative
    from slit.models.stage2 import Stage2Batch

    workdir = cli_run["workdir"]
    result = run_slit("eval", "--workdir", str(workdir), "--task", "classification", "--data", TINY_DATA)
    assert result.returncode == 0, result.stderr[-3000:]
    stem = TINY_DATA.replace("/", "_")
    metrics = json.loads((workdir / "eval" / f"classification-{stem}-test.json").read_text())["metrics"]

    run = runs.load_trained(workdir)
    test = sources.open_split(TINY_DATA, tiny_data_dir, "test")
    classes, labels, _ = generative.class_names_and_labels(test)
    assert metrics["classes"] == classes and metrics["num_items"] == len(test)
    instruction = TASK_INSTRUCTIONS["classify"][0].format(
        choices=", ".join(c.replace("_", " ") for c in classes)
    )
    losses = generative.llm_class_losses(run, test, instruction, classes)
    want = classification.zero_shot_report(-losses, labels, classes)
    assert metrics["accuracy"] == pytest.approx(want["accuracy"])

    enc, d = run.answerer.encoders, run.config.data
    graphdef, frozen = run.answerer.graphdef, run.answerer.frozen
    loss_fn = jax.jit(lambda p, b: nnx.merge(graphdef, p, frozen)(b, rngs=None)[1])
    spec = run.spec
    from slit.data import pipeline

    batch = next(pipeline.eval_audio_batches(test, spec, 1))
    for c, name in enumerate(classes):
        answer = enc.answer.encode([name.replace("_", " ")], d.max_answer_length)
        inputs = Stage2Batch(
            qformer_ids=enc.qformer.encode([instruction]),
            instruction_ids=enc.instruction.encode([instruction], d.max_instruction_length),
            answer_ids=answer,
            audio=batch["audio"],
            num_samples=batch["num_samples"],
        )
        out = loss_fn(run.params, inputs)
        assert float(out["loss"]) * int(out["answer_tokens"]) == pytest.approx(losses[0, c], rel=1e-4)
