"""Stage-one evaluations: audio-text retrieval (contrastive, and re-ranked by the matching head) and
zero-shot classification by contrastive similarity, over a model's weights in their shardings.

Used by the stage-one trainer (validation and the final test evaluation) and by `slit eval` on a
stage-one run (`evaluate_run`, `evaluate_classification_run`, which open the run through
`slit.runs.load_run`). Nothing here imports a trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from slit import runs
from slit.data import feature_cache, pipeline, sources
from slit.data.feature_cache import CachedFeatures
from slit.data.tokenizer import TextTokenizer
from slit.errors import UserError
from slit.eval import classification, reports, retrieval
from slit.eval.progress import BatchProgress, load_or_compute, progress_key
from slit.models.stage1 import Stage1Config
from slit.train import checkpoint, sharding
from slit.train.harness import ModelParts
from slit.train.preemption import Preempted, PreemptionWatcher


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
    """Opens a stage-one workdir's checkpoint (newest unless `step`) for evaluation on `data_name`
    (slit.runs: the workdir's config.json, the frozen encoder checked against the one it was trained
    with), with the evaluation functions jitted for this process's mesh."""
    config = checkpoint.run_config(workdir)
    config.data.name = data_name
    if data_dir is not None:
        config.data.data_dir = data_dir
    opened = runs.open_stage1(runs.load_run(workdir, step), config)
    fns = make_embedders(opened.parts.graphdef, opened.mesh, opened.rules, opened.parts)
    return LoadedRun(
        config,
        opened.tokenizer,
        opened.parts.params,
        opened.parts.frozen,
        fns,
        opened.spec,
        opened.mesh,
        opened.step,
        opened.model_config,
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
    classes, labels, labelled = class_names_and_labels(source)
    cached, progress = _eval_inputs(workdir, run, task="classification", data=data_name, split=split)
    with jax.set_mesh(run.mesh), PreemptionWatcher() as watcher:
        clips = embed_clips(run, source, functools.partial(watcher.should_stop, run.step), progress, cached)
        if clips is None:
            raise Preempted(run.step, "", progress.describe())
        prompt_ids = run.tokenizer.encode(
            classification.label_prompts(classes, prompt), run.config.data.max_text_length
        )
        prompts = embed_text_ids(run.fns, run.params, run.frozen, prompt_ids, run.config.batch_size)
    scores = classification.similarity_scores(clips, prompts)[labelled]  # (N labelled, C)
    metrics = classification.zero_shot_report(scores, labels, classes)
    metrics.update(method="zero-shot contrastive", prompt=prompt, classes=classes)
    metrics["clips_without_labels"] = len(source) - len(labelled)
    paths = {}
    if jax.process_index() == 0:
        paths = reports.write_report(
            workdir, "classification", data_name, split, metrics, run.config, step=run.step
        )
    progress.clear()
    return metrics, paths


def flatten_report(prefix: str, report: dict) -> dict[str, float]:
    """A retrieval report's two directions as scalars: {"<prefix>/audio_to_text_R@1": ...}."""
    return {
        f"{prefix}/{direction}_{k}": v
        for direction in ("audio_to_text", "text_to_audio")
        for k, v in report[direction].items()
    }
