"""Stage-one trainer: a Q-Former learns audio-text retrieval against a frozen audio encoder.

Read top to bottom: build the mesh, the data and the model; jit one train step with explicit
shardings and donated state; loop with logging, periodic evaluation and checkpoints; finish with a
retrieval evaluation on the test split.

    slit train --config configs/stage1_synthetic.py --workdir runs/stage1
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from slit import config as config_lib
from slit.data import pipeline, sources
from slit.data.tokenizer import TextTokenizer, word_level_tokenizer
from slit.eval import retrieval
from slit.models.audio.whisper import WhisperEncoderConfig
from slit.models.layers import Frozen
from slit.models.qformer import QFormerConfig
from slit.models.stage1 import Stage1Batch, Stage1Config, Stage1Model
from slit.train import checkpoint, loop, sharding
from slit.train.metrics import MetricWriter
from slit.train.optimizer import make_optimizer, nonfinite_counts
from slit.train.preemption import Preempted, PreemptionWatcher

BATCH_KEYS = ("audio", "num_samples", "text_ids")

validate = config_lib.validate_stage1  # called by `slit train` before anything compiles


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def make_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> TextTokenizer:
    """The run's tokenizer: the one saved in the workdir if resuming, else from the config."""
    if (workdir / "tokenizer.json").is_file():
        return TextTokenizer.from_directory(workdir)
    if config.tokenizer.kind == "synthetic_words":
        from slit.data.synthetic import CAPTION_VOCABULARY

        return TextTokenizer(word_level_tokenizer(CAPTION_VOCABULARY))
    if config.tokenizer.kind == "directory":
        return TextTokenizer.from_directory(config.tokenizer.path)
    raise ValueError(f"tokenizer.kind={config.tokenizer.kind!r}: use 'synthetic_words' or 'directory'")


def model_config(config: ml_collections.ConfigDict, tokenizer: TextTokenizer) -> Stage1Config:
    """Translates the config file's groups into the model's dataclasses."""
    a, q, loss = config.audio_encoder, config.qformer, config.loss
    audio = WhisperEncoderConfig(
        num_mel_bins=a.num_mel_bins,
        width=a.width,
        num_layers=a.layers,
        num_heads=a.heads,
        mlp_dim=a.mlp_dim,
        max_positions=a.max_positions,
    )
    qformer = QFormerConfig(
        vocab_size=tokenizer.vocab_size,
        num_queries=q.num_queries,
        num_layers=q.layers,
        width=q.width,
        num_heads=q.heads,
        mlp_dim=q.mlp_dim,
        cross_attention_freq=q.cross_attention_freq,
        encoder_width=a.width,
        max_text_positions=q.max_text_positions,
        dropout_rate=q.dropout,
        initializer_range=q.initializer_range,
    )
    return Stage1Config(
        audio=audio,
        qformer=qformer,
        embed_dim=q.embed_dim,
        temperature_init=loss.temperature_init,
        temperature_min=loss.temperature_min,
        temperature_max=loss.temperature_max,
        label_smoothing=loss.label_smoothing,
        pad_token_id=tokenizer.pad_id,
        dec_token_id=tokenizer.dec_id,
    )


@dataclasses.dataclass
class ModelParts:
    """The model split for jit: structure, trainable params, frozen weights, and their shardings."""

    graphdef: Any
    params: dict
    frozen: dict
    param_shardings: dict
    frozen_shardings: dict


def create_model(
    cfg: Stage1Config, seed: int, audio_seed: int, mesh: jax.sharding.Mesh, rules: dict
) -> ModelParts:
    """Initialises the model directly into its shardings (no unsharded copy on one device)."""

    def build() -> Stage1Model:
        return Stage1Model(cfg, rngs=nnx.Rngs(params=seed), audio_rngs=nnx.Rngs(params=audio_seed))

    abstract = nnx.eval_shape(build)
    graphdef, abs_params, abs_frozen = nnx.split(abstract, nnx.Param, Frozen)
    param_sh = sharding.state_shardings(abs_params, rules, mesh)
    frozen_sh = sharding.state_shardings(abs_frozen, rules, mesh)

    @jax.jit
    def init() -> tuple[dict, dict]:
        _, params, frozen = nnx.split(build(), nnx.Param, Frozen)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)

    with jax.set_mesh(mesh):
        params, frozen = jax.jit(init, out_shardings=(param_sh, frozen_sh))()
    return ModelParts(graphdef, params, frozen, param_sh, frozen_sh)


def loss_and_grads(
    graphdef: Any, params: dict, frozen: dict, batch: dict, key: jax.Array, step: jax.Array, dropout: bool
) -> tuple[dict, dict]:
    """Gradients of the stage-one loss w.r.t. the trainable params, and the step's metrics."""
    dropout_key, negatives_key = jax.random.split(jax.random.fold_in(key, step))

    def loss_fn(params: dict) -> tuple[jax.Array, dict]:
        model = nnx.merge(graphdef, params, frozen)
        rngs = nnx.Rngs(dropout=dropout_key) if dropout else None
        return model(Stage1Batch(**batch), rngs=rngs, negatives_key=negatives_key)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics


