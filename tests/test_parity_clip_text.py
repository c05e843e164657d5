"""Parity of slit's CLIP text tower and prompt tokenizer with transformers'.

transformers writes small random `CLIPTextModelWithProjection`, `CLIPModel` and `CLIPTextModel`
checkpoints with `save_pretrained`, and a CLIP tokenizer built from a hand-written byte-level BPE
vocabulary (vocab.json + merges.txt, `</w>` word ends, as CLIP's); slit loads them with
`slit.interop.hf_clip` and `CLIPPromptTokenizer` and embeds a right-padded batch of different lengths.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.interop import hf_clip  # noqa: E402
from slit.interop.pretrained import read_safetensors  # noqa: E402
from slit.models.layers import Frozen, unfreeze  # noqa: E402
from slit.models.text.clip import (  # noqa: E402
    CLIPPromptTokenizer,
    CLIPTextConfig,
    CLIPTextTower,
    pooling_positions,
)

ATOL = 1e-4
LENGTH = 12  # tokens per prompt, BOS and EOS included

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PUNCTUATION = "!,."
MERGES = [
    "t h",
    "th e</w>",
    "c a",
    "ca t</w>",
    "d o",
    "do g</w>",
    "b i",
    "bi r",
    "bir d</w>",
    "a n",
    "an d</w>",
]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

TEXTS = [
    "The cat and the dog.",
    "a BIRD,   sings!",
    "dog",
    "the cat and the dog and the bird and the cat, again and again",  # longer than LENGTH: truncated
]


def _vocab() -> dict[str, int]:
    tokens = [*LETTERS, *PUNCTUATION]
    tokens += [t + "</w>" for t in tokens]
    tokens += [a + b for a, b in (m.split() for m in MERGES)]
    return {t: i for i, t in enumerate([*tokens, BOS, EOS])}  # EOS is the largest id, as in CLIP


VOCAB = _vocab()
VOCAB_SIZE = len(VOCAB)
EOS_ID = VOCAB[EOS]

TEXT_SIZES = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=LENGTH + 4,
    bos_token_id=VOCAB[BOS],
    eos_token_id=EOS_ID,
    pad_token_id=EOS_ID,
)
VISION_SIZES = dict(
    hidden_size=16,
    intermediate_size=20,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=8,
    patch_size=4,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    """A CLIP tokenizer directory (tokenizer.json, tokenizer_config.json) written by transformers."""
    src = tmp_path_factory.mktemp("clip_vocab")
    (src / "vocab.json").write_text(json.dumps(VOCAB))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    # transformers 5's CLIPTokenizerFast ignores vocab_file= / merges_file= arguments (it builds a
    # 3-token vocabulary instead); from_pretrained on the directory reads vocab.json + merges.txt.
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(str(src))
    assert tokenizer.get_vocab() == VOCAB
    out = tmp_path_factory.mktemp("clip_tokenizer")
    tokenizer.save_pretrained(str(out))
    return out


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Norms and biases randomised too (their defaults would hide mistakes); eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.mul_(1.0 + 0.2 * torch.randn_like(p)).add_(0.1 * torch.randn_like(p))
    return model.eval()


def _write(kind: str, directory, **text_overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    text = dict(TEXT_SIZES, **text_overrides)
    if kind == "CLIPModel":
        config = transformers.CLIPConfig(text_config=text, vision_config=VISION_SIZES, projection_dim=24)
    else:
        config = transformers.CLIPTextConfig(**text, projection_dim=24)
    model = _randomize(getattr(transformers, kind)(config))
    model.save_pretrained(str(directory))
    return model


def _reference(kind: str, model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray):
    """(embedding (B, E), last hidden state (B, L, D)) of transformers."""
    args = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    with torch.no_grad():
        if kind == "CLIPModel":
            out = model.get_text_features(**args)
            return out.pooler_output.numpy(), out.last_hidden_state.numpy()
        out = model(**args)
        if kind == "CLIPTextModel":
            return out.pooler_output.numpy(), out.last_hidden_state.numpy()
        return out.text_embeds.numpy(), out.last_hidden_state.numpy()


# kind, text-config overrides: each covers a different switch.
VARIANTS = {
    # first-EOS pooling (eos_token_id is the real end token), quick_gelu.
    "with-projection": ("CLIPTextModelWithProjection", {}),
    # legacy pooling (eos_token_id == 2: argmax of the ids), exact gelu; text_config inside CLIPModel.
    "clip-model-legacy-eos": ("CLIPModel", dict(eos_token_id=2, hidden_act="gelu")),
    # no text_projection: the pooled state itself; top-level names (transformers 5's CLIPTextModel).
    "text-model": ("CLIPTextModel", dict(layer_norm_eps=1e-6)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tower_matches_transformers(variant, tmp_path, tokenizer_dir):
    kind, overrides = VARIANTS[variant]
    model = _write(kind, tmp_path, **overrides)
    ids, mask = CLIPPromptTokenizer(tokenizer_dir).encode(TEXTS, LENGTH)
    assert len(set(mask.sum(-1).tolist())) == len(TEXTS)  # every row a different length

    config, tensors = hf_clip.load_clip_text(tmp_path)
    assert config.eos_token_id == overrides.get("eos_token_id", EOS_ID)
    assert config.hidden_act == overrides.get("hidden_act", "quick_gelu")
    assert config.projection_dim == (0 if kind == "CLIPTextModel" else 24)
    tower = hf_clip.load_clip_text_tower(tmp_path)
    assert tower.output_width == (32 if kind == "CLIPTextModel" else 24)

    want_embedding, want_states = _reference(kind, model, ids, mask)
    states = np.asarray(tower.hidden_states(jnp.asarray(ids), jnp.asarray(mask)))
    embedding = np.asarray(jax.jit(lambda i, m: tower(i, m))(jnp.asarray(ids), jnp.asarray(mask)))
    assert states.shape == want_states.shape == (len(TEXTS), LENGTH, 32)
    assert embedding.shape == want_embedding.shape == (len(TEXTS), tower.output_width)
    np.testing.assert_allclose(states, want_states, atol=ATOL, rtol=0)
    np.testing.assert_allclose(embedding, want_embedding, atol=ATOL, rtol=0)
    print(
        f"{variant}: max |diff| hidden states {np.abs(states - want_states).max():.2e}, "
        f"embedding {np.abs(embedding - want_embedding).max():.2e}"
    )

    # No mask: causal attention only, as transformers without attention_mask.
    with torch.no_grad():
        unmasked = model.get_text_features if kind == "CLIPModel" else model
        out = unmasked(input_ids=torch.tensor(ids, dtype=torch.long))
    want_unmasked = out.last_hidden_state.numpy()
    np.testing.assert_allclose(
        np.asarray(tower.hidden_states(jnp.asarray(ids))), want_unmasked, atol=ATOL, rtol=0
    )

    # Weights placed into a randomly initialised tower give the same embedding.
    fresh = hf_clip.place_clip_text_weights(CLIPTextTower(config, rngs=nnx.Rngs(1)), tensors)
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(ids), jnp.asarray(mask))), embedding, atol=1e-6)


def test_tower_is_frozen_and_unfreezes(tmp_path):
    _write("CLIPTextModelWithProjection", tmp_path)
    tower = hf_clip.load_clip_text_tower(tmp_path)
    assert len(nnx.state(tower, nnx.Param)) == 0
    frozen = nnx.state(tower, Frozen)
    assert len(jax.tree.leaves(frozen)) == 2 + 3 * 16 + 2 + 1  # embeddings, layers, final norm, projection
    ids = jnp.asarray([[VOCAB[BOS], 3, 4, EOS_ID]])
    before = np.asarray(tower(ids, jnp.ones_like(ids)))
    unfreeze(tower)
    assert len(nnx.state(tower, Frozen)) == 0
    assert len(jax.tree.leaves(nnx.state(tower, nnx.Param))) == len(jax.tree.leaves(frozen))
    np.testing.assert_array_equal(np.asarray(tower(ids, jnp.ones_like(ids))), before)


def test_pooling_rules():
    ids = jnp.asarray([[5, 9, 7, 9, 9], [5, 3, 2, 8, 1], [5, 6, 6, 6, 6]])
    # First occurrence of the end token (0 when a row has none) ...
    np.testing.assert_array_equal(pooling_positions(ids, 9), [1, 0, 0])
    # ... or, for legacy configs (eos_token_id 2), the first position of the largest id.
    np.testing.assert_array_equal(pooling_positions(ids, 2), [1, 3, 1])


def test_tokenizer_matches_transformers(tokenizer_dir):
    reference = transformers.CLIPTokenizerFast.from_pretrained(str(tokenizer_dir))
    texts = [*TEXTS, "", "naïve Cat!!", "x" * 40]
    for length in (LENGTH, 5, 40):
        ids, mask = CLIPPromptTokenizer(tokenizer_dir).encode(texts, length)
        want = reference(texts, padding="max_length", truncation=True, max_length=length)
        assert ids.dtype == mask.dtype == np.int32
        np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
        np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"]))
    ids, mask = CLIPPromptTokenizer(tokenizer_dir).encode(TEXTS, LENGTH)
    assert (ids[:, 0] == VOCAB[BOS]).all()
    assert ids[3, -1] == EOS_ID and mask[3].all()  # truncated, the end token kept
    assert ids[2].tolist() == [VOCAB[BOS], VOCAB["dog</w>"], EOS_ID] + [EOS_ID] * (
        LENGTH - 3
    )  # pads with EOS


def test_tokenizer_errors(tmp_path, tokenizer_dir):
    with pytest.raises(UserError, match="no tokenizer.json"):
        CLIPPromptTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(UserError, match="no pad_token '<pad>'"):
        CLIPPromptTokenizer(tmp_path)


def test_loader_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hf_clip.load_clip_text(tmp_path / "absent")
    with pytest.raises(UserError, match="no config.json"):
        hf_clip.load_clip_text(tmp_path)

    # A vision-only checkpoint.
    vision = tmp_path / "vision"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_SIZES)).save_pretrained(str(vision))
    with pytest.raises(UserError, match="vision-only"):
        hf_clip.load_clip_text(vision)

    # PyTorch pickles only.
    pickles = tmp_path / "pickles"
    _write("CLIPTextModel", pickles)
    (pickles / "model.safetensors").rename(pickles / "pytorch_model.bin")
    with pytest.raises(UserError, match="convert-torch"):
        hf_clip.load_clip_text(pickles)

    # A missing tensor, named.
    broken = tmp_path / "broken"
    _write("CLIPTextModelWithProjection", broken)
    tensors = read_safetensors(broken)
    del tensors["text_model.encoder.layers.1.mlp.fc2.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing tensor 'encoder.layers.1.mlp.fc2.weight'"):
        hf_clip.load_clip_text_tower(broken)

    # A projection that disagrees with config.json.
    mismatch = tmp_path / "mismatch"
    _write("CLIPTextModelWithProjection", mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps(dict(config, projection_dim=8)))
    with pytest.raises(UserError, match="projection_dim 8"):
        hf_clip.load_clip_text(mismatch)

    # Weights that do not fit a tower of other sizes.
    good = tmp_path / "good"
    _write("CLIPTextModelWithProjection", good)
    _, tensors = hf_clip.load_clip_text(good)
    small = CLIPTextConfig(
        vocab_size=8, width=8, num_layers=1, num_heads=2, intermediate_size=8, max_positions=4
    )
    with pytest.raises(UserError, match="does not match the CLIP text tower"):
        hf_clip.place_clip_text_weights(CLIPTextTower(small, rngs=nnx.Rngs(0)), tensors)


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(width=30, num_heads=4)
    assert CLIPTextConfig(projection_dim=0).output_width == 512
