"""Whisper encoders from model directories: CTranslate2 (`model.bin`, whole or in parts) and Hugging Face.

The CTranslate2 files are written by CTranslate2's own converter from a small random Whisper that
transformers wrote, in every storage type (float32, float16, bfloat16, int8, int16); CTranslate2 itself
(compute type float32, which dequantizes the same way) is the reference for the encoder output.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.interop import ctranslate2 as ct2_reader  # noqa: E402
from slit.interop import pretrained  # noqa: E402

ATOL = 1e-4
MELS, FRAMES = 80, 3000  # CTranslate2's Whisper encoder takes 30 s windows only


@pytest.fixture(scope="module")
def hf_whisper(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pathlib.Path, "transformers.PreTrainedModel"]:
    """A small random WhisperForConditionalGeneration saved by transformers (1-D params randomised too)."""
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        num_mel_bins=MELS,
        vocab_size=100,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.model.encoder.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("hf_whisper")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def mel_bmt() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1.0, 1.5, (2, MELS, FRAMES)).astype(np.float32)


def _encode(encoder: nnx.Module, mel_bmt: np.ndarray) -> np.ndarray:
    return np.asarray(_jit_encode(encoder, jnp.asarray(mel_bmt.transpose(0, 2, 1))))


@nnx.jit
def _jit_encode(encoder: nnx.Module, mel_btm: jnp.ndarray) -> jnp.ndarray:
    return encoder(mel_btm)


def _hf_reference(model: "transformers.PreTrainedModel", mel_bmt: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.model.encoder(torch.from_numpy(mel_bmt)).last_hidden_state.numpy()


def _convert(hf_dir: pathlib.Path, out: pathlib.Path, quantization: str) -> pathlib.Path:
    """CTranslate2's own converter (offline: a stub vocabulary replaces the Whisper tokenizer)."""
    ctranslate2 = pytest.importorskip("ctranslate2")

    class _Vocabulary:
        additional_special_tokens: list = []

        def get_vocab(self) -> dict:
            return {f"token{i}": i for i in range(100)}

    class _Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return _Vocabulary()

    _Converter(str(hf_dir)).convert(str(out), quantization=quantization)
    return out


