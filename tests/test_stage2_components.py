"""Stage two built from parts: every audio-encoder kind stage one takes, a BERT-initialised Q-Former
bridge, and `init_from` a stage-one run on a pretrained encoder.

The encoders are small random checkpoints written by transformers (Whisper, wav2vec2, HuBERT,
data2vec-audio); each was checked against transformers' own forward pass in stage one
(tests/test_stage1_pretrained.py, tests/test_parity_wav2vec2.py). Here stage two must build the very
same frozen encoder from the same config group: bit-identical features and fingerprint, and a train
step that moves the bridge and nothing frozen.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit import config as config_lib  # noqa: E402
from slit.errors import UserError  # noqa: E402
from slit.train import checkpoint, init_from, pretrained, stage1, stage1_model, stage2, stage2_model  # noqa: E402
from tests.conftest import run_slit, tiny_config  # noqa: E402
from tests.test_parity_wav2vec2 import _checkpoint as write_wav2vec2_family  # noqa: E402
from tests.test_stage1_pretrained import _bert_dir, _whisper_dir  # noqa: E402
from tests.test_train_stage2 import (  # noqa: E402
    CONFIG_FILE,
    Built,
    adam_moments,
    cli_args,
    flat,
    one_device_mesh,
    stage2_config,
    stage2_overrides,
    write_tiny_llama,
)

NOWHERE = pathlib.Path("/nonexistent")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def write_encoder(kind: str, directory: pathlib.Path) -> dict[str, object]:
    """Writes a small random checkpoint of `kind`; returns the audio_encoder overrides that load it."""
    if kind == "whisper":
        _whisper_dir(directory)
    else:
        write_wav2vec2_family({"wav2vec2": "wav2vec2-layer-stable"}.get(kind, kind), directory)
    return {
        "audio_encoder.kind": "whisper" if kind == "whisper" else "wav2vec2",
        "audio_encoder.path": str(directory),
        "audio_encoder.hidden_layer": -2,  # BLIP-2's second-to-last
    }


def stage_one_features(config, audio: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, str]:
    """(features, fingerprint) of stage one's frozen encoder built from `config`'s audio_encoder group."""
    tokenizer = stage1_model.make_tokenizer(config, NOWHERE)
    parts = stage1_model.create_model(
        stage1_model.model_config(config, tokenizer), 0, config.audio_encoder.init_seed, one_device_mesh(), {}
    )
    model = nnx.merge(parts.graphdef, parts.params, parts.frozen)
    features, _ = nnx.jit(lambda m, a, n: m.encode_audio(a, n))(
        model, jnp.asarray(audio), jnp.asarray(lengths)
    )
    return np.asarray(features), checkpoint.fingerprint(parts.frozen["audio_tower"])


@pytest.mark.parametrize("kind", ["whisper", "wav2vec2", "hubert", "data2vec-audio"])
def test_stage_two_step_with_each_encoder_kind(kind, tiny_data_dir, llm_dir, tmp_path):
    overrides = write_encoder(kind, tmp_path / kind)
    config = stage2_config(tiny_data_dir, llm_dir, **overrides)
    stage2.validate(config, num_devices=1)
    built = Built(config, num_batches=1)
    parts = built.setup.parts
    assert built.cfg.audio.weights == f"{overrides['audio_encoder.kind']}:{tmp_path / kind}"
    assert built.cfg.audio.hidden_layer == -2

    # The same frozen encoder as stage one builds from the same group: same weights, same features.
    batch = built.batches[0]
    model = built.model()
    features, _ = nnx.jit(lambda m, a, n: m.encode_audio(a, n))(
        model, jnp.asarray(batch["audio"]), jnp.asarray(batch["num_samples"])
    )
    one = tiny_config(tiny_data_dir, **overrides)
    config_lib.validate_stage1(one, num_devices=1)
    expected, fingerprint = stage_one_features(one, batch["audio"], batch["num_samples"])
    np.testing.assert_array_equal(np.asarray(features), expected)
    identity = checkpoint.frozen_identity(parts.frozen, stage2_model.frozen_sources(config, built.llm_source))
    assert identity["audio_tower"]["fingerprint"] == fingerprint
    assert str(tmp_path / kind) in identity["audio_tower"]["source"]

    # One step: gradients reach the bridge's cross-attention over the encoder's frames (read from
    # Adam's first moment, zero exactly where the gradient is); the frozen encoder is left alone.
    frozen_before = flat(jax.device_get(parts.frozen["audio_tower"]))
    state = jax.tree.map(lambda x: x.copy(), built.setup.state)
    state, metrics = built.setup.step_fn(state, parts.frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    grads = flat(jax.device_get(adam_moments(state["opt_state"]).mu))
    assert not any(name.startswith("audio_tower") for name in grads)
    for name in ("bridge/projection/kernel", "bridge/qformer/layers/0/cross_attention/key/kernel"):
        assert np.abs(grads[name]).max() > 1e-7, name
    for name, value in flat(jax.device_get(parts.frozen["audio_tower"])).items():
        np.testing.assert_array_equal(value, frozen_before[name], err_msg=name)


def test_qformer_bridge_initialised_from_bert(tiny_data_dir, llm_dir, tmp_path):
    """qformer.init in stage two: BERT's sizes, tokenizer and text weights, as in stage one."""
    (tmp_path / "bert").mkdir()
    bert = _bert_dir(tmp_path / "bert")
    config = stage2_config(tiny_data_dir, llm_dir, **{"qformer.init": str(tmp_path / "bert")})
    stage2.validate(config, num_devices=1)
    tokenizer = stage2_model.make_qformer_tokenizer(config, NOWHERE)
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    assert vocab["[CLS]"] == 2 and "[DEC]" in vocab and "barks" in vocab
    cfg = stage2_model.model_config(config, tokenizer)
    q = cfg.bridge.qformer
    assert config.qformer.mlp_dim == 64 and q.mlp_dim == 48  # BERT's intermediate_size, not the group's
    assert (q.width, q.num_layers, q.num_heads, q.num_queries) == (32, 2, 4, config.qformer.num_queries)
    llm, _, _ = stage2_model.load_llm(config.llm)
    parts = stage2_model.create_model(cfg, llm, 0, config.audio_encoder.init_seed, one_device_mesh(), {})
    params = jax.device_get(parts.params)["bridge"]["qformer"]
    state = {k: v.detach().numpy() for k, v in bert.state_dict().items()}
    words = state["bert.embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(np.asarray(params["word_embeddings"]["embedding"])[: len(words)], words)
    np.testing.assert_array_equal(
        np.asarray(params["layers"][1]["self_attention"]["query"]["kernel"]),
        state["bert.encoder.layer.1.attention.self.query.weight"].T,
    )


@pytest.fixture(scope="module")
def wav2vec2_stage_one(tiny_data_dir, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A 2-step stage-one run on a random wav2vec2 checkpoint (hidden layer -2)."""
    root = tmp_path_factory.mktemp("w2v_stage1")
    overrides = write_encoder("wav2vec2", root / "encoder")
    stage1.train(tiny_config(tiny_data_dir, total_steps=2, **overrides), root / "run")
    return root / "run", overrides


def test_init_from_a_stage_one_run_on_a_pretrained_encoder(wav2vec2_stage_one, tiny_data_dir, llm_dir):
    workdir, overrides = wav2vec2_stage_one
    config = stage2_config(tiny_data_dir, llm_dir, **overrides, init_from=str(workdir))
    built = Built(config, num_batches=1)
    identity = checkpoint.frozen_identity(
        built.setup.parts.frozen, stage2_model.frozen_sources(config, built.llm_source)
    )
    init_from.check_init_from_audio_tower(
        config.init_from, identity["audio_tower"], config
    )  # the same encoder: accepted
    start = init_from.init_from_stage_one(
        config.init_from, built.setup.state, built.setup.state_shardings, built.qformer_tok
    )
    saved = flat(init_from.read_params(workdir)[0])
    got = flat(jax.device_get(start.state["params"]))
    name = "bridge/qformer/layers/0/cross_attention/key/kernel"  # reads the wav2vec2 width
    np.testing.assert_array_equal(got[name], saved[name.removeprefix("bridge/")])

    # Another hidden layer of the same weights: same fingerprint, other features; refused by name.
    other_layer = stage2_config(
        tiny_data_dir, llm_dir, **{**overrides, "audio_encoder.hidden_layer": -1}, init_from=str(workdir)
    )
    with pytest.raises(UserError, match=r"audio_encoder\.hidden_layer=-1 here, -2 in stage one"):
        init_from.check_init_from_audio_tower(workdir, identity["audio_tower"], other_layer)
    # Another encoder altogether (the random Whisper of the config): refused by fingerprint.
    random_config = stage2_config(tiny_data_dir, llm_dir, init_from=str(workdir))
    random_built = Built(random_config, num_batches=1)
    random_identity = checkpoint.frozen_identity(
        random_built.setup.parts.frozen, stage2_model.frozen_sources(random_config, random_built.llm_source)
    )
    with pytest.raises(UserError, match="another audio tower"):
        init_from.check_init_from_audio_tower(workdir, random_identity["audio_tower"], random_config)
    assert pretrained.audio_settings(random_config).kind == "random"


def test_stage_two_trains_from_stage_one_feature_cache(tiny_data_dir, llm_dir, tmp_path):
    """features=cached in stage two: the cache `slit cache-features` writes from a *stage-one* config
    (same audio_encoder and data groups) is the one stage two opens; the first batch has the same
    texts as computing features, and the model's loss on it equals the loss computed from the audio."""
    from slit.data import feature_cache
    from slit.models.stage2 import Stage2Batch
    from slit.train import feature_cache as cache_lib

    whole = {"data.max_seconds": 10.0}  # whole clips: a cache holds each clip's start, training crops
    one = tiny_config(tiny_data_dir, features_dir=str(tmp_path), **whole)
    directory, summary = cache_lib.build(one, log=lambda line: None)
    assert summary["written"]
    computed = Built(stage2_config(tiny_data_dir, llm_dir, **whole), num_batches=1)
    cached_config = stage2_config(
        tiny_data_dir, llm_dir, features="cached", features_dir=str(tmp_path), **whole
    )
    stage2.validate(cached_config, num_devices=1)
    assert stage2.batch_keys(cached_config) == stage2.CACHED_BATCH_KEYS
    built = Built(cached_config, num_batches=0)
    training_data = stage2.open_training_data(cached_config)
    with_features, cache = stage2.with_cached_features(
        cached_config, built.cfg, built.setup.parts.frozen, training_data
    )
    assert cache.directory == directory  # stage one's cache, keyed by the same encoder and frontend
    # `slit cache-features` takes the stage-two config too, and finds that same cache up to date.
    args = cli_args(stage2_overrides(tiny_data_dir, llm_dir, features_dir=str(tmp_path), **whole))
    result = run_slit("cache-features", "--config", str(CONFIG_FILE), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"feature cache {directory} is up to date" in result.stdout
    stream = stage2.train_dataset(
        cached_config, built.encoders, None, mixture=stage2.make_tasks(cached_config, with_features)
    )
    batch = stage2.model_batch(next(iter(stream)), cached_config)
    assert set(batch) == set(stage2.CACHED_BATCH_KEYS)
    want = computed.batches[0]
    for key in stage2.TEXT_KEYS:  # the same tasks, instructions and answers drawn
        np.testing.assert_array_equal(batch[key], want[key], err_msg=key)

    graphdef, frozen = built.setup.parts.graphdef, built.setup.parts.frozen
    params = built.setup.state["params"]
    loss = jax.jit(lambda p, b: nnx.merge(graphdef, p, frozen)(Stage2Batch(**b), rngs=None)[0])
    from_audio = float(loss(params, {k: jnp.asarray(want[k]) for k in stage2.BATCH_KEYS}))
    from_cache = float(loss(params, {k: jnp.asarray(batch[k]) for k in stage2.CACHED_BATCH_KEYS}))
    assert abs(from_audio - from_cache) < 1e-5, (from_audio, from_cache)
    assert isinstance(with_features[0][1], feature_cache.WithFeatures)

    # A cache built for another encoder is refused with the command that rebuilds it.
    other = stage2_config(
        tiny_data_dir,
        llm_dir,
        features="cached",
        features_dir=str(tmp_path),
        **{"audio_encoder.init_seed": 7},
    )
    other_built = Built(other, num_batches=0)
    with pytest.raises(UserError, match="slit cache-features"):
        stage2.with_cached_features(other, other_built.cfg, other_built.setup.parts.frozen, training_data)
