"""Frozen or trainable per component (`audio_encoder.trainable`, `llm.trainable`).

A trainable component starts from exactly the weights the frozen one would hold, so the first step's
loss is the frozen model's; its weights are then `nnx.Param`s: gradients and Adam moments reach them,
the step moves them, checkpoints hold them, and the frozen-model fingerprints leave them out. A stage-one
run that trained its encoder hands it on to stage two only into a trainable encoder.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from slit import config as config_lib  # noqa: E402
from slit import export  # noqa: E402
from slit.config import ConfigError  # noqa: E402
from slit.errors import UserError  # noqa: E402
from slit.train import checkpoint, init_from, stage1, stage2, stage2_model  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.test_stage2_components import write_encoder  # noqa: E402
from tests.test_train_stage2 import Built, adam_moments, flat, stage2_config, write_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def two_steps(built: Built) -> tuple[dict, float]:
    """Two train steps (the first at learning rate 0, in warmup) from a copy of the fresh state, on the
    same batch: (new state, the first step's loss)."""
    state = jax.tree.map(lambda x: x.copy(), built.setup.state)
    losses = []
    for seed in (3, 4):
        state, metrics = built.setup.step_fn(
            state, built.setup.parts.frozen, built.batches[0], jax.random.key(seed)
        )
        losses.append(float(metrics["loss"]))
    return state, losses[0]


def test_stage_two_trains_a_pretrained_encoder_and_the_llm_from_their_frozen_weights(
    tiny_data_dir, llm_dir, tmp_path
):
    encoder = write_encoder("whisper", tmp_path / "whisper")
    frozen = Built(stage2_config(tiny_data_dir, llm_dir, **encoder), num_batches=1)
    trained_config = stage2_config(
        tiny_data_dir, llm_dir, **encoder, **{"audio_encoder.trainable": True, "llm.trainable": True}
    )
    stage2.validate(trained_config, num_devices=1)
    trained = Built(trained_config, num_batches=1)

    # The same weights, moved from the frozen state to the trainable one; nothing frozen is left.
    assert set(frozen.setup.parts.frozen) == {"audio_tower", "llm"} and trained.setup.parts.frozen == {}
    params = flat(jax.device_get(trained.setup.state["params"]))
    for component in ("audio_tower", "llm"):
        held = flat(jax.device_get(frozen.setup.parts.frozen[component]))
        assert len(held) > 5
        for name, value in held.items():
            np.testing.assert_array_equal(params[f"{component}/{name}"], value, err_msg=name)
    sources = stage2_model.frozen_sources(trained_config, trained.llm_source)
    assert checkpoint.frozen_identity(trained.setup.parts.frozen, sources) == {}

    # The first step's loss is the frozen model's (same forward pass); gradients reach the encoder's
    # first convolution and the LLM's first layer (Adam's first moment is non-zero exactly where the
    # gradient is), and the steps move their weights.
    state_frozen, loss_frozen = two_steps(frozen)
    state, loss = two_steps(trained)
    np.testing.assert_allclose(loss, loss_frozen, rtol=1e-5)
    moments = flat(jax.device_get(adam_moments(state["opt_state"]).mu))
    assert not any(
        n.startswith(("audio_tower", "llm")) for n in flat(adam_moments(state_frozen["opt_state"]).mu)
    )
    after = flat(jax.device_get(state["params"]))
    for name in ("audio_tower/encoder/conv1/kernel", "llm/layers/0/attention/q_proj/kernel"):
        assert name in moments, sorted(n for n in moments if n.startswith(name.split("/")[0]))[:5]
        assert np.abs(moments[name]).max() > 0, name
        assert not np.array_equal(after[name], params[name]), name


def test_config_values_that_cannot_work_are_refused(tiny_data_dir, llm_dir):
    cached = tiny_config(tiny_data_dir, **{"audio_encoder.trainable": True, "features": "cached"})
    with pytest.raises(
        ConfigError, match=r"audio_encoder\.trainable=true with features=cached.*features=compute"
    ):
        config_lib.validate_stage1(cached, num_devices=1)
    bf16 = stage2_config(tiny_data_dir, llm_dir, **{"llm.trainable": True, "llm.param_dtype": "bfloat16"})
    with pytest.raises(ConfigError, match=r"llm\.trainable=true with llm\.param_dtype=bfloat16"):
        stage2.validate(bf16, num_devices=1)


def test_a_stage_one_trained_encoder_goes_on_only_into_a_trainable_one(tiny_data_dir, llm_dir, tmp_path):
    workdir = tmp_path / "stage1"
    overrides = {"audio_encoder.trainable": True}
    stage1.train(tiny_config(tiny_data_dir, total_steps=2, **overrides), workdir)
    saved = flat(init_from.read_params(workdir)[0])
    metadata = json.loads((workdir / "checkpoints" / "2" / "metadata" / "metadata").read_text())
    assert "audio_tower" not in metadata["frozen_models"]  # its weights are in the checkpoint instead

    # Exported, the trained encoder goes with the Q-Former, the card says so, and the bundle rebuilds it.
    export.export(workdir, "safetensors", tmp_path / "safetensors")
    card = (tmp_path / "safetensors" / "README.md").read_text()
    assert "against a fine-tuned random audio encoder" in card and "as `audio_tower.*`" in card
    export.export(workdir, "bundle", tmp_path / "bundle")
    with pytest.raises(UserError, match=r"hf-blip2 writes the Q-Former only.*also trained its audio_tower"):
        export.export(workdir, "hf-blip2", tmp_path / "hf")  # the trained encoder would be lost
    model = export.load_bundle(tmp_path / "bundle").model
    kernel = "audio_tower/encoder/conv1/kernel"
    np.testing.assert_array_equal(np.asarray(model.audio_tower.encoder.conv1.kernel[...]), saved[kernel])

    # The random encoder stage one started from: the trained one differs from it.
    held = Built(stage2_config(tiny_data_dir, llm_dir, init_from=str(workdir)), num_batches=1)
    start = flat(jax.device_get(held.setup.parts.frozen["audio_tower"]))
    moved = [n for n in start if not np.array_equal(saved[f"audio_tower/{n}"], start[n])]
    assert len(moved) > len(start) // 2

    identity = checkpoint.frozen_identity(
        held.setup.parts.frozen, stage2_model.frozen_sources(held.config, held.llm_source)
    )
    with pytest.raises(
        UserError, match=r"stage one trained its audio encoder.*audio_encoder\.trainable=true"
    ):
        init_from.check_init_from_audio_tower(str(workdir), identity["audio_tower"], held.config)

    # Trainable here too: the trainer takes stage one's trained encoder along with its Q-Former (one step
    # at the warmup's learning rate 0, so the checkpoint holds exactly what init_from copied).
    config = stage2_config(
        tiny_data_dir,
        llm_dir,
        init_from=str(workdir),
        **overrides,
        features="compute",
        total_steps=1,
        checkpoint_every_steps=1,
        **{"eval.max_clips": 2, "eval.tasks": ("captioning",)},
    )
    stage2.train(config, tmp_path / "stage2")
    got = flat(init_from.read_params(tmp_path / "stage2")[0])
    for name in start:
        np.testing.assert_array_equal(got[f"audio_tower/{name}"], saved[f"audio_tower/{name}"], err_msg=name)
    np.testing.assert_array_equal(
        got["bridge/qformer/query_tokens"], saved["qformer/query_tokens"]
    )  # and the Q-Former


def test_the_run_says_what_trains_and_what_is_frozen():
    from slit.train.harness import describe_parameters

    params = {"bridge": {"w": np.zeros((300, 100)), "b": np.zeros(100)}, "audio_tower": np.zeros((3, 4))}
    frozen = {"llm": {"embedding": np.zeros((1000, 135))}}
    assert describe_parameters(params, frozen) == (
        "Parameters: trained 30.11 k (bridge 30.10 k, audio_tower 12); frozen 0.14 M (llm 0.14 M)"
    )
    assert describe_parameters(params, {}).endswith("; frozen nothing")


def test_a_run_cannot_switch_a_component_between_frozen_and_trained():
    from slit.train.checkpoint import check_frozen_identity

    tower = {"source": "whisper base", "fingerprint": "abc"}
    llm = {"source": "SmolLM2", "fingerprint": "def"}
    with pytest.raises(UserError, match=r"holds audio_tower frozen, while this run trains it.*init_from"):
        check_frozen_identity({"audio_tower": tower, "llm": llm}, {"llm": llm}, "run/checkpoints/4", True)
    with pytest.raises(UserError, match=r"holds llm trained, while this run freezes it"):
        check_frozen_identity({"audio_tower": tower}, {"audio_tower": tower, "llm": llm}, "run", True)
    check_frozen_identity({"audio_tower": tower}, {"audio_tower": tower}, "run", False)  # unchanged: fine