def make_train_step(
    graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, dropout: bool
) -> Callable[[dict, dict, dict, jax.Array], tuple[dict, dict]]:
    """The pure train step: (state, frozen, batch, key) -> (state, metrics)."""

    def train_step(state: dict, frozen: dict, batch: dict, key: jax.Array) -> tuple[dict, dict]:
        grads, metrics = loss_and_grads(graphdef, state["params"], frozen, batch, key, state["step"], dropout)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(
            metrics,
            grad_norm=optax.global_norm(grads),
            learning_rate=schedule(state["step"]),
            **nonfinite_counts(opt_state),
        )
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def make_embedders(
    graphdef: Any, mesh: jax.sharding.Mesh, rules: dict, parts: ModelParts
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array], tuple, Any]:
    """Jitted evaluation functions: audio -> (B, Q, E) embeddings and text ids -> (B, E)."""
    rep = sharding.replicated(mesh)
    audio_shardings = (sharding.batch_sharding(mesh, rules, 2), sharding.batch_sharding(mesh, rules, 1))
    text_sharding = sharding.batch_sharding(mesh, rules, 2)

    def embed_audio(params: dict, frozen: dict, audio: jax.Array, num_samples: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, frozen)
        features, mask = model.encode_audio(audio, num_samples)
        return model.audio_embeddings(model.query_outputs(features, mask, None))

    def embed_text(params: dict, frozen: dict, text_ids: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, frozen)
        return model.text_embeddings(text_ids, None)

    audio_fn = jax.jit(
        embed_audio,
        in_shardings=(parts.param_shardings, parts.frozen_shardings, *audio_shardings),
        out_shardings=rep,
    )
    text_fn = jax.jit(
        embed_text,
        in_shardings=(parts.param_shardings, parts.frozen_shardings, text_sharding),
        out_shardings=rep,
    )
    return audio_fn, text_fn, audio_shardings, text_sharding


