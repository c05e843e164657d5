"""Hand a trained run to others: `slit export --workdir DIR --format F --out OUT` (stage one or two).

Formats:
- `safetensors`: the trainable weights (`model.safetensors`, names like `qformer.layers.0.ffn...`),
  `config.json` (the model's hyperparameters), the tokenizer(s), and a model card (`README.md`) with
  what it is, what it was trained on, the workdir's evaluation results, and how to load it.
- `bundle`: everything `load_bundle` needs to rebuild the model without the training config:
  the weights, the model-defining config groups, the tokenizer(s), and references to the frozen models
  (their source and content fingerprint, checked on load). Stage two's frozen LLM is not copied: it is
  loaded from its recorded source (or `load_bundle(..., llm_path=...)`) and checked by fingerprint.
- `hf-blip2`: a directory that `transformers` loads (slit/interop/hf_convert.py). Stage one: a
  `Blip2ForImageTextRetrieval` (Q-Former with retrieval heads). Stage two: the Q-Former, query tokens and
  `language_projection` of a `InstructBlipForConditionalGeneration` (instruction in the Q-Former) or
  `Blip2ForConditionalGeneration` (queries only); the frozen LLM's and image tower's weights are not
  written.

The run is read by `slit.runs.load_run`. The export is written into a hidden directory next to `OUT`
and renamed to `OUT` when complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

import slit
from slit import paths, runs
from slit.data import tasks as tasks_lib
from slit.errors import UserError, some_names
from slit.train import checkpoint

FORMATS = ("safetensors", "bundle", "hf-blip2")
# What rebuilding each stage's model needs (besides DATA_KEYS of `data`): whole config groups, then
# top-level values. OPTIONAL_GROUPS are copied where the config has them.
MODEL_GROUPS = {
    "stage1": ("audio_encoder", "qformer", "loss", "tokenizer"),
    "stage2": ("audio_encoder", "qformer", "tokenizer", "llm", "eval"),
}
OPTIONAL_GROUPS = ("bridge",)
TOP_LEVEL_KEYS = {
    "stage1": ("trainer", "compute_dtype"),
    "stage2": ("trainer", "seed", "loss_average", "compute_dtype"),
}
DATA_KEYS = ("sample_rate",)  # and every data.max_* (clip length, text and instruction lengths)
LLM_TOKENIZER_DIR = runs.LLM_TOKENIZER_DIR

TrainedRun = runs.Run  # the name this module used before slit.runs


class Bundle(NamedTuple):
    """What `load_bundle` returns; unpacks as (model, tokenizer, info)."""

    model: Any  # stage one: a Stage1Model; stage two: a slit.runs.TrainedRun (`.answer` generates)
    tokenizer: Any  # the Q-Former's TextTokenizer
    info: dict  # the bundle's config.json


def read_run(workdir: str | pathlib.Path, step: int | None = None) -> runs.Run:
    """A workdir's checkpoint (newest unless `step`) read on the host: `slit.runs.load_run`."""
    return runs.load_run(workdir, step)


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a": {"b": {0: x}}} -> {"a.b.0": x}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = np.asarray(value)
    return out


def unflatten(flat: dict[str, np.ndarray], like: dict) -> dict:
    """The inverse of `flatten`, with `like`'s key types (ints stay ints); every name must be used."""
    missing = []

    def fill(node: dict, prefix: str) -> dict:
        result = {}
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                result[key] = fill(value, name + ".")
            elif name in flat:
                result[key] = flat[name]
            else:
                missing.append(name)
        return result

    out = fill(like, "")
    unexpected = sorted(set(flat) - set(flatten(like)))
    if missing or unexpected:
        raise UserError(
            "the weights do not fit the model:"
            + (f"\n  missing: {some_names(missing)}" if missing else "")
            + (f"\n  unexpected: {some_names(unexpected)}" if unexpected else "")
        )
    return out


