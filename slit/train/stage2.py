"""Stage-two trainer: the Q-Former's outputs become a soft prompt for a frozen LLM, instruction-tuned.

Read top to bottom: config checks; the multi-task data (captioning, question answering, classification,
made from what the datasets hold and mixed with configurable weights); the step and the training setup
(the model of slit/train/stage2_model.py around the frozen LLM, through the shared harness); where a run
starts (its own checkpoint, resume_from, or the Q-Former of a stage-one run via `init_from`); then
`train`: the shared step loop (slit/train/loop.py) and, after it, captioning (CIDEr-D and the other
caption metrics), question answering (accuracy, with the majority-answer baselines next to it) and
zero-shot classification, each where the held-out test clips hold its field (the others are named as
skipped), written as eval reports (slit/eval/stage2.py:
`<workdir>/eval/{captioning,aqa,classification}-<data>-test.{json,md,png}`).

    slit train --config configs/stage2_synthetic.py --workdir runs/stage2 \\
        --config.init_from=runs/stage1_synthetic

A trained run is opened for `slit eval`, `slit generate` and `slit export` by slit.runs (`load_trained`).
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from slit import config as config_lib
from slit.data import pipeline, sources
from slit.data import tasks as tasks_lib
from slit.data.tokenizer import TextTokenizer
from slit.errors import UserError
from slit.eval import stage2 as evals
from slit.eval.stage2 import evaluate_split, evaluation_sets, headline, write_reports
from slit.generate.answerer import Answerer
from slit.models.bridges import BRIDGES
from slit.models.stage2 import LOSS_AVERAGES, REMAT_POLICIES, Stage2Batch, Stage2Config
from slit.train import checkpoint, harness, loop, pretrained, sharding
from slit.train.harness import TrainingSetup
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
WORD_EMBEDDINGS = "bridge/qformer/word_embeddings/embedding"
STAGE_ONE_QFORMER = "qformer/"  # where a stage-one run keeps its Q-Former; a Q-Former bridge's is under
BRIDGE_QFORMER = "bridge/qformer/"  # the bridge


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Checks everything that can be checked before loading or compiling; raises ConfigError listing
    all problems."""
    problems = []
    try:
        shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
        sizes = dict(zip(sharding.MESH_AXES, shape, strict=True))
        batch_target = sharding.rules_dict(config.sharding_rules).get("batch")
        axes = (batch_target,) if isinstance(batch_target, str) else tuple(batch_target or ())
        dp = int(np.prod([sizes.get(a, 1) for a in axes]))
        if config.batch_size % dp:
            problems.append(f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp}")
        if config.eval.batch_size % dp:
            problems.append(
                f"eval.batch_size={config.eval.batch_size} is not divisible by the data-parallel size {dp}"
            )
    except ValueError as e:
        problems.append(str(e))
    if config.batch_size % num_processes:
        problems.append(f"batch_size={config.batch_size} is not divisible by {num_processes} processes")
    for key in ("total_steps", "log_every_steps", "batch_size"):
        if config[key] <= 0:
            problems.append(f"{key}={config[key]} must be positive")
    for key in ("eval_every_steps", "checkpoint_every_steps", "checkpoint_keep_period"):
        if config[key] < 0:
            problems.append(f"{key}={config[key]} must be >= 0 (0 turns it off)")
    if config.resume_from and config.init_from:
        problems.append("resume_from and init_from are both set; a run starts from one of them")
    if config.init_from and not pathlib.Path(config.init_from).exists():
        problems.append(
            f"init_from={config.init_from}: no such workdir or checkpoint (give a stage-one workdir)"
        )
    if config.resume_from and not pathlib.Path(config.resume_from).exists():
        problems.append(f"resume_from={config.resume_from}: no such workdir or checkpoint")
    opt = config.optimizer
    if not 0 <= opt.warmup_steps <= config.total_steps:
        problems.append(f"optimizer.warmup_steps={opt.warmup_steps} must be within [0, total_steps]")
    if opt.learning_rate <= 0 or not 0 <= opt.min_learning_rate <= opt.learning_rate:
        problems.append("optimizer: need learning_rate > 0 and 0 <= min_learning_rate <= learning_rate")
    problems += pretrained.audio_problems(config)
    problems += pretrained.qformer_problems(config, text_length="max_qformer_instruction_length")
    features = config.get("features", "compute")
    if features not in ("compute", "cached"):
        problems.append(f"features={features!r}: use 'compute' (run the encoder) or 'cached'")
    elif features == "cached" and list(config.data.get("mixture", None) or []):
        problems.append("features=cached reads one dataset's cache; with data.mixture use features=compute")
    bridge_kind = config.get("bridge", {}).get("kind", "qformer")
    if bridge_kind not in BRIDGES:
        problems.append(f"bridge.kind={bridge_kind!r}: choose one of {', '.join(BRIDGES)}")
    d = config.data
    for key in ("max_instruction_length", "max_answer_length"):
        if d[key] < 1:
            problems.append(f"data.{key}={d[key]} must be at least 1")
    problems.extend(tasks_lib.config_problems(config))
    llm = config.llm
    if llm.kind not in ("gguf", "hf"):
        problems.append(f"llm.kind={llm.kind!r}: use 'gguf' (a GGUF file) or 'hf' (a checkpoint directory)")
    elif llm.kind == "hf" and not llm.path:
        problems.append("llm.path is empty: give the HF checkpoint directory of the frozen LLM")
    elif llm.kind == "hf" and not (pathlib.Path(llm.path) / "config.json").is_file():
        problems.append(f"llm.path={llm.path}: not a HF checkpoint directory (no config.json in it)")
    elif llm.kind == "gguf" and llm.path and not pathlib.Path(llm.path).is_file():
        problems.append(f"llm.path={llm.path}: no such GGUF file")
    if llm.param_dtype not in ("float32", "bfloat16"):
        problems.append(f"llm.param_dtype={llm.param_dtype!r}: use 'float32' or 'bfloat16'")
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
    if spec.train_split != "train":
        raise UserError(
            f"features=cached reads the cache's train split; data.train_split={spec.train_split!r} is not "
            "cached (use features=compute)"
        )
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


