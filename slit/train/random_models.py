"""Randomly initialised (untrained) frozen models of any supported architecture, chosen by config: the audio
encoder (`audio_encoder.kind = "random"` with `audio_encoder.arch`) and the LLM (`llm.kind = "random"` with
`llm.arch`). They give synthetic-scale runs the architecture families of the paper recipes on a laptop
CPU, and paper-scale architecture-only configs something to build without weights (memory planning).

Random audio encoders (`audio_encoder.arch`; run configs without the field: "whisper"). The size fields
`width`, `layers`, `heads` and `mlp_dim` apply to every arch but htsat's layers; weights come from
`audio_encoder.init_seed` (initialised inside one jit by the trainers, as the random Whisper always was).

- "whisper": Whisper's encoder with `num_mel_bins` (80 or 128) and `max_positions` (1500: 30 s).
- "wav2vec2", "hubert", "data2vec-audio": the wav2vec2 family's feature encoder of the released models
  (7 convolutions, kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: one frame per 320 samples, 20 ms at
  16 kHz) with `audio_encoder.conv_dim` channels each (512 in the released models), then the transformer.
  wav2vec2 and HuBERT (the same architecture): group norm after the first convolution, one positional
  convolution (kernel 128, 16 groups), post-norm layers. data2vec-audio: layer norm after every
  convolution, biases, a stack of 5 positional convolutions (kernel 19, 16 groups) with layer norms.
  The waveform is normalised per clip and the padding is masked inside the encoder. `width` must be a
  multiple of 16 (the positional convolution's groups).
- "htsat": CLAP's HTSAT (Pengi's encoder) of the released geometry: 4 Swin stages of `audio_encoder.depths`
  blocks each (released: 2, 2, 6, 2), 64 mel bins in a 256 x 256 image of 4 x 4 patches, 8 x 8 windows,
  64 frames per clip. `width` is the last stage's (the bridge's input; released 768), each stage halves it
  going back (released first stage: 96), `heads` is the first stage's head count, doubled at each stage
  (released: 4), the MLPs are `mlp_dim / width` times their stage's width. Its log-mel is a 16 kHz one
  (400-sample FFT, hop 160, 0-8 kHz, Slaney filter bank) for clips of up to 10 s (1001 frames of the
  image's 1024), repeat-padded as CLAP's feature extractor does.

Random LLMs (`llm.kind = "random"`, `llm.arch` "llama", "gpt2" or "t5"; sizes `llm.width`, `llm.layers`,
`llm.heads`, `llm.kv_heads` (llama), `llm.mlp_dim`, `llm.max_positions` (gpt2's position table),
`llm.vocab_size` (rows of the embedding and output tables; absent or 0: the tokenizer's words; a paper
LLM's, e.g. 32000, for memory planning: the word-level tokenizer still uses only its first ids), weights
from `llm.init_seed`, computed by one jit with a fixed key: the same on every rebuild, as the frozen-model
fingerprints checked on resume, evaluation and export require). llama: SwiGLU, RoPE (theta 10000),
untied output layer; gpt2: GELU, learned positions, tied output layer; t5: Flan-T5's gated GELU, untied
output layer, encoder and decoder of `llm.layers` each. Their tokenizer is a word-level one over the
synthetic data's words (`random_llm_tokenizer`); the trainer saves it in the workdir as any LLM's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from slit.models.audio.clap_frontend import ClapFrontendConfig
from slit.models.audio.htsat import HTSATConfig
from slit.models.audio.wav2vec2 import Wav2Vec2Config
from slit.models.audio.whisper import WhisperEncoderConfig

RANDOM_AUDIO_ARCHS = ("whisper", "wav2vec2", "hubert", "data2vec-audio", "htsat")
RANDOM_LLM_ARCHS = ("llama", "gpt2", "t5")

WAV2VEC2_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
WAV2VEC2_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)
WAV2VEC2_POSITION_GROUPS = 16
HTSAT_STAGES = 4
HTSAT_FRONTEND = ClapFrontendConfig(
    sample_rate=16000,
    n_fft=400,
    hop_length=160,
    num_mel_bins=64,
    fmin=0.0,
    fmax=8000.0,
    max_length_s=10,
    truncation="rand_trunc",
    padding="repeatpad",
)
_AUDIO_NAMES = {
    "whisper": "Whisper",
    "wav2vec2": "wav2vec2",
    "hubert": "HuBERT",
    "data2vec-audio": "data2vec-audio",
    "htsat": "CLAP HTSAT",
}
_LLM_NAMES = {"llama": "Llama", "gpt2": "GPT-2", "t5": "T5 (Flan-T5 layout)"}
# The LLM tokenizer's special tokens: T5's ids first (pad 0, eos 1, unk 2), then BOS for the decoder-only.
_SPECIALS = ("<pad>", "</s>", "<unk>", "<s>")
# Words of stage two's prompt and answer formats (slit.data.text_encoders) besides the data's own.
_PROMPT_WORDS = ("Answer", ":", "?", ".", ",", "!", "'", "-")


# ---------------------------------------------------------------------------------------------------------
# Audio encoders.


def random_audio_arch(config: ml_collections.ConfigDict) -> str:
    """`audio_encoder.arch` (run configs written before the field: "whisper")."""
    return str(config.audio_encoder.get("arch", "whisper"))


def random_audio_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Everything wrong with a random encoder's arch and sizes, each naming the field (empty: buildable)."""
    a, arch = config.audio_encoder, random_audio_arch(config)
    if arch not in RANDOM_AUDIO_ARCHS:
        return [f"audio_encoder.arch={arch!r}: use one of {', '.join(map(repr, RANDOM_AUDIO_ARCHS))}"]
    problems = [
        f"audio_encoder.{name}={a.get(name)} must be a positive integer"
        for name in ("width", "layers", "heads", "mlp_dim")
        if not isinstance(a.get(name), int) or a.get(name) < 1
    ]
    if problems:
        return problems
    if arch == "whisper":
        if a.width % a.heads:
            problems.append(
                f"audio_encoder.width={a.width} is not divisible by audio_encoder.heads={a.heads}"
            )
        if a.num_mel_bins not in (80, 128):
            problems.append(f"audio_encoder.num_mel_bins={a.num_mel_bins}: Whisper uses 80 or 128")
    elif arch == "htsat":
        depths = tuple(a.get("depths", (2, 2, 6, 2)))
        scale = 2 ** (HTSAT_STAGES - 1)
        if len(depths) != HTSAT_STAGES or any(not isinstance(d, int) or d < 1 for d in depths):
            problems.append(
                f"audio_encoder.depths={depths}: the htsat encoder has {HTSAT_STAGES} stages; give "
                "one positive block count per stage, e.g. (2, 2, 6, 2)"
            )
        if a.width % scale:
            problems.append(
                f"audio_encoder.width={a.width} must be a multiple of {scale} (the htsat encoder's last "
                f"stage is {scale} times as wide as its first)"
            )
        elif (a.width // scale) % a.heads:
            problems.append(
                f"audio_encoder.heads={a.heads} (the htsat encoder's first stage) does not divide its first "
                f"stage's width audio_encoder.width / {scale} = {a.width // scale}"
            )
    else:
        if a.width % a.heads:
            problems.append(
                f"audio_encoder.width={a.width} is not divisible by audio_encoder.heads={a.heads}"
            )
        if a.width % WAV2VEC2_POSITION_GROUPS:
            problems.append(
                f"audio_encoder.width={a.width} must be a multiple of {WAV2VEC2_POSITION_GROUPS} (the "
                f"{arch} positional convolution's groups)"
            )
        conv_dim = a.get("conv_dim", 512)
        if not isinstance(conv_dim, int) or conv_dim < 1:
            problems.append(f"audio_encoder.conv_dim={conv_dim} must be a positive integer")
    return problems


def random_encoder_config(
    config: ml_collections.ConfigDict,
) -> WhisperEncoderConfig | Wav2Vec2Config | HTSATConfig:
    """The random encoder's architecture from the `audio_encoder` group (`random_audio_problems` first)."""
    a, arch = config.audio_encoder, random_audio_arch(config)
    if arch == "whisper":
        return WhisperEncoderConfig(
            num_mel_bins=a.num_mel_bins,
            width=a.width,
            num_layers=a.layers,
            num_heads=a.heads,
            mlp_dim=a.mlp_dim,
            max_positions=a.max_positions,
        )
    if arch == "htsat":
        depths = tuple(a.get("depths", (2, 2, 6, 2)))
        return HTSATConfig(
            num_mel_bins=HTSAT_FRONTEND.num_mel_bins,
            spec_size=256,
            patch_size=4,
            patch_stride=4,
            patch_embeds_hidden_size=a.width // 2 ** (HTSAT_STAGES - 1),
            depths=depths,
            num_attention_heads=tuple(a.heads * 2**i for i in range(HTSAT_STAGES)),
            window_size=8,
            mlp_ratio=a.mlp_dim / a.width,
            frontend=HTSAT_FRONTEND,
        )
    if arch not in RANDOM_AUDIO_ARCHS:
        raise ValueError(f"audio_encoder.arch={arch!r}: use one of {', '.join(RANDOM_AUDIO_ARCHS)}")
    conv_dim = int(a.get("conv_dim", 512))
    common = dict(
        conv_dim=(conv_dim,) * len(WAV2VEC2_CONV_KERNEL),
        conv_kernel=WAV2VEC2_CONV_KERNEL,
        conv_stride=WAV2VEC2_CONV_STRIDE,
        width=a.width,
        num_layers=a.layers,
        num_heads=a.heads,
        mlp_dim=a.mlp_dim,
        position_conv_groups=WAV2VEC2_POSITION_GROUPS,
    )
    if arch == "data2vec-audio":
        return Wav2Vec2Config(
            **common,
            conv_bias=True,
            feature_norm="layer",
            position_conv_kernel=19,
            position_conv_layers=5,
            position_conv_layer_norm=True,
        )
    return Wav2Vec2Config(**common, conv_bias=False, feature_norm="group", position_conv_kernel=128)


def random_audio_source(config: ml_collections.ConfigDict) -> str:
    """The random encoder in words, its arch and sizes included (recorded with its fingerprint)."""
    a, arch = config.audio_encoder, random_audio_arch(config)
    if arch == "whisper":  # (the words every run config before `arch` recorded)
        return (
            f"randomly initialised Whisper encoder (width {a.width}, {a.layers} layers, "
            f"{a.heads} heads, {a.num_mel_bins} mel bins), init_seed {a.init_seed}"
        )
    if arch == "htsat":
        depths = ", ".join(map(str, a.get("depths", (2, 2, 6, 2))))
        sizes = f"width {a.width}, depths ({depths}), {a.heads} heads in stage 1, mlp {a.mlp_dim}"
    else:
        sizes = (
            f"width {a.width}, {a.layers} layers, {a.heads} heads, mlp {a.mlp_dim}, "
            f"{a.get('conv_dim', 512)} conv channels"
        )
    return f"randomly initialised {_AUDIO_NAMES.get(arch, arch)} encoder ({sizes}), init_seed {a.init_seed}"


# ---------------------------------------------------------------------------------------------------------
# LLMs.


def random_llm_problems(llm: ml_collections.ConfigDict) -> list[str]:
    """Everything wrong with `llm.kind = "random"`'s arch and sizes, each naming the field."""
    arch = llm.get("arch", "")
    if arch not in RANDOM_LLM_ARCHS:
        return [f"llm.arch={arch!r}: a random LLM is one of {', '.join(map(repr, RANDOM_LLM_ARCHS))}"]
    names = ["width", "layers", "heads", "mlp_dim", "max_positions"] + (
        ["kv_heads"] if arch == "llama" else []
    )
    problems = [
        f"llm.{name}={llm.get(name)} must be a positive integer"
        for name in names
        if not isinstance(llm.get(name), int) or llm.get(name) < 1
    ]
    if problems:
        return problems
    if llm.width % llm.heads:
        problems.append(f"llm.width={llm.width} is not divisible by llm.heads={llm.heads}")
    elif arch == "llama" and (llm.width // llm.heads) % 2:
        problems.append(
            f"llm.width / llm.heads = {llm.width // llm.heads}: Llama's rotary embedding needs an even "
            "head width"
        )
    if arch == "llama" and llm.heads % llm.kv_heads:
        problems.append(f"llm.heads={llm.heads} is not a multiple of llm.kv_heads={llm.kv_heads}")
    vocab_size = llm.get("vocab_size", 0)
    if not isinstance(vocab_size, int) or vocab_size < 0 or 0 < vocab_size < len(_vocabulary()):
        problems.append(
            f"llm.vocab_size={vocab_size!r}: 0 (the tokenizer's {len(_vocabulary())} words) or at least that"
        )
    if not isinstance(llm.get("init_seed"), int):
        problems.append(f"llm.init_seed={llm.get('init_seed')!r} must be an integer")
    return problems


def _vocabulary() -> list[str]:
    """The random LLMs' tokens in id order: the special tokens, then the synthetic data's and the prompts'
    words."""
    from slit.data.synthetic import TOKENIZER_VOCABULARY

    return [*_SPECIALS, *sorted((set(TOKENIZER_VOCABULARY) | set(_PROMPT_WORDS)) - set(_SPECIALS))]


def random_llm_tokenizer(arch: str) -> Any:  # noqa: ANN401 (transformers.PreTrainedTokenizerFast)
    """A word-level tokenizer over the synthetic data's words (slit.data.synthetic.TOKENIZER_VOCABULARY)
    and stage two's prompt words, with `<pad>` 0, `</s>` 1 (EOS), `<unk>` 2 and, but for T5, `<s>` 3
    (BOS); T5's decoder starts with its pad token, as T5's does."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(_vocabulary())}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(_SPECIALS))
    bos = {} if arch == "t5" else {"bos_token": "<s>"}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<pad>", **bos
    )


def random_llm_module_config(llm: ml_collections.ConfigDict) -> Any:  # noqa: ANN401
    """The LlamaConfig / GPT2Config / T5Config of `llm.kind = "random"`: its transformers config
    (`random_llm_hf_config`) read as a checkpoint's config.json is read."""
    from slit.models.llm.gpt2 import gpt2_config_from_hf
    from slit.models.llm.llama import llama_config_from_hf
    from slit.models.llm.t5 import t5_config_from_hf

    read = {"llama": llama_config_from_hf, "gpt2": gpt2_config_from_hf, "t5": t5_config_from_hf}[llm.arch]
    return read(random_llm_hf_config(llm))


def random_llm_hf_config(llm: ml_collections.ConfigDict) -> dict[str, Any]:
    """The random LLM as a transformers config.json dict (LlamaConfig / GPT2Config / T5Config fields), e.g.
    a BLIP-2 export's `text_config`; `random_llm_module_config` reads it as a checkpoint's is read."""
    ids = {name: i for i, name in enumerate(_SPECIALS)}
    vocab_size = int(llm.get("vocab_size", 0)) or len(_vocabulary())
    special = {"eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]}
    if llm.arch == "llama":
        return {
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": llm.width,
            "intermediate_size": llm.mlp_dim,
            "num_hidden_layers": llm.layers,
            "num_attention_heads": llm.heads,
            "num_key_value_heads": llm.kv_heads,
            "head_dim": llm.width // llm.heads,
            "max_position_embeddings": llm.max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": ids["<s>"],
            **special,
        }
    if llm.arch == "gpt2":
        return {
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_positions": llm.max_positions,
            "n_embd": llm.width,
            "n_layer": llm.layers,
            "n_head": llm.heads,
            "n_inner": llm.mlp_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True,
            "bos_token_id": ids["<s>"],
            **special,
        }
    if llm.arch == "t5":
        return {
            "model_type": "t5",
            "is_encoder_decoder": True,
            "vocab_size": vocab_size,
            "d_model": llm.width,
            "d_kv": llm.width // llm.heads,
            "d_ff": llm.mlp_dim,
            "num_layers": llm.layers,
            "num_decoder_layers": llm.layers,
            "num_heads": llm.heads,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6,
            "tie_word_embeddings": False,
            "decoder_start_token_id": ids["<pad>"],
            **special,
        }
    raise ValueError(f"llm.arch={llm.arch!r}: use one of {', '.join(RANDOM_LLM_ARCHS)}")


def random_llm_builder(llm: ml_collections.ConfigDict) -> tuple[Callable[[], nnx.Module], Any]:  # noqa: ANN401
    """(a function building the random LLM of `llm` with float32 weights from `llm.init_seed`, its
    tokenizer). `nnx.eval_shape(build)` gives the module without computing a weight (memory planning)."""
    from slit.models.llm.gpt2 import GPT2
    from slit.models.llm.llama import Llama
    from slit.models.llm.t5 import T5

    tokenizer = random_llm_tokenizer(llm.arch)
    module_config = random_llm_module_config(llm)
    cls = {"llama": Llama, "gpt2": GPT2, "t5": T5}[llm.arch]

    scan = bool(llm.get("scan_layers", False))

    def build() -> nnx.Module:
        return cls(module_config, rngs=nnx.Rngs(params=int(llm.init_seed)), scan_layers=scan)

    return build, tokenizer


def random_llm(llm: ml_collections.ConfigDict) -> tuple[nnx.Module, Any, str]:  # noqa: ANN401
    """(frozen random LLM, its word-level tokenizer, where it came from in words), as `load_llm` returns.

    Its weights are the module's own initialisers run by one jit keyed by `llm.init_seed`, stored in
    `llm.param_dtype`: rebuilding gives the same bits.
    """
    build, tokenizer = random_llm_builder(llm)
    param_dtype = jnp.bfloat16 if llm.param_dtype == "bfloat16" else jnp.float32
    graphdef, _ = nnx.split(nnx.eval_shape(build))

    @jax.jit
    def init() -> nnx.State:
        state = nnx.state(build())
        return jax.tree.map(
            lambda x: x.astype(param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state
        )

    module = nnx.merge(graphdef, init())
    sizes = f"{llm.heads} heads" + (f", {llm.kv_heads} kv heads" if llm.arch == "llama" else "")
    rows = int(llm.get("vocab_size", 0))
    table = f" in a {rows}-row table" if rows else ""
    source = (
        f"random {_LLM_NAMES[llm.arch]} LLM (width {llm.width}, {llm.layers} layers, {sizes}, mlp "
        f"{llm.mlp_dim}, {llm.max_positions} positions, vocabulary {len(tokenizer)}{table}), init_seed "
        f"{llm.init_seed} ({llm.param_dtype})"
    )
    return module, tokenizer, source
