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
from collections.abc import Callable, Sequence
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
from slit.data import feature_cache, pipeline, sources
from slit.data.feature_cache import CachedFeatures
from slit.data.tokenizer import TextTokenizer, word_level_tokenizer
from slit.errors import UserError
from slit.eval import classification, reports, retrieval
from slit.eval.progress import BatchProgress, load_or_compute, progress_key
from slit.models.layers import Frozen
from slit.models.stage1 import Stage1Batch, Stage1Config, Stage1Model
from slit.train import checkpoint, loop, pretrained, sharding
from slit.train.metrics import MetricWriter
from slit.train.optimizer import apply_gradients, make_optimizer
from slit.train.preemption import Preempted, PreemptionWatcher

BATCH_KEYS = ("audio", "num_samples", "text_ids")
CACHED_BATCH_KEYS = ("features", "frame_mask", "text_ids")  # features=cached: the frozen encoder's outputs

validate = config_lib.validate_stage1  # called by `slit train` before anything compiles


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def audio_spec(config: ml_collections.ConfigDict) -> pipeline.AudioSpec:
    """Clips are cropped or zero-padded (and masked) to data.max_seconds at data.sample_rate."""
    return pipeline.AudioSpec(
        config.data.sample_rate, int(round(config.data.max_seconds * config.data.sample_rate))
    )


def make_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> TextTokenizer:
    """The run's tokenizer: the one saved in the workdir if resuming, else from the config (the BERT
    directory's, plus [DEC], when the Q-Former is initialised from BERT)."""
    if (workdir / "tokenizer.json").is_file():
        return TextTokenizer.from_directory(workdir)
    if config.qformer.get("init", ""):
        return TextTokenizer.from_directory(pretrained.bert_directory(config.qformer.init))
    if config.tokenizer.kind == "synthetic_words":
        from slit.data.synthetic import CAPTION_VOCABULARY

        return TextTokenizer(word_level_tokenizer(CAPTION_VOCABULARY))
    if config.tokenizer.kind == "directory":
        return TextTokenizer.from_directory(config.tokenizer.path)
    raise ValueError(f"tokenizer.kind={config.tokenizer.kind!r}: use 'synthetic_words' or 'directory'")