def make_train_step(
    graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, dropout: bool
) -> Callable[[dict, dict, dict, jax.Array], tuple[dict, dict]]:
    """The pure train step: (state, frozen, batch, key) -> (state, metrics). Gradients are taken
    w.r.t. the trainable params only; frozen weights are a separate argument."""

    def train_step(state: dict, frozen: dict, batch: dict, key: jax.Array) -> tuple[dict, dict]:
        dropout_key = jax.random.fold_in(key, state["step"])

        def loss_fn(params: dict) -> tuple[jax.Array, dict]:
            model = nnx.merge(graphdef, params, frozen)
            rngs = nnx.Rngs(dropout=dropout_key) if dropout else None
            return model(Stage2Batch(**batch), rngs=rngs)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
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
    )
    step = functools.partial(make_train_step, dropout=config.qformer.dropout > 0)
    ranks = {k: BATCH_RANKS[k] for k in batch_keys(config)}
    return harness.build_training(config, parts, mesh, rules, ranks, step, model_config=cfg)


def check_init_from_audio_tower(path: str, identity: dict, config: ml_collections.ConfigDict) -> None:
    """Refuses a stage-one checkpoint whose Q-Former learned against another frozen audio encoder: other
    weights (fingerprint), or the same weights read at another hidden layer or in other windows."""
    directory, step = checkpoint.locate(path)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if not steps:
        raise UserError(f"init_from={path}: {directory} holds no checkpoint")
    meta_file = directory / str(step if step is not None else steps[-1]) / "metadata" / "metadata"
    if not meta_file.is_file():
        return
    meta = json.loads(meta_file.read_text())
    saved = meta.get("frozen_models", {}).get("audio_tower")
    if saved and saved["fingerprint"] != identity["audio_tower"]["fingerprint"]:
        raise UserError(
            f"init_from={path}: its Q-Former was trained against another audio tower ({saved['source']}, "
            f"fingerprint {saved['fingerprint']}); this run builds {identity['audio_tower']['source']} "
            f"(fingerprint {identity['audio_tower']['fingerprint']}). Use stage one's audio_encoder settings."
        )
    if not meta.get("config"):
        return
    theirs = pretrained.audio_settings(ml_collections.ConfigDict(meta["config"]))
    ours = pretrained.audio_settings(config)
    differ = [
        f"audio_encoder.{field}={_setting(ours, field)} here, {_setting(theirs, field)} in stage one"
        for field in ("hidden_layer", "window_seconds")
        if _setting(ours, field) != _setting(theirs, field)
    ]
    if differ:
        raise UserError(
            f"init_from={path}: its Q-Former read other features of the same encoder: "
            + "; ".join(differ)
            + ". Use stage one's values."
        )


