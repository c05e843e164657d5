"""Stage-one trainer: a Q-Former learns audio-text retrieval against a frozen audio encoder.

Read top to bottom: the loss and the step; the training setup (the model of slit/train/stage1_model.py
in its shardings, through the shared harness); then `train`: the data, where to start, the step loop
with periodic validation retrieval, and a retrieval evaluation on the test split (slit/eval/stage1.py).

    slit train --config configs/stage1_synthetic.py --workdir runs/stage1
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from slit import config as config_lib
from slit.data import feature_cache, pipeline, sources
from slit.data.feature_cache import CachedFeatures
from slit.data.pipeline import example_texts
from slit.data.tokenizer import TextTokenizer
from slit.errors import UserError
from slit.eval import reports, retrieval
from slit.eval.stage1 import eval_progress, evaluate_retrieval, flatten_report, make_embedders
from slit.models.stage1 import Stage1Batch
from slit.paths import workdir_path
from slit.train import accumulation, checkpoint, harness, loop, sharding
from slit.train import feature_cache as cache_lib
from slit.train.harness import TrainingSetup
from slit.train.metrics import MetricWriter
from slit.train.optimizer import apply_gradients
from slit.train.stage1_model import audio_spec, create_model, frozen_sources, make_tokenizer, model_config

BATCH_KEYS = ("audio", "num_samples", "text_ids")
CACHED_BATCH_KEYS = ("features", "frame_mask", "text_ids")  # features=cached: the frozen encoder's outputs
BATCH_RANKS = {"audio": 2, "num_samples": 1, "features": 3, "frame_mask": 2, "text_ids": 2}

validate = config_lib.validate_stage1  # called by `slit train` before anything compiles


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
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    dropout: bool,
    accum_steps: int = 1,
    param_shardings: dict | None = None,
    activation_rules: sharding.Rules | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[dict, dict, dict, jax.Array], tuple[dict, dict]]:
    """The pure train step: (state, frozen, batch, key) -> (state, metrics), one optimizer update.

    accum_steps = k > 1 (`grad_accum_steps`): the update follows the mean of the gradients of k
    micro-batches (rows i, i + k, ... of the batch; slit.train.accumulation), each micro-batch's loss
    computed as a batch of its own, with its own in-batch contrastive negatives and hard negatives, as
    gradient accumulation in LAVIS does. That is not the full batch's loss: contrastive learning with k
    micro-batches sees B / k - 1 negatives per example, not B - 1. Micro-batch i uses the key
    `jax.random.fold_in(key, i)` where the plain step uses `key` (dropout and negatives differ between
    micro-batches, and are the same every run). The metrics are the means over the micro-batches
    (each a mean over its rows). param_shardings: the accumulator's shardings (those of the params).

    activation_rules: the config's sharding rules, applied to the tower-boundary activations
    (slit.train.sharding.constrain) on `mesh` (None: jax.set_mesh's); None leaves them unconstrained.
    """

    def grads_of(params: dict, frozen: dict, batch: dict, key: jax.Array, step: jax.Array) -> tuple:
        if accum_steps == 1:
            return loss_and_grads(graphdef, params, frozen, batch, key, step, dropout)

        def micro(micro_batch: dict, i: jax.Array) -> tuple[dict, dict]:
            micro_key = jax.random.fold_in(key, i)
            return loss_and_grads(graphdef, params, frozen, micro_batch, micro_key, step, dropout)

        grads, metrics = accumulation.accumulate(micro, batch, accum_steps, params, param_shardings)
        grads = jax.tree.map(lambda g: g / accum_steps, grads)
        return grads, jax.tree.map(lambda m: m.mean(axis=0), metrics)

    def train_step(state: dict, frozen: dict, batch: dict, key: jax.Array) -> tuple[dict, dict]:
        with sharding.activation_sharding(activation_rules, mesh):
            grads, metrics = grads_of(state["params"], frozen, batch, key, state["step"])
        return apply_gradients(tx, schedule, state, grads, metrics)

    return train_step


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What a training batch holds: audio, or (features=cached) the frozen encoder's outputs; and text."""
    return CACHED_BATCH_KEYS if config.get("features", "compute") == "cached" else BATCH_KEYS


def build_training(
    config: ml_collections.ConfigDict, tokenizer: TextTokenizer, mesh: jax.sharding.Mesh, rules: dict
) -> TrainingSetup:
    """The model of `config` initialised into its shardings, its sharded train state and the jitted step
    (slit.train.harness.build_training). With features=cached the step takes batches of frozen features
    (CACHED_BATCH_KEYS) instead of audio (BATCH_KEYS)."""
    cfg = model_config(config, tokenizer)
    parts = create_model(cfg, config.seed, config.audio_encoder.init_seed, mesh, rules)
    options = accumulation.step_options(config)
    step = functools.partial(
        make_train_step,
        dropout=config.qformer.dropout > 0,
        accum_steps=options["accum_steps"],
        param_shardings=parts.param_shardings,
        activation_rules=rules if options["activation_sharding"] else None,
        mesh=mesh,
    )
    ranks = {k: BATCH_RANKS[k] for k in batch_keys(config)}
    return harness.build_training(config, parts, mesh, rules, ranks, step, model_config=cfg)


def _captions(source: Sequence[dict], limit: int | None = None) -> Iterator[str]:
    for i in range(len(source) if limit is None else min(limit, len(source))):
        yield from example_texts(source[i], "captions")


def check_vocabulary(
    config: ml_collections.ConfigDict, tokenizer: TextTokenizer, source: Sequence[dict], log: bool = True
) -> float:
    """Prints the fraction of the training captions' words (of the first 1,000 clips) that the tokenizer
    does not know ([UNK]); refuses (UserError) above `tokenizer.max_unknown_fraction`, saying what fixes
    it. Returns the fraction."""
    fraction, unknown = tokenizer.unknown_words(list(_captions(source, 1000)))
    limit = float(config.tokenizer.get("max_unknown_fraction", 1.0))
    examples = ", ".join(f"{w!r} ({n})" for w, n in unknown.most_common(5))
    if log:
        print(
            f"tokenizer: {100 * fraction:.1f}% of the training captions' words are unknown ([UNK])"
            + (f", most often {examples}" if unknown else ""),
            file=sys.stderr,
        )
    if fraction > limit:
        raise UserError(
            f"{100 * fraction:.0f}% of the training captions' words are unknown to the tokenizer "
            f"(tokenizer.kind={config.tokenizer.kind}; e.g. {examples}), above "
            f"tokenizer.max_unknown_fraction={limit}: use --config.tokenizer.kind=train_words (a word "
            "vocabulary from the training captions), or --config.tokenizer.kind=directory with "
            "--config.tokenizer.path=<a BERT tokenizer directory>, or --config.qformer.init=minilm"
        )
    return fraction


def _has_split(config: ml_collections.ConfigDict, split: str) -> bool:
    try:
        sources.open_split(config.data.name, config.data.data_dir, split)
    except (FileNotFoundError, UserError):
        return False
    return True


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains stage one in `workdir` (resuming from its checkpoint); returns the test retrieval report
    ({} when the dataset has no test split: a note says so before step 1)."""
    workdir = workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)

    # Data, and the tokenizer that must know its words.
    spec = audio_spec(config)
    split = cache_lib.split_names(config)  # role -> split of data.name (data.train_split, ...)
    if jax.process_count() > 1:  # one process generates a missing built-in dataset, the others wait
        if is_main:
            sources.open_split(config.data.name, config.data.data_dir, split["train"])
        multihost_utils.sync_global_devices("slit: dataset ready")
    train_source = sources.open_split(config.data.name, config.data.data_dir, split["train"])
    tokenizer = make_tokenizer(config, workdir, lambda: _captions(train_source))
    check_vocabulary(config, tokenizer, train_source, log=is_main)
    if is_main:
        tokenizer.save(workdir)
    has_validation, has_test = (_has_split(config, split[role]) for role in ("validation", "test"))
    if is_main:  # known before step 1, said before step 1
        if config.eval_every_steps and not has_validation:
            print(
                f"note: {config.data.name} has no {split['validation']!r} split, so it is not evaluated "
                f"during training (eval_every_steps={config.eval_every_steps}); name one with "
                "data.validation_split (the test split is not used for choosing)",
                file=sys.stderr,
            )
        if not has_test:
            print(
                f"note: {config.data.name} has no {split['test']!r} split, so retrieval is not evaluated "
                "after the last step; name one with data.test_split",
                file=sys.stderr,
            )

    # Model, optimizer, state, and the jitted step.
    setup = build_training(config, tokenizer, mesh, rules)
    parts = setup.parts
    cache = None
    if config.get("features", "compute") == "cached":  # refused here if missing or stale
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
    b = config.batch_size
    if cache is None:
        train_data = pipeline.train_dataset(train_source, tokenizer, spec, **common)
        global_shapes = {"audio": (b, spec.max_samples), "num_samples": (b,)}
    else:
        features = cache.splits["train"]
        train_data = feature_cache.cached_train_dataset(train_source, features, tokenizer, spec, **common)
        global_shapes = {"features": (b, features.frames, features.width), "frame_mask": (b, features.frames)}
    global_shapes["text_ids"] = (b, config.data.max_text_length)
    train_iter = iter(train_data)

    # Where to start (fresh, or resumed by the checkpoint precedence).
    ckpt = checkpoint.Checkpointer(
        workdir, config, checkpoint.frozen_identity(parts.frozen, frozen_sources(config))
    )
    start = ckpt.resolve_start(setup.state, setup.state_shardings, train_iter)
    embedders = make_embedders(parts.graphdef, mesh, rules, parts)
    writer = MetricWriter(workdir)
    if start.step == 0:
        writer.write(0, harness.parameter_scalars(setup.state["params"], parts.frozen))

    def cached_split(role: str) -> CachedFeatures | None:
        return None if cache is None else cache.splits.get(role)

    def evaluate(step: int, state: dict, should_stop: Callable[[], bool]) -> dict | None:
        report = evaluate_retrieval(
            split["validation"],
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
        return flatten_report("validation", report["contrastive"])

    fns = loop.StepFunctions(
        step=setup.step_fn,
        frozen=parts.frozen,
        next_batch=harness.global_batches(train_iter, setup.batch_shardings, global_shapes),
        key=jax.random.key(config.seed),
        evaluate=evaluate if has_validation else None,
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

    def evaluate_test(state: dict, should_stop: Callable[[], bool]) -> dict | None:
        if not has_test:
            return {}
        return evaluate_retrieval(
            split["test"],
            config,
            tokenizer,
            spec,
            embedders,
            state["params"],
            parts.frozen,
            should_stop,
            rerank_k=config.retrieval_rerank_k,
            cached=cached_split("test"),
            progress=test_progress,
        )

    report = harness.train_then_evaluate(
        config, workdir, mesh, start, fns, ckpt, writer, train_iter, evaluate_test, test_progress.describe
    )
    if not report:  # no test split (said before step 1)
        writer.close()
        test_progress.clear()
        return report
    scalars = flatten_report("test", report["contrastive"])
    if "reranked" in report:
        scalars.update(flatten_report("test_reranked", report["reranked"]))
        scalars.update(
            {f"test_matching/{k}": v for k, v in report["matching"].items() if isinstance(v, float)}
        )
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
            summary.update(
                reranked=report["reranked"], rerank_k=report["rerank_k"], matching=report["matching"]
            )
        (workdir / "eval" / "retrieval.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nTest-split retrieval ({paths['json']}), by contrastive similarity:")
        print(retrieval.format_table(report["contrastive"]))
        if "reranked" in report:
            print(f"after re-ranking each query's top {report['rerank_k']} by the matching head:")
            print(retrieval.format_table(report["reranked"]))
            print(retrieval.describe_matching(report["matching"]))
    test_progress.clear()
    return report