def model_config(config: ml_collections.ConfigDict, tokenizer: TextTokenizer) -> Stage1Config:
    """Translates the config file's groups into the model's dataclasses (the audio encoder and the
    Q-Former are the components both stages build the same way: slit.train.pretrained)."""
    q, loss = config.qformer, config.loss
    audio = pretrained.audio_encoder_config(config)
    return Stage1Config(
        audio=audio,
        qformer=pretrained.qformer_component_config(config, tokenizer.vocab_size, audio.width),
        embed_dim=q.embed_dim,
        temperature_init=loss.temperature_init,
        temperature_min=loss.temperature_min,
        temperature_max=loss.temperature_max,
        label_smoothing=loss.label_smoothing,
        pad_token_id=tokenizer.pad_id,
        dec_token_id=tokenizer.dec_id,
        qformer_init=q.get("init", ""),
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
    """Initialises the model directly into its shardings (no unsharded copy on one device).

    A pretrained audio encoder (`cfg.audio.weights`) is read on the host and placed into the frozen
    shardings (its random initialisation is never computed); with `cfg.qformer_init`, the Q-Former's
    text weights are BERT's (slit.train.pretrained.bert_params).
    """

    def build() -> Stage1Model:
        return Stage1Model(cfg, rngs=nnx.Rngs(params=seed), audio_rngs=nnx.Rngs(params=audio_seed))

    abstract = nnx.eval_shape(build)
    graphdef, abs_params, abs_frozen = nnx.split(abstract, nnx.Param, Frozen)
    param_sh = sharding.state_shardings(abs_params, rules, mesh)
    frozen_sh = sharding.state_shardings(abs_frozen, rules, mesh)
    random_frozen = not cfg.audio.weights

    @jax.jit
    def init() -> tuple[dict, dict | None]:
        _, params, frozen = nnx.split(build(), nnx.Param, Frozen)
        return nnx.to_pure_dict(params), (nnx.to_pure_dict(frozen) if random_frozen else None)

    with jax.set_mesh(mesh):
        params, frozen = jax.jit(init, out_shardings=(param_sh, frozen_sh if random_frozen else None))()
    if not random_frozen:
        frozen = pretrained.put_like(
            abs_frozen, {"audio_tower": pretrained.load_tower(cfg.audio.weights).params}, frozen_sh
        )
    if cfg.qformer_init:
        host = pretrained.bert_params(cfg.qformer_init, cfg.qformer, jax.device_get(params))
        params = pretrained.put_like(abs_params, host, param_sh)
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
        return apply_gradients(tx, schedule, state, grads, metrics)

    return train_step


@dataclasses.dataclass
class RetrievalFunctions:
    """Jitted evaluation functions over sharded batches; outputs come back replicated.

    embed_audio: (params, frozen, audio, num_samples) -> (embeddings (B, Q, E), frozen encoder
        features (B, F, D), frame mask (B, F))
    embed_features: (params, frozen, features (B, F, D), frame mask (B, F)) -> embeddings (B, Q, E)
    embed_text: (params, frozen, text_ids) -> embeddings (B, E)
    match: (params, frozen, features, frame mask, text_ids) -> matching-head logits (B,)
    """

    embed_audio: Callable[..., Any]
    embed_features: Callable[..., Any]
    embed_text: Callable[..., Any]
    match: Callable[..., Any]
    audio_shardings: tuple
    text_sharding: Any
    mesh: jax.sharding.Mesh
    rules: dict


def make_embedders(
    graphdef: Any, mesh: jax.sharding.Mesh, rules: dict, parts: ModelParts
) -> RetrievalFunctions:
    """Jits the evaluation functions with explicit shardings (batch-sharded in, replicated out)."""
    rep = sharding.replicated(mesh)
    audio_shardings = (sharding.batch_sharding(mesh, rules, 2), sharding.batch_sharding(mesh, rules, 1))
    text_sharding = sharding.batch_sharding(mesh, rules, 2)
    weights = (parts.param_shardings, parts.frozen_shardings)

    def embed_audio(params: dict, frozen: dict, audio: jax.Array, num_samples: jax.Array) -> tuple:
        model = nnx.merge(graphdef, params, frozen)
        features, mask = model.encode_audio(audio, num_samples)
        embeddings = model.audio_embeddings(model.query_outputs(features, mask, None))
        return embeddings, features, mask

    def embed_features(params: dict, frozen: dict, features: jax.Array, mask: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, frozen)
        return model.audio_embeddings(model.query_outputs(features, mask, None))

    def embed_text(params: dict, frozen: dict, text_ids: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, frozen)
        return model.text_embeddings(text_ids, None)

    def match(
        params: dict, frozen: dict, features: jax.Array, mask: jax.Array, text_ids: jax.Array
    ) -> jax.Array:
        model = nnx.merge(graphdef, params, frozen)
        return model.match_logits(model.qformer.encoder_kv(features), mask, text_ids)

    return RetrievalFunctions(
        embed_audio=jax.jit(embed_audio, in_shardings=(*weights, *audio_shardings), out_shardings=rep),
        embed_features=jax.jit(embed_features, out_shardings=rep),
        embed_text=jax.jit(embed_text, in_shardings=(*weights, text_sharding), out_shardings=rep),
        match=jax.jit(match, out_shardings=rep),
        audio_shardings=audio_shardings,
        text_sharding=text_sharding,
        mesh=mesh,
        rules=rules,
    )


class _Stopped(Exception):  # noqa: N818 (a signal, not an error)
    """should_stop() turned true inside a nested evaluation loop."""


def evaluate_retrieval(
    split: str,
    config: ml_collections.ConfigDict,
    tokenizer: TextTokenizer,
    spec: pipeline.AudioSpec,
    fns: RetrievalFunctions,
    params: dict,
    frozen: dict,
    should_stop: Callable[[], bool] = lambda: False,
    rerank_k: int = 0,
    cached: CachedFeatures | None = None,
    progress: BatchProgress | None = None,
) -> dict | None:
    """Audio-text retrieval on a split: R@1/5/10 and mAP@10 both ways by contrastive similarity and,
    with rerank_k > 0, after BLIP-2's re-ranking of each query's top k by the matching head.

    With `cached` (the split's frozen features from the feature cache), the encoder is not run. With
    `progress`, each audio batch's embeddings (and, for re-ranking, frozen features) and each batch of
    re-ranking scores are saved as they are computed, so that a stopped evaluation resumes.

    Returns slit.eval.retrieval.retrieval_report's dict ({"contrastive", "reranked", "curves"}), or None
    if `should_stop()` turned true between batches (preemption).
    """
    source = sources.open_split(config.data.name, config.data.data_dir, split)
    batch_size = config.batch_size
    # For re-ranking, the frozen encoder's features of every clip stay on the host (a clip's
    # cross-attention keys/values are recomputed from them for each pair scored).
    audio_embeddings, clip_features, clip_masks = [], [], []
    if cached is not None and len(cached) != len(source):
        raise UserError(
            f"the feature cache {cached.directory} has {len(cached)} clips, {split} {len(source)}"
        )
    batches = (
        pipeline.eval_audio_batches(source, spec, batch_size)
        if cached is None
        else feature_cache.eval_feature_batches(cached, batch_size)
    )

    def embed(batch: dict) -> dict[str, np.ndarray]:
        if cached is None:
            audio = sharding.replicated_to_global(batch["audio"], fns.audio_shardings[0])
            num_samples = sharding.replicated_to_global(batch["num_samples"], fns.audio_shardings[1])
            emb, features, mask = fns.embed_audio(params, frozen, audio, num_samples)
        else:
            features, mask = batch["features"], batch["frame_mask"]
            emb = fns.embed_features(
                params,
                frozen,
                sharding.replicated_to_global(features, sharding.batch_sharding(fns.mesh, fns.rules, 3)),
                sharding.replicated_to_global(mask, sharding.batch_sharding(fns.mesh, fns.rules, 2)),
            )
        valid = batch["valid"]
        out = {"embeddings": np.asarray(sharding.fetch_replicated(emb))[valid]}
        if rerank_k and cached is None:  # (cached features are read from the cache again)
            out["features"] = np.asarray(sharding.fetch_replicated(features))[valid]
            out["mask"] = np.asarray(sharding.fetch_replicated(mask))[valid]
        return out

    for i, batch in enumerate(batches):
        if should_stop():
            return None
        results = load_or_compute(progress, i, functools.partial(embed, batch), "audio")
        audio_embeddings.append(results["embeddings"])
        if rerank_k:
            if cached is None:
                clip_features.append(results["features"])
                clip_masks.append(results["mask"])
            else:
                clip_features.append(np.asarray(batch["features"])[batch["valid"]])
                clip_masks.append(np.asarray(batch["frame_mask"])[batch["valid"]])
    audio_emb = np.concatenate(audio_embeddings)
    texts, owners = pipeline.split_captions(source)
    all_ids = tokenizer.encode(texts, config.data.max_text_length)
    if should_stop():
        return None
    text_emb = embed_text_ids(fns, params, frozen, all_ids, batch_size)
    sim = np.einsum("aqe,te->atq", audio_emb, text_emb).max(-1)
    if not rerank_k:
        return retrieval.retrieval_report(sim, owners)

    features_host, masks_host = np.concatenate(clip_features), np.concatenate(clip_masks)
    calls = iter(range(1 << 62))  # re-ranking calls score_pairs in a fixed order: number them

    def match_logits(audio_idx: np.ndarray, text_idx: np.ndarray) -> dict[str, np.ndarray]:
        def put(x: np.ndarray) -> jax.Array:
            return sharding.replicated_to_global(x, sharding.batch_sharding(fns.mesh, fns.rules, x.ndim))

        features, mask = put(features_host[audio_idx]), put(masks_host[audio_idx])
        logits = fns.match(params, frozen, features, mask, put(all_ids[text_idx]))
        return {"logits": np.asarray(sharding.fetch_replicated(logits))}

    def score_pairs(audio_idx: np.ndarray, text_idx: np.ndarray) -> np.ndarray:
        if should_stop():
            raise _Stopped
        compute = functools.partial(match_logits, audio_idx, text_idx)
        return load_or_compute(progress, next(calls), compute, "rerank")["logits"]

    try:
        return retrieval.retrieval_report(sim, owners, score_pairs, k=rerank_k, batch_size=batch_size)
    except _Stopped:
        return None


@dataclasses.dataclass
class TrainingSetup:
    """Everything the loop needs: the model parts, the initial state, the jitted step and shardings."""

    parts: ModelParts
    state: dict
    state_shardings: dict
    batch_shardings: dict
    step_fn: Any
    model_config: Stage1Config


def build_training(
    config: ml_collections.ConfigDict, tokenizer: TextTokenizer, mesh: jax.sharding.Mesh, rules: dict
) -> TrainingSetup:
    """Initialises the sharded train state and jits the train step with explicit shardings.

    The state ({step, params, opt_state}) is donated to every step; frozen weights are a separate,
    never-donated argument with no optimizer state. With features=cached the step takes batches of
    frozen features (CACHED_BATCH_KEYS) instead of audio (BATCH_KEYS).
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
    ranks = (
        (("features", 3), ("frame_mask", 2), ("text_ids", 2))
        if config.get("features", "compute") == "cached"
        else (("audio", 2), ("num_samples", 1), ("text_ids", 2))
    )
    batch_shardings = {k: sharding.batch_sharding(mesh, rules, n) for k, n in ranks}
    step_fn = jax.jit(
        make_train_step(parts.graphdef, tx, schedule, dropout=config.qformer.dropout > 0),
        in_shardings=(state_shardings, parts.frozen_shardings, batch_shardings, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
    return TrainingSetup(parts, state, state_shardings, batch_shardings, step_fn, cfg)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def frozen_sources(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Where each frozen model comes from, in words (recorded in every checkpoint)."""
    return {"audio_tower": pretrained.audio_source(config)}


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
    spec = audio_spec(config)
    if jax.process_count() > 1:  # one process generates a missing built-in dataset, the others wait
        if is_main:
            sources.open_split(config.data.name, config.data.data_dir, "train")
        multihost_utils.sync_global_devices("slit: dataset ready")
    train_source = sources.open_split(config.data.name, config.data.data_dir, "train")

    # Model, optimizer, state, and the jitted step.
    setup = build_training(config, tokenizer, mesh, rules)
    parts = setup.parts
    cache = None
    if config.get("features", "compute") == "cached":  # refused here if missing or stale
        from slit.train import feature_cache as cache_lib

        cache = cache_lib.open_for_training(config, setup.model_config, parts.frozen)
        if is_main:
            print(f"reading frozen features from {cache.directory}")
    common = dict(
        max_text_length=config.data.max_text_length,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=config.data.worker_count,
    )
    if cache is None:
        train_data = pipeline.train_dataset(train_source, tokenizer, spec, **common)
        batch_keys = BATCH_KEYS
        global_shapes = {
            "audio": (config.batch_size, spec.max_samples),
            "num_samples": (config.batch_size,),
            "text_ids": (config.batch_size, config.data.max_text_length),
        }
    else:
        features = cache.splits["train"]
        train_data = feature_cache.cached_train_dataset(train_source, features, tokenizer, spec, **common)
        batch_keys = CACHED_BATCH_KEYS
        global_shapes = {
            "features": (config.batch_size, features.frames, features.width),
            "frame_mask": (config.batch_size, features.frames),
            "text_ids": (config.batch_size, config.data.max_text_length),
        }
    train_iter = iter(train_data)

    # Where to start (fresh, or resumed by the checkpoint precedence).
    ckpt = checkpoint.Checkpointer(
        workdir, config, checkpoint.frozen_identity(parts.frozen, frozen_sources(config))
    )
    start = ckpt.resolve_start(setup.state, setup.state_shardings, train_iter)
    embedders = make_embedders(parts.graphdef, mesh, rules, parts)
    writer = MetricWriter(workdir)

    def next_batch() -> dict:
        local = next(train_iter)
        shardings = setup.batch_shardings
        return {k: sharding.host_to_global(local[k], shardings[k], global_shapes[k]) for k in batch_keys}

    def cached_split(split: str) -> CachedFeatures | None:
        return None if cache is None else cache.splits[split]

    def evaluate(step: int, state: dict, should_stop: Callable[[], bool]) -> dict | None:
        report = evaluate_retrieval(
            "validation",
            config,
            tokenizer,
            spec,
            embedders,
            state["params"],
            parts.frozen,
            should_stop,
            cached=cached_split("validation"),
        )
        if report is None:
            return None
        r1 = report["contrastive"]["text_to_audio"]["R@1"]
        if is_main:
            tqdm.write(f"step {step}: validation text->audio R@1 {100 * r1:.1f}%")
        return _flatten_report("validation", report["contrastive"])

    fns = loop.StepFunctions(
        step=setup.step_fn,
        frozen=parts.frozen,
        next_batch=next_batch,
        key=jax.random.key(config.seed),
        evaluate=evaluate,
        postfix=("loss", "itm_accuracy"),
    )
    test_progress = eval_progress(
        workdir,
        config,
        task="retrieval",
        data=config.data.name,
        split="test",
        step=int(config.total_steps),
        rerank_k=config.retrieval_rerank_k,
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
            rerank_k=config.retrieval_rerank_k,
            cached=cached_split("test"),
            progress=test_progress,
        )
    if report is None:
        raise Preempted(
            config.total_steps, str(ckpt.directory / str(config.total_steps)), test_progress.describe()
        )
    scalars = _flatten_report("test", report["contrastive"])
    if "reranked" in report:
        scalars.update(_flatten_report("test_reranked", report["reranked"]))
    writer.write(config.total_steps, scalars)
    writer.close()
    if is_main:
        paths = reports.write_report(
            workdir, "retrieval", config.data.name, "test", report, config, step=int(config.total_steps)
        )
        # The stable summary that scripts read: contrastive numbers at the top level (audio_to_text /
        # text_to_audio R@1/5/10 and mAP@10, num_audio, num_text), the re-ranked ones under "reranked".
        summary = dict(report["contrastive"], step=int(config.total_steps))
        if "reranked" in report:
            summary.update(reranked=report["reranked"], rerank_k=report["rerank_k"])
        (workdir / "eval" / "retrieval.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nTest-split retrieval ({paths['json']}), by contrastive similarity:")
        print(retrieval.format_table(report["contrastive"]))
        if "reranked" in report:
            print(f"after re-ranking each query's top {report['rerank_k']} by the matching head:")
            print(retrieval.format_table(report["reranked"]))
    test_progress.clear()
    return report


def _eval_inputs(
    workdir: str | pathlib.Path, run: LoadedRun, *, split: str, **fields: Any
) -> tuple[CachedFeatures | None, BatchProgress]:
    """For `slit eval` on a stage-one run: the split's cached frozen features (runs trained from the
    feature cache, when it matches) and where the evaluation keeps its per-batch results."""
    from slit.train import feature_cache as cache_lib

    cached = cache_lib.open_for_eval(run.config, run.model_config, run.frozen, split)
    progress = eval_progress(
        workdir, run.config, split=split, step=run.step, cached=cached is not None, **fields
    )
    return cached, progress


@dataclasses.dataclass
class LoadedRun:
    """A stage-one run's checkpoint restored for evaluation on this process's mesh."""

    config: ml_collections.ConfigDict
    tokenizer: TextTokenizer
    params: dict
    frozen: dict
    fns: RetrievalFunctions
    spec: pipeline.AudioSpec
    mesh: jax.sharding.Mesh
    step: int
    model_config: Stage1Config


def load_run(
    workdir: str | pathlib.Path, data_name: str, data_dir: str | None = None, step: int | None = None
) -> LoadedRun:
    """Restores a stage-one workdir's checkpoint (newest unless `step`) for evaluation on `data_name`,
    checking the frozen encoder against the one it was trained with."""
    workdir = pathlib.Path(workdir)
    config = checkpoint.run_config(workdir)
    config.data.name = data_name
    if data_dir is not None:
        config.data.data_dir = data_dir
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)
    tokenizer = make_tokenizer(config, workdir)
    setup = build_training(config, tokenizer, mesh, rules)
    identity = checkpoint.frozen_identity(setup.parts.frozen, frozen_sources(config))
    ckpt = checkpoint.Checkpointer(workdir, config, identity)
    try:
        state, step = ckpt.restore_for_eval(setup.state, setup.state_shardings, step)
    finally:
        ckpt.close()
    fns = make_embedders(setup.parts.graphdef, mesh, rules, setup.parts)
    return LoadedRun(
        config,
        tokenizer,
        state["params"],
        setup.parts.frozen,
        fns,
        audio_spec(config),
        mesh,
        step,
        setup.model_config,
    )