# ---------------------------------------------------------------------------------------------------------
# CTranslate2.


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8", "int16"])
def test_ctranslate2_directory_matches_ctranslate2(hf_whisper, mel_bmt, tmp_path, quantization):
    ctranslate2 = pytest.importorskip("ctranslate2")
    ct2_dir = _convert(hf_whisper[0], tmp_path / quantization, quantization)
    stored = ct2_reader.read_model_bin(ct2_dir)
    weight_dtype = stored.variables["encoder/layer_0/ffn/linear_0/weight"].dtype
    assert weight_dtype == {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}.get(
        quantization, np.dtype(quantization)
    )

    encoder, loaded = pretrained.load_whisper_encoder(ct2_dir)
    assert loaded.format == "ctranslate2"
    assert (loaded.config.width, loaded.config.num_layers, loaded.config.num_heads) == (64, 2, 4)
    assert (loaded.config.mlp_dim, loaded.config.num_mel_bins) == (128, MELS)

    reference = ctranslate2.models.Whisper(str(ct2_dir), compute_type="float32", intra_threads=1)
    features = ctranslate2.StorageView.from_array(mel_bmt)
    expected = np.array(reference.encode(features, to_cpu=True))
    got = _encode(encoder, mel_bmt)
    assert got.shape == expected.shape == (2, FRAMES // 2, 64)
    err = np.abs(got - expected).max()
    print(f"ctranslate2 {quantization}: slit vs CTranslate2 max abs diff {err:.2e}")
    assert err < ATOL
    if quantization == "float32":  # lossless storage: also equal to the transformers model it came from
        hf_err = np.abs(got - _hf_reference(hf_whisper[1], mel_bmt)).max()
        print(f"ctranslate2 float32: slit vs transformers max abs diff {hf_err:.2e}")
        assert hf_err < ATOL


def test_int8_dequantization_follows_ctranslate2_scales(hf_whisper, tmp_path):
    """int8 weights are `q / scale` with one scale per output row: within half a step of the original."""
    ct2_dir = _convert(hf_whisper[0], tmp_path / "int8", "int8")
    stored = ct2_reader.read_model_bin(ct2_dir, prefix="encoder/")
    original = hf_whisper[1].model.encoder.layers[1].fc1.weight.detach().numpy()
    name = "encoder/layer_1/ffn/linear_0/weight"
    scale = stored.variables[name + "_scale"]
    assert stored.variables[name].dtype == np.int8 and scale.shape == (original.shape[0],)
    step = 1.0 / scale[:, None]
    assert np.all(np.abs(stored.float32(name) - original) <= 0.5 * step + 1e-7)
    assert not any(k.startswith("decoder/") for k in stored.variables)  # prefix: decoder skipped


def test_model_bin_in_parts_reads_as_one_stream(hf_whisper, tmp_path):
    """`model.bin` split in byte ranges, in one directory or given as a list of files anywhere."""
    ct2_dir = _convert(hf_whisper[0], tmp_path / "whole", "float16")
    data = (ct2_dir / "model.bin").read_bytes()
    whole = pretrained.whisper_encoder_params(ct2_dir)

    split_dir = tmp_path / "split"
    split_dir.mkdir()
    cuts = [0, 7, len(data) // 3, len(data) // 3 + 1, len(data)]  # a cut inside the header, tiny parts
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        (split_dir / f"model.bin.part{i + 1}").write_bytes(data[a:b])
    from_dir = pretrained.whisper_encoder_params(split_dir)
    spread = [tmp_path / f"elsewhere{i}" / p.name for i, p in enumerate(sorted(split_dir.iterdir()))]
    for src, dst in zip(sorted(split_dir.iterdir()), spread, strict=True):
        dst.parent.mkdir()
        dst.write_bytes(src.read_bytes())
    from_list = pretrained.whisper_encoder_params(sorted(spread, key=lambda p: p.name))
    for loaded in (from_dir, from_list):
        assert loaded.config == whole.config
        flat = _flat(loaded.params)
        for path, value in _flat(whole.params).items():
            np.testing.assert_array_equal(flat[path], value)

    # A missing middle part is named, not misread.
    (split_dir / "model.bin.part2").unlink()
    with pytest.raises(UserError, match=r"numbered \[1, 3, 4\].*missing"):
        pretrained.whisper_encoder_params(split_dir)


def _flat(params: dict) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(params)


def test_bad_ctranslate2_files_are_reported(hf_whisper, tmp_path):
    ct2_dir = _convert(hf_whisper[0], tmp_path / "ok", "float16")
    data = (ct2_dir / "model.bin").read_bytes()

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated/model\.bin.*truncated"):
        pretrained.whisper_encoder_params(truncated)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"PK\x03\x04" + bytes(64))  # e.g. a zip / pickle, not CTranslate2
    with pytest.raises(UserError, match=r"garbage\.bin.*binary version"):
        pretrained.whisper_encoder_params(garbage)

    with pytest.raises(FileNotFoundError, match="neither a packaged model"):
        pretrained.whisper_encoder_params(tmp_path / "does-not-exist")
    with pytest.raises(UserError, match="no packaged Whisper model"):
        pretrained.packaged_whisper_files("large-v3")


# ---------------------------------------------------------------------------------------------------------
# Hugging Face directories.


def test_hf_directories_both_prefixes_and_shards(hf_whisper, mel_bmt, tmp_path):
    """WhisperForConditionalGeneration (`model.encoder.`), WhisperModel (`encoder.`), sharded safetensors."""
    hf_dir, model = hf_whisper
    expected = _hf_reference(model, mel_bmt)

    whisper_model_dir = tmp_path / "whisper_model"
    model.model.save_pretrained(whisper_model_dir)  # WhisperModel: keys `encoder.*`
    sharded_dir = tmp_path / "sharded"
    model.save_pretrained(sharded_dir, max_shard_size="100KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()

    for directory in (hf_dir, whisper_model_dir, sharded_dir):
        encoder, loaded = pretrained.load_whisper_encoder(directory)
        assert loaded.format == "huggingface"
        err = np.abs(_encode(encoder, mel_bmt) - expected).max()
        print(f"HF directory {directory.name}: max abs diff {err:.2e}")
        assert err < ATOL


def test_hf_directory_problems_are_named(hf_whisper, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_dir, model = hf_whisper
    tensors = load_file(str(hf_dir / "model.safetensors"))
    config = (hf_dir / "config.json").read_text()

    def directory(name: str, tensors: dict, config: str = config) -> pathlib.Path:
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(config)
        return d

    key = "model.encoder.layers.1.fc2.weight"
    missing = directory("missing", {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(
        UserError, match=r"missing tensor 'model\.encoder\.layers\.1\.fc2\.weight'.*\(64, 128\)"
    ):
        pretrained.whisper_encoder_params(missing)

    misshapen = directory("misshapen", dict(tensors, **{key: tensors[key].T.copy()}))
    with pytest.raises(
        UserError, match=r"layers\.1\.fc2\.weight' has shape \(128, 64\), expected.*\(64, 128\)"
    ):
        pretrained.whisper_encoder_params(misshapen)

    extra = directory(
        "extra", dict(tensors, **{"model.encoder.layers.0.adapter.weight": np.zeros(3, np.float32)})
    )
    with pytest.raises(UserError, match=r"unused.*model\.encoder\.layers\.0\.adapter\.weight"):
        pretrained.whisper_encoder_params(extra)

    bert = directory("bert", tensors, json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="'bert' model, not 'whisper'"):
        pretrained.whisper_encoder_params(bert)

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text(config)
    (pickles / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*never reads"):
        pretrained.whisper_encoder_params(pickles)
