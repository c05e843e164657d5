"""`slit export`: safetensors + model card, bundles that rebuild the model, and bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from slit import export
from slit.data import pipeline, sources
from slit.errors import UserError
from slit.eval import stage1 as stage1_eval
from slit.train import checkpoint, sharding, stage1, stage1_model
from tests.conftest import run_slit


@pytest.fixture
def trained(trained_run):
    return trained_run


def test_safetensors_export_has_the_weights_config_tokenizer_and_a_model_card(trained, tmp_path):
    workdir, config = trained
    result = run_slit(
        "export", "--workdir", str(workdir), "--format", "safetensors", "--out", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model.safetensors" in result.stdout and "README.md" in result.stdout
    out = tmp_path / "out"

    weights = load_file(str(out / "model.safetensors"))
    saved = export.flatten(export.read_run(workdir).params)
    assert sorted(weights) == sorted(saved) and any(k.startswith("qformer.") for k in weights)
    assert not any("audio_tower" in k for k in weights)  # frozen weights are not the export's
    for name in saved:
        np.testing.assert_array_equal(weights[name], saved[name], err_msg=name)

    info = json.loads((out / "config.json").read_text())
    assert info["step"] == 2 and info["model"]["qformer"]["width"] == config.qformer.width
    assert set(info["frozen_models"]) == {"audio_tower"}
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    report = json.loads(next((workdir / "eval").glob("retrieval-*-test.json")).read_text())
    assert f"{100 * report['metrics']['contrastive']['text_to_audio']['R@1']:.1f}" in card
    assert "reranked (top" in card
    assert config.data.name in card and "fingerprint" in card


def test_bundle_rebuilds_a_model_with_the_trained_outputs(trained, tmp_path):
    workdir, config = trained
    export.export(workdir, "bundle", tmp_path / "bundle")
    model, tokenizer, info = export.load_bundle(tmp_path / "bundle")

    # The training code's embeddings, from the workdir's checkpoint restored onto a mesh.
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_dict(config.sharding_rules)
    setup = stage1.build_training(config, stage1_model.make_tokenizer(config, workdir), mesh, rules)
    identity = checkpoint.frozen_identity(setup.parts.frozen, stage1_model.frozen_sources(config))
    ckpt = checkpoint.Checkpointer(workdir, config, identity)
    spec = stage1_model.audio_spec(config)
    source = sources.open_split(config.data.name, config.data.data_dir, "test")
    batch = next(pipeline.eval_audio_batches(source, spec, config.batch_size))
    texts = pipeline.split_captions(source)[0][: config.batch_size]
    ids = tokenizer.encode(texts, config.data.max_text_length)
    state = ckpt.manager.restore(
        2,
        args=checkpoint.ocp.args.Composite(
            state=checkpoint.ocp.args.StandardRestore(
                checkpoint.abstract_like(setup.state, setup.state_shardings)
            )
        ),
    )["state"]
    ckpt.close()
    fns = stage1_eval.make_embedders(setup.parts.graphdef, mesh, rules, setup.parts)
    with jax.set_mesh(mesh):
        emb, _, _ = fns.embed_audio(state["params"], setup.parts.frozen, batch["audio"], batch["num_samples"])
        want_audio = np.asarray(emb)
        want_text = np.asarray(fns.embed_text(state["params"], setup.parts.frozen, ids))

    features, mask = model.encode_audio(batch["audio"], batch["num_samples"])
    got_audio = np.asarray(model.audio_embeddings(model.query_outputs(features, mask, None)))
    got_text = np.asarray(model.text_embeddings(ids, None))
    np.testing.assert_allclose(got_audio, want_audio, atol=1e-5)
    np.testing.assert_allclose(got_text, want_text, atol=1e-5)
    assert info["format"] == "bundle" and info["step"] == 2


def test_bundle_refuses_a_frozen_model_that_changed(trained, tmp_path):
    workdir, _ = trained
    bundle = export.export(workdir, "bundle", tmp_path / "bundle")
    info = json.loads((bundle / "config.json").read_text())
    info["model"]["audio_encoder"]["init_seed"] += (
        1  # the recorded source no longer rebuilds the same encoder
    )
    (bundle / "config.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="audio_tower"):
        export.load_bundle(bundle)


def test_export_refuses_bad_requests_with_clear_messages(trained, tmp_path):
    workdir, _ = trained
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export.export(workdir, "bundle", tmp_path / "full")
    with pytest.raises(UserError, match="no checkpoints/ directory"):
        export.export(tmp_path, "bundle", tmp_path / "new")
    with pytest.raises(UserError, match="has no step 7"):
        export.export(workdir, "bundle", tmp_path / "new", step=7)
    with pytest.raises(UserError, match="not a slit bundle: config.json is missing"):
        export.load_bundle(tmp_path / "full")


def test_hf_blip2_export_loads_in_transformers_and_round_trips(trained, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from slit.interop import hf_convert

    workdir, _ = trained
    result = run_slit(
        "export", "--workdir", str(workdir), "--format", "hf-blip2", "--out", str(tmp_path / "hf")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True
    )
    # An audio model has no image tower: its patch/position embeddings are the only keys missing.
    assert all(k.startswith("vision_model.embeddings.") for k in info["missing_keys"])
    assert not info["unexpected_keys"] and not info["mismatched_keys"]

    # transformers' weights, imported back into slit, are the run's trainable weights.
    state_dict = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    config = hf_convert.blip2_qformer_config(model.config)
    back = export.flatten(hf_convert.blip2_retrieval_params(state_dict, config))
    saved = export.flatten(export.read_run(workdir).params)
    assert {k.split(".")[0] for k in back} >= {"qformer", "audio_projection", "text_projection", "itm_head"}
    for name, value in back.items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