def evaluate_run(
    workdir: str | pathlib.Path,
    data_name: str,
    split: str = "test",
    data_dir: str | None = None,
    rerank_k: int | None = None,
    step: int | None = None,
) -> tuple[dict, dict]:
    """`slit eval --task retrieval`: a stage-one workdir's checkpoint on any split of any dataset with
    captions. Returns (report, paths of the written files)."""
    run = load_run(workdir, data_name, data_dir, step)
    rerank_k = run.config.retrieval_rerank_k if rerank_k is None else rerank_k
    cached, progress = _eval_inputs(
        workdir, run, task="retrieval", data=data_name, split=split, rerank_k=rerank_k
    )
    with jax.set_mesh(run.mesh), PreemptionWatcher() as watcher:
        report = evaluate_retrieval(
            split,
            run.config,
            run.tokenizer,
            run.spec,
            run.fns,
            run.params,
            run.frozen,
            functools.partial(watcher.should_stop, run.step),
            rerank_k=rerank_k,
            cached=cached,
            progress=progress,
        )
    if report is None:
        raise Preempted(run.step, "", progress.describe())
    paths = {}
    if jax.process_index() == 0:
        paths = reports.write_report(
            workdir, "retrieval", data_name, split, report, run.config, step=run.step
        )
    progress.clear()
    return report, paths


