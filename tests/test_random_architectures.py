"""Random (untrained) architectures chosen by config: `audio_encoder.kind=random` with each
`audio_encoder.arch` trains in stage one and stage two, `llm.kind=random` with each `llm.arch` trains,
evaluates, exports a bundle that answers the same greedy tokens, and rebuilding either from its seed
gives the same bits (the frozen-model fingerprints checked on resume, evaluation and export)."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from slit import config as config_lib
from slit import export, runs
from slit.data import pipeline, sources
from slit.errors import UserError
from slit.generate import answerer
from slit.models.audio.encoder import make_audio_tower
from slit.models.audio.htsat import HTSATConfig
from slit.models.audio.wav2vec2 import Wav2Vec2Config
from slit.models.audio.whisper import WhisperEncoderConfig
from slit.train import init_from, pretrained, random_models, stage1, stage2
from slit.train.stage2_model import load_llm
from tests.conftest import TINY_DATA, tiny_config
from tests.test_train_stage2 import Built, stage2_config

# Tiny sizes of every random encoder: width 32 (wav2vec2 family: a multiple of 16; htsat: 4 in its first
# stage), 16 feature-encoder channels, one Swin block per htsat stage.
AUDIO = {"audio_encoder.conv_dim": 16, "audio_encoder.depths": (1, 1, 1, 1)}
LLM = {
    "llm.kind": "random",
    "llm.width": 32,
    "llm.layers": 2,
    "llm.heads": 4,
    "llm.kv_heads": 2,
    "llm.mlp_dim": 64,
    "llm.max_positions": 64,
    "llm.init_seed": 7,
}
NO_TEST_SPLIT = {"data.test_split": "none"}  # stage one: no retrieval evaluation after the 2 steps
# Stage two: (LLM, audio encoder) of each run; the pairs of the paper recipes where there is one
# (Flan-T5 with data2vec-audio, GPT-2 with HTSAT as Pengi).
STAGE_TWO = {"llama": "wav2vec2", "gpt2": "htsat", "t5": "data2vec-audio"}


def audio_overrides(arch: str) -> dict[str, object]:
    return {"audio_encoder.arch": arch, **AUDIO}


def llm_group(arch: str, **extra: object) -> ml_collections.ConfigDict:
    config = stage2_config("", pathlib.Path("unused"), **{**LLM, "llm.arch": arch, **extra})
    return config.llm


@pytest.fixture(scope="module")
def stage_one_runs(tiny_data_dir, tmp_path_factory) -> dict[str, pathlib.Path]:
    """A 2-step stage-one workdir on each random wav2vec2-family / htsat encoder (wav2vec2 is HuBERT's
    architecture: the same module and weights, so HuBERT stands for both)."""
    out = {}
    for arch in ("hubert", "data2vec-audio", "htsat"):
        config = tiny_config(tiny_data_dir, total_steps=2, **audio_overrides(arch), **NO_TEST_SPLIT)
        config_lib.validate_stage1(config, num_devices=1)
        workdir = tmp_path_factory.mktemp(f"stage1_{arch}")
        stage1.train(config, workdir)
        out[arch] = workdir
    return out


def saved_frozen(workdir: pathlib.Path, step: int = 2) -> dict:
    meta = json.loads((workdir / "checkpoints" / str(step) / "metadata" / "metadata").read_text())
    return meta["frozen_models"]


def test_stage_one_trains_on_each_random_encoder(stage_one_runs):
    words = {
        "hubert": "HuBERT",
        "data2vec-audio": "data2vec-audio",
        "htsat": "CLAP HTSAT",
    }
    fingerprints = {}
    for arch, workdir in stage_one_runs.items():
        tower = saved_frozen(workdir)["audio_tower"]
        assert tower["source"].startswith(f"randomly initialised {words[arch]} encoder (width 32"), tower
        assert tower["source"].endswith("init_seed 1234")
        fingerprints[arch] = tower["fingerprint"]
        assert (workdir / "checkpoints" / "2").is_dir()
    assert len(set(fingerprints.values())) == 3  # (a random wav2vec2's are HuBERT's: the same module)


def test_init_from_refuses_a_stage_one_run_on_another_random_arch(stage_one_runs, tiny_data_dir):
    hubert = stage_one_runs["hubert"]
    tower = saved_frozen(hubert)["audio_tower"]  # (the same weights as a random wav2vec2's)
    same = stage2_config(tiny_data_dir, pathlib.Path("unused"), **audio_overrides("hubert"))
    init_from.check_init_from_audio_tower(str(hubert), tower, same)
    other = stage2_config(tiny_data_dir, pathlib.Path("unused"), **audio_overrides("wav2vec2"))
    with pytest.raises(
        UserError, match=r"a random hubert encoder; this run builds audio_encoder\.arch=wav2vec2"
    ):
        init_from.check_init_from_audio_tower(str(hubert), tower, other)


@pytest.mark.slow  # (the same module as the random wav2vec2, which trains stage two with llama below)
def test_stage_two_steps_on_a_random_hubert(tiny_data_dir):
    """Two stage-two steps on the random HuBERT (the other encoders train in the LLM runs below)."""
    config = stage2_config(
        tiny_data_dir, pathlib.Path("unused"), **audio_overrides("hubert"), **LLM, **{"llm.arch": "llama"}
    )
    stage2.validate(config, num_devices=1)
    built = Built(config, num_batches=1)
    assert isinstance(built.cfg.audio.arch, Wav2Vec2Config) and not built.cfg.audio.weights
    state = jax.tree.map(lambda x: x.copy(), built.setup.state)
    for seed in (3, 4):
        state, metrics = built.setup.step_fn(
            state, built.setup.parts.frozen, built.batches[0], jax.random.key(seed)
        )
        assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0


@pytest.fixture(scope="module", params=sorted(STAGE_TWO))
def llm_run(request, tiny_data_dir, tmp_path_factory) -> tuple[str, pathlib.Path]:
    """A 2-step stage-two workdir on a random LLM of each arch (and a random encoder), with its test
    evaluation (captioning and AQA) of 4 clips."""
    arch = request.param
    workdir = tmp_path_factory.mktemp(f"stage2_{arch}")
    config = stage2_config(
        tiny_data_dir,
        pathlib.Path("unused"),
        total_steps=2,
        checkpoint_every_steps=2,
        **audio_overrides(STAGE_TWO[arch]),
        **LLM,
        **{"llm.arch": arch, "eval.max_clips": 4, "eval.batch_size": 4},
        # (the bundle check below generates for a batch of 4 too: the same compiled program)
        **{"eval.tasks": ("captioning", "aqa")},
    )
    stage2.validate(config, num_devices=1)
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")  # as `slit train` does
    stage2.train(config, workdir)
    return arch, workdir


def test_a_random_llm_trains_evaluates_and_its_bundle_generates_the_same_tokens(llm_run, tmp_path):
    arch, workdir = llm_run
    frozen = saved_frozen(workdir)
    name = {"llama": "Llama", "gpt2": "GPT-2", "t5": "T5"}[arch]
    assert frozen["llm"]["source"].startswith(f"random {name}"), frozen["llm"]
    assert "init_seed 7" in frozen["llm"]["source"]
    assert STAGE_TWO[arch].replace("htsat", "HTSAT") in frozen["audio_tower"]["source"]
    assert (workdir / "llm_tokenizer" / "tokenizer.json").is_file()
    assert {p.name.split("-")[0] for p in (workdir / "eval").glob("*.json")} >= {"captioning", "aqa"}

    trained = runs.load_trained(workdir)  # rebuilds the random LLM and checks its fingerprint
    bundle = export.export(workdir, "bundle", tmp_path / "bundle")
    rebuilt, _, info = export.load_bundle(bundle)
    assert info["frozen_models"]["llm"]["fingerprint"] == frozen["llm"]["fingerprint"]
    test = sources.open_split(TINY_DATA, trained.config.data.data_dir, "test")
    batch = next(pipeline.eval_audio_batches(test, trained.spec, 4))
    gen = answerer.generation_config(trained.config, num_beams=1, do_sample=False)
    instructions = ["describe the sound."] * 4
    want = trained.answer(batch["audio"], batch["num_samples"], instructions, gen)
    assert len(want) == 4
    assert rebuilt.answer(batch["audio"], batch["num_samples"], instructions, gen) == want


def test_a_random_llm_is_a_function_of_its_seed():
    """(Every arch's rebuild is checked by fingerprint when the LLM runs above are loaded and exported.)"""
    arch = "llama"

    def weights(**extra: object) -> list[np.ndarray]:
        module, _, _ = load_llm(llm_group(arch, **extra))
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module))]

    first, again = weights(), weights()
    assert all(a.tobytes() == b.tobytes() and a.dtype == b.dtype for a, b in zip(first, again, strict=True))
    other = weights(**{"llm.init_seed": 8})
    assert not any(np.array_equal(a, b) for a, b in zip(first, other, strict=True) if a.std() > 0)
    half = weights(**{"llm.param_dtype": "bfloat16"})
    assert {str(x.dtype) for x in half} == {"bfloat16"}


