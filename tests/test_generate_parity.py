"""slit's decoding loop (slit/generate) against transformers' `generate`, token for token.

transformers writes small random Llama, GPT-2 and T5 checkpoints with `save_pretrained`; slit loads
them from the same directory. Prompts are a left-padded batch of different lengths (pad id 1, so
that transformers' beam search fills finished beams with the pad id). The EOS id is chosen as a
token that transformers' own greedy output emits in the middle of one row and never in another, so
that rows finish at different steps and the rest of the batch goes on. Weights are drawn wider than
transformers' default (std 0.2) so that the next-token scores are not near-ties.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slit.generate import GenerationConfig, generate, generate_seq2seq  # noqa: E402
from slit.models.llm import gpt2, llama, t5  # noqa: E402

VOCAB, PAD = 64, 1
NEW_TOKENS = 10
PROMPT_LENGTHS = (7, 4, 2)  # left-padded to 7


def _write_decoder_only(directory: pathlib.Path, family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=PAD,
        )
    else:
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.2,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=PAD,
        )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _write_t5(directory: pathlib.Path) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.mul_(1.0 + 0.3 * torch.randn_like(p))
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.5)
    model.save_pretrained(directory)
    return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (transformers model, slit model read from the directory transformers wrote)."""
    built = {}

    def get(family: str):
        if family not in built:
            directory = tmp_path_factory.mktemp(family)
            if family == "t5":
                built[family] = _write_t5(directory), t5.t5_from_hf(directory)
            else:
                hf = _write_decoder_only(directory, family)
                load = llama.llama_from_hf if family == "llama" else gpt2.gpt2_from_hf
                built[family] = hf, load(directory)
        return built[family]

    return get


def _prompts() -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids [3, 7] (pad id where masked) and mask."""
    width = max(PROMPT_LENGTHS)
    ids = np.random.default_rng(3).integers(2, VOCAB, (len(PROMPT_LENGTHS), width))
    mask = np.arange(width)[None, :] >= width - np.array(PROMPT_LENGTHS)[:, None]
    return np.where(mask, ids, PAD).astype(np.int32), mask


def _hf_generate(hf, ids, mask, is_seq2seq: bool, **kwargs) -> np.ndarray:
    """transformers' new tokens [B, L] (L = longest row; pad after EOS)."""
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=NEW_TOKENS,
            pad_token_id=PAD,
            **kwargs,
        ).numpy()
    return out[:, 1:] if is_seq2seq else out[:, ids.shape[1] :]


def _mid_sequence_eos(greedy: np.ndarray) -> int:
    """A token that one row emits first at step 2..6 and another row never emits."""
    for token in dict.fromkeys(greedy.ravel().tolist()):
        first = [np.flatnonzero(row == token) for row in greedy]
        stops_mid_way = any(f.size and 2 <= f[0] <= 6 for f in first)
        if stops_mid_way and any(f.size == 0 for f in first):
            return int(token)
    raise AssertionError(f"no mid-sequence EOS candidate in {greedy.tolist()}")


def _slit_generate(model, ids, mask, is_seq2seq: bool, config: GenerationConfig):
    if is_seq2seq:
        out = generate_seq2seq(model, model.embed(jnp.asarray(ids)), jnp.asarray(mask), config)
    else:
        out = generate(
            model, model.embed(jnp.asarray(ids)), jnp.asarray(mask), config, prompt_token_ids=jnp.asarray(ids)
        )
    return np.asarray(out.tokens), np.asarray(out.lengths)


def _assert_same(got: np.ndarray, lengths: np.ndarray, expected: np.ndarray, eos: int) -> None:
    """slit's [B, N] against transformers' [B, L <= N]; past L slit must hold the pad id."""
    print(f"slit {got.tolist()}\nhf   {expected.tolist()}")
    width = expected.shape[1]
    np.testing.assert_array_equal(got[:, :width], expected)
    assert (got[:, width:] == PAD).all()
    expected_lengths = [
        (np.flatnonzero(row == eos)[0] + 1) if (row == eos).any() else NEW_TOKENS for row in expected
    ]
    np.testing.assert_array_equal(lengths, expected_lengths)


@pytest.fixture(scope="module")
def cases(models):
    """family -> (hf, slit model, ids, mask, an eos id that ends one row mid-way), built once."""
    built = {}

    def get(family: str):
        if family not in built:
            hf, model = models(family)
            ids, mask = _prompts()
            free_run = _hf_generate(hf, ids, mask, family == "t5", do_sample=False, eos_token_id=None)
            assert free_run.shape == (3, NEW_TOKENS)
            built[family] = hf, model, ids, mask, _mid_sequence_eos(free_run)
        return built[family]

    return get


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_greedy_matches_transformers(cases, family):
    hf, model, ids, mask, eos = cases(family)
    is_seq2seq = family == "t5"
    expected = _hf_generate(hf, ids, mask, is_seq2seq, do_sample=False, eos_token_id=eos)
    assert expected.shape[1] == NEW_TOKENS and (expected[:, -1] == PAD).any()  # a row stopped, not all
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=(eos,), pad_token_id=PAD)
    _assert_same(*_slit_generate(model, ids, mask, is_seq2seq, config), expected, eos)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_greedy_with_repetition_penalty_matches_transformers(cases, family):
    """The penalty counts prompt and generated ids, not left padding (transformers 5 ignores it);
    for T5 it counts the decoder's ids, the start token included."""
    hf, model, ids, mask, eos = cases(family)
    is_seq2seq = family == "t5"
    kwargs = dict(do_sample=False, eos_token_id=eos, repetition_penalty=1.8)
    expected = _hf_generate(hf, ids, mask, is_seq2seq, **kwargs)
    plain = _hf_generate(hf, ids, mask, is_seq2seq, do_sample=False, eos_token_id=eos)
    assert expected.shape != plain.shape or (expected != plain).any()  # the penalty changes the output
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, eos_token_ids=(eos,), pad_token_id=PAD, repetition_penalty=1.8
    )
    _assert_same(*_slit_generate(model, ids, mask, is_seq2seq, config), expected, eos)


# Each early-stopping rule once, each family once.
BEAM_CASES = [("llama", 0.6, False), ("gpt2", 2.0, True), ("t5", 1.5, "never")]


@pytest.mark.parametrize("family, length_penalty, early_stopping", BEAM_CASES, ids=str)
def test_beam_search_matches_transformers(cases, family, length_penalty, early_stopping):
    hf, model, ids, mask, eos = cases(family)
    is_seq2seq = family == "t5"
    kwargs = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    expected = _hf_generate(hf, ids, mask, is_seq2seq, do_sample=False, eos_token_id=eos, **kwargs)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=(eos,), pad_token_id=PAD, **kwargs)
    _assert_same(*_slit_generate(model, ids, mask, is_seq2seq, config), expected, eos)
