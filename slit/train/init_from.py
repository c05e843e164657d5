"""Starting stage two from a stage-one run (`init_from`): the Q-Former's weights copied into the bridge (word
embeddings remapped by token), after checking that the stage-one Q-Former learned against the same audio
encoder, read the same way (a trained encoder goes along into a trainable one); and the restore precedence
with it (this workdir's checkpoint, resume_from, init_from, fresh).
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from slit.data.tokenizer import TextTokenizer
from slit.errors import UserError
from slit.train import checkpoint, pretrained, random_models, sharding

WORD_EMBEDDINGS = "bridge/qformer/word_embeddings/embedding"
STAGE_ONE_QFORMER = "qformer/"  # where a stage-one run keeps its Q-Former; a Q-Former bridge's is under
BRIDGE_QFORMER = "bridge/qformer/"  # the bridge


def check_init_from_audio_tower(path: str, tower: dict, config: ml_collections.ConfigDict) -> None:
    """Refuses a stage-one checkpoint whose Q-Former learned against another audio encoder than the one
    this run starts from (`tower`: its {"source", "fingerprint"}): other weights (fingerprint), the same
    weights read at another hidden layer or in other windows, or an encoder stage one trained while this
    run holds the pretrained one frozen (a trained encoder is copied only into a trainable one)."""
    directory, step = checkpoint.locate(path)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if not steps:
        raise UserError(f"init_from={path}: {directory} holds no checkpoint")
    meta_file = directory / str(step if step is not None else steps[-1]) / "metadata" / "metadata"
    if not meta_file.is_file():
        return
    meta = json.loads(meta_file.read_text())
    saved = meta.get("frozen_models", {}).get("audio_tower")
    if saved and saved["fingerprint"] != tower["fingerprint"]:
        raise UserError(
            f"init_from={path}: its Q-Former was trained against another audio tower ({saved['source']}, "
            f"fingerprint {saved['fingerprint']}); this run builds {tower['source']} "
            f"(fingerprint {tower['fingerprint']}). Use stage one's audio_encoder settings."
        )
    if not meta.get("config"):
        return
    theirs = pretrained.audio_settings(ml_collections.ConfigDict(meta["config"]))
    ours = pretrained.audio_settings(config)
    if theirs.kind == ours.kind == "random":  # (random wav2vec2 and HuBERT have the same weights)
        their_arch = random_models.random_audio_arch(ml_collections.ConfigDict(meta["config"]))
        if their_arch != random_models.random_audio_arch(config):
            raise UserError(
                f"init_from={path}: its Q-Former was trained against a random {their_arch} encoder; "
                f"this run builds audio_encoder.arch={random_models.random_audio_arch(config)}. Use stage "
                "one's audio_encoder settings."
            )
    if theirs.trainable and not ours.trainable:
        raise UserError(
            f"init_from={path}: stage one trained its audio encoder (audio_encoder.trainable=true), and its "
            "Q-Former learned against that trained encoder, which this run would replace with the "
            "pretrained one. Set --config.audio_encoder.trainable=true (the encoder is then copied too; "
            "--config.optimizer.lr_multipliers=audio_tower=0 holds it where stage one left it) and "
            "--config.features=compute."
        )
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
    flat_target = {  # global arrays, not fetched (only the word table is, when remapped)
        checkpoint.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]
    }
    note = ""
    if WORD_EMBEDDINGS in source and WORD_EMBEDDINGS in flat_target and run_dir is not None:
        source_tok_file = run_dir / "tokenizer.json"
        if source_tok_file.is_file():
            source_vocab = TextTokenizer.from_directory(run_dir).tokenizer.get_vocab(with_added_tokens=True)
            target_vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
            if source_vocab != target_vocab:
                table, copied_rows = remap_word_embeddings(
                    source[WORD_EMBEDDINGS],
                    source_vocab,
                    target_vocab,
                    sharding.gather_to_host(flat_target[WORD_EMBEDDINGS]),
                )
                source[WORD_EMBEDDINGS] = table
                note = (
                    f"; word embeddings: {copied_rows} of {len(target_vocab)} tokens copied by word, "
                    f"{len(target_vocab) - copied_rows} new"
                )
    params, copied, fresh, mismatched = checkpoint.merge_matching(state["params"], source)
    if mismatched:
        groups = ["audio_encoder" if m.startswith("audio_tower/") else "qformer" for m in mismatched]
        raise UserError(
            f"init_from={path}: these weights exist in both but differ in shape (checkpoint vs this run):\n"
            "  - "
            + "\n  - ".join(mismatched)
            + f"\nUse stage one's {' and '.join(sorted(set(groups)))} settings in this config."
        )
    if not any(name.startswith(BRIDGE_QFORMER) for name in copied):
        raise UserError(f"init_from={path}: no Q-Former weight of the checkpoint matches this model by name")
    params = sharding.replace_from_host(state["params"], params, shardings["params"])
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