def evaluate_retrieval(
    split: str,
    config: ml_collections.ConfigDict,
    tokenizer: TextTokenizer,
    spec: pipeline.AudioSpec,
    embedders: tuple,
    params: dict,
    frozen: dict,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict | None:
    """Text-to-audio and audio-to-text recall@1/5/10 on a split, by contrastive similarity.

    Returns None if `should_stop()` turned true between batches (preemption).
    """
    embed_audio, embed_text, audio_shardings, text_sharding = embedders
    source = sources.open_split(config.data.name, config.data.data_dir, split)
    batch_size = config.batch_size
    audio_embeddings = []
    for batch in pipeline.eval_audio_batches(source, spec, batch_size):
        if should_stop():
            return None
        audio = sharding.replicated_to_global(batch["audio"], audio_shardings[0])
        num_samples = sharding.replicated_to_global(batch["num_samples"], audio_shardings[1])
        emb = embed_audio(params, frozen, audio, num_samples)
        audio_embeddings.append(sharding.fetch_replicated(emb)[batch["valid"]])
    audio_emb = np.concatenate(audio_embeddings)
    texts, owners = pipeline.split_captions(source)
    text_embeddings = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids = tokenizer.encode(chunk + [chunk[-1]] * (batch_size - len(chunk)), config.data.max_text_length)
        emb = embed_text(params, frozen, sharding.replicated_to_global(ids, text_sharding))
        text_embeddings.append(sharding.fetch_replicated(emb)[: len(chunk)])
    text_emb = np.concatenate(text_embeddings)
    sim = np.einsum("aqe,te->atq", audio_emb, text_emb).max(-1)
    return retrieval.recall_at_k(sim, owners)


@dataclasses.dataclass
class TrainingSetup:
    """Everything the loop needs: the model parts, the initial state, the jitted step and shardings."""

    parts: ModelParts
    state: dict
    state_shardings: dict
    batch_shardings: dict
    step_fn: Any


def build_training(
    config: ml_collections.ConfigDict, tokenizer: TextTokenizer, mesh: jax.sharding.Mesh, rules: dict
) -> TrainingSetup:
    """Initialises the sharded train state and jits the train step with explicit shardings.

    The state ({step, params, opt_state}) is donated to every step; frozen weights are a separate,
    never-donated argument with no optimizer state.
    """
    cfg = model_config(config, tokenizer)
    parts = create_model(cfg, config.seed, config.audio_encoder.init_seed, mesh, rules)
    tx, schedule = make_optimizer(config.optimizer, config.total_steps)
    rep = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, parts.params),
        parts.param_shardings,
        transform_non_params=lambda _: rep,
    )
    state_shardings = {"step": rep, "params": parts.param_shardings, "opt_state": opt_shardings}
    with jax.set_mesh(mesh):
        state = jax.jit(
            lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
            out_shardings=state_shardings,
        )(parts.params)
    parts.params = None  # the state owns them now (and donates them every step)
    batch_shardings = {
        k: sharding.batch_sharding(mesh, rules, n)
        for k, n in (("audio", 2), ("num_samples", 1), ("text_ids", 2))
    }
    step_fn = jax.jit(
        make_train_step(parts.graphdef, tx, schedule, dropout=config.qformer.dropout > 0),
        in_shardings=(state_shardings, parts.frozen_shardings, batch_shardings, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
    return TrainingSetup(parts, state, state_shardings, batch_shardings, step_fn)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def frozen_sources(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Where each frozen model comes from, in words (recorded in every checkpoint)."""
    a = config.audio_encoder
    return {
        "audio_tower": f"randomly initialised Whisper encoder (width {a.width}, {a.layers} layers, "
        f"{a.heads} heads, {a.num_mel_bins} mel bins), init_seed {a.init_seed}"
    }


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains stage one in `workdir` (resuming from its checkpoint); returns the test retrieval report."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)
    tokenizer = make_tokenizer(config, workdir)
    if is_main:
        tokenizer.save(workdir)

    # Data.
    spec = pipeline.AudioSpec(
        config.data.sample_rate, int(round(config.data.max_seconds * config.data.sample_rate))
    )
    if jax.process_count() > 1:  # one process generates a missing built-in dataset, the others wait
        if is_main:
            sources.open_split(config.data.name, config.data.data_dir, "train")
        multihost_utils.sync_global_devices("slit: dataset ready")
    train_source = sources.open_split(config.data.name, config.data.data_dir, "train")
    train_data = pipeline.train_dataset(
        train_source,
        tokenizer,
        spec,
        max_text_length=config.data.max_text_length,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=config.data.worker_count,
    )
    train_iter = iter(train_data)

    # Model, optimizer, state (fresh, or resumed by the checkpoint precedence), and the jitted step.
    setup = build_training(config, tokenizer, mesh, rules)
    parts = setup.parts
    ckpt = checkpoint.Checkpointer(
        workdir, config, checkpoint.frozen_identity(parts.frozen, frozen_sources(config))
    )
    start = ckpt.resolve_start(setup.state, setup.state_shardings, train_iter)
    embedders = make_embedders(parts.graphdef, mesh, rules, parts)
    writer = MetricWriter(workdir)
    global_shapes = {
        "audio": (config.batch_size, spec.max_samples),
        "num_samples": (config.batch_size,),
        "text_ids": (config.batch_size, config.data.max_text_length),
    }

    def next_batch() -> dict:
        local = next(train_iter)
        shardings = setup.batch_shardings
        return {k: sharding.host_to_global(local[k], shardings[k], global_shapes[k]) for k in BATCH_KEYS}

    def evaluate(step: int, state: dict, should_stop: Callable[[], bool]) -> dict | None:
        report = evaluate_retrieval(
            "validation", config, tokenizer, spec, embedders, state["params"], parts.frozen, should_stop
        )
        if report is None:
            return None
        progress_line = f"step {step}: validation text->audio R@1 {100 * report['text_to_audio']['R@1']:.1f}%"
        if is_main:
            tqdm.write(progress_line)
        return _flatten_report("validation", report)

    fns = loop.StepFunctions(
        step=setup.step_fn,
        frozen=parts.frozen,
        next_batch=next_batch,
        key=jax.random.key(config.seed),
        evaluate=evaluate,
        postfix=("loss", "itm_accuracy"),
    )
    with jax.set_mesh(mesh), PreemptionWatcher() as watcher:
        state = loop.run(config, workdir, start.state, start.step, fns, ckpt, writer, train_iter, watcher)
        ckpt.close()
        report = evaluate_retrieval(
            "test",
            config,
            tokenizer,
            spec,
            embedders,
            state["params"],
            parts.frozen,
            functools.partial(watcher.should_stop, config.total_steps),
        )
    if report is None:
        raise Preempted(config.total_steps, str(ckpt.directory / str(config.total_steps)))
    report["step"] = int(config.total_steps)
    writer.write(config.total_steps, _flatten_report("test", report))
    writer.close()
    if is_main:
        (workdir / "eval").mkdir(exist_ok=True)
        (workdir / "eval" / "retrieval.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nTest-split retrieval ({workdir / 'eval' / 'retrieval.json'}):")
        print(retrieval.format_table(report))
    return report


def _flatten_report(prefix: str, report: dict) -> dict:
    return {
        f"{prefix}/{direction}_{k}": v
        for direction in ("audio_to_text", "text_to_audio")
        for k, v in report[direction].items()
    }
