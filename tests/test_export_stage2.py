"""`slit export` of a stage-two run: a bundle that generates the run's greedy tokens, safetensors with a
stage-two model card, the InstructBLIP / BLIP-2 layouts in transformers, and bad requests through the CLI.

One tiny stage-two run (random tiny Llama from tests/test_train_stage2.py, 2 steps) serves every test.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from slit import config as config_lib
from slit import export, runs
from slit.data import pipeline, sources
from slit.data.tasks import DEFAULT_TEMPLATES as TASK_INSTRUCTIONS
from slit.errors import UserError
from slit.generate import answerer
from slit.train import stage2
from tests.conftest import TINY_DATA, run_slit
from tests.test_train_stage2 import stage2_config, write_tiny_llama

ATOL = 1e-4


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_data_dir, llm_dir) -> pathlib.Path:
    """A 2-step stage-two workdir (instruction in the Q-Former), with its test evaluation reports."""
    workdir = tmp_path_factory.mktemp("stage2_run")
    config = stage2_config(
        tiny_data_dir, llm_dir, total_steps=2, checkpoint_every_steps=2, **{"eval.max_clips": 8}
    )
    (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")  # as `slit train` does
    stage2.train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def trained(run_dir) -> runs.TrainedRun:
    return runs.load_trained(run_dir)


@pytest.fixture(scope="module")
def bundle_dir(run_dir, tmp_path_factory) -> pathlib.Path:
    return export.export(run_dir, "bundle", tmp_path_factory.mktemp("bundles") / "bundle")


@pytest.fixture(scope="module")
def test_clips(trained) -> dict:
    """The first 8 test clips: audio (8, S), num_samples (8,), and one caption and one question
    instruction per clip."""
    test = sources.open_split(TINY_DATA, trained.config.data.data_dir, "test")
    batch = next(pipeline.eval_audio_batches(test, trained.spec, 8))
    questions = [
        TASK_INSTRUCTIONS["qa"][i % 3].format(question=test[i]["questions"][0].decode()) for i in range(8)
    ]
    captions = [TASK_INSTRUCTIONS["caption"][i % 4] for i in range(8)]
    return {
        "audio": batch["audio"],
        "num_samples": batch["num_samples"],
        "instructions": [captions, questions],
    }


def soft_prompt_and_greedy_tokens(run: runs.TrainedRun, clips: dict, instructions: list[str]) -> tuple:
    """The soft prompt (B, Q, D) and greedy tokens (B, T) with lengths (B,), through the model's own
    methods and slit.generate (what the Answerer decodes)."""
    from slit.generate import generate

    a, d = run.answerer, run.config.data
    model = nnx.merge(a.graphdef, run.params, a.frozen)
    qformer_ids = a.encoders.qformer.encode(instructions)
    instruction_ids = a.encoders.instruction.encode(instructions, d.max_instruction_length)
    soft = model.soft_prompt(
        jnp.asarray(clips["audio"]), jnp.asarray(clips["num_samples"]), qformer_ids, None
    )
    embeds, mask, ids = model.prompt(soft, instruction_ids)
    gen = answerer.generation_config(run.config, num_beams=1, do_sample=False)
    out = generate(model.llm, embeds, mask, gen, prompt_token_ids=ids)
    return np.asarray(soft), np.asarray(out.tokens), np.asarray(out.lengths)


# --------------------------------------------------------------------------------------------------
# bundle
# --------------------------------------------------------------------------------------------------


def test_bundle_generates_the_greedy_tokens_of_the_run(trained, bundle_dir, test_clips):
    rebuilt, tokenizer, info = export.load_bundle(bundle_dir)
    assert isinstance(rebuilt, runs.TrainedRun) and rebuilt.step == trained.step == info["step"] == 2
    assert tokenizer.vocab_size == trained.answerer.encoders.qformer.tokenizer.vocab_size
    gen = answerer.generation_config(trained.config, num_beams=1, do_sample=False)
    all_tokens = []
    for instructions in test_clips["instructions"]:
        want_soft, want_tokens, want_lengths = soft_prompt_and_greedy_tokens(
            trained, test_clips, instructions
        )
        got_soft, got_tokens, got_lengths = soft_prompt_and_greedy_tokens(rebuilt, test_clips, instructions)
        np.testing.assert_array_equal(got_soft, want_soft)
        np.testing.assert_array_equal(got_lengths, want_lengths)
        for i, n in enumerate(want_lengths):
            np.testing.assert_array_equal(got_tokens[i, :n], want_tokens[i, :n], err_msg=instructions[i])
        assert want_lengths.max() > 0
        all_tokens.append(want_tokens)
        audio, num_samples = test_clips["audio"], test_clips["num_samples"]
        assert rebuilt.answer(audio, num_samples, instructions, gen) == trained.answer(
            audio, num_samples, instructions, gen
        )
    # The soft prompt depends on the instruction (it enters the Q-Former), so the two sets differ.
    caption_soft = soft_prompt_and_greedy_tokens(rebuilt, test_clips, test_clips["instructions"][0])[0]
    question_soft = soft_prompt_and_greedy_tokens(rebuilt, test_clips, test_clips["instructions"][1])[0]
    assert np.abs(caption_soft - question_soft).max() > 1e-3


def test_generate_from_a_bundle_answers_every_clip_and_prompt(trained, bundle_dir, test_clips, tmp_path):
    """`slit generate --bundle` with two clips and two prompts: one block per clip, and each answer is the
    run's own greedy answer to that (clip, prompt) pair."""
    import soundfile as sf

    wavs = []
    for i in range(2):
        n = int(test_clips["num_samples"][i])
        wavs.append(tmp_path / f"clip{i}.wav")
        sf.write(str(wavs[-1]), np.asarray(test_clips["audio"][i, :n]), 16000, subtype="PCM_16")
    prompts = [test_clips["instructions"][0][0], test_clips["instructions"][1][0]]
    out = tmp_path / "answers.json"
    args = ["generate", "--bundle", str(bundle_dir), "--json", str(out), "--max-new-tokens", "8"]
    for wav in wavs:
        args += ["--audio", str(wav)]
    for prompt in prompts:
        args += ["--prompt", prompt]
    result = run_slit(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(out.read_text())
    assert [item["audio"] for item in answers] == [str(w) for w in wavs]
    gen = answerer.generation_config(trained.config, max_new_tokens=8)
    for i, item in enumerate(answers):
        audio = np.repeat(test_clips["audio"][i : i + 1], 2, axis=0)
        num_samples = np.repeat(test_clips["num_samples"][i : i + 1], 2)
        assert list(item["answers"].values()) == trained.answer(audio, num_samples, prompts, gen)
        assert f"{wavs[i]}\n  {prompts[0]} -> " in result.stdout
    missing = run_slit("generate", "--bundle", str(tmp_path / "nowhere"), "--audio", str(wavs[0]))
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_bundle_holds_the_model_config_tokenizers_and_frozen_identities(run_dir, bundle_dir):
    info = json.loads((bundle_dir / "config.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    model = info["model"]
    assert info["format"] == "bundle" and info["stage"] == model["trainer"] == "stage2"
    for group in ("llm", "audio_encoder", "qformer", "tokenizer", "eval"):
        assert model[group] == config[group], group
    data = config["data"]
    assert model["data"] == {k: data[k] for k in data if k == "sample_rate" or k.startswith("max_")}
    assert "max_qformer_instruction_length" in model["data"] and "max_answer_length" in model["data"]
    assert "optimizer" not in model and "data_dir" not in model["data"]  # training settings stay behind
    metadata = runs.load_run(run_dir).metadata
    assert info["frozen_models"] == metadata["frozen_models"]
    assert set(info["frozen_models"]) == {"audio_tower", "llm"}
    assert (bundle_dir / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    llm_files = sorted(p.name for p in (run_dir / "llm_tokenizer").iterdir())
    assert llm_files and sorted(p.name for p in (bundle_dir / "llm_tokenizer").iterdir()) == llm_files
    for name in llm_files:
        assert (bundle_dir / "llm_tokenizer" / name).read_bytes() == (
            run_dir / "llm_tokenizer" / name
        ).read_bytes()


def test_bundle_refuses_another_llm_and_names_a_missing_one(bundle_dir, tmp_path):
    other = write_tiny_llama(tmp_path / "other_llama", seed=1)  # same shapes, other weights
    with pytest.raises(UserError, match="llm: trained against"):
        export.load_bundle(bundle_dir, llm_path=str(other))
    with pytest.raises(UserError, match="llm_path"):
        export.load_bundle(bundle_dir, llm_path=str(tmp_path / "absent"))


# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------


def test_safetensors_export_has_weights_config_tokenizers_and_a_stage_two_card(run_dir, tmp_path):
    out = tmp_path / "out"
    result = run_slit("export", "--workdir", str(run_dir), "--format", "safetensors", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    run = runs.load_run(run_dir)
    saved = export.flatten(run.params)
    weights = load_file(str(out / "model.safetensors"))
    assert sorted(weights) == sorted(saved)
    assert {".".join(k.split(".")[:2]) for k in weights} == {
        "bridge.qformer",
        "bridge.projection",
    }  # no frozen
    for name, value in saved.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    info = json.loads((out / "config.json").read_text())
    assert (
        info["stage"] == "stage2" and info["step"] == 2 and info["model"]["llm"] == run.config.llm.to_dict()
    )
    assert (out / "tokenizer.json").is_file() and (out / "llm_tokenizer" / "tokenizer.json").is_file()

    card = (out / "README.md").read_text()
    assert card.startswith("# slit stage-two") and "stage-one" not in card.splitlines()[0]
    assert run.frozen_models["llm"]["source"] in card and run.frozen_models["llm"]["fingerprint"] in card
    llm_width = saved["bridge.projection.kernel"].shape[1]
    assert f"to the frozen LLM's width {llm_width}" in card
    assert "instruction enters the Q-Former" in card and run.config.data.name in card
    reports = sorted((run_dir / "eval").glob("*.md"))
    assert {"captioning", "aqa"} <= {p.name.split("-")[0] for p in reports}  # and classification
    for report in reports:  # every evaluation table of the workdir, row by row
        for row in report.read_text().splitlines():
            if row.startswith("|"):
                assert row in card, (report.name, row)
    assert "load_bundle" in card


# --------------------------------------------------------------------------------------------------
# hf-blip2: InstructBLIP (instruction in the Q-Former) and BLIP-2 (queries alone)
# --------------------------------------------------------------------------------------------------


def slit_features(trained: runs.TrainedRun, clips: dict) -> tuple[np.ndarray, np.ndarray, nnx.Module]:
    """The frozen encoder's frames (B, F, E) and mask (B, F), and the merged slit model."""
    a = trained.answerer
    model = nnx.merge(a.graphdef, trained.params, a.frozen)
    features, mask = model.encode_audio(jnp.asarray(clips["audio"]), jnp.asarray(clips["num_samples"]))
    return np.array(features), np.array(mask), model  # writable copies, for torch.from_numpy


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    err = float(np.abs(got - want).max())
    assert err < ATOL, f"{what}: max abs difference {err:.2e} from slit's"


def load_hf(cls: type, directory: pathlib.Path) -> object:
    """Loads an export; only the image tower's embeddings and the language model may be missing."""
    model, info = cls.from_pretrained(str(directory), output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    missing = [k for k in info["missing_keys"] if not k.startswith("language_model.")]
    assert all(k.startswith("vision_model.embeddings.") for k in missing), missing
    assert any(k.startswith("language_model.") for k in info["missing_keys"])  # the LLM is not exported
    return model.eval()


def test_hf_blip2_export_of_an_instruction_run_is_instructblip_and_matches(
    run_dir, trained, test_clips, tmp_path
):
    torch = pytest.importorskip("torch")
    import transformers

    out = tmp_path / "hf"
    result = run_slit("export", "--workdir", str(run_dir), "--format", "hf-blip2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["InstructBlipForConditionalGeneration"]
    llm_config = json.loads((pathlib.Path(trained.config.llm.path) / "config.json").read_text())
    assert hf_config["text_config"]["hidden_size"] == llm_config["hidden_size"]
    assert hf_config["slit"]["frozen_models"] == runs.load_run(run_dir).frozen_models
    model = load_hf(transformers.InstructBlipForConditionalGeneration, out)

    # The Q-Former alone: InstructBlipQFormerModel takes every exported qformer.* tensor, and needs no other.
    tensors = load_file(str(out / "model.safetensors"))
    qformer_sd = {
        k.removeprefix("qformer."): torch.from_numpy(v)
        for k, v in tensors.items()
        if k.startswith("qformer.")
    }
    alone = transformers.InstructBlipQFormerModel(model.config.qformer_config)
    report = alone.load_state_dict(qformer_sd, strict=False)
    assert not report.missing_keys and not report.unexpected_keys, report

    features, frame_mask, slit_model = slit_features(trained, test_clips)
    instructions = test_clips["instructions"][1]
    qformer_ids = trained.answerer.encoders.qformer.encode(instructions)
    pad = trained.answerer.encoders.qformer.tokenizer.pad_id
    q = trained.config.qformer.num_queries
    want_queries = np.asarray(
        slit_model.bridge.query_outputs(
            jnp.asarray(features), jnp.asarray(frame_mask), jnp.asarray(qformer_ids), None
        )
    )
    want_soft = np.asarray(slit_model.bridge.projection(jnp.asarray(want_queries)))
    with torch.no_grad():
        normed = model.vision_model.post_layernorm(torch.from_numpy(features))
        mask = np.concatenate(
            [np.ones((len(qformer_ids), q), np.int64), (qformer_ids != pad).astype(np.int64)], 1
        )
        hidden = model.qformer(
            input_ids=torch.from_numpy(qformer_ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask),
            query_embeds=model.query_tokens.expand(len(qformer_ids), -1, -1),
            encoder_hidden_states=normed,
            encoder_attention_mask=torch.from_numpy(frame_mask.astype(np.int64)),
        ).last_hidden_state[:, :q]
        soft = model.language_projection(hidden)
    assert_close(hidden.numpy(), want_queries, "query outputs")
    assert_close(soft.numpy(), want_soft, "soft prompt")
    assert (out / "tokenizer.json").is_file() and (out / "llm_tokenizer").is_dir()


def test_hf_blip2_export_of_a_queries_only_run_is_blip2_and_matches(run_dir, trained, test_clips, tmp_path):
    """The layout follows `qformer.instruction`: the same weights, read by a run that keeps the instruction
    out of the Q-Former, are BLIP-2's (queries alone, no text FFN or word embeddings)."""
    torch = pytest.importorskip("torch")
    import transformers

    run = runs.load_run(run_dir)
    run.config.qformer.instruction = False
    out = tmp_path / "blip2"
    out.mkdir()
    export.export_hf_blip2(run, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Blip2ForConditionalGeneration"]
    tensors = load_file(str(out / "model.safetensors"))
    assert not any(
        ".intermediate.dense" in k or "embeddings." in k for k in tensors if k.startswith("qformer.")
    )
    model = load_hf(transformers.Blip2ForConditionalGeneration, out)
    alone = transformers.Blip2QFormerModel(model.config.qformer_config)
    qformer_sd = {
        k.removeprefix("qformer."): torch.from_numpy(v)
        for k, v in tensors.items()
        if k.startswith("qformer.")
    }
    report = alone.load_state_dict(qformer_sd, strict=False)
    assert not report.missing_keys and not report.unexpected_keys, report

    features, frame_mask, slit_model = slit_features(trained, test_clips)
    want_queries = np.asarray(
        slit_model.bridge.query_outputs(jnp.asarray(features), jnp.asarray(frame_mask), None, None)
    )
    with torch.no_grad():
        hidden = model.qformer(
            query_embeds=model.query_tokens.expand(len(features), -1, -1),
            encoder_hidden_states=model.vision_model.post_layernorm(torch.from_numpy(features)),
            encoder_attention_mask=torch.from_numpy(frame_mask.astype(np.int64)),
        ).last_hidden_state
        soft = model.language_projection(hidden)
    assert_close(hidden.numpy(), want_queries, "query outputs")
    want_soft = np.asarray(slit_model.bridge.projection(jnp.asarray(want_queries)))
    assert_close(soft.numpy(), want_soft, "soft prompt")


# --------------------------------------------------------------------------------------------------
# Bad requests through the CLI: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------------


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slit export: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_export_errors_say_what_to_do(run_dir, tmp_path):
    out = str(tmp_path / "out")
    no_checkpoint = tmp_path / "fresh_run"
    (no_checkpoint / "checkpoints").mkdir(parents=True)
    (no_checkpoint / "config.json").write_text(json.dumps({"trainer": "stage2"}))
    assert_one_line_error(
        run_slit("export", "--workdir", str(no_checkpoint), "--format", "bundle", "--out", out),
        "holds no checkpoint yet",
        "slit train",
    )
    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    (not_a_run / "cat.jpg").write_bytes(b"x")
    assert_one_line_error(
        run_slit("export", "--workdir", str(not_a_run), "--format", "bundle", "--out", out),
        "is not a slit run",
        "give the workdir",
    )
    assert_one_line_error(
        run_slit("export", "--workdir", str(tmp_path / "nowhere"), "--format", "bundle", "--out", out),
        "no such directory",
    )
    assert_one_line_error(
        run_slit("export", "--workdir", str(run_dir), "--format", "onnx", "--out", out),
        "'onnx'",
        "safetensors, bundle, hf-blip2",
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    assert_one_line_error(
        run_slit("export", "--workdir", str(run_dir), "--format", "safetensors", "--out", str(full)),
        "not empty",
        "new (or empty) directory",
    )
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
