"""Stage-two trainer: the Q-Former's outputs become a soft prompt for a frozen LLM, instruction-tuned.

Read top to bottom: config checks; the multi-task data (captioning, question answering, classification,
made from what the datasets hold and mixed with configurable weights); the step and the training setup
(the model of slit/train/stage2_model.py around the frozen LLM, through the shared harness); then
`train`: where the run starts (its own checkpoint, resume_from, or the Q-Former of a stage-one run via
`init_from`: slit/train/init_from.py), the shared step loop (slit/train/loop.py) and, after it,
captioning (CIDEr-D and the other caption metrics), question answering (accuracy, with the
majority-answer baselines next to it) and zero-shot classification, each where the held-out test clips
hold its field (the others are named as skipped), written as eval reports (slit/eval/stage2.py:
`<workdir>/eval/{captioning,aqa,classification}-<data>-test.{json,md,png}`).

    slit train --config configs/stage2_synthetic.py --workdir runs/stage2 \\
        --config.init_from=runs/stage1_synthetic

A trained run is opened for `slit eval`, `slit generate` and `slit export` by slit.runs (`load_trained`).
"""

from __future__ import annotations

import functools
import pathlib
import sys
import tempfile
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
from slit import paths
from slit.data import pipeline, sources
from slit.data import tasks as tasks_lib
from slit.errors import UserError
from slit.eval import stage2 as evals
from slit.eval.stage2 import evaluate_split, evaluation_sets, headline, write_reports
from slit.generate.answerer import Answerer
from slit.models.bridges import BRIDGES, QFORMER_BRIDGES
from slit.models.llm.quantize import unknown_quantization
from slit.models.stage2 import LOSS_AVERAGES, REMAT_POLICIES, Stage2Batch, Stage2Config, loss_normaliser
from slit.train import accumulation, checkpoint, harness, loop, pretrained, sharding
from slit.train.harness import TrainingSetup
from slit.train.init_from import check_init_from_audio_tower, resolve_start
from slit.train.metrics import MetricWriter
from slit.train.optimizer import apply_gradients
from slit.train.stage2_model import (
    LLM_TOKENIZER_DIR,
    Encoders,
    audio_spec,
    create_model,
    frozen_sources,
    load_llm,
    make_encoders,
    make_qformer_tokenizer,
    model_config,
)

TEXT_KEYS = ("qformer_ids", "instruction_ids", "answer_ids")
BATCH_KEYS = ("audio", "num_samples", *TEXT_KEYS)
CACHED_BATCH_KEYS = ("features", "frame_mask", *TEXT_KEYS)  # features=cached: the encoder's outputs
BATCH_RANKS = {"audio": 2, "num_samples": 1, "features": 3, "frame_mask": 2} | dict.fromkeys(TEXT_KEYS, 2)


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What a training batch holds: the audio, or (features=cached) the frozen encoder's outputs."""
    return CACHED_BATCH_KEYS if config.get("features", "compute") == "cached" else BATCH_KEYS


TASK_NAMES = tasks_lib.TASK_KINDS