def _setting(settings: pretrained.AudioSettings, field: str) -> object:
    value = getattr(settings, field)
    return -1 if field == "hidden_layer" and value is None else value


def read_params(path: str | pathlib.Path) -> tuple[dict, pathlib.Path, int]:
    """The trainable params of a checkpoint (a workdir, its checkpoints/, or checkpoints/<step>; newest
    step by default) as host numpy arrays: (params, checkpoints directory, step)."""
    directory, step = checkpoint.locate(path)
    manager = checkpoint.read_only_manager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{path}: {directory} holds no checkpoint")
        state = checkpoint.read_on_host(manager, step)["state"]
    finally:
        manager.close()
    return state["params"], directory, int(step)


def remap_word_embeddings(
    table_vd: np.ndarray, source_vocab: dict[str, int], target_vocab: dict[str, int], init_vd: np.ndarray
) -> tuple[np.ndarray, int]:
    """Stage one's word-embedding rows (Vs, D) moved to this run's token ids: row target_vocab[w] takes
    table_vd[source_vocab[w]] for every word w in both; the other rows keep `init_vd` (Vt, D).
    Returns (the (Vt, D) table, how many rows were copied)."""
    out = np.array(init_vd, copy=True)
    shared = [(target_vocab[w], i) for w, i in source_vocab.items() if w in target_vocab]
    if shared:
        rows_t, rows_s = map(np.asarray, zip(*shared, strict=True))
        out[rows_t] = np.asarray(table_vd, dtype=out.dtype)[rows_s]
    return out, len(shared)


