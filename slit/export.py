"""Hand a trained run to others: `slit export --workdir DIR --format F --out OUT`.

Formats:
- `safetensors`: the trainable weights (`model.safetensors`, names like `qformer.layers.0.ffn...`),
  `config.json` (the model's hyperparameters), the tokenizer, and a model card (`README.md`) with
  what it is, what it was trained on, the workdir's evaluation results, and how to load it.
- `bundle`: everything `load_bundle` needs to rebuild the model without the training config:
  the weights, the model config, the tokenizer, and references to the frozen models (their source
  and content fingerprint, checked on load).
- `hf-blip2`: a directory that `transformers` loads as a BLIP-2 Q-Former with retrieval heads
  (slit/interop/hf_convert.py).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

import slit
from slit.errors import UserError
from slit.train import checkpoint

FORMATS = ("safetensors", "bundle", "hf-blip2")
MODEL_GROUPS = ("audio_encoder", "qformer", "loss", "tokenizer")  # what rebuilding the model needs
DATA_KEYS = ("sample_rate", "max_seconds", "max_text_length")


@dataclasses.dataclass
class TrainedRun:
    """A workdir's newest (or chosen) checkpoint, read on the host."""

    workdir: pathlib.Path
    step: int
    config: ml_collections.ConfigDict
    params: dict  # nested dict of np.ndarray, as the model's nnx.Param state
    metadata: dict


def read_run(workdir: str | pathlib.Path, step: int | None = None) -> TrainedRun:
    """Reads the trainable weights and metadata of a workdir's checkpoint (newest unless `step`)."""
    workdir = pathlib.Path(workdir).absolute()
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"{workdir} has no checkpoints/ directory; give the workdir of a `slit train` run")
    with checkpoint.read_only_manager(directory) as manager:
        steps = manager.all_steps()
        if not steps:
            raise UserError(f"{directory} holds no checkpoint yet")
        step = max(steps) if step is None else step
        if step not in steps:
            raise UserError(f"{directory} has no step {step}; it has {sorted(steps)}")
        restored = checkpoint.read_on_host(manager, step, metadata=True)
    metadata = restored["metadata"]
    config = ml_collections.ConfigDict(metadata["config"])
    return TrainedRun(workdir, int(step), config, restored["state"]["params"], metadata)


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
    missing, out = [], {}

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
            + (f"\n  missing: {', '.join(missing)}" if missing else "")
            + (f"\n  unexpected: {', '.join(unexpected)}" if unexpected else "")
        )
    return out


def model_config_dict(config: ml_collections.ConfigDict) -> dict:
    """The part of a training config that defines the model (no optimizer, data paths or mesh)."""
    out = {group: config[group].to_dict() for group in MODEL_GROUPS}
    out["data"] = {k: config.data[k] for k in DATA_KEYS}
    out["trainer"] = config.trainer
    return out


def export(
    workdir: str | pathlib.Path, fmt: str, out: str | pathlib.Path, step: int | None = None
) -> pathlib.Path:
    """Writes `fmt` to the directory `out` (created; refused if it exists and is not empty)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new directory")
    run = read_run(workdir, step)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf-blip2":
        export_hf_blip2(run, out)
        return out
    from safetensors.numpy import save_file

    save_file(
        flatten(run.params),
        str(out / "model.safetensors"),
        metadata={"format": "slit", "step": str(run.step)},
    )
    info = {
        "slit_version": slit.__version__,
        "format": fmt,
        "step": run.step,
        "model": model_config_dict(run.config),
        "frozen_models": run.metadata.get("frozen_models", {}),
        "trained_on": run.config.data.name,
    }
    (out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    for name in ("tokenizer.json",):
        if (run.workdir / name).is_file():
            shutil.copy(run.workdir / name, out / name)
    if fmt == "safetensors":
        (out / "README.md").write_text(model_card(run, info))
    return out


def typed_params(run: TrainedRun) -> tuple[dict, Any]:
    """The run's params with the model's own key types (list indices as ints), and its Stage1Config."""
    from slit.data.tokenizer import TextTokenizer
    from slit.models.stage1 import Stage1Model
    from slit.train import stage1

    cfg = stage1.model_config(run.config, TextTokenizer.from_directory(run.workdir))
    abstract = nnx.eval_shape(lambda: Stage1Model(cfg, rngs=nnx.Rngs(0)))
    like = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return unflatten(flatten(run.params), like), cfg


def export_hf_blip2(run: TrainedRun, out: pathlib.Path) -> None:
    """`Blip2ForImageTextRetrieval` layout: query tokens, text embeddings, Q-Former, projections, ITM head
    (slit.interop.hf_convert.export_qformer), plus the tokenizer."""
    from slit.interop import hf_convert

    params, cfg = typed_params(run)
    hf_convert.export_qformer(out, params, cfg.qformer, layout="blip2-retrieval", embed_dim=cfg.embed_dim)
    shutil.copy(run.workdir / "tokenizer.json", out / "tokenizer.json")


def model_card(run: TrainedRun, info: dict) -> str:
    """A README.md for an exported model: what it is, its data, its numbers, how to load it."""
    q, a = run.config.qformer, run.config.audio_encoder
    lines = [
        "# slit stage-one Q-Former",
        "",
        f"A BLIP-2 Q-Former ({q.layers} layers, width {q.width}, {q.num_queries} queries, "
        f"cross-attention every {q.cross_attention_freq} layers) trained by slit {slit.__version__} "
        f"for {run.step} steps against a frozen {a.kind} audio encoder, with audio-text contrastive, "
        "matching and grounded-generation losses.",
        "",
        f"- Trained on: `{run.config.data.name}` (batch {run.config.batch_size}, "
        f"learning rate {run.config.optimizer.learning_rate}).",
    ]
    for name, frozen in info["frozen_models"].items():
        lines.append(f"- Frozen `{name}`: {frozen['source']} (fingerprint `{frozen['fingerprint']}`).")
    lines += ["", "## Results", ""]
    tables = sorted((run.workdir / "eval").glob("*.md")) if (run.workdir / "eval").is_dir() else []
    if not tables:
        lines.append("No evaluation report in the workdir.")
    for path in tables:  # written next to each eval/<task>-<data>-<split>.json by slit.eval.reports
        text = path.read_text().strip()
        lines += ["### " + text.removeprefix("# ") if text.startswith("# ") else text, ""]
    lines += [
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


def load_bundle(directory: str | pathlib.Path, check_frozen: bool = True) -> tuple[Any, Any, dict]:
    """Rebuilds a stage-one model from a bundle: (Stage1Model, TextTokenizer, config.json contents).

    The frozen models are rebuilt from their recorded source and checked against their fingerprint.
    """
    from safetensors.numpy import load_file

    from slit.data.tokenizer import TextTokenizer
    from slit.train import sharding, stage1

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
    tokenizer = TextTokenizer.from_directory(directory)
    # Built exactly as training builds it (jitted init), so a random frozen encoder comes out bit-identical.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    parts = stage1.create_model(
        stage1.model_config(config, tokenizer), 0, config.audio_encoder.init_seed, mesh, {}
    )
    params = unflatten(load_file(str(directory / "model.safetensors")), jax.device_get(parts.params))
    if check_frozen:
        identity = checkpoint.frozen_identity(parts.frozen, stage1.frozen_sources(config))
        checkpoint.check_frozen_identity(
            info["frozen_models"], identity, str(directory), allow_mismatch=False
        )
    model = nnx.merge(parts.graphdef, jax.device_put(params, jax.devices()[0]), parts.frozen)
    return model, tokenizer, info