def _llm_model_type(llm: ml_collections.ConfigDict) -> str:
    """The LLM's architecture as far as the config tells before loading: `llm.arch` of a random LLM, the
    `model_type` of an HF directory's config.json, "llama" for a GGUF file (slit reads Llama GGUFs)."""
    if llm.kind == "random":
        return str(llm.get("arch", "llama"))
    if llm.kind == "hf" and (pathlib.Path(llm.path) / "config.json").is_file():
        from slit.models.llm.loading import read_json

        return str(read_json(pathlib.Path(llm.path) / "config.json").get("model_type", ""))
    return "llama" if llm.kind == "gguf" else ""


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Checks everything that can be checked before loading or compiling; raises ConfigError listing
    all problems."""
    problems = harness.common_problems(config, num_devices, num_processes)
    dp = harness.data_parallel_size(config, num_devices)
    problems += accumulation.accumulation_problems(config, dp)
    if dp and config.eval.batch_size % dp:
        problems.append(
            f"eval.batch_size={config.eval.batch_size} is not divisible by the data-parallel size {dp}"
        )
    problems += pretrained.audio_problems(config)
    problems += pretrained.qformer_problems(config, text_length="max_qformer_instruction_length")
    features = config.get("features", "compute")
    if features not in ("compute", "cached"):
        problems.append(f"features={features!r}: use 'compute' (run the encoder) or 'cached'")
    elif features == "cached" and list(config.data.get("mixture", None) or []):
        problems.append("features=cached reads one dataset's cache; with data.mixture use features=compute")
    bridge = config.get("bridge", {})
    bridge_kind = bridge.get("kind", "qformer")
    if bridge_kind not in BRIDGES:
        problems.append(f"bridge.kind={bridge_kind!r}: choose one of {', '.join(BRIDGES)}")
    elif bridge_kind == "window_qformer" and int(bridge.get("window_frames", 17)) < 1:
        problems.append(f"bridge.window_frames={bridge.window_frames} must be at least 1 (encoder frames)")
    elif bridge_kind not in QFORMER_BRIDGES:
        if config.init_from:
            problems.append(
                f"init_from={config.init_from}: it copies a stage-one Q-Former, and "
                f"bridge.kind={bridge_kind} has none (stage one does not apply to it); train it from "
                "scratch (init_from='')"
            )
        if bridge_kind == "linear" and (bridge.get("num_tokens", 8) < 1 or bridge.get("hidden", 0) < 0):
            problems.append("bridge.num_tokens must be at least 1 and bridge.hidden >= 0 (0: one linear map)")
        if bridge_kind == "pengi":
            sizes = ("prefix_length", "clip_length", "mapper_layers", "mapper_heads", "projection_width")
            problems += [
                f"bridge.{key}={bridge[key]} must be at least 1"
                for key in sizes
                if key in bridge and bridge[key] < 1
            ]
            encoder, path = bridge.get("prompt_encoder", "bert"), bridge.get("prompt_encoder_path", "")
            if encoder not in ("bert", "clip"):
                problems.append(f"bridge.prompt_encoder={encoder!r}: use 'bert' or 'clip'")
            elif encoder == "clip" and not (pathlib.Path(path) / "config.json").is_file():
                problems.append(
                    "bridge.prompt_encoder=clip needs bridge.prompt_encoder_path, a CLIP checkpoint "
                    f"directory (config.json, model.safetensors, tokenizer.json); {path!r} has no config.json"
                )
            elif encoder == "clip" and not (pathlib.Path(path) / "tokenizer.json").is_file():
                problems.append(f"bridge.prompt_encoder_path={path}: no tokenizer.json (CLIP's tokenizer)")
            if not 0.0 <= bridge.get("projection_dropout", 0.5) < 1.0:
                problems.append(f"bridge.projection_dropout={bridge.projection_dropout} must be in [0, 1)")
    bridge_init = bridge.get("init", "")
    if bridge_init and not pathlib.Path(bridge_init).is_file():
        problems.append(f"bridge.init={bridge_init}: no such file (a safetensors file of bridge weights)")
    elif bridge_init and config.init_from:
        problems.append(
            f"bridge.init={bridge_init} and init_from={config.init_from} both set the bridge's weights: "
            "drop one (init_from='' to start from bridge.init, bridge.init='' to continue stage one)"
        )
    d = config.data
    for key in ("max_instruction_length", "max_answer_length"):
        if d[key] < 1:
            problems.append(f"data.{key}={d[key]} must be at least 1")
    problems.extend(tasks_lib.config_problems(config))
    llm = config.llm
    if llm.kind not in ("gguf", "hf", "random"):
        problems.append(
            f"llm.kind={llm.kind!r}: use 'gguf' (a GGUF file), 'hf' (a checkpoint directory) or 'random' "
            "(an untrained llm.arch of the llm group's sizes)"
        )
    elif llm.kind == "random":
        from slit.train.random_models import random_llm_problems

        problems += random_llm_problems(llm)
    elif llm.kind == "hf" and not llm.path:
        problems.append("llm.path is empty: give the HF checkpoint directory of the frozen LLM")
    elif llm.kind == "hf" and not (pathlib.Path(llm.path) / "config.json").is_file():
        problems.append(f"llm.path={llm.path}: not a HF checkpoint directory (no config.json in it)")
    elif llm.kind == "gguf" and llm.path and not pathlib.Path(llm.path).is_file():
        problems.append(f"llm.path={llm.path}: no such GGUF file")
    quantization = llm.get("quantization", "none")
    if problem := unknown_quantization(quantization):
        problems.append(problem)
    elif quantization != "none" and llm.get("trainable", False):
        problems.append(
            f"llm.trainable=true with llm.quantization={quantization}: a quantised LLM is frozen (its "
            "weights are rounded to int8 for storage); use --config.llm.quantization=none to train it"
        )
    elif quantization != "none" and _llm_model_type(llm) == "t5":
        problems.append(
            f"llm.quantization={quantization} with a T5 LLM: slit stores Llama-family and GPT-2 layers in "
            "int8, not T5's; use --config.llm.quantization=none"
        )
    if llm.param_dtype not in ("float32", "bfloat16"):
        problems.append(f"llm.param_dtype={llm.param_dtype!r}: use 'float32' or 'bfloat16'")
    elif llm.get("trainable", False) and llm.param_dtype != "float32":
        problems.append(
            f"llm.trainable=true with llm.param_dtype={llm.param_dtype}: Adam's updates vanish in 16-bit "
            "weights; train the LLM in float32 (--config.llm.param_dtype=float32)"
        )
    if llm.remat_policy not in REMAT_POLICIES:
        problems.append(f"llm.remat_policy={llm.remat_policy!r}: use one of {', '.join(REMAT_POLICIES)}")
    if config.get("loss_average", "tokens") not in LOSS_AVERAGES:
        problems.append(f"loss_average={config.loss_average!r}: use one of {', '.join(LOSS_AVERAGES)}")
    e = config.eval
    if e.num_beams < 1 or e.max_new_tokens < 1 or e.batch_size < 1:
        problems.append("eval.num_beams, eval.max_new_tokens and eval.batch_size must be at least 1")
    if e.max_clips < 0:
        problems.append(f"eval.max_clips={e.max_clips} must be >= 0 (0: the whole split)")
    try:
        from slit.eval.captioning import _normalise_metrics

        _normalise_metrics(e.caption_metrics)
    except UserError as err:
        problems.append(f"eval.caption_metrics: {err}")
    if problems:
        raise config_lib.ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def open_training_data(
    config: ml_collections.ConfigDict,
) -> list[tuple[tasks_lib.DatasetSpec, Sequence[dict], tasks_lib.SplitContents]]:
    """(dataset, its training split, what that split holds) for each dataset stage two trains on:
    `data.name` alone, or every dataset of `data.mixture`."""
    out = []
    for spec in tasks_lib.datasets(config.data):
        source = sources.open_split(spec.name, spec.data_dir, spec.train_split)
        out.append(
            (spec, source, tasks_lib.cached_contents(spec.name, spec.data_dir, spec.train_split, source))
        )
    return out


def with_cached_features(
    config: ml_collections.ConfigDict,
    cfg: Stage2Config,
    frozen: dict,
    training_data: list[tuple[tasks_lib.DatasetSpec, Sequence[dict], tasks_lib.SplitContents]],
) -> tuple[list, Any]:  # noqa: ANN401
    """The training split with each clip's cached frozen features (features=cached), and the opened
    cache: the one `slit cache-features` wrote for this encoder and data (the same cache stage one
    reads). Raises UserError when it is missing or stale (saying how to rebuild it)."""
    from slit.data.feature_cache import WithFeatures
    from slit.train import feature_cache as cache_lib

    ((spec, source, contents),) = training_data  # validate() refuses a mixture with features=cached
    cache = cache_lib.open_for_training(config, cfg, frozen)
    return [(spec, WithFeatures(source, cache.splits["train"]), contents)], cache


def make_tasks(
    config: ml_collections.ConfigDict,
    training_data: Sequence[tuple[tasks_lib.DatasetSpec, Sequence[dict], tasks_lib.SplitContents]]
    | None = None,
) -> tasks_lib.Mixture:
    """The instruction-tuning tasks the data can supply (captioning, question answering, classification
    over each dataset's clips that hold captions / questions / labels), weighted by `tasks.weights` (by
    name) and the datasets' weights, with `tasks.templates`. Its `notes` name weighted tasks left out."""
    training_data = open_training_data(config) if training_data is None else training_data
    try:
        return tasks_lib.build_mixture(
            training_data,
            tasks_lib.task_weights(config.tasks.weights),
            tasks_lib.templates(config.tasks.get("templates")),
        )
    except ValueError as e:
        held = "; ".join(f"{c.name}: {c.summary()}" for _, _, c in training_data)
        raise UserError(f"{e} (the data holds {held})") from None