def embed_clips(
    run: LoadedRun,
    source: Sequence[dict],
    should_stop: Callable[[], bool],
    progress: BatchProgress | None = None,
    cached: CachedFeatures | None = None,
) -> np.ndarray | None:
    """Every clip's normalised query embeddings, (N, Q, E), in the split's order; None if stopped.
    With `cached` (the split's frozen features) the encoder is not run; with `progress`, each batch's
    embeddings are saved as they are computed (a re-run resumes)."""
    fns, out = run.fns, []

    def embed(batch: dict) -> dict[str, np.ndarray]:
        if cached is None:
            audio = sharding.replicated_to_global(batch["audio"], fns.audio_shardings[0])
            num_samples = sharding.replicated_to_global(batch["num_samples"], fns.audio_shardings[1])
            emb, _, _ = fns.embed_audio(run.params, run.frozen, audio, num_samples)
        else:
            emb = fns.embed_features(
                run.params,
                run.frozen,
                sharding.replicated_to_global(
                    batch["features"], sharding.batch_sharding(fns.mesh, fns.rules, 3)
                ),
                sharding.replicated_to_global(
                    batch["frame_mask"], sharding.batch_sharding(fns.mesh, fns.rules, 2)
                ),
            )
        return {"embeddings": np.asarray(sharding.fetch_replicated(emb))[batch["valid"]]}

    if cached is not None and len(cached) != len(source):
        raise UserError(
            f"the feature cache {cached.directory} has {len(cached)} clips, the split {len(source)}"
        )
    batches = (
        pipeline.eval_audio_batches(source, run.spec, run.config.batch_size)
        if cached is None
        else feature_cache.eval_feature_batches(cached, run.config.batch_size)
    )
    for i, batch in enumerate(batches):
        if should_stop():
            return None
        out.append(load_or_compute(progress, i, functools.partial(embed, batch), "audio")["embeddings"])
    return np.concatenate(out)


