"""The frozen-feature cache: `slit cache-features` output read by stage-one training
(`features=cached`) in place of running the frozen encoder.

Shown: the first training step from the cache has the same loss as computing the features (same
batches, same captions); the cached iterator resumes exactly; the cache is keyed by the encoder's
fingerprint and the frontend settings but not by the Q-Former's; a stale or mismatched cache is
refused with what differs and the command that rebuilds it.
"""

import copy
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from slit import config as config_lib
from slit.data import feature_cache, pipeline, sources
from slit.eval import stage1 as stage1_eval
from slit.models.stage1 import Stage1Batch
from slit.train import feature_cache as cache_lib
from slit.train import sharding, stage1, stage1_model
from tests.conftest import ROOT, run_slit, tiny_config, tiny_overrides

NOWHERE = pathlib.Path("/nonexistent")
# 10 s holds every synthetic clip whole, so the compute path crops nothing at random.
SETTINGS = {"data.max_seconds": 10.0}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory, tiny_data_dir):
    root = tmp_path_factory.mktemp("features")
    config = tiny_config(tiny_data_dir, features_dir=str(root), **SETTINGS)
    directory, summary = cache_lib.build(config, log=lambda line: None)
    assert summary["written"] and summary["clips"] == 64 + 16 + 16
    return root, directory


def _model_parts(config):
    """The model's config and parts, built as training builds them."""
    config_lib.validate_stage1(config, num_devices=1)
    cfg = stage1_model.model_config(config, stage1_model.make_tokenizer(config, NOWHERE))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return cfg, stage1_model.create_model(cfg, config.seed, config.audio_encoder.init_seed, mesh, {})


def _train_source(config):
    return sources.open_split(config.data.name, config.data.data_dir, "train")


def test_training_from_the_cache_matches_computing_features(tiny_data_dir, cache_root):
    """The first step's losses: the model's forward on the first batch, as the train step computes it."""
    root, _ = cache_root
    config = tiny_config(tiny_data_dir, features_dir=str(root), features="cached", **SETTINGS)
    cfg, parts = _model_parts(config)
    tokenizer = stage1_model.make_tokenizer(config, NOWHERE)

    @jax.jit
    def losses(params, frozen, batch):
        model = nnx.merge(parts.graphdef, params, frozen)
        return model(Stage1Batch(**batch), rngs=None, negatives_key=jax.random.key(3))[1]

    spec = stage1_model.audio_spec(config)
    common = dict(max_text_length=config.data.max_text_length, global_batch_size=config.batch_size, seed=0)
    computed_batch = next(iter(pipeline.train_dataset(_train_source(config), tokenizer, spec, **common)))
    computed = losses(parts.params, parts.frozen, {k: computed_batch[k] for k in stage1.BATCH_KEYS})

    cache = cache_lib.open_for_training(config, cfg, parts.frozen)
    stream = feature_cache.cached_train_dataset(
        _train_source(config), cache.splits["train"], tokenizer, spec, **common
    )
    iterator = iter(stream)
    cached_batch = next(iterator)
    np.testing.assert_array_equal(cached_batch["text_ids"], computed_batch["text_ids"])  # same captions
    assert cached_batch["features"].shape == (8, 500, 32) and cached_batch["frame_mask"].dtype == bool
    from_cache = losses(parts.params, parts.frozen, {k: cached_batch[k] for k in stage1.CACHED_BATCH_KEYS})
    for name in ("loss", "itc_loss", "itm_loss", "itg_loss"):
        assert abs(float(computed[name]) - float(from_cache[name])) < 1e-5, name

    # The cached stream's iterator is checkpointable: a restored copy continues identically.
    saved = iterator.get_state()
    expected = next(iterator)
    resumed = iter(stream)
    resumed.set_state(saved)
    got = next(resumed)
    for key in stage1.CACHED_BATCH_KEYS:
        np.testing.assert_array_equal(got[key], expected[key])


def _parts(config):
    """The model's config and frozen weights, built as training builds them (no train step)."""
    config_lib.validate_stage1(config, num_devices=1)
    cfg = stage1_model.model_config(config, stage1_model.make_tokenizer(config, NOWHERE))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return cfg, stage1_model.create_model(cfg, config.seed, config.audio_encoder.init_seed, mesh, {}).frozen