def train_dataset(
    config: ml_collections.ConfigDict,
    encoders: Encoders,
    source: Sequence[dict] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    mixture: tasks_lib.Mixture | None = None,
) -> Any:  # noqa: ANN401 (a grain IterDataset)
    """The endless training mixture of this process: `mixture` (default: `make_tasks` over the config's
    data, with `source` as the training split of a single dataset when given).

    Batches (per process) hold audio (b, S), num_samples (b,), instruction_ids (b, Lq + Li) (the
    Q-Former and the LLM tokenizations side by side; `model_batch` splits them), target_ids (b, La)
    and task_id (b,) (the index of the row's task in `mixture.parts`).
    """
    if mixture is None:
        training_data = None
        if source is not None:
            (spec,) = tasks_lib.datasets(config.data)
            training_data = [
                (spec, source, tasks_lib.split_contents(source, f"the training split of {spec.name}"))
            ]
        mixture = make_tasks(config, training_data)
    d = config.data
    li = d.max_instruction_length
    return pipeline.mixture_dataset(
        mixture.tasks,
        mixture.sources,
        encoders.paired(li),
        audio_spec(config),
        max_instruction_length=d.max_qformer_instruction_length + li,
        max_target_length=d.max_answer_length,
        global_batch_size=config.batch_size,
        seed=config.seed,
        weights=mixture.weights,
        target_tokenizer=encoders.answer,
        process_index=process_index,
        process_count=process_count,
        worker_count=d.worker_count,
    )