def init_from_stage_one(
    path: str, state: dict, shardings: dict, tokenizer: TextTokenizer
) -> checkpoint.Start:
    """Copies the Q-Former of a stage-one run (`init_from`) into a fresh stage-two state.

    Stage one's `qformer/...` weights become the Q-Former bridge's `bridge/qformer/...`; weights with
    the same name and shape are copied (a stage-two checkpoint's bridge too); the word-embedding table
    is copied row by row by token (when the stage-one run's tokenizer.json is there), so stage two may
    read a larger vocabulary (instruction words) than stage one did. The projection to the LLM starts
    fresh. Optimizer state and step start from zero.
    """
    source, directory, step = read_params(path)
    source = {
        _bridge_name(checkpoint.path_name(p)): v for p, v in jax.tree_util.tree_flatten_with_path(source)[0]
    }
    run_dir = _run_directory(directory)
    host_params = jax.device_get(state["params"])
    flat_target = {
        checkpoint.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(host_params)[0]
    }
    note = ""
    if WORD_EMBEDDINGS in source and WORD_EMBEDDINGS in flat_target and run_dir is not None:
        source_tok_file = run_dir / "tokenizer.json"
        if source_tok_file.is_file():
            source_vocab = TextTokenizer.from_directory(run_dir).tokenizer.get_vocab(with_added_tokens=True)
            target_vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
            if source_vocab != target_vocab:
                table, copied_rows = remap_word_embeddings(
                    source[WORD_EMBEDDINGS], source_vocab, target_vocab, flat_target[WORD_EMBEDDINGS]
                )
                source[WORD_EMBEDDINGS] = table
                note = (
                    f"; word embeddings: {copied_rows} of {len(target_vocab)} tokens copied by word, "
                    f"{len(target_vocab) - copied_rows} new"
                )
    params, copied, fresh, mismatched = checkpoint.merge_matching(host_params, source)
    if mismatched:
        raise UserError(
            f"init_from={path}: these weights exist in both but differ in shape (checkpoint vs this run):\n"
            "  - " + "\n  - ".join(mismatched) + "\nUse stage one's qformer settings in this config."
        )
    if not any(name.startswith(BRIDGE_QFORMER) for name in copied):
        raise UserError(f"init_from={path}: no Q-Former weight of the checkpoint matches this model by name")
    params = jax.device_put(params, shardings["params"])
    fresh_groups = sorted({"/".join(name.split("/")[:2]) for name in fresh})
    if jax.process_index() == 0:
        print(
            f"Initialised {len(copied)} weights from {directory / str(step)}{note}; fresh: "
            f"{', '.join(fresh_groups) or 'none'}.",
            file=sys.stderr,
        )
    return checkpoint.Start(dict(state, params=params), 0, f"init_from {directory / str(step)}")


def _bridge_name(name: str) -> str:
    """A stage-one weight's name as the Q-Former bridge holds it (other names unchanged)."""
    return "bridge/" + name if name.startswith(STAGE_ONE_QFORMER) else name


def _run_directory(path: pathlib.Path) -> pathlib.Path | None:
    """The workdir that holds a checkpoint path (a workdir, its checkpoints/, or checkpoints/<step>)."""
    path = path.absolute()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / checkpoint.CHECKPOINTS).is_dir():
            return candidate
    return None


def resolve_start(
    ckpt: checkpoint.Checkpointer,
    config: ml_collections.ConfigDict,
    state: dict,
    shardings: dict,
    data_iter: Any,  # noqa: ANN401
    tokenizer: TextTokenizer,
) -> checkpoint.Start:
    """Stage one's precedence (this workdir's checkpoint, resume_from, init_from, fresh), with init_from
    done by `init_from_stage_one` (word embeddings remapped by token)."""
    if not config.init_from:
        return ckpt.resolve_start(state, shardings, data_iter)
    without_init = ml_collections.ConfigDict(config.to_dict())
    without_init.init_from = ""
    ckpt.config = without_init
    try:
        start = ckpt.resolve_start(state, shardings, data_iter)
    finally:
        ckpt.config = config  # checkpoints record the run's real config
    if start.origin != "fresh start":
        return start
    return init_from_stage_one(config.init_from, start.state, shardings, tokenizer)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains stage two in `workdir` (resuming from its checkpoint); returns the test eval reports
    ({"captioning": ..., "aqa": ..., "classification": ..., "skipped": {evaluation: why}}, with the
    evaluations the test split can answer), or {dataset name: those reports} for a `data.mixture`."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)

    qformer_tok = make_qformer_tokenizer(config, workdir)
    llm, llm_tok, llm_source = load_llm(config.llm)
    if is_main:
        qformer_tok.save(workdir)
        llm_tok.save_pretrained(str(workdir / LLM_TOKENIZER_DIR))
    encoders = make_encoders(config, qformer_tok, llm, llm_tok)

    # Model (frozen audio encoder, bridge, frozen LLM) and its sharded train state and jitted step.
    cfg = model_config(config, qformer_tok)
    setup = build_training(config, cfg, llm, mesh, rules)
    parts = setup.parts
    identity = checkpoint.frozen_identity(parts.frozen, frozen_sources(config, llm_source))
    if config.init_from:
        check_init_from_audio_tower(config.init_from, identity, config)

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
