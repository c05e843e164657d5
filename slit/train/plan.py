"""Will it fit: the train step of a config compiled ahead of time on simulated devices, and what XLA says
it needs on each device (`slit plan`, slit/commands/plan.py).

The plan is the trainers' own program, built from abstract values only: the model is the stage's
(`stage1.build_training` / `stage2.build_training`, through `slit.train.harness.build_training`) traced
under `jax.eval_shape`, so that its weights, optimizer state and shardings come from the same code and the
same logical-axis rules table as a run's, but no weight is computed, allocated or read (a random
architecture's, or a Hugging Face LLM's config.json only). The jitted step (its in/out shardings and
donation) is then lowered and compiled for the mesh, and XLA's memory and cost analyses are read.

Per device, two sources:
- from the shardings (exact, for any backend): every array's shard shape x dtype: trainable parameters,
  frozen weights, optimizer state, batch;
- from XLA (`compiled.memory_analysis()`, `cost_analysis()`): arguments, outputs, outputs aliased to
  donated arguments, temporaries (activations kept for the backward pass and scratch), generated code,
  and FLOPs. The peak estimate is arguments + outputs - aliased + temporaries. These come from XLA's CPU
  compiler: GPU and TPU compilers fuse and schedule differently, so their temporaries differ (usually
  fewer); treat the total as an estimate, the shardings' numbers as exact.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from slit.errors import UserError
from slit.train import harness, pretrained, sharding

GIB = 1024**3
TRAINERS = {"stage1": "slit.train.stage1", "stage2": "slit.train.stage2"}
_NOWHERE = pathlib.Path("/nonexistent/slit-plan")  # a workdir without a saved tokenizer


@dataclasses.dataclass
class MeshPlan:
    """One compiled train step: the mesh, the per-device bytes (from the shardings and from XLA), FLOPs per
    step per device and the times taken. Bytes are per device; `flops` is XLA's count for one device's
    program (the step's total is `flops * devices` for a program without redundant work)."""

    mesh: dict[str, int]
    devices: int
    # from the shardings: shard shape x dtype, summed per device
    trainable_parameters: int  # counts (global), not bytes
    frozen_parameters: int
    param_bytes: int
    frozen_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    # from XLA's memory analysis
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    flops: float = 0.0
    trace_seconds: float = 0.0
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    error: str = ""  # why this mesh could not be compiled ("" when it was)
    # the program has while loops (scanned layers, accumulation): `flops` is then a lower bound
    loops: bool = False
    rough_bytes: int = 0  # `search`'s rough estimate of the peak, used only to rank meshes for compiling
    # from the shardings, by top-level part: {"params": {"bridge": bytes, ...}, "frozen": {"llm": ...}}
    parts: dict = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """XLA's peak estimate per device: arguments + outputs - outputs aliased to donated inputs + temps."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def state_bytes(self) -> int:
        """What the shardings alone put on one device: trainable params, frozen weights, optimizer state."""
        return self.param_bytes + self.frozen_bytes + self.optimizer_bytes

    def mesh_text(self) -> str:
        return " x ".join(f"{a}={self.mesh[a]}" for a in sharding.MESH_AXES)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["total_bytes"] = self.total_bytes
        out["sources"] = {
            "shardings": ["param_bytes", "frozen_bytes", "optimizer_bytes", "batch_bytes"],
            "xla_memory_analysis": [
                "argument_bytes",
                "output_bytes",
                "alias_bytes",
                "temp_bytes",
                "generated_code_bytes",
                "total_bytes",
            ],
            "xla_cost_analysis": ["flops"],
        }
        return out


# ---------------------------------------------------------------------------------------------------------
# The abstract model: the trainer's own build, traced.


def plan_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What keeps `config` from being planned without weights, each naming the field (empty: plannable)."""
    problems = []
    settings = pretrained.audio_settings(config)
    if settings.kind != "random":
        problems.append(
            f"audio_encoder.kind={settings.kind}: slit plan builds architectures without weights; use "
            "audio_encoder.kind=random with audio_encoder.arch and the encoder's sizes (width, layers, "
            "heads, mlp_dim: slit/train/random_models.py)"
        )
    if config.trainer == "stage2":
        if config.llm.kind == "gguf":
            problems.append(
                "llm.kind=gguf: slit plan reads no weights; use llm.kind=random with llm.arch and the LLM's "
                "sizes, or llm.kind=hf (only its config.json is read)"
            )
        bridge = config.get("bridge", {})
        if bridge.get("kind") == "pengi" and bridge.get("prompt_encoder", "bert") == "clip":
            problems.append(
                "bridge.prompt_encoder=clip: its weights would be read; plan with bridge.prompt_encoder=bert"
            )
    return problems


def _abstract_llm(llm: ml_collections.ConfigDict) -> tuple[Any, nnx.State]:  # noqa: ANN401
    """(graphdef, abstract state) of the stage-two LLM in `llm.param_dtype`, no weight computed or read:
    kind=random from its sizes, kind=hf from the directory's config.json only."""
    if llm.kind == "random":
        from slit.train.random_models import random_llm_builder

        build, _ = random_llm_builder(llm)
    elif llm.kind == "hf":
        from slit.models.llm import gpt2, llama, loading, t5

        hf = loading.read_json(pathlib.Path(llm.path) / "config.json")
        kinds = {
            "llama": (llama.Llama, llama.llama_config_from_hf),
            "qwen2": (llama.Llama, llama.llama_config_from_hf),
            "mistral": (llama.Llama, llama.llama_config_from_hf),
            "gpt2": (gpt2.GPT2, gpt2.gpt2_config_from_hf),
            "t5": (t5.T5, t5.t5_config_from_hf),
        }
        if hf.get("model_type") not in kinds:
            raise UserError(f"llm.path={llm.path}: model_type={hf.get('model_type')!r} is not supported")
        cls, read = kinds[hf["model_type"]]
        module_config = read(hf)

        def build() -> nnx.Module:
            return cls(module_config, rngs=nnx.Rngs(params=0))
    else:
        raise UserError(f"llm.kind={llm.kind}: slit plan reads no weights (use random or hf)")
    from slit.models.llm.quantize import quantize_layers

    dtype = jnp.bfloat16 if llm.param_dtype == "bfloat16" else jnp.float32

    def quantized() -> nnx.Module:  # the layers' kernels as llm.quantization stores them
        module = build()
        quantize_layers(module, llm.get("quantization", "none"))
        return module

    def stored(path: tuple, x: Any) -> Any:  # noqa: ANN401 (floating weights in param_dtype; scales f32)
        scale = any(getattr(k, "key", None) == "kernel_scale" for k in path)
        return (
            jax.ShapeDtypeStruct(x.shape, dtype) if jnp.issubdtype(x.dtype, jnp.floating) and not scale else x
        )

    graphdef, state = nnx.split(nnx.eval_shape(quantized))
    return graphdef, jax.tree_util.tree_map_with_path(stored, state)


@dataclasses.dataclass
class AbstractTraining:
    """The trainer's setup, abstract: the jitted step, the state, frozen weights and batch as
    ShapeDtypeStructs, and their shardings."""

    step_fn: Any
    state: dict
    frozen: dict
    batch: dict
    state_shardings: dict
    frozen_shardings: dict
    batch_shardings: dict
    variables: tuple = ()  # (params, frozen) as the abstract nnx.States the shardings were made from


def _strip(tree: Any) -> Any:  # noqa: ANN401
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def abstract_training(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Mapping[str, Any]
) -> AbstractTraining:
    """The stage's own `build_training`, traced under `jax.eval_shape`: every weight and the optimizer
    state are abstract (nothing is allocated); the jitted step and the shardings are the run's.

    Weights a run would read are not read: a BERT-initialised Q-Former (`qformer.init`) keeps BERT's sizes
    (its config.json) with random values; `bridge.init` is ignored (the same shapes)."""
    problems = plan_problems(config)
    if problems:
        raise UserError("cannot plan this config:\n  - " + "\n  - ".join(problems))
    config = copy.deepcopy(config)
    with config.unlocked():
        if "bridge" in config and "init" in config.bridge:
            config.bridge.init = ""
    captured: dict[str, Any] = {}
    _RECORDED.clear()
    if config.trainer == "stage2":
        from slit.train import stage2, stage2_model

        tokenizer = stage2_model.make_qformer_tokenizer(config, _NOWHERE)
        cfg = dataclasses.replace(stage2_model.model_config(config, tokenizer), qformer_init="")
        llm_graphdef, llm_state = _abstract_llm(config.llm)

        def build(llm_state: nnx.State) -> tuple[dict, dict]:
            llm = nnx.merge(llm_graphdef, llm_state)
            setup = captured["setup"] = stage2.build_training(config, cfg, llm, mesh, rules)
            return setup.state, setup.parts.frozen

        with _tracing():
            state, frozen = jax.eval_shape(build, llm_state)
        batch_keys, ranks = stage2.batch_keys(config), stage2.BATCH_RANKS
    elif config.trainer == "stage1":
        from slit.train import stage1, stage1_model

        tokenizer = stage1_model.make_tokenizer(config, _NOWHERE, lambda: _training_captions(config))

        def model_config(config: ml_collections.ConfigDict, tokenizer: Any) -> Any:  # noqa: ANN401
            return dataclasses.replace(stage1_model.model_config(config, tokenizer), qformer_init="")

        def build() -> tuple[dict, dict]:
            setup = captured["setup"] = stage1.build_training(config, tokenizer, mesh, rules)
            return setup.state, setup.parts.frozen

        with mock.patch.object(stage1, "model_config", model_config), _tracing():
            state, frozen = jax.eval_shape(build)
        batch_keys, ranks = stage1.batch_keys(config), stage1.BATCH_RANKS
    else:
        raise UserError(f"trainer={config.trainer!r} is not known; choose one of {', '.join(TRAINERS)}")
    setup = captured["setup"]
    batch = _abstract_batch(config, setup, state, frozen, batch_keys)
    assert set(batch) == set(setup.batch_shardings), (set(batch), set(setup.batch_shardings))
    assert all(len(batch[k].shape) == ranks[k] for k in batch)
    return AbstractTraining(
        setup.step_fn,
        _strip(state),
        _strip(frozen),
        batch,
        setup.state_shardings,
        setup.parts.frozen_shardings,
        setup.batch_shardings,
        tuple(_RECORDED[:2]),
    )


_RECORDED: list = []


def _recording(state_shardings: Any) -> Any:  # noqa: ANN401
    """`sharding.state_shardings` that also records the abstract states it is asked about (the model's
    params, then its frozen weights), so that other meshes' shardings can be made from them."""

    def record(abstract_state: nnx.State, rules: Any, mesh: Any) -> dict:  # noqa: ANN401
        _RECORDED.append(abstract_state)
        return state_shardings(abstract_state, rules, mesh)

    return record


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """While the trainer's setup is traced: its `jax.set_mesh` blocks (around its initialising jits, which
    name their out_shardings on the mesh anyway) do nothing, since `set_mesh` cannot be entered inside a
    trace; the "Parameters: ..." line it prints stays off stderr."""
    with (
        mock.patch.object(jax, "set_mesh", lambda mesh: contextlib.nullcontext()),
        mock.patch.object(sharding, "state_shardings", _recording(sharding.state_shardings)),
        mock.patch.object(harness, "describe_parameters", lambda *_: ""),
        mock.patch("builtins.print"),
    ):
        yield


def _training_captions(config: ml_collections.ConfigDict) -> Iterator[str]:
    from slit.data import sources
    from slit.data.pipeline import example_texts

    source = sources.open_split(
        config.data.name, config.data.data_dir, config.data.get("train_split", "train")
    )
    for i in range(min(1000, len(source))):
        yield from example_texts(source[i], "captions")


def _abstract_batch(
    config: ml_collections.ConfigDict, setup: Any, state: dict, frozen: dict, keys: Sequence[str]
) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as ShapeDtypeStructs, of the shapes and dtypes the trainers feed: audio (B, S)
    float32 and num_samples (B,) int32, or the cached features (B, F, D) float32 and frame_mask (B, F)
    bool (F and D the encoder's, from its abstract output); token ids (B, L) int32."""
    b, d = config.batch_size, config.data
    samples = pretrained.audio_spec(config).max_samples
    audio = jax.ShapeDtypeStruct((b, samples), jnp.float32)
    num_samples = jax.ShapeDtypeStruct((b,), jnp.int32)
    out = {"audio": audio, "num_samples": num_samples}
    if "features" in keys:
        graphdef = setup.parts.graphdef

        def encode(params: dict, frozen: dict, audio: jax.Array, num: jax.Array) -> tuple:
            return nnx.merge(graphdef, params, frozen).encode_audio(audio, num)

        features, mask = jax.eval_shape(encode, state["params"], frozen, audio, num_samples)
        out |= {
            "features": jax.ShapeDtypeStruct(features.shape, jnp.float32),
            "frame_mask": jax.ShapeDtypeStruct(mask.shape, jnp.bool_),
        }
    ids = lambda n: jax.ShapeDtypeStruct((b, n), jnp.int32)  # noqa: E731
    if config.trainer == "stage1":
        out["text_ids"] = ids(d.max_text_length)
    else:
        out |= {
            "qformer_ids": ids(d.max_qformer_instruction_length),
            "instruction_ids": ids(d.max_instruction_length),
            "answer_ids": ids(d.max_answer_length),
        }
    return {k: out[k] for k in keys}


# ---------------------------------------------------------------------------------------------------------
# Bytes per device from the shardings.


def shard_bytes(abstract: Any, shardings: Any) -> int:  # noqa: ANN401
    """Bytes one device holds of `abstract` (ShapeDtypeStructs) laid out by `shardings` (the same tree of
    NamedShardings): the largest shard of each array (shard shape x itemsize), summed."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def _count(tree: Any) -> int:  # noqa: ANN401
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------------------
# Planning one mesh, and searching meshes.


def plan_mesh(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device], compile_step: bool = True
) -> MeshPlan:
    """Builds the trainer's abstract setup on a mesh of `devices` (config.mesh) and, with `compile_step`,
    lowers and compiles its train step; returns the per-device numbers."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_dict(config.sharding_rules)
    t0 = time.perf_counter()
    t = abstract_training(config, mesh, rules)
    traced = time.perf_counter() - t0
    plan = MeshPlan(
        mesh=dict(zip(sharding.MESH_AXES, (int(s) for s in mesh.devices.shape), strict=True)),
        devices=len(devices),
        trainable_parameters=_count(t.state["params"]),
        frozen_parameters=_count(t.frozen),
        param_bytes=shard_bytes(t.state["params"], t.state_shardings["params"]),
        frozen_bytes=shard_bytes(t.frozen, t.frozen_shardings),
        optimizer_bytes=shard_bytes(t.state["opt_state"], t.state_shardings["opt_state"]),
        batch_bytes=shard_bytes(t.batch, t.batch_shardings),
        trace_seconds=traced,
        parts={
            "params": {
                k: shard_bytes(v, t.state_shardings["params"][k]) for k, v in t.state["params"].items()
            },
            "frozen": {k: shard_bytes(v, t.frozen_shardings[k]) for k, v in t.frozen.items()},
        },
    )
    if not compile_step:
        return plan
    key = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = t.step_fn.lower(t.state, t.frozen, t.batch, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    plan.argument_bytes = int(memory.argument_size_in_bytes)
    plan.output_bytes = int(memory.output_size_in_bytes)
    plan.alias_bytes = int(memory.alias_size_in_bytes)
    plan.temp_bytes = int(memory.temp_size_in_bytes)
    plan.generated_code_bytes = int(memory.generated_code_size_in_bytes)
    plan.flops = float((cost or {}).get("flops", 0.0))
    plan.loops = " while(" in compiled.as_text()  # XLA's cost analysis counts a loop's body once
    plan.lower_seconds, plan.compile_seconds = t1 - t0, t2 - t1
    return plan


def mesh_candidates(num_devices: int) -> list[dict[str, int]]:
    """Every (data, fsdp, tensor) whose product is `num_devices`, in a fixed order."""
    out = []
    for data in range(1, num_devices + 1):
        if num_devices % data:
            continue
        rest = num_devices // data
        for fsdp in range(1, rest + 1):
            if rest % fsdp == 0:
                out.append({"data": data, "fsdp": fsdp, "tensor": rest // fsdp})
    return out


def with_mesh(config: ml_collections.ConfigDict, mesh: Mapping[str, int]) -> ml_collections.ConfigDict:
    """A copy of `config` with `mesh` set."""
    config = copy.deepcopy(config)
    for axis, size in mesh.items():
        config.mesh[axis] = int(size)
    return config


def estimate(t: AbstractTraining, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> MeshPlan:
    """What the shardings of `mesh` would put on one device, from an abstract setup made on another mesh
    (no trace, no compile): params and frozen weights by the rules table; the optimizer state as the
    traced mesh's optimizer-to-params ratio (its moments follow their params' shardings); the batch split
    over the `batch` rule's axes."""
    rules = sharding.rules_dict(config.sharding_rules)
    params_vars, frozen_vars = t.variables
    param_sh = sharding.state_shardings(params_vars, rules, mesh)
    frozen_sh = sharding.state_shardings(frozen_vars, rules, mesh)
    parts = {
        "params": {k: shard_bytes(v, param_sh[k]) for k, v in t.state["params"].items()},
        "frozen": {k: shard_bytes(v, frozen_sh[k]) for k, v in t.frozen.items()},
    }
    param_bytes, frozen_bytes = sum(parts["params"].values()), sum(parts["frozen"].values())
    traced_params = shard_bytes(t.state["params"], t.state_shardings["params"])
    ratio = shard_bytes(t.state["opt_state"], t.state_shardings["opt_state"]) / max(traced_params, 1)
    batch_sh = {k: sharding.batch_sharding(mesh, rules, len(v.shape)) for k, v in t.batch.items()}
    return MeshPlan(
        mesh=dict(zip(sharding.MESH_AXES, (int(n) for n in mesh.devices.shape), strict=True)),
        devices=mesh.devices.size,
        trainable_parameters=_count(t.state["params"]),
        frozen_parameters=_count(t.frozen),
        param_bytes=param_bytes,
        frozen_bytes=frozen_bytes,
        optimizer_bytes=int(ratio * param_bytes),
        batch_bytes=shard_bytes(t.batch, batch_sh),
        parts=parts,
    )


def rows_per_device(plan: MeshPlan, config: ml_collections.ConfigDict) -> float:
    """Batch rows each device computes on: the global batch over the `batch` rule's mesh axes."""
    target = sharding.rules_dict(config.sharding_rules).get("batch")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return config.batch_size / math.prod(plan.mesh[a] for a in axes)


def rough_peak(t: AbstractTraining, config: ml_collections.ConfigDict, plan: MeshPlan, mesh: Any) -> int:  # noqa: ANN401
    """A rough peak per device, only to choose which meshes to compile: the state (`plan.state_bytes`);
    the weights as the matmuls read them, gathered over every axis but `tensor` (XLA gathers an FSDP
    weight whole before its matmul and keeps it for the backward pass), plus a float32 copy of each
    16-bit weight when compute_dtype is float32; and the LLM's activations by Korthikanti et al. (2022)
    for t-way tensor parallelism without sequence parallelism: s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes a
    layer in 16 bits (twice that in float32), b the rows of one micro-batch on a device."""
    rules = {}
    for name, target in sharding.rules_dict(config.sharding_rules).items():
        axes = tuple(
            a for a in ((target,) if isinstance(target, str) else tuple(target or ())) if a == "tensor"
        )
        rules[name] = axes or None
    f32 = config.get("compute_dtype", "float32") == "float32"
    gathered = 0
    for abstract, variables in zip((t.state["params"], t.frozen), t.variables, strict=True):
        shardings = sharding.state_shardings(variables, rules, mesh)
        for x, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
            size = np.dtype(x.dtype).itemsize
            gathered += math.prod(sh.shard_shape(x.shape)) * (size + (4 if f32 and size < 4 else 0))
    activations = 0.0
    llm = config.get("llm", None)
    if config.trainer == "stage2" and llm is not None and llm.kind == "random":
        d = config.data
        bridge = config.get("bridge", {}).get("kind", "qformer")
        soft = config.qformer.num_queries if "qformer" in bridge else config.bridge.get("num_tokens", 8)
        lengths = (
            [soft + d.max_instruction_length, d.max_answer_length]
            if llm.arch == "t5"
            else [soft + d.max_instruction_length + d.max_answer_length]
        )
        rows = rows_per_device(plan, config) / int(config.get("grad_accum_steps", 1))
        h, a, tp = llm.width, llm.heads, plan.mesh["tensor"]
        for seq in lengths:
            per_layer = seq * rows * h * (10 + 24 / tp + 5 * a * seq / (h * tp))
            activations += llm.layers * per_layer * (2 if f32 else 1)
    return int(plan.state_bytes + gathered + activations)


def search(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    limit: int = 3,
    progress: Any = None,  # noqa: ANN401 (a callable taking one line of text)
) -> tuple[list[MeshPlan], list[tuple[dict[str, int], str]]]:
    """Plans the meshes that factor len(devices) (data x fsdp x tensor).

    Every candidate the trainer's checks accept is first estimated from its shardings alone (one trace of
    the setup, then seconds per mesh: `estimate`) and ranked by `rough_peak`; the first `limit` (0: all)
    are compiled (`plan_mesh`). Returns (plans: the compiled ones by XLA's
    total, best first, then the others in rank order), [(mesh, why the trainer refused it)]."""
    trainer = _trainer(config)
    valid, refused = [], []
    for mesh in mesh_candidates(len(devices)):
        try:
            trainer.validate(with_mesh(config, mesh), len(devices), 1)
        except Exception as e:  # noqa: BLE001 (a ConfigError: the reason is shown)
            refused.append((mesh, _first_problem(str(e))))
            continue
        valid.append(mesh)
    if not valid:
        return [], refused
    if progress:
        progress(f"estimating {len(valid)} meshes from their shardings ...")
    first = with_mesh(config, valid[0])
    mesh0 = sharding.make_mesh(first.mesh, devices)
    t = abstract_training(first, mesh0, sharding.rules_dict(first.sharding_rules))
    plans = []
    for m in valid:
        mesh = sharding.make_mesh(with_mesh(config, m).mesh, devices)
        plan = estimate(t, config, mesh)
        plan.rough_bytes = rough_peak(t, config, plan, mesh)
        plans.append(plan)
    plans.sort(key=lambda p: (p.rough_bytes, rows_per_device(p, config), p.state_bytes))
    chosen = len(plans) if limit <= 0 else min(limit, len(plans))
    for i in range(chosen):
        if progress:
            progress(f"compiling {plans[i].mesh_text()} ({i + 1}/{chosen}) ...")
        try:
            done = plan_mesh(with_mesh(config, plans[i].mesh), devices)
            done.rough_bytes = plans[i].rough_bytes
            plans[i] = done
        except Exception as e:  # noqa: BLE001 (one mesh failing to compile must not end the search)
            plans[i].error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    compiled = sorted((p for p in plans[:chosen] if not p.error), key=lambda p: p.total_bytes)
    return compiled + [p for p in plans if p not in compiled], refused


def _first_problem(message: str) -> str:
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    return lines[1] if len(lines) > 1 and lines[0].startswith("invalid config") else (lines or [""])[0]


def _trainer(config: ml_collections.ConfigDict) -> Any:  # noqa: ANN401
    import importlib

    if config.trainer not in TRAINERS:
        raise UserError(f"trainer={config.trainer!r} is not known; choose one of {', '.join(TRAINERS)}")
    return importlib.import_module(TRAINERS[config.trainer])


def validate(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    """The trainer's own checks for `num_devices` devices (mesh, batch split, sizes; None: not run) and
    what a plan needs (architectures without weights); raises ConfigError / UserError naming every
    problem."""
    trainer = _trainer(config)
    problems = plan_problems(config)  # first: the trainer's checks may read a pretrained encoder's files
    if problems:
        raise UserError("cannot plan this config:\n  - " + "\n  - ".join(problems))
    if num_devices is not None:
        trainer.validate(config, num_devices, 1)


# ---------------------------------------------------------------------------------------------------------
# Words and tables.


def gib(n: float) -> str:
    """Bytes in GiB (MiB below 0.01 GiB, KiB below 0.01 MiB)."""
    if abs(n) >= 0.01 * GIB or n == 0:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 1024**2:.2f} MiB" if abs(n) >= 0.01 * 1024**2 else f"{n / 1024:.2f} KiB"


def _by_part(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {gib(v)}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]) if v)


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def table(plan: MeshPlan) -> str:
    """The per-device table of one compiled plan (Markdown)."""
    rows = [
        (
            "trainable parameters",
            gib(plan.param_bytes),
            "shardings",
            f"{plan.trainable_parameters / 1e6:,.1f} M: {_by_part(plan.parts.get('params', {}))}",
        ),
        (
            "frozen weights",
            gib(plan.frozen_bytes),
            "shardings",
            f"{plan.frozen_parameters / 1e6:,.1f} M: {_by_part(plan.parts.get('frozen', {}))}",
        ),
        ("optimizer state", gib(plan.optimizer_bytes), "shardings", ""),
        ("batch", gib(plan.batch_bytes), "shardings", ""),
        ("arguments (all of the above)", gib(plan.argument_bytes), "XLA", "unused inputs are pruned"),
        ("activations and temporaries", gib(plan.temp_bytes), "XLA", ""),
        ("outputs", gib(plan.output_bytes), "XLA", ""),
        ("outputs aliased to donated state", gib(plan.alias_bytes), "XLA", "counted once"),
        ("total (arguments + outputs - aliased + temporaries)", gib(plan.total_bytes), "XLA", ""),
        (
            "FLOPs per step",
            ("at least " if plan.loops else "") + _flops(plan.flops),
            "XLA",
            f"{_flops(plan.flops * plan.devices)} on all devices"
            + ("; loop bodies (scanned layers, accumulation) counted once" if plan.loops else ""),
        ),
        ("compile time", f"{plan.compile_seconds:.1f} s", "", f"lower {plan.lower_seconds:.1f} s"),
    ]
    out = [
        f"per device, mesh {plan.mesh_text()} ({plan.devices} devices)",
        "",
        "| | per device | from | note |",
    ]
    out.append("|---|---:|---|---|")
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def candidates_table(plans: Sequence[MeshPlan], memory_per_device: float | None = None) -> str:
    """The searched meshes, best first (Markdown)."""
    head = "| mesh (data x fsdp x tensor) | params + frozen + optimizer | rough estimate | "
    head += "activations + temporaries | total | compile |" + (" fits |" if memory_per_device else "")
    out = [head, "|---|---:|---:|---:|---:|---:|" + ("---|" if memory_per_device else "")]
    for p in plans:
        shape = f"{p.mesh['data']} x {p.mesh['fsdp']} x {p.mesh['tensor']}"
        cells = [gib(p.state_bytes), gib(p.rough_bytes) if p.rough_bytes else ""]
        if p.argument_bytes and not p.error:
            cells += [gib(p.temp_bytes), gib(p.total_bytes), f"{p.compile_seconds:.0f} s"]
            if memory_per_device:
                cells.append("yes" if p.total_bytes <= memory_per_device * GIB else "no")
        else:
            why = f"failed: {p.error}" if p.error else "not compiled"
            cells += [why, "", ""] + ([""] if memory_per_device else [])
        out.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def verdict(plan: MeshPlan, config: ml_collections.ConfigDict, memory_per_device: float) -> tuple[bool, str]:
    """(fits, in words): the plan's total against `memory_per_device` GiB, with the headroom; when it does
    not fit, what would change that, largest part first."""
    budget = memory_per_device * GIB
    headroom = budget - plan.total_bytes
    if headroom >= 0:
        return True, (
            f"fits in {memory_per_device:g} GiB per device: {gib(plan.total_bytes)} "
            f"({100 * plan.total_bytes / budget:.0f}%), headroom {gib(headroom)}"
        )
    lines = [
        f"does not fit in {memory_per_device:g} GiB per device: {gib(plan.total_bytes)} needed, "
        f"{gib(-headroom)} over. To change that:"
    ]
    parts = sorted(
        [
            (plan.frozen_bytes + plan.param_bytes, "weights"),
            (plan.optimizer_bytes, "optimizer"),
            (plan.temp_bytes, "activations"),
        ],
        reverse=True,
    )
    n, mesh = plan.devices, plan.mesh
    for size, what in parts:
        if size < 0.05 * plan.total_bytes:
            continue
        if what == "weights":
            lines.append(
                f"- weights ({gib(size)}): shard them over more devices (--config.mesh.fsdp / "
                f"--config.mesh.tensor; now fsdp={mesh['fsdp']}, tensor={mesh['tensor']}; `--search` tries "
                f"every mesh of {n}), or keep the frozen LLM in bf16 (--config.llm.param_dtype=bfloat16) "
                "or its layers in int8 (--config.llm.quantization=int8)"
            )
        elif what == "optimizer":
            lines.append(
                f"- optimizer state ({gib(size)}): shard it with the params (--config.mesh.fsdp), or train "
                "fewer weights (freeze the encoder: --config.audio_encoder.trainable=false)"
            )
        else:
            remat = config.get("llm", {}).get("remat_policy", None)
            lines.append(
                f"- activations ({gib(size)}): a smaller per-device batch (--config.batch_size, now "
                f"{config.batch_size} over {n} devices), more data-parallel devices, "
                + (
                    f"rematerialising the LLM's layers (--config.llm.remat_policy=everything, now {remat}), "
                    if remat is not None and remat != "everything"
                    else ""
                )
                + (
                    f"gradient accumulation (--config.grad_accum_steps, now {config.grad_accum_steps}), "
                    if "grad_accum_steps" in config
                    else ""
                )
                + "or a cached frozen encoder (--config.features=cached)"
            )
    lines.append(f"- or more devices: slit plan --devices {2 * n} ...")
    return False, "\n".join(lines)


def describe_config(config: ml_collections.ConfigDict) -> str:
    """One line: the architecture planned."""
    from slit.train.random_models import random_audio_source

    parts = [f"trainer {config.trainer}", f"batch {config.batch_size} (global)"]
    parts.append(random_audio_source(config).replace("randomly initialised ", "").split(", init_seed")[0])
    if config.trainer == "stage2":
        llm = config.llm
        stored = llm.param_dtype
        if llm.get("quantization", "none") != "none":
            stored += f", layers {llm.quantization}"
        if llm.kind == "random":
            parts.append(
                f"{llm.arch} LLM (width {llm.width}, {llm.layers} layers, {llm.heads} heads, "
                f"mlp {llm.mlp_dim}, vocabulary {llm.get('vocab_size', 0) or 'of the tokenizer'}, "
                f"{stored})"
            )
        else:
            parts.append(f"LLM from {llm.path} ({stored})")
    return "; ".join(parts)