def model_batch(local: dict, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A pipeline batch -> the model's inputs (`batch_keys`, numpy): audio (b, S) and num_samples (b,),
    or features (b, F, D) and frame_mask (b, F); qformer_ids (b, Lq), instruction_ids (b, Li) and
    answer_ids (b, La)."""
    lq = config.data.max_qformer_instruction_length
    paired = np.asarray(local["instruction_ids"])
    audio_keys = [k for k in batch_keys(config) if k not in TEXT_KEYS]
    return {k: np.asarray(local[k]) for k in audio_keys} | {
        "qformer_ids": paired[:, :lq],
        "instruction_ids": paired[:, lq:],
        "answer_ids": np.asarray(local["target_ids"]),
    }


def loss_and_grads(
    graphdef: Any,
    params: dict,
    frozen: dict,
    batch: dict,
    key: jax.Array,
    step: jax.Array,
    dropout: bool,
    normaliser: jax.Array | None = None,
) -> tuple[dict, dict]:
    """Gradients of the answer-token loss w.r.t. the trainable params, and the batch's metrics
    (`normaliser`: the loss's denominator, default the batch's own; slit.models.stage2.Stage2Model)."""
    dropout_key = jax.random.fold_in(key, step)

    def loss_fn(params: dict) -> tuple[jax.Array, dict]:
        model = nnx.merge(graphdef, params, frozen)
        rngs = nnx.Rngs(dropout=dropout_key) if dropout else None
        return model(Stage2Batch(**batch), rngs=rngs, normaliser=normaliser)

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
    Gradients are taken w.r.t. the trainable params only; frozen weights are a separate argument.

    accum_steps = k > 1 (`grad_accum_steps`): the gradients of k micro-batches (rows i, i + k, ... of
    the batch; slit.train.accumulation) are summed, each micro-batch's weighted token-loss sum divided
    by the *full* batch's denominator (its answer tokens for loss_average="tokens", its examples with
    an answer for "examples"), so the update is the plain full-batch step's (up to float32 summation
    order). Micro-batch i's dropout key is the plain step's with `key` replaced by
    `jax.random.fold_in(key, i)`. Metrics are the full batch's: the loss (the micro-batches' sum),
    token_accuracy (weighted by answer tokens) and answer_tokens (their sum). param_shardings: the
    accumulator's shardings (those of the params).

    activation_rules: the config's sharding rules, applied to the tower-boundary activations
    (slit.train.sharding.constrain) on `mesh` (None: jax.set_mesh's); None leaves them unconstrained.
    """

    def grads_of(params: dict, frozen: dict, batch: dict, key: jax.Array, step: jax.Array) -> tuple:
        if accum_steps == 1:
            return loss_and_grads(graphdef, params, frozen, batch, key, step, dropout)
        loss_average = nnx.merge(graphdef, params, frozen).config.loss_average  # static: the model's config
        normaliser = loss_normaliser(batch["answer_ids"], loss_average)

        def micro(micro_batch: dict, i: jax.Array) -> tuple[dict, dict]:
            micro_key = jax.random.fold_in(key, i)
            return loss_and_grads(graphdef, params, frozen, micro_batch, micro_key, step, dropout, normaliser)

        grads, metrics = accumulation.accumulate(micro, batch, accum_steps, params, param_shardings)
        tokens = metrics["answer_tokens"]
        hits = (metrics["token_accuracy"] * tokens).sum()
        return grads, dict(
            {k: v.mean(axis=0) for k, v in metrics.items()},
            loss=metrics["loss"].sum(),
            token_accuracy=hits / jnp.maximum(tokens.sum(), 1),
            answer_tokens=tokens.sum(),
        )

    def train_step(state: dict, frozen: dict, batch: dict, key: jax.Array) -> tuple[dict, dict]:
        with sharding.activation_sharding(activation_rules, mesh):
            grads, metrics = grads_of(state["params"], frozen, batch, key, state["step"])
        return apply_gradients(tx, schedule, state, grads, metrics)

    return train_step


def build_training(
    config: ml_collections.ConfigDict,
    cfg: Stage2Config,
    llm: nnx.Module,
    mesh: jax.sharding.Mesh,
    rules: dict,
) -> TrainingSetup:
    """The model around the loaded `llm` in its shardings, its sharded train state ({step, params,
    opt_state}; donated every step) and the jitted step (slit.train.harness.build_training)."""
    parts = create_model(
        cfg,
        llm,
        config.seed,
        config.audio_encoder.init_seed,
        mesh,
        rules,
        config.llm.get("match_embedding_scale", False),
        bridge_init=str(config.get("bridge", {}).get("init", "")),
    )
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


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains stage two in `workdir` (resuming from its checkpoint); returns the test eval reports
    ({"captioning": ..., "aqa": ..., "classification": ..., "skipped": {evaluation: why}}, with the
    evaluations the test split can answer), or {dataset name: those reports} for a `data.mixture`."""
    workdir = paths.workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)

    qformer_tok = make_qformer_tokenizer(config, workdir)
    llm, llm_tok, llm_source = load_llm(config.llm)
    if is_main:
        print(f"Frozen LLM: {llm_source}", file=sys.stderr)
        qformer_tok.save(workdir)
        with tempfile.TemporaryDirectory() as scratch:  # transformers writes local files only
            llm_tok.save_pretrained(scratch)
            paths.copy(scratch, workdir / LLM_TOKENIZER_DIR)
    encoders = make_encoders(config, qformer_tok, llm, llm_tok)

    # Model (frozen audio encoder, bridge, frozen LLM) and its sharded train state and jitted step.
    cfg = model_config(config, qformer_tok)
    setup = build_training(config, cfg, llm, mesh, rules)
    parts = setup.parts
    identity = checkpoint.frozen_identity(parts.frozen, frozen_sources(config, llm_source))
    if config.init_from:  # against the encoder this run starts from, frozen or trainable
        tower = (
            identity.get("audio_tower")
            or checkpoint.frozen_identity(
                {"audio_tower": setup.state["params"]["audio_tower"]},
                {"audio_tower": pretrained.audio_source(config)},
            )["audio_tower"]
        )
        check_init_from_audio_tower(config.init_from, tower, config)

    # Data: the task mixture, made from what the datasets hold; what is left out is said before step 1.
    spec = audio_spec(config)
    if jax.process_count() > 1:
        if is_main:
            open_training_data(config)
        multihost_utils.sync_global_devices("slit: dataset ready")
    training_data = open_training_data(config)
    eval_sets, validation_sets, data_notes = evaluation_sets(config, training_data)
    unknown_words = tasks_lib.unknown_token_note(qformer_tok, training_data)
    data_notes += [unknown_words] if unknown_words else []
    cached = config.get("features", "compute") == "cached"
    if cached:  # the frozen encoder's outputs from `slit cache-features` (refused if missing or stale)
        training_data, cache = with_cached_features(config, cfg, parts.frozen, training_data)
        data_notes.append(f"reading frozen features from {cache.directory} (evaluations run the encoder)")
    mixture = make_tasks(config, training_data)
    if is_main:
        print(describe_data(training_data, mixture, data_notes), file=sys.stderr)
    d = config.data
    lq, li = d.max_qformer_instruction_length, d.max_instruction_length
    train_data = train_dataset(
        config, encoders, None, jax.process_index(), jax.process_count(), mixture=mixture
    )
    train_iter = iter(train_data)

    # Where the run starts: this workdir / resume_from / init_from a stage-one run / fresh.
    ckpt = checkpoint.Checkpointer(workdir, config, identity)
    start = resolve_start(ckpt, config, setup.state, setup.state_shardings, train_iter, qformer_tok)
    writer = MetricWriter(workdir)
    if start.step == 0:
        writer.write(0, harness.parameter_scalars(setup.state["params"], setup.parts.frozen))
    b = config.batch_size
    global_shapes = {
        "audio": (b, spec.max_samples),
        "num_samples": (b,),
        "qformer_ids": (b, lq),
        "instruction_ids": (b, li),
        "answer_ids": (b, d.max_answer_length),
    }
    if cached:
        features = cache.splits["train"]
        global_shapes |= {
            "features": (b, features.frames, features.width),
            "frame_mask": (b, features.frames),
        }
    answerer = Answerer(parts.graphdef, parts.frozen, encoders, config, llm_tok)

    def evaluate(step: int, state: dict, should_stop: Callable[[], bool]) -> dict | None:
        logged = {}
        for dataset, split in validation_sets:
            reports = evaluate_split(
                config, answerer, state["params"], spec, split, config.eval.max_clips, should_stop, dataset
            )
            if reports is None:
                return None
            prefix = "validation" if len(eval_sets) == 1 else f"validation/{dataset.name}"
            if is_main:
                tqdm.write(f"step {step}: {headline(reports, f'{prefix} ')}")
            logged |= evals.scalars(prefix, reports)
        return logged

    fns = loop.StepFunctions(
        step=setup.step_fn,
        frozen=parts.frozen,
        next_batch=harness.global_batches(
            train_iter, setup.batch_shardings, global_shapes, lambda local: model_batch(local, config)
        ),
        key=jax.random.key(config.seed),
        evaluate=evaluate if validation_sets else None,
        postfix=("loss", "token_accuracy"),
    )

    def evaluate_test(state: dict, should_stop: Callable[[], bool]) -> dict | None:
        all_reports = {}
        for dataset, split in eval_sets:
            reports = evaluate_split(
                config, answerer, state["params"], spec, split, config.eval.max_clips, should_stop, dataset
            )
            if reports is None:
                return None
            all_reports[dataset.name] = reports
        return all_reports

    all_reports = harness.train_then_evaluate(
        config, workdir, mesh, start, fns, ckpt, writer, train_iter, evaluate_test
    )
    single = len(eval_sets) == 1
    for name, reports in all_reports.items():
        writer.write(config.total_steps, evals.scalars("test" if single else f"test/{name}", reports))
    writer.close()
    if is_main:
        for (dataset, split), reports in zip(eval_sets, all_reports.values(), strict=True):
            write_reports(workdir, config, reports, int(config.total_steps), dataset.name, split)
    return next(iter(all_reports.values()), {}) if single else all_reports


def describe_data(
    training_data: Sequence[tuple[tasks_lib.DatasetSpec, Sequence[dict], tasks_lib.SplitContents]],
    mixture: tasks_lib.Mixture,
    notes: Sequence[str],
) -> str:
    """What the training data holds, the tasks made from it, and every note (printed before step 1)."""
    lines = [f"Data: {contents.name}: {contents.summary()}" for _, _, contents in training_data]
    lines.append("Tasks (clips that hold the task's field, mixing weight):")
    lines.append(mixture.describe())
    lines += [f"note: {n}" for n in (*mixture.notes, *notes)]
    return "\n".join(lines)