def test_a_random_llm_tokenizer_knows_the_prompts_and_its_special_tokens():
    from slit.data.synthetic import TOKENIZER_VOCABULARY
    from slit.data.text_encoders import answer_text, llm_prompt_text

    t5 = random_models.random_llm_tokenizer("t5")
    llama = random_models.random_llm_tokenizer("llama")
    for tokenizer in (t5, llama):
        ids = tokenizer(llm_prompt_text("what do you hear? describe it in a sentence."))["input_ids"]
        ids += tokenizer(answer_text(" ".join(TOKENIZER_VOCABULARY) + "."))["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert t5.bos_token is None and llama.bos_token_id == 3
    module = random_models.random_llm_module_config(llm_group("t5"))
    assert module.token_ids.decoder_start == module.token_ids.pad == 0


def test_a_random_encoder_is_a_function_of_its_seed(tiny_data_dir):
    """Initialised inside one jit, as both stages do (and every arch's rebuild is checked by fingerprint
    when the LLM runs above are loaded and exported)."""
    arch = "htsat"

    def weights(seed: int) -> list[np.ndarray]:
        config = tiny_config(tiny_data_dir, **audio_overrides(arch))
        audio = pretrained.audio_encoder_config(config)
        state = jax.jit(lambda: nnx.state(make_audio_tower(audio, nnx.Rngs(params=seed))))()
        return [np.asarray(x) for x in jax.tree.leaves(state)]

    first, again, other = weights(1234), weights(1234), weights(1235)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_random_encoder_configs(tiny_data_dir):
    config = tiny_config(tiny_data_dir, **audio_overrides("htsat"))
    htsat = pretrained.encoder_config(config)
    assert isinstance(htsat, HTSATConfig) and htsat.width == 32 and htsat.frontend.sample_rate == 16000
    assert htsat.num_attention_heads == (2, 4, 8, 16) and htsat.frontend.max_length_s == 10
    data2vec = pretrained.encoder_config(tiny_config(tiny_data_dir, **audio_overrides("data2vec-audio")))
    assert data2vec.feature_norm == "layer" and data2vec.position_conv_layers == 5
    assert data2vec.conv_dim == (16,) * 7 and data2vec.hop_samples == 320
    # A run config written before `audio_encoder.arch`: the random Whisper, in the words it recorded.
    old = tiny_config(tiny_data_dir)
    with old.unlocked():
        for key in ("arch", "conv_dim", "depths"):
            del old.audio_encoder[key]
    assert isinstance(pretrained.encoder_config(old), WhisperEncoderConfig)
    assert pretrained.audio_source(old) == (
        "randomly initialised Whisper encoder (width 32, 1 layers, 2 heads, 80 mel bins), init_seed 1234"
    )
    # paper scale, architecture only: no weight is computed
    paper = tiny_config(
        tiny_data_dir,
        **{
            "audio_encoder.arch": "htsat",
            "audio_encoder.width": 768,
            "audio_encoder.heads": 4,
            "audio_encoder.mlp_dim": 3072,
            "audio_encoder.depths": (2, 2, 6, 2),
        },
    )
    audio = pretrained.audio_encoder_config(paper)
    abstract = nnx.eval_shape(lambda: make_audio_tower(audio, nnx.Rngs(params=0)))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract)))
    assert 27e6 < count < 32e6, count  # HTSAT-base: ~28 M weights


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"audio_encoder.arch": "ast"}, r"audio_encoder\.arch='ast': use one of 'whisper', 'wav2vec2'"),
        (
            {"audio_encoder.arch": "hubert", "audio_encoder.width": 40},
            r"audio_encoder\.width=40 must be a multiple of 16",
        ),
        (
            {"audio_encoder.arch": "htsat", "audio_encoder.depths": (2, 2)},
            r"audio_encoder\.depths=\(2, 2\): the htsat encoder has 4 stages",
        ),
        (
            {"audio_encoder.arch": "htsat", "audio_encoder.width": 36},
            r"audio_encoder\.width=36 must be a multiple of 8",
        ),
        (
            {"audio_encoder.arch": "htsat", "audio_encoder.heads": 3},
            r"audio_encoder\.heads=3 \(the htsat encoder's first stage\)",
        ),
        (
            {"audio_encoder.arch": "htsat", "data.max_seconds": 12.0},
            r"data\.max_seconds=12\.0: the htsat encoder takes at most 10 s",
        ),
        (
            {"audio_encoder.arch": "wav2vec2", "audio_encoder.conv_dim": 0},
            r"audio_encoder\.conv_dim=0 must be a positive",
        ),
    ],
)
def test_bad_random_encoders_are_named(overrides, message, tiny_data_dir):
    config = tiny_config(tiny_data_dir, **{**AUDIO, **overrides})
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_stage1(config, num_devices=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"llm.arch": "mamba"}, r"llm\.arch='mamba': a random LLM is one of 'llama', 'gpt2', 't5'"),
        ({"llm.arch": "gpt2", "llm.heads": 3}, r"llm\.width=32 is not divisible by llm\.heads=3"),
        ({"llm.arch": "llama", "llm.kv_heads": 3}, r"llm\.heads=4 is not a multiple of llm\.kv_heads=3"),
        ({"llm.arch": "t5", "llm.layers": 0}, r"llm\.layers=0 must be a positive integer"),
        (
            {"llm.kind": "randm"},
            r"llm\.kind='randm': use 'gguf' \(a GGUF file\), 'hf' \(a checkpoint directory\) or 'random'",
        ),
    ],
)
def test_bad_random_llms_are_named(overrides, message, tiny_data_dir):
    config = stage2_config(tiny_data_dir, pathlib.Path("unused"), **{**LLM, **overrides})
    with pytest.raises(config_lib.ConfigError, match=message):
        stage2.validate(config, num_devices=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_a_random_llm_has_the_group_s_sizes_and_its_tokenizer_s_ids(arch):
    """The module config (read from `random_llm_hf_config`, a BLIP-2 export's text_config) has the
    `llm` group's sizes and the tokenizer's vocabulary and special ids."""
    llm = llm_group(arch)
    tokenizer = random_models.random_llm_tokenizer(arch)
    config = random_models.random_llm_module_config(llm)
    width, layers, heads = {
        "llama": ("hidden_size", "num_layers", "num_heads"),
        "gpt2": ("hidden_size", "num_layers", "num_heads"),
        "t5": ("d_model", "num_layers", "num_heads"),
    }[arch]
    assert (getattr(config, width), getattr(config, layers), getattr(config, heads)) == (
        llm.width,
        llm.layers,
        llm.heads,
    )
    assert config.vocab_size == len(tokenizer)
    assert (
        config.token_ids.eos == (tokenizer.eos_token_id,) and config.token_ids.pad == tokenizer.pad_token_id
    )
    assert config.token_ids.bos == tokenizer.bos_token_id
    assert export.llm_text_config(llm) == random_models.random_llm_hf_config(llm)


def test_a_paper_scale_random_llm_builds_without_weights():
    """Llama-2-7B's sizes, architecture only (`nnx.eval_shape`): no weight is computed."""
    llm = llm_group(
        "llama",
        **{"llm.width": 4096, "llm.layers": 32, "llm.heads": 32, "llm.kv_heads": 32, "llm.mlp_dim": 11008},
    )
    assert random_models.random_llm_problems(llm) == []
    build, _ = random_models.random_llm_builder(llm)
    abstract = nnx.eval_shape(build)
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract)))
    assert 6.4e9 < count < 6.6e9, count  # Llama-2-7B less its 32000-token vocabulary's 262 M