def eval_progress(
    workdir: str | pathlib.Path, config: ml_collections.ConfigDict, **fields: Any
) -> BatchProgress:
    """Where a stage-one evaluation keeps its per-batch results until its report is written; `fields`
    name what the results depend on (task, data, split, step, ...)."""
    key = progress_key(
        batch_size=config.batch_size,
        features=config.get("features", "compute"),
        max_seconds=config.data.max_seconds,
        **fields,
    )
    return BatchProgress(workdir, key, write=jax.process_index() == 0)


def embed_text_ids(
    fns: RetrievalFunctions, params: dict, frozen: dict, ids_tl: np.ndarray, batch_size: int
) -> np.ndarray:
    """Normalised text embeddings of token ids (T, L) -> (T, E), in fixed-size batches (the last one
    padded by repetition, so that one compilation serves all)."""
    out = []
    for start in range(0, len(ids_tl), batch_size):
        chunk = ids_tl[start : start + batch_size]
        ids = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        emb = fns.embed_text(params, frozen, sharding.replicated_to_global(ids, fns.text_sharding))
        out.append(sharding.fetch_replicated(emb)[: len(chunk)])
    return np.concatenate(out)


def evaluate_classification_run(
    workdir: str | pathlib.Path,
    data_name: str,
    split: str = "test",
    data_dir: str | None = None,
    prompt: str = classification.DEFAULT_PROMPT,
    step: int | None = None,
) -> tuple[dict, dict]:
    """`slit eval --task classification`: zero-shot by contrastive similarity between each clip and
    one prompt per label ("this is a sound of {label}"), the max over queries as BLIP-2's ITC.

    Classes are the labels found in the split, sorted. Single-label data: accuracy, per-class accuracy
    and the confusion matrix. Multi-label data: mAP over classes and top-1 accuracy (the best-scoring
    class is one of the clip's labels). Returns (metrics, paths of the written files)."""
    from slit.eval.generative import class_names_and_labels

    run = load_run(workdir, data_name, data_dir, step)
    source = sources.open_split(run.config.data.name, run.config.data.data_dir, split)
    classes, labels = class_names_and_labels(source)
    cached, progress = _eval_inputs(workdir, run, task="classification", data=data_name, split=split)
    with jax.set_mesh(run.mesh), PreemptionWatcher() as watcher:
        clips = embed_clips(run, source, functools.partial(watcher.should_stop, run.step), progress, cached)
        if clips is None:
            raise Preempted(run.step, "", progress.describe())
        prompt_ids = run.tokenizer.encode(
            classification.label_prompts(classes, prompt), run.config.data.max_text_length
        )
        prompts = embed_text_ids(run.fns, run.params, run.frozen, prompt_ids, run.config.batch_size)
    scores = classification.similarity_scores(clips, prompts)  # (N, C)
    metrics = classification.zero_shot_report(scores, labels, classes)
    metrics.update(method="zero-shot contrastive", prompt=prompt, classes=classes)
    paths = {}
    if jax.process_index() == 0:
        paths = reports.write_report(
            workdir, "classification", data_name, split, metrics, run.config, step=run.step
        )
    progress.clear()
    return metrics, paths


def _flatten_report(prefix: str, report: dict) -> dict:
    return {
        f"{prefix}/{direction}_{k}": v
        for direction in ("audio_to_text", "text_to_audio")
        for k, v in report[direction].items()
    }
