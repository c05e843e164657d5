"""The stage-one model assembled from a config: tokenizer, model dataclasses, the model initialised into
its shardings (with pretrained frozen encoder and BERT-initialised Q-Former where the config says so),
and the frozen models' sources. Used by the stage-one trainer and by whatever opens a stage-one run
(slit.runs, slit.eval, slit.export); it imports no trainer.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterable

import jax
import ml_collections
from flax import nnx

from slit.data.tokenizer import TextTokenizer, training_vocabulary, word_level_tokenizer
from slit.models.layers import Frozen
from slit.models.stage1 import Stage1Config, Stage1Model
from slit.train import pretrained, sharding
from slit.train.harness import ModelParts
from slit.train.pretrained import audio_spec

__all__ = ["ModelParts", "audio_spec", "create_model", "frozen_sources", "make_tokenizer", "model_config"]


def make_tokenizer(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    train_captions: Callable[[], Iterable[str]] | None = None,
) -> TextTokenizer:
    """The run's tokenizer: the one saved in the workdir if resuming, else from the config (the BERT
    directory's, plus [DEC], when the Q-Former is initialised from BERT; with tokenizer.kind=train_words,
    the words of `train_captions()`, the training split's captions)."""
    if (workdir / "tokenizer.json").is_file():
        return TextTokenizer.from_directory(workdir)
    if config.qformer.get("init", ""):
        return TextTokenizer.from_directory(pretrained.bert_directory(config.qformer.init))
    if config.tokenizer.kind == "synthetic_words":
        from slit.data.synthetic import CAPTION_VOCABULARY

        return TextTokenizer(word_level_tokenizer(CAPTION_VOCABULARY))
    if config.tokenizer.kind == "directory":
        return TextTokenizer.from_directory(config.tokenizer.path)
    if config.tokenizer.kind == "train_words":
        if train_captions is None:
            raise ValueError("tokenizer.kind=train_words needs the training captions")
        vocabulary = training_vocabulary(train_captions(), int(config.tokenizer.get("min_count", 1)))
        return TextTokenizer(word_level_tokenizer(vocabulary))
    raise ValueError(
        f"tokenizer.kind={config.tokenizer.kind!r}: use 'synthetic_words', 'train_words' or 'directory'"
    )


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


def create_model(
    cfg: Stage1Config, seed: int, audio_seed: int, mesh: jax.sharding.Mesh, rules: dict
) -> ModelParts:
    """Initialises the model directly into its shardings (no unsharded copy on one device).

    A pretrained audio encoder (`cfg.audio.weights`) is read on the host and placed into its shardings:
    with the frozen weights (its random initialisation is then never computed), or with the trainable
    ones when `cfg.audio.trainable` (then initialised with the rest, and replaced). With
    `cfg.qformer_init`, the Q-Former's text weights are BERT's (slit.train.pretrained.bert_params).
    """

    def build() -> Stage1Model:
        return Stage1Model(cfg, rngs=nnx.Rngs(params=seed), audio_rngs=nnx.Rngs(params=audio_seed))

    abstract = nnx.eval_shape(build)
    graphdef, abs_params, abs_frozen = nnx.split(abstract, nnx.Param, Frozen)
    param_sh = sharding.state_shardings(abs_params, rules, mesh)
    frozen_sh = sharding.state_shardings(abs_frozen, rules, mesh)
    random_tower = not cfg.audio.weights

    @jax.jit
    def init() -> tuple[dict, dict]:
        _, params, frozen = nnx.split(build(), nnx.Param, Frozen)
        return nnx.to_pure_dict(params), (nnx.to_pure_dict(frozen) if random_tower else {})

    with jax.set_mesh(mesh):
        params, frozen = jax.jit(init, out_shardings=(param_sh, frozen_sh if random_tower else {}))()
    if not random_tower:
        pretrained.place_audio_tower(
            cfg.audio, params, frozen, (abs_params, abs_frozen), (param_sh, frozen_sh)
        )
    if cfg.qformer_init:  # BERT's weights placed into the sharded params; only the word table is fetched
        words = ("qformer", "word_embeddings", "embedding")
        table = sharding.gather_to_host(params["qformer"]["word_embeddings"]["embedding"])
        view = sharding.placeholders(params, {words: table})
        host = pretrained.bert_params(cfg.qformer_init, cfg.qformer, view)
        params = sharding.replace_from_host(params, host, param_sh)
    return ModelParts(graphdef, params, frozen, param_sh, frozen_sh)


def frozen_sources(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Where each frozen model comes from, in words (recorded in every checkpoint; a trained encoder's
    weights are in the checkpoint instead)."""
    return (
        {}
        if pretrained.audio_settings(config).trainable
        else {"audio_tower": pretrained.audio_source(config)}
    )
