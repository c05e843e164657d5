"""Pengi's own towers joined in one stage-two run: HTSAT (a CLAP audio directory) as the audio encoder,
CLIP's text tower as the frozen prompt encoder and GPT-2 as the frozen LM, all small random checkpoints
written by transformers. The run trains, evaluates, exports a bundle that answers alike, and its prompt
encoder gives transformers' CLIP text embedding for the ids of the run's own tokenizer."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from slit import config as config_lib  # noqa: E402
from slit import export, runs  # noqa: E402
from slit.data import pipeline, sources  # noqa: E402
from slit.generate import answerer  # noqa: E402
from slit.train import stage2  # noqa: E402
from tests.conftest import TINY_DATA  # noqa: E402
from tests.test_parity_clip_text import MERGES, TEXT_SIZES, VOCAB  # noqa: E402
from tests.test_parity_htsat import write_clap_audio  # noqa: E402
from tests.test_train_stage2 import stage2_config, write_word_tokenizer  # noqa: E402

PROMPT_LENGTH = 16  # CLIP tokens of the instruction (the tiny CLIP has 16 positions)


def write_clip(directory: pathlib.Path) -> torch.nn.Module:
    """A tiny random CLIPTextModelWithProjection and its BPE tokenizer (tokenizer.json), by transformers."""
    vocab_dir = directory.with_name(directory.name + "_vocab")
    vocab_dir.mkdir(parents=True)
    (vocab_dir / "vocab.json").write_text(json.dumps(VOCAB))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    transformers.CLIPTokenizerFast.from_pretrained(str(vocab_dir)).save_pretrained(str(directory))
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TEXT_SIZES, projection_dim=24)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(directory))
    return model


def write_gpt2(directory: pathlib.Path) -> None:
    """A tiny random GPT2LMHeadModel with a word-level tokenizer over the synthetic data's words."""
    vocab = write_word_tokenizer(directory, ["<unk>", "<|endoftext|>"], "<|endoftext|>", "<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1
    )
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(str(directory))


@pytest.fixture(scope="module")
def pengi_as_published(tmp_path_factory, tiny_data_dir) -> tuple[pathlib.Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("pengi_published")
    write_clap_audio(root / "htsat")
    clip = write_clip(root / "clip")
    write_gpt2(root / "gpt2")
    workdir = root / "run"
    workdir.mkdir()
    config = stage2_config(
        tiny_data_dir,
        root / "gpt2",
        total_steps=2,
        checkpoint_every_steps=2,
        **{
            "eval.max_clips": 8,
            "data.max_seconds": 2.0,  # the tiny CLAP extractor's max_length_s
            "data.max_qformer_instruction_length": PROMPT_LENGTH,
            "audio_encoder.kind": "htsat",
            "audio_encoder.path": str(root / "htsat"),
            "bridge.kind": "pengi",
            "bridge.prompt_encoder": "clip",
            "bridge.prompt_encoder_path": str(root / "clip"),
            "bridge.prefix_length": 3,
            "bridge.clip_length": 2,
            "bridge.projection_width": 24,
            "bridge.mapper_layers": 1,
            "bridge.mapper_heads": 4,
            "llm.kind": "hf",
            "optimizer.lr_multipliers": "",
        },
    )
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    stage2.train(config, workdir)
    return workdir, clip


def test_pengi_as_published_trains_evaluates_and_exports(pengi_as_published, tmp_path):
    workdir, clip = pengi_as_published
    run = runs.load_run(workdir)
    assert run.frozen_models["bridge"]["source"].startswith("prompt encoder: CLIP text")
    assert "HTSAT" in run.frozen_models["audio_tower"]["source"]
    assert {p.name.split("-")[0] for p in (workdir / "eval").glob("*.json")} >= {"captioning", "aqa"}

    trained = runs.load_trained(workdir)
    test = sources.open_split(TINY_DATA, trained.config.data.data_dir, "test")
    batch = next(pipeline.eval_audio_batches(test, trained.spec, 4))
    gen = answerer.generation_config(trained.config, num_beams=1, do_sample=False)
    instructions = ["describe the sound.", "how many sounds are there?"] * 2
    want = trained.answer(batch["audio"], batch["num_samples"], instructions, gen)
    rebuilt, _, info = export.load_bundle(export.export(workdir, "bundle", tmp_path / "bundle"))
    assert rebuilt.answer(batch["audio"], batch["num_samples"], instructions, gen) == want

    # The prompt encoder is the CLIP directory's text tower, fed by the run's saved CLIP tokenizer.
    a = trained.answerer
    model = nnx.merge(a.graphdef, trained.params, a.frozen)
    ids = a.encoders.qformer.encode(instructions)
    assert ids.shape == (4, PROMPT_LENGTH)
    reference = transformers.CLIPTokenizerFast.from_pretrained(str(workdir))
    hf_ids = reference(instructions, padding="max_length", max_length=PROMPT_LENGTH, truncation=True)
    np.testing.assert_array_equal(ids, np.asarray(hf_ids["input_ids"]))
    with torch.no_grad():
        embeds = clip(input_ids=torch.from_numpy(np.asarray(ids, np.int64))).text_embeds.numpy()
    got = np.asarray(model.bridge.prompt_tower(jnp.asarray(ids)))
    np.testing.assert_allclose(got, embeds, atol=1e-4)