def test_cache_is_keyed_by_encoder_and_frontend_not_by_the_qformer(tiny_data_dir, cache_root):
    root, directory = cache_root

    def key(config, frozen=None):
        cfg, built = _parts(config)
        ident = cache_lib.identity(config, cfg, built if frozen is None else frozen)
        return feature_cache.cache_directory(root, config.data.name, ident), ident, built

    def config(**overrides):
        return tiny_config(tiny_data_dir, features_dir=str(root), **{**SETTINGS, **overrides})

    other_qformer = {"qformer.width": 16, "qformer.mlp_dim": 24, "qformer.num_queries": 2, "batch_size": 4}
    same, ident, frozen = key(config(**other_qformer))
    assert same == directory  # the Q-Former and the batch change neither the frozen weights nor the key
    assert ident["frontend"] == {
        "encoder": "whisper",
        "sample_rate": 16000,
        "max_seconds": 10.0,
        "hidden_layer": -1,
        "window_seconds": 0.0,
        "num_mel_bins": 80,
    }
    others = {
        "init_seed": key(config(**{"audio_encoder.init_seed": 7}))[0],
        # Frontend settings: the same weights, another key.
        "max_seconds": key(config(**{"data.max_seconds": 8.0}), frozen)[0],
        "hidden_layer": key(config(**{"audio_encoder.hidden_layer": 0}), frozen)[0],
        "window": key(config(**{"audio_encoder.window_seconds": 5.0}), frozen)[0],
    }
    assert len({directory, *others.values()}) == 5, others


def test_stale_or_mismatched_caches_are_refused(tiny_data_dir, cache_root, tmp_path):
    root, directory = cache_root

    def refusal(root_dir, **overrides):
        config = tiny_config(
            tiny_data_dir, features_dir=str(root_dir), features="cached", **{**SETTINGS, **overrides}
        )
        cfg, frozen = _parts(config)
        with pytest.raises(feature_cache.StaleCacheError) as info:
            cache_lib.open_for_training(config, cfg, frozen)
        return str(info.value)

    # Another encoder (same architecture, other weights): the fingerprint differs.
    message = refusal(root, **{"audio_encoder.init_seed": 7})
    assert "encoder_fingerprint: cache has" in message and str(directory) in message
    assert "slit cache-features --config" in message and "--config.audio_encoder.init_seed=7" in message
    # Another frontend setting.
    message = refusal(root, **{"audio_encoder.hidden_layer": 0})
    assert "frontend.hidden_layer: cache has -1, this config needs 0" in message
    # No cache at all.
    assert "no feature cache of slit_synthetic_sounds/tiny" in refusal(tmp_path / "empty")

    # The dataset changed since (a split of another size): the cache is stale.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest_path = copy / directory.relative_to(root) / feature_cache.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["data"]["splits"]["train"] = 63
    manifest_path.write_text(json.dumps(manifest))
    message = refusal(copy)
    assert "is stale" in message and "splits.train: cache has 63, this config needs 64" in message
    assert "slit cache-features" in message

    # An interrupted write is not a cache.
    (manifest_path.parent).rename(manifest_path.parent.with_name(manifest_path.parent.name + ".partial"))
    assert "never completed" in refusal(copy)


def test_cli_trains_from_the_cache_and_refuses_a_stale_one_without_traceback(
    tiny_data_dir, cache_root, tmp_path
):
    root, _ = cache_root
    overrides = tiny_overrides(tiny_data_dir, features_dir=str(root), features="cached", **SETTINGS)
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    config = str(ROOT / "configs" / "stage1_synthetic.py")
    result = run_slit(
        "train",
        "--config",
        config,
        "--workdir",
        str(tmp_path / "bad"),
        *args,
        "--config.audio_encoder.init_seed=5",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "encoder_fingerprint" in result.stderr and "Traceback" not in result.stderr

    result = run_slit("cache-features", "--config", config, *args)  # already up to date: nothing written
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"written": false' in result.stdout and "--config.features=cached" in result.stdout


def test_eval_of_a_cached_run_reads_the_cache_and_reports_what_the_trainer_did(trained_run, tmp_path, capsys):
    """`slit eval` on a run trained with features=cached reads the split's frozen features from the
    cache (the numbers equal the trainer's own test evaluation, which ran the encoder), and with no
    usable cache it says so and runs the encoder."""
    workdir, config = trained_run
    run_dir = shutil.copytree(workdir, tmp_path / "run")
    root = tmp_path / "features"
    cache_config = copy.deepcopy(config)
    cache_config.features_dir = str(root)
    cache_lib.build(cache_config, log=lambda _: None)
    saved = json.loads(config_lib.to_json(config))  # (the CLI writes config.json; train() alone does not)
    (run_dir / "config.json").write_text(json.dumps(dict(saved, features="cached", features_dir=str(root))))

    report, _ = stage1_eval.evaluate_run(run_dir, config.data.name)
    assert "reading frozen features from" in capsys.readouterr().out
    trainer = json.loads((workdir / "eval" / "retrieval.json").read_text())
    for ranking, got in (("contrastive", report["contrastive"]), ("reranked", report["reranked"])):
        want = trainer if ranking == "contrastive" else trainer["reranked"]
        for direction in ("audio_to_text", "text_to_audio"):
            for metric, value in want[direction].items():
                assert got[direction][metric] == pytest.approx(value, abs=1e-6), (ranking, direction, metric)

    (run_dir / "config.json").write_text(
        json.dumps(dict(saved, features="cached", features_dir=str(tmp_path / "empty")))
    )
    stage1_eval.evaluate_classification_run(run_dir, config.data.name)
    assert "note: computing frozen features (no usable feature cache" in capsys.readouterr().out
