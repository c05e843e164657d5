"""Opening a trained run: `load_run(workdir)` reads what a workdir holds, for either stage.

A run's workdir (written by `slit train`) holds `config.json`, `checkpoints/<step>/` (trainable state and
metadata: the resolved config and the frozen models' identities), the Q-Former's `tokenizer.json`, and for
stage two the frozen LLM's tokenizer in `llm_tokenizer/`. `load_run` reads one checkpoint's trainable
weights onto the host (NumPy), whatever mesh it was saved from, and names the workdir's tokenizer files; it
builds no model and imports no trainer, so anything above the trainers (export, eval, generate) can use it.
`open_stage1(run)` and `open_stage2(run)` then rebuild that stage's model around the weights on this
process's mesh (the frozen models built as training builds them, and checked against the fingerprints the
checkpoint recorded); `load_trained(workdir)` is both steps for a stage-two run (`slit generate`).

Every problem (no such directory, not a workdir, no checkpoint, no such step, a step that cannot be read,
an unknown trainer) is a `UserError` that says what to give instead.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from slit import paths
from slit.errors import UserError
from slit.train import checkpoint

STAGES = ("stage1", "stage2")
QFORMER_TOKENIZER = "tokenizer.json"
LLM_TOKENIZER_DIR = "llm_tokenizer"  # as slit.train.stage2_model.LLM_TOKENIZER_DIR


@dataclasses.dataclass
class Run:
    """One checkpoint of a workdir, read on the host."""

    workdir: epath.Path  # a local path or a URI (gs://)
    config: ml_collections.ConfigDict  # the resolved config recorded with this checkpoint
    stage: str  # "stage1" or "stage2" (config.trainer)
    step: int
    params: dict  # trainable weights: nested dict of np.ndarray, as saved (list indices as str)
    metadata: dict  # the checkpoint's metadata: config, slit version, frozen_models
    qformer_tokenizer: epath.Path | None  # <workdir>/tokenizer.json, when there
    llm_tokenizer: epath.Path | None  # <workdir>/llm_tokenizer/, when there (stage two)

    @property
    def frozen_models(self) -> dict[str, dict[str, str]]:
        """{name: {"source": ..., "fingerprint": ...}} of the frozen models the weights were trained with."""
        return self.metadata.get("frozen_models", {})


def checkpoint_steps(workdir: str | pathlib.Path) -> list[int]:
    """The steps of the checkpoints in `<workdir>/checkpoints` (sorted; empty when there are none).

    Raises UserError when `workdir` (a local path or a URI such as gs://) is not a directory or not a
    `slit train` workdir."""
    workdir = paths.workdir_path(workdir)
    if not workdir.exists():
        raise UserError(f"--workdir {workdir}: no such directory; give the workdir of a `slit train` run")
    if not workdir.is_dir():
        raise UserError(
            f"--workdir {workdir} is a file; give the workdir (a directory) of a `slit train` run"
        )
    directory = workdir / checkpoint.CHECKPOINTS
    if not directory.is_dir():
        if not (workdir / "config.json").is_file():
            raise UserError(
                f"--workdir {workdir} is not a slit run (no config.json, no {checkpoint.CHECKPOINTS}/ "
                "directory); give the workdir of a `slit train` run"
            )
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def load_run(workdir: str | pathlib.Path, step: int | None = None) -> Run:
    """Reads checkpoint `step` of `workdir` (default: the newest): config, stage, host params, metadata.

    Raises UserError for a missing directory, a directory that is not a workdir, a workdir without a
    checkpoint, a step it does not hold or cannot read, or a trainer slit does not know.
    """
    workdir = paths.workdir_path(workdir, absolute=True)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise UserError(
            f"--workdir {workdir} holds no checkpoint yet (nothing in {checkpoint.CHECKPOINTS}/); train it "
            "first (`slit train --config CONFIG --workdir DIR`) or give another workdir"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(
            f"{workdir / checkpoint.CHECKPOINTS} has no step {step}; it has {steps} (leave out --step for "
            "the newest)"
        )
    try:
        with checkpoint.read_only_manager(workdir / checkpoint.CHECKPOINTS) as manager:
            restored = checkpoint.read_on_host(manager, step, metadata=True)
    except Exception as e:  # orbax's errors for a damaged or partial step directory vary
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        others = [s for s in steps if s != step]
        raise UserError(
            f"{workdir / checkpoint.CHECKPOINTS / str(step)} cannot be read ({type(e).__name__}: {reason}); "
            + (f"give --step one of {others}" if others else "train the run again")
        ) from e
    metadata = dict(restored["metadata"])
    config = ml_collections.ConfigDict(metadata["config"])
    stage = config.get("trainer", "stage1")
    if stage not in STAGES:
        raise UserError(f"{workdir}: trainer {stage!r} in its config; slit knows {', '.join(STAGES)}")
    qformer_tokenizer = workdir / QFORMER_TOKENIZER
    llm_tokenizer = workdir / LLM_TOKENIZER_DIR
    return Run(
        workdir=workdir,
        config=config,
        stage=stage,
        step=int(step),
        params=restored["state"]["params"],
        metadata=metadata,
        qformer_tokenizer=qformer_tokenizer if qformer_tokenizer.is_file() else None,
        llm_tokenizer=llm_tokenizer if llm_tokenizer.is_dir() else None,
    )


def _check_frozen(run: Run, frozen: dict, sources: dict[str, str], config: ml_collections.ConfigDict) -> None:
    """Refuses frozen models other than those `run`'s checkpoint was trained with (as a resume does),
    unless config.allow_frozen_mismatch."""
    identity = checkpoint.frozen_identity(frozen, sources)
    where = str(run.workdir / checkpoint.CHECKPOINTS / str(run.step))
    checkpoint.check_frozen_identity(
        run.frozen_models, identity, where, bool(config.get("allow_frozen_mismatch", False))
    )


def _placed(run: Run, fresh: dict, shardings: dict) -> dict:
    """The run's trainable weights placed like `fresh` (the model's initial params: names, shapes,
    dtypes) into `shardings`."""
    from slit.train import pretrained

    try:
        return pretrained.put_like(fresh, run.params, shardings)
    except ValueError as e:
        raise UserError(
            f"{run.workdir / checkpoint.CHECKPOINTS / str(run.step)}: the weights do not fit the model its "
            f"config builds ({e})"
        ) from None


@dataclasses.dataclass
class Stage1Opened:
    """A stage-one run's model on this process's mesh: its weights (parts.params) in their shardings."""

    config: ml_collections.ConfigDict
    tokenizer: Any  # slit.data.tokenizer.TextTokenizer
    parts: Any  # slit.train.harness.ModelParts (params: the run's, placed)
    step: int
    model_config: Any  # slit.models.stage1.Stage1Config
    spec: Any  # slit.data.pipeline.AudioSpec
    mesh: jax.sharding.Mesh
    rules: dict


def open_stage1(
    run: Run, config: ml_collections.ConfigDict | None = None, mesh: jax.sharding.Mesh | None = None
) -> Stage1Opened:
    """Rebuilds `run`'s stage-one model (`config`: default the one recorded with the checkpoint; `mesh`:
    default the config's) with the run's weights. Raises UserError when the frozen encoder is not the
    one the run was trained with (unless config.allow_frozen_mismatch) or the weights do not fit."""
    from slit.train import sharding, stage1_model

    config = run.config if config is None else config
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding.rules_dict(config.sharding_rules)
    tokenizer = stage1_model.make_tokenizer(config, run.workdir)
    cfg = stage1_model.model_config(config, tokenizer)
    parts = stage1_model.create_model(cfg, config.seed, config.audio_encoder.init_seed, mesh, rules)
    _check_frozen(run, parts.frozen, stage1_model.frozen_sources(config), config)
    parts.params = _placed(run, parts.params, parts.param_shardings)
    return Stage1Opened(config, tokenizer, parts, run.step, cfg, stage1_model.audio_spec(config), mesh, rules)


@dataclasses.dataclass
class TrainedRun:
    """A stage-two run rebuilt from its workdir (or a bundle): config, weights of one checkpoint and the
    answerer (`answer` generates)."""

    config: ml_collections.ConfigDict
    params: dict
    answerer: Any  # slit.generate.answerer.Answerer
    step: int
    spec: Any  # slit.data.pipeline.AudioSpec

    def answer(
        self, audio: np.ndarray, num_samples: np.ndarray, instructions: Sequence[str], gen: Any
    ) -> list[str]:  # noqa: ANN401
        """audio (B, S) float32, num_samples (B,) int32, B instructions -> B decoded answers."""
        return self.answerer.answer(self.params, audio, num_samples, instructions, gen)


def build_stage2(
    config: ml_collections.ConfigDict,
    qformer_tok: Any,  # noqa: ANN401 (slit.data.tokenizer.TextTokenizer)
    llm_tok: Any,  # noqa: ANN401 (the LLM's transformers tokenizer)
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[Any, Any, dict]:  # noqa: ANN401
    """The stage-two model of `config`, built as training builds it (frozen models bit-identical), on
    `mesh` (default: this process's first device), for weights read elsewhere.

    Returns (parts: slit.train.harness.ModelParts with freshly initialised params, to be replaced by the
    caller's; frozen models loaded), an Answerer over `parts.graphdef` and `parts.frozen`, and the frozen
    models' identity (`checkpoint.frozen_identity`: source and fingerprint) to check against a recorded one.
    """
    from slit.generate.answerer import Answerer
    from slit.train import sharding, stage2_model

    llm, _, llm_source = stage2_model.load_llm(config.llm)
    if mesh is None:
        mesh, rules = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), {}
    else:
        rules = sharding.rules_dict(config.sharding_rules)
    parts = stage2_model.create_model(
        stage2_model.model_config(config, qformer_tok),
        llm,
        config.seed,
        config.audio_encoder.init_seed,
        mesh,
        rules,
        config.llm.get("match_embedding_scale", False),
    )
    identity = checkpoint.frozen_identity(parts.frozen, stage2_model.frozen_sources(config, llm_source))
    encoders = stage2_model.make_encoders(config, qformer_tok, llm, llm_tok)
    return parts, Answerer(parts.graphdef, parts.frozen, encoders, config, llm_tok), identity


def open_stage2(run: Run, config: ml_collections.ConfigDict | None = None) -> TrainedRun:
    """Rebuilds `run`'s stage-two model on the config's mesh (`config`: default the one recorded with the
    checkpoint) with the run's weights and tokenizers. Raises UserError when a frozen model is not the one
    the run was trained with (unless config.allow_frozen_mismatch) or the weights do not fit."""
    from slit.data.tokenizer import load_text_tokenizer
    from slit.models.llm import loading
    from slit.train import sharding, stage2_model

    config = run.config if config is None else config
    if run.qformer_tokenizer is None or run.llm_tokenizer is None:
        raise UserError(
            f"{run.workdir} lacks {QFORMER_TOKENIZER} or {LLM_TOKENIZER_DIR}/; was it written by stage two?"
        )
    qformer_tok = load_text_tokenizer(run.workdir)
    with paths.local_copy(run.llm_tokenizer) as local:  # transformers reads local files
        llm_tok = loading.load_tokenizer(local)
    parts, answerer, identity = build_stage2(config, qformer_tok, llm_tok, sharding.make_mesh(config.mesh))
    checkpoint.check_frozen_identity(
        run.frozen_models,
        identity,
        str(run.workdir / checkpoint.CHECKPOINTS / str(run.step)),
        bool(config.get("allow_frozen_mismatch", False)),
    )
    params = _placed(run, parts.params, parts.param_shardings)
    return TrainedRun(config, params, answerer, run.step, stage2_model.audio_spec(config))


def load_trained(workdir: str | pathlib.Path, step: int | None = None) -> TrainedRun:
    """Rebuilds a stage-two run from `workdir` for `slit generate` and `slit eval`: its config.json,
    tokenizers, the frozen models (checked against the checkpoint's fingerprints) and the trainable
    weights of checkpoint `step` (default: the newest). Raises UserError for a missing workdir, config or
    checkpoint, or another trainer's run."""
    import json

    workdir = paths.workdir_path(workdir)
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
    if not (workdir / LLM_TOKENIZER_DIR).is_dir() or not (workdir / QFORMER_TOKENIZER).is_file():
        raise UserError(
            f"{workdir} lacks tokenizer.json or {LLM_TOKENIZER_DIR}/; was it written by stage two?"
        )
    return open_stage2(load_run(workdir, step), config)