def int_keys(tree: dict) -> dict:
    """A nested dict with digit-string keys (as checkpoints store list indices) turned into ints."""
    return {
        (int(k) if isinstance(k, str) and k.isdigit() else k): (int_keys(v) if isinstance(v, dict) else v)
        for k, v in tree.items()
    }


def model_config_dict(config: ml_collections.ConfigDict) -> dict:
    """The part of a training config that defines the model (no optimizer, data paths or mesh)."""
    stage = config.get("trainer", "stage1")
    out = {group: config[group].to_dict() for group in MODEL_GROUPS[stage]}
    out |= {group: config[group].to_dict() for group in OPTIONAL_GROUPS if group in config}
    out |= {key: config[key] for key in TOP_LEVEL_KEYS[stage] if key in config}
    out["trainer"] = stage
    out["data"] = {k: v for k, v in config.data.items() if k in DATA_KEYS or k.startswith("max_")}
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def export(
    workdir: str | pathlib.Path, fmt: str, out: str | pathlib.Path, step: int | None = None
) -> pathlib.Path | epath.Path:
    """Writes `fmt` for checkpoint `step` (default: the newest) of a stage-one or stage-two workdir to the
    directory `out` (created; refused if it exists and is not empty). Returns `out`. Either may be a URI
    (gs://): an export to one is written locally first, then copied there.

    Raises UserError for an unknown format, a non-empty `out`, or a workdir that is not a run with a
    checkpoint and its tokenizer(s)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not a format; choose one of {', '.join(FORMATS)}")
    out = paths.workdir_path(out) if paths.is_remote(out) else pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new (or empty) directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; give a new (or empty) directory")
    run = runs.load_run(workdir, step)
    missing = [
        name
        for name, path in (
            ("tokenizer.json", run.qformer_tokenizer),
            (f"{LLM_TOKENIZER_DIR}/", run.llm_tokenizer),
        )
        if path is None and (name == "tokenizer.json" or run.stage == "stage2")
    ]
    if missing:
        raise UserError(f"{run.workdir} lacks {' and '.join(missing)}; was it written by `slit train`?")
    if paths.is_remote(out):  # written here, then copied up (the run read once)
        with tempfile.TemporaryDirectory(prefix="slit-export-") as scratch:
            _write(run, fmt, pathlib.Path(scratch))
            paths.copy(scratch, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write(run, fmt, staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _write(run: runs.Run, fmt: str, directory: pathlib.Path) -> None:
    """The export of `fmt` into the (empty, local) `directory`."""
    if fmt == "hf-blip2":
        export_hf_blip2(run, directory)
    else:
        write_weights(run, fmt, directory)


def write_weights(run: runs.Run, fmt: str, out: pathlib.Path) -> None:
    """`safetensors` or `bundle` into `out`: model.safetensors, config.json, tokenizer(s) (+ README.md)."""
    from safetensors.numpy import save_file

    save_file(
        flatten(run.params),
        str(out / "model.safetensors"),
        metadata={"format": "slit", "step": str(run.step), "stage": run.stage},
    )
    info = {
        "slit_version": slit.__version__,
        "format": fmt,
        "stage": run.stage,
        "step": run.step,
        "model": model_config_dict(run.config),
        "frozen_models": run.frozen_models,
        "trained_on": run.config.data.name,
    }
    (out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    copy_tokenizers(run, out)
    if fmt == "safetensors":
        card = model_card(run, info) if run.stage == "stage1" else stage2_model_card(run, info)
        (out / "README.md").write_text(card)


def copy_tokenizers(run: runs.Run, out: pathlib.Path) -> None:
    """The Q-Former's tokenizer.json and (stage two) the LLM's tokenizer directory."""
    paths.copy(run.qformer_tokenizer, out / runs.QFORMER_TOKENIZER)
    clip_config = run.workdir / "tokenizer_config.json"  # a CLIP prompt tokenizer's (Pengi)
    if clip_config.is_file():
        paths.copy(clip_config, out / clip_config.name)
    if run.stage == "stage2":
        paths.copy(run.llm_tokenizer, out / LLM_TOKENIZER_DIR)


def typed_params(run: runs.Run) -> tuple[dict, Any]:
    """A stage-one run's params with the model's own key types (list indices as ints), and its
    Stage1Config; raises UserError when the weights do not fit the model the config builds."""
    from slit.data.tokenizer import TextTokenizer
    from slit.models.stage1 import Stage1Model
    from slit.train import stage1_model

    cfg = stage1_model.model_config(run.config, TextTokenizer.from_directory(run.workdir))
    abstract = nnx.eval_shape(lambda: Stage1Model(cfg, rngs=nnx.Rngs(0)))
    like = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return unflatten(flatten(run.params), like), cfg


def export_hf_blip2(run: runs.Run, out: pathlib.Path) -> None:
    """Stage one: `Blip2ForImageTextRetrieval` layout (query tokens, text embeddings, Q-Former,
    projections, ITM head). Stage two: the Q-Former, query tokens and `language_projection` of
    `InstructBlipForConditionalGeneration` (the run puts the instruction into the Q-Former) or
    `Blip2ForConditionalGeneration`, with the frozen LLM's config as `text_config`. Plus the tokenizer(s).
    """
    from slit.interop import hf_convert

    trained = _trained_components(run.config)
    if trained:
        raise UserError(
            f"--format hf-blip2 writes the Q-Former only, and {run.workdir} also trained its "
            f"{' and '.join(trained)} (their weights would be lost): use safetensors or bundle"
        )

    if run.stage == "stage1":
        params, cfg = typed_params(run)
        hf_convert.export_qformer(out, params, cfg.qformer, layout="blip2-retrieval", embed_dim=cfg.embed_dim)
        copy_tokenizers(run, out)
        return
    from slit.data.text_encoders import llm_prompt_text
    from slit.data.tokenizer import load_text_tokenizer
    from slit.train import stage2_model

    bridge = run.config.get("bridge", {}).get("kind", "qformer")
    if bridge != "qformer":
        raise UserError(
            f"--format hf-blip2 writes a Q-Former; {run.workdir}'s bridge is {bridge!r}: use safetensors "
            "or bundle"
        )
    cfg = stage2_model.model_config(run.config, load_text_tokenizer(run.workdir))
    params = int_keys(run.params)
    layout = "instructblip-generation" if cfg.bridge.instruction_in_qformer else "blip2-generation"
    hf_convert.export_blip2_generation(
        out,
        params["bridge"]["qformer"],
        params["bridge"]["projection"],
        cfg.bridge.qformer,
        layout=layout,
        text_config=llm_text_config(run.config.llm),
        extra={
            "slit": {
                "stage": "stage2",
                "step": run.step,
                "frozen_models": run.frozen_models,
                # "int8": the Q-Former was trained against the LLM's layers rounded to int8 per output
                # channel (slit.models.llm.quantize), while text_config describes the float model
                "llm_quantization": run.config.llm.get("quantization", "none"),
                "llm_prompt": llm_prompt_text("{instruction}"),
                "trained_on": run.config.data.name,
            }
        },
    )
    copy_tokenizers(run, out)


def llm_text_config(llm: ml_collections.ConfigDict) -> dict:
    """The frozen LLM's transformers config as a dict (the `text_config` of a BLIP-2 export): its HF
    checkpoint's config.json, or for a GGUF file a Llama config from the file's metadata (a random LLM:
    its arch's config, slit.train.random_models)."""
    if llm.kind == "random":
        from slit.train.random_models import random_llm_hf_config

        return random_llm_hf_config(llm)
    if llm.kind == "hf":
        path = pathlib.Path(llm.path) / "config.json"
        if not path.is_file():
            raise UserError(
                f"llm.path={llm.path}: no config.json there; --format hf-blip2 needs the frozen LLM's config"
            )
        return json.loads(path.read_text())
    from slit.models.llm import gguf

    path = pathlib.Path(llm.path) if llm.path else gguf.smollm2_gguf_path()
    if not path.is_file():
        raise UserError(
            f"llm.path={path}: no such GGUF file; --format hf-blip2 needs the frozen LLM's config"
        )
    c = gguf.llama_config_from_gguf(gguf.read_gguf(path))
    rope: dict[str, Any] = {"rope_type": c.rope.kind, "rope_theta": c.rope.theta}
    if c.rope.kind == "linear":
        rope["factor"] = c.rope.factor
    return {
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": float(f"{c.rms_norm_eps:.7g}"),  # read as float32 from the file
        "rope_theta": c.rope.theta,
        "rope_parameters": rope,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.token_ids.bos,
        "eos_token_id": list(c.token_ids.eos) or None,
        "pad_token_id": c.token_ids.pad,
        "hidden_act": "silu",
    }


# --------------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------------


def _results(run: runs.Run) -> list[str]:
    """The workdir's evaluation tables (eval/*.md, written by slit.eval.reports), as card lines."""
    lines = ["## Results", ""]
    tables = sorted((run.workdir / "eval").glob("*.md")) if (run.workdir / "eval").is_dir() else []
    if not tables:
        lines += ["No evaluation report in the workdir.", ""]
    for path in tables:
        text = path.read_text().strip()
        lines += ["### " + text.removeprefix("# ") if text.startswith("# ") else text, ""]
    return lines


def _frozen_lines(info: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The frozen models with their fingerprints, then the pretrained components the run trained too."""
    lines = [
        f"- Frozen `{name}`: {frozen['source']} (fingerprint `{frozen['fingerprint']}`)."
        for name, frozen in info["frozen_models"].items()
    ]
    what = {"audio_tower": f"the {config.audio_encoder.kind} audio encoder", "llm": "the LLM"}
    return lines + [
        f"- Trained too, from where it started (in this file as `{name}.*`): {what[name]}."
        for name in _trained_components(config)
    ]


def _trained_components(config: ml_collections.ConfigDict) -> list[str]:
    """The pretrained components the run trained too ("audio_tower", "llm"), by their config fields."""
    return [
        name
        for name, group in (("audio_tower", "audio_encoder"), ("llm", "llm"))
        if config.get(group, {}).get("trainable", False)
    ]


def _stored_line(trained_parts: str, config: ml_collections.ConfigDict) -> str:
    """What `model.safetensors` holds, for a stage-two card."""
    trained = _trained_components(config)
    if not trained:
        return (
            f"Only {trained_parts} in `model.safetensors`; the frozen audio encoder and LLM are named above "
            "with content fingerprints."
        )
    held = [what for name, what in (("audio_tower", "audio encoder"), ("llm", "LLM")) if name not in trained]
    return f"`model.safetensors` holds the bridge and the trained {' and '.join(trained)} weights" + (
        f"; the frozen {' and '.join(held)} are named above with content fingerprints." if held else "."
    )


def _encoder_held(config: ml_collections.ConfigDict) -> str:
    """'frozen' or 'fine-tuned': how the run held its audio encoder (`audio_encoder.trainable`)."""
    return "fine-tuned" if config.audio_encoder.get("trainable", False) else "frozen"


def qformer_description(qformer: dict, cross_attention_freq: int) -> str:
    """'N layers, width W, Q queries, cross-attention every K layers', read off the Q-Former's weights
    (a BERT-initialised Q-Former takes BERT's sizes, not the config group's)."""
    queries, width = np.shape(qformer["query_tokens"])[-2:]
    return (
        f"{len(qformer['layers'])} layers, width {width}, {queries} queries, cross-attention every "
        f"{cross_attention_freq} layers"
    )


def model_card(run: runs.Run, info: dict) -> str:
    """A stage-one README.md: what it is, its data, its numbers, how to load it."""
    q, a = run.config.qformer, run.config.audio_encoder
    lines = [
        "# slit stage-one Q-Former",
        "",
        f"A BLIP-2 Q-Former ({qformer_description(run.params['qformer'], q.cross_attention_freq)}) "
        f"trained by slit {slit.__version__} "
        f"for {run.step} steps against a {_encoder_held(run.config)} {a.kind} audio encoder, with "
        "audio-text contrastive, "
        "matching and grounded-generation losses.",
        "",
        f"- Trained on: `{run.config.data.name}` (batch {run.config.batch_size}, "
        f"learning rate {run.config.optimizer.learning_rate}).",
        *_frozen_lines(info, run.config),
        "",
        *_results(run),
        "## Loading",
        "",
        "```python",
        "from safetensors.numpy import load_file",
        'weights = load_file("model.safetensors")  # names like qformer.layers.0.self_attention.query.kernel',
        "```",
        "",
        "`config.json` holds the hyperparameters (`model`) and the frozen models' identities.",
        "Dense kernels are stored (in, out). `slit export --format bundle` writes the same weights",
        "in a form `slit.export.load_bundle` rebuilds into a model; `--format hf-blip2` writes a",
        "directory `transformers` loads.",
        "",
    ]
    return "\n".join(lines)


def stage2_model_card(run: runs.Run, info: dict) -> str:
    """A stage-two README.md: the Q-Former and projection, into which frozen LLM, whether the instruction
    enters the Q-Former, the data, the workdir's eval results, and how to load it."""
    from slit.data.text_encoders import llm_prompt_text
    from slit.train import stage2_model

    c = run.config
    q, a = c.qformer, c.audio_encoder
    kind = c.get("bridge", {}).get("kind", "qformer")
    if kind == "pengi":  # (no single projection: each mapper ends at the LLM's width)
        width = int(np.shape(run.params["bridge"]["audio_mapper"]["linear"]["kernel"])[0])
        llm_width = int(np.shape(run.params["bridge"]["audio_mapper"]["prefix_const"])[-1])
    else:
        width, llm_width = (int(n) for n in np.shape(run.params["bridge"]["projection"]["kernel"]))
    llm_source = info["frozen_models"].get("llm", {}).get("source", f"{c.llm.kind} {c.llm.path}")
    llm_held = "fine-tuned" if "llm" in _trained_components(c) else "frozen"
    if kind in ("qformer", "window_qformer"):
        qformer = run.params["bridge"]["qformer"]
        queries = int(np.shape(qformer["query_tokens"])[-2])
        title = f"a Q-Former soft prompt for a {llm_held} LLM"
        outputs = f"its {queries} projected query outputs are a soft prompt"
        if kind == "window_qformer":
            title = f"a windowed Q-Former soft prompt for a {llm_held} LLM"
            outputs = (
                f"one pass per window of {c.bridge.window_frames} encoder frames, whose {queries} projected "
                "query outputs, window after window, are a soft prompt (SALMONN's window-level Q-Former)"
            )
        description = (
            f"A BLIP-2 Q-Former ({qformer_description(qformer, q.cross_attention_freq)}) over a "
            f"{_encoder_held(c)} {a.kind} audio encoder, and a linear projection from width {width} to the "
            f"{llm_held} LLM's width {llm_width}: {outputs}"
        )
        if q.get("instruction", True):
            bridge = (
                "The instruction enters the Q-Former (InstructBLIP): its Q-Former tokens join the queries in "
                "self-attention, so the soft prompt depends on what is asked."
            )
        else:
            bridge = (
                "The Q-Former reads the audio only (BLIP-2): the soft prompt is the same whatever is asked."
            )
        trained_parts = "the Q-Former (with its query tokens and embeddings) and the projection are"
        names = "bridge.qformer.* and bridge.projection.{kernel,bias}"
    elif kind == "pengi":
        b = c.bridge
        prefix = int(np.shape(run.params["bridge"]["audio_mapper"]["prefix_const"])[0])
        prompt_encoder = stage2_model.prompt_encoder_source(c)
        title = f"a Pengi prefix for a {llm_held} LLM"
        description = (
            f"Pengi's mapping networks over a {_encoder_held(c)} {a.kind} audio encoder: the clip's mean "
            f"frame and the frozen prompt encoder's ({prompt_encoder}) embedding, each projected to "
            f"width {width}, L2-normalised and mapped by its own {b.mapper_layers}-layer transformer to "
            f"{prefix} tokens of the LLM's width {llm_width}: {2 * prefix} prefix tokens, audio then prompt"
        )
        bridge = "The instruction reaches the LLM through the prompt prefix" + (
            " and as its own tokens after it." if b.get("instruction_to_llm", False) else " only (as Pengi)."
        )
        trained_parts = "the projections and the two mappers are"
        names = "bridge.{audio,prompt}_projection.* and bridge.{audio,prompt}_mapper.*"
    else:
        b = c.bridge
        mlp = f"an MLP (hidden width {b.hidden})" if b.get("hidden", 0) else "a linear map"
        title = f"a {kind} bridge's soft prompt for a {llm_held} LLM"
        description = (
            f"A {kind} bridge over a {_encoder_held(c)} {a.kind} audio encoder: each clip's frames "
            f"averaged over {b.num_tokens} equal segments, normalised and mapped by {mlp} to the frozen "
            f"LLM's width {llm_width}: {b.num_tokens} soft-prompt tokens"
        )
        bridge = "The bridge reads the audio only; the instruction goes to the LLM."
        trained_parts = "the bridge's weights are"
        names = "bridge.*"
    try:
        weights = tasks_lib.task_weights(c.tasks.weights)
        tasks = ", ".join(f"{name} {weight:g}" for name, weight in weights.items())
    except (AttributeError, KeyError, TypeError, ValueError):
        tasks = ""
    prompt = llm_prompt_text("<instruction>").replace("\n", "\\n")
    lines = [
        f"# slit stage-two audio-language model: {title}",
        "",
        f"{description} in front of the {llm_held} LLM ({llm_source}). "
        f"Trained by slit {slit.__version__} for {run.step} steps on the answer tokens only. {bridge}",
        "",
        f"The LLM sees `[soft prompt; {prompt}]` and generates the answer after it.",
        "",
        f"- Trained on: `{c.data.name}` (tasks: {tasks or 'see config'}; batch {c.batch_size}, learning "
        f"rate {c.optimizer.learning_rate}"
        + (f"; Q-Former from stage-one run `{pathlib.Path(c.init_from).name}`" if c.get("init_from") else "")
        + ").",
        *_frozen_lines(info, run.config),
        f"- {_stored_line(trained_parts, run.config)}",
        "",
        *_results(run),
        "## Loading",
        "",
        "```python",
        "from safetensors.numpy import load_file",
        f'weights = load_file("model.safetensors")  # {names}',
        "```",
        "",
        "`config.json` holds the hyperparameters (`model`) and the frozen models' identities;",
        f"`tokenizer.json` is the Q-Former's tokenizer, `{LLM_TOKENIZER_DIR}/` the LLM's. Dense kernels are",
        "stored (in, out). To generate, export a bundle of the same run and rebuild it:",
        "",
        "```python",
        "from slit import export",
        "from slit.generate.answerer import generation_config",
        'run, _, info = export.load_bundle("BUNDLE_DIR")  # checks the frozen models\' fingerprints',
        "gen = generation_config(run.config)  # the run's decoding settings (config.eval)",
        'answers = run.answer(audio_bs, num_samples_b, ["describe the sound."], gen)  # float32 (B, S), (B,)',
        "```",
        "",
        "`--format hf-blip2` writes the Q-Former, query tokens and projection in the transformers",
        "InstructBLIP / BLIP-2 layout.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Loading a bundle
# --------------------------------------------------------------------------------------------------


def load_bundle(
    directory: str | pathlib.Path, check_frozen: bool = True, llm_path: str | None = None
) -> Bundle:
    """Rebuilds the model of a `--format bundle` export: Bundle(model, tokenizer, info).

    Stage one: model is a Stage1Model. Stage two: model is a `slit.runs.TrainedRun` (config,
    params, answerer; `model.answer(audio (B, S), num_samples (B,), B instructions, gen)` -> B answers),
    with the frozen LLM loaded from its recorded `llm.path`, or from `llm_path` when given (the same
    checkpoint elsewhere). tokenizer is the Q-Former's; info the bundle's config.json.
    The frozen models are rebuilt and checked against their recorded fingerprints (unless `check_frozen`
    is False). Raises UserError for a directory that is not a bundle, or frozen models that differ.
    """
    from safetensors.numpy import load_file

    from slit.data.tokenizer import load_text_tokenizer

    directory = pathlib.Path(directory)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (directory / name).is_file():
            raise UserError(
                f"{directory} is not a slit bundle: {name} is missing (write one with slit export)"
            )
    info = json.loads((directory / "config.json").read_text())
    if info.get("format") != "bundle":
        raise UserError(f"{directory / 'config.json'} says format {info.get('format')!r}, not 'bundle'")
    config = ml_collections.ConfigDict(info["model"])
    tokenizer = load_text_tokenizer(directory)
    weights = load_file(str(directory / "model.safetensors"))
    if config.get("trainer", "stage1") == "stage2":
        return Bundle(
            _load_stage2(directory, config, tokenizer, weights, info, check_frozen, llm_path), tokenizer, info
        )
    from slit.train import sharding, stage1_model

    # Built exactly as training builds it (jitted init), so a random frozen encoder comes out bit-identical.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    parts = stage1_model.create_model(
        stage1_model.model_config(config, tokenizer), 0, config.audio_encoder.init_seed, mesh, {}
    )
    params = unflatten(weights, jax.device_get(parts.params))
    if check_frozen:
        identity = checkpoint.frozen_identity(parts.frozen, stage1_model.frozen_sources(config))
        checkpoint.check_frozen_identity(
            info["frozen_models"], identity, str(directory), allow_mismatch=False
        )
    model = nnx.merge(parts.graphdef, jax.device_put(params, jax.devices()[0]), parts.frozen)
    return Bundle(model, tokenizer, info)


def _load_stage2(
    directory: pathlib.Path,
    config: ml_collections.ConfigDict,
    tokenizer: Any,  # noqa: ANN401
    weights: dict[str, np.ndarray],
    info: dict,
    check_frozen: bool,
    llm_path: str | None,
) -> runs.TrainedRun:
    from slit.models.llm import loading
    from slit.train import pretrained

    if not (directory / LLM_TOKENIZER_DIR).is_dir():
        raise UserError(f"{directory} is not a stage-two bundle: {LLM_TOKENIZER_DIR}/ is missing")
    if llm_path is not None:
        config.llm.path = str(llm_path)
    if config.llm.kind == "hf" and not (pathlib.Path(config.llm.path) / "config.json").is_file():
        source = info["frozen_models"].get("llm", {}).get("source", "the frozen LLM")
        raise UserError(
            f"{directory}: the frozen LLM ({source}) was read from llm.path={config.llm.path}, which holds "
            "no checkpoint here; pass load_bundle(..., llm_path=DIR) the directory of the same checkpoint"
        )
    parts, answerer, identity = runs.build_stage2(
        config, tokenizer, loading.load_tokenizer(directory / LLM_TOKENIZER_DIR)
    )
    if check_frozen:
        checkpoint.check_frozen_identity(
            info["frozen_models"], identity, str(directory), allow_mismatch=False
        )
    params = jax.device_put(unflatten(weights, jax.device_get(parts.params)), parts.param_shardings)
    return runs.TrainedRun(config, params, answerer, int(info["step"]), pretrained.audio_spec(config))
