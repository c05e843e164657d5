"""Building and opening the frozen-feature cache of both stages (storage: slit.data.feature_cache).

A cache is keyed by what the features depend on: the frozen encoder's content fingerprint (as
checkpoints record it, slit.train.checkpoint.fingerprint) and the frontend settings (encoder family,
sample rate, mel bins or waveform options, max_seconds, hidden layer, window). It also records the data
it was computed from (dataset version, split sizes), checked whenever it is opened.

    slit cache-features --config configs/stage1_synthetic.py [--config.a.b=value ...] [--out DIR]
    slit train --config configs/stage1_synthetic.py --workdir DIR --config.features=cached [...]

The cache holds the audio encoder's outputs only, so a stage-one run and the stage-two run that
continues it (same `audio_encoder` and `data` groups) read the same cache, and `slit cache-features`
takes either stage's config.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from slit.data import feature_cache, pipeline, sources
from slit.errors import UserError
from slit.models.audio.encoder import AudioEncoderConfig, encode_audio, make_audio_tower
from slit.models.audio.htsat import HTSATConfig
from slit.models.audio.whisper import WhisperEncoderConfig
from slit.models.layers import Frozen
from slit.train import checkpoint, pretrained, sharding

SPLITS = ("train", "validation", "test")  # the roles of the splits training reads


@dataclasses.dataclass(frozen=True)
class EncoderOnly:
    """The part of a model config (`Stage1Config`, `Stage2Config`) that the cache depends on."""

    audio: AudioEncoderConfig


def cache_root(config: ml_collections.ConfigDict) -> pathlib.Path:
    """`features_dir`, or `<data.data_dir or ~/tensorflow_datasets>/slit_features`."""
    if config.get("features_dir", ""):
        return pathlib.Path(config.features_dir).expanduser()
    data_dir = config.data.data_dir or "~/tensorflow_datasets"
    return pathlib.Path(data_dir).expanduser() / "slit_features"


def frontend_settings(config: ml_collections.ConfigDict, cfg: EncoderOnly) -> dict:
    """Everything besides the encoder's weights that decides the cached features."""
    settings = pretrained.audio_settings(config)
    arch = cfg.audio.arch
    family = (
        "whisper"
        if isinstance(arch, WhisperEncoderConfig)
        else "htsat"
        if isinstance(arch, HTSATConfig)
        else "wav2vec2"
    )
    out = {
        "encoder": family,
        "sample_rate": int(config.data.sample_rate),
        "max_seconds": float(config.data.max_seconds),
        "hidden_layer": settings.hidden_layer if settings.hidden_layer is not None else -1,
        "window_seconds": settings.window_seconds,
    }
    if isinstance(arch, WhisperEncoderConfig):
        out["num_mel_bins"] = arch.num_mel_bins
    elif isinstance(arch, HTSATConfig):  # its log-mel settings (preprocessor_config.json), not in the weights
        out["frontend"] = dataclasses.asdict(arch.frontend)
    else:
        out.update(normalize=cfg.audio.normalize, mask_padding=cfg.audio.mask_padding)
    return out


def identity(config: ml_collections.ConfigDict, cfg: EncoderOnly, frozen: dict) -> dict:
    """The cache key's inputs: the frozen audio tower's fingerprint and the frontend settings."""
    return {
        "encoder_fingerprint": checkpoint.fingerprint(frozen["audio_tower"]),
        "frontend": frontend_settings(config, cfg),
    }


def data_description(config: ml_collections.ConfigDict, splits: dict[str, object]) -> dict:
    """What the features were computed from: dataset name, version and split sizes."""
    any_split = next(iter(splits.values()))
    info = getattr(any_split, "dataset_info", None)
    out = {
        "dataset": config.data.name,
        "version": str(getattr(info, "version", "unknown")),
        "splits": {name: len(source) for name, source in splits.items()},
    }
    names = split_names(config)
    if any(role != split for role, split in names.items()):  # (recorded only when renamed: older
        out["split_names"] = names  # caches of the default names stay valid)
    return out


def rebuild_command(config: ml_collections.ConfigDict) -> str:
    """The `slit cache-features` command line that builds the cache this config reads."""
    parts = ["slit cache-features --config <this run's config file>"]
    for group in ("data", "audio_encoder"):
        for key, value in sorted(config[group].items()):
            if group == "data" and key not in ("name", "data_dir", "sample_rate", "max_seconds"):
                if not (key.endswith("_split") and value != key[: -len("_split")]):
                    continue
            parts.append(f"--config.{group}.{key}={value}")
    if config.get("features_dir", ""):
        parts.append(f"--config.features_dir={config.features_dir}")
    return " ".join(parts)


def split_names(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Each role's split of `config.data.name`: data.train_split / validation_split / test_split (default:
    the role's name; e.g. ESC-50's train_split="fold1+fold2+fold3+fold4", test_split="fold5")."""
    return {role: str(config.data.get(f"{role}_split", role)) for role in SPLITS}


def open_splits(config: ml_collections.ConfigDict) -> dict[str, object]:
    """{role: source} of the roles whose split the dataset has; the training split must exist (a missing
    one raises FileNotFoundError saying which), the validation and test splits may be absent."""
    out = {}
    for role, split in split_names(config).items():
        try:
            out[role] = sources.open_split(config.data.name, config.data.data_dir, split)
        except FileNotFoundError:
            if role == "train":
                raise
    return out


def _matching_cache(config: ml_collections.ConfigDict, cfg: EncoderOnly, frozen: dict) -> pathlib.Path:
    """The directory of the cache that matches the config's encoder, frontend and data (or a refusal)."""
    return feature_cache.open_cache(
        cache_root(config),
        config.data.name,
        identity(config, cfg, frozen),
        data_description(config, open_splits(config)),
        rebuild_command(config),
    )


def open_for_training(
    config: ml_collections.ConfigDict, cfg: EncoderOnly, frozen: dict
) -> feature_cache.OpenedCache:
    """The cache this run reads (features=cached), checked against its frozen encoder, frontend and data.

    Raises:
      slit.data.feature_cache.StaleCacheError: missing or mismatched, saying what differs and how to
        rebuild it.
    """
    directory = _matching_cache(config, cfg, frozen)
    present = [name for name in SPLITS if (directory / name / feature_cache.INDEX).is_file()]
    return feature_cache.OpenedCache(
        directory, {name: feature_cache.CachedFeatures(directory / name) for name in present}
    )


def open_for_eval(
    config: ml_collections.ConfigDict, cfg: EncoderOnly, frozen: dict, split: str
) -> feature_cache.CachedFeatures | None:
    """The cached features of `split` of `config.data.name` for an evaluation of a run trained with
    features=cached, or None (with a note saying why) when there is no usable cache: then the
    evaluation runs the frozen encoder, which gives the same features."""
    if config.get("features", "compute") != "cached":
        return None
    try:
        directory = _matching_cache(config, cfg, frozen)
    except (UserError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0]
        print(f"note: computing frozen features (no usable feature cache: {reason})")
        return None
    role = {name: role for role, name in split_names(config).items()}.get(split)
    if role is None or not (directory / role / feature_cache.INDEX).is_file():
        print(f"note: computing frozen features (the feature cache {directory} has no {split} split)")
        return None
    print(f"reading frozen features from {directory / role}")
    return feature_cache.CachedFeatures(directory / role)


@dataclasses.dataclass
class Encoder:
    """The frozen tower, jitted over the config's mesh: (audio (B, S), num_samples (B,)) -> numpy
    features (B, F, D) and frame mask (B, F) of the batch's rows."""

    fn: Callable[..., tuple]
    params: dict
    frozen: dict
    cfg: EncoderOnly
    audio_shardings: tuple

    def __call__(self, audio: np.ndarray, num_samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        audio = sharding.replicated_to_global(audio, self.audio_shardings[0])
        num_samples = sharding.replicated_to_global(num_samples, self.audio_shardings[1])
        features, mask = self.fn(self.params, self.frozen, audio, num_samples)
        return sharding.fetch_replicated(features), sharding.fetch_replicated(mask)


def make_encoder(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: dict) -> Encoder:
    """Builds the frozen audio encoder alone, exactly as either stage builds it (same seeded jitted
    initialisation of a random tower, same loaded weights of a pretrained one), and jits it."""
    audio = pretrained.audio_encoder_config(config)

    def build() -> nnx.Module:
        return make_audio_tower(audio, nnx.Rngs(params=config.audio_encoder.init_seed))

    graphdef, abs_frozen = nnx.split(nnx.eval_shape(build), Frozen)
    frozen_sh = {"audio_tower": sharding.state_shardings(abs_frozen, rules, mesh)}
    if audio.weights:
        tower = {"audio_tower": pretrained.load_tower(audio.weights).params}
        frozen = pretrained.put_like({"audio_tower": nnx.to_pure_dict(abs_frozen)}, tower, frozen_sh)
    else:
        with jax.set_mesh(mesh):
            frozen = jax.jit(
                lambda: {"audio_tower": nnx.to_pure_dict(nnx.split(build(), Frozen)[1])},
                out_shardings=frozen_sh,
            )()
    audio_shardings = (sharding.batch_sharding(mesh, rules, 2), sharding.batch_sharding(mesh, rules, 1))

    def encode(params: dict, frozen: dict, samples: jax.Array, num_samples: jax.Array) -> tuple:
        tower = nnx.merge(graphdef, frozen["audio_tower"])
        return encode_audio(tower, audio.window_samples, samples, num_samples)

    fn = jax.jit(
        encode,
        in_shardings=(None, frozen_sh, *audio_shardings),
        out_shardings=sharding.replicated(mesh),
    )
    return Encoder(fn, {}, frozen, EncoderOnly(audio), audio_shardings)


def _encoded(
    encoder: Encoder,
    source: object,
    spec: pipeline.AudioSpec,
    batch_size: int,
    progress: Callable[[int], None],
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for batch in pipeline.eval_audio_batches(source, spec, batch_size):
        features, mask = encoder(batch["audio"], batch["num_samples"])
        valid = batch["valid"]
        progress(int(valid.sum()))
        yield features[valid], mask[valid], batch["num_samples"][valid]


class _Range(Sequence):
    """Clips start..stop-1 of a split, as a sequence of their own."""

    def __init__(self, source: Sequence, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:  # noqa: ANN401
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + i]


def _write_as_processes(
    directory: pathlib.Path,
    manifest: dict,
    splits: dict[str, Sequence],
    encoder: Encoder,
    spec: pipeline.AudioSpec,
    batch_size: int,
    progress: Callable[[int], None],
) -> None:
    """Process p of P encodes clips [p*n/P, (p+1)*n/P) of each split into its part of the cache;
    process 0 then joins the parts in order, so the cache is the one a single process writes."""
    from jax.experimental import multihost_utils

    processes, me = jax.process_count(), jax.process_index()
    partial = directory.with_name(directory.name + ".partial")
    if me == 0 and partial.exists():
        shutil.rmtree(partial)
    multihost_utils.sync_global_devices("slit: feature cache started")
    for name, source in splits.items():
        n = len(source)
        start, stop = n * me // processes, n * (me + 1) // processes
        part = _Range(source, start, stop)
        batches = _encoded(encoder, part, spec, batch_size, progress) if len(part) else iter(())
        feature_cache.write_split_part(partial / name / f"part-{me:05d}", len(part), batches)
    multihost_utils.sync_global_devices("slit: feature cache parts written")
    if me == 0:
        for name in splits:
            parts = [partial / name / f"part-{p:05d}" for p in range(processes)]
            feature_cache.merge_split_parts(partial / name, parts)
        feature_cache.finish_cache(partial, directory, manifest)
    multihost_utils.sync_global_devices("slit: feature cache written")


def build(
    config: ml_collections.ConfigDict,
    root: str | pathlib.Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[pathlib.Path, dict]:
    """Writes the cache of `config`'s frozen encoder over the train, validation and test splits (those
    the dataset has; `split_names` says which split plays each role).

    An up-to-date cache is kept unless `force`. Returns (its directory, a summary: seconds, clips,
    bytes, whether it was written).
    """
    processes = jax.process_count()
    if jax.process_index() != 0:  # one voice for the whole run
        log = lambda message: None  # noqa: E731
    root = pathlib.Path(root).expanduser() if root else cache_root(config)
    rules = sharding.rules_dict(config.sharding_rules)
    batch_size = config.batch_size
    if processes > 1:  # each process encodes its own range of clips on its own devices (no collectives)
        local = jax.local_device_count()
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
        batch_size = -(-batch_size // local) * local
    else:
        mesh = sharding.make_mesh(config.mesh)
    encoder = make_encoder(config, mesh, rules)
    ident = identity(config, encoder.cfg, encoder.frozen)
    splits = open_splits(config)
    data = data_description(config, splits)
    directory = feature_cache.cache_directory(root, config.data.name, ident)
    if not force:
        try:
            feature_cache.open_cache(root, config.data.name, ident, data, "")
            log(f"feature cache {directory} is up to date")
            return directory, {"written": False, "directory": str(directory)}
        except feature_cache.StaleCacheError:
            pass
    spec = pipeline.AudioSpec(
        config.data.sample_rate, int(round(config.data.max_seconds * config.data.sample_rate))
    )
    total = sum(len(s) for s in splits.values())
    if processes > 1:  # process 0 reports the progress of its own share
        total = sum(len(s) // processes for s in splits.values()) or 1
    done, start = [0], time.perf_counter()

    def progress(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if done[0] * 10 // total > before * 10 // total or done[0] == total:  # every 10%
            elapsed = time.perf_counter() - start
            log(f"  {done[0]}/{total} clips encoded ({done[0] / max(elapsed, 1e-9):.2f} clips/s)")

    manifest = {
        "identity": ident,
        "encoder_source": pretrained.audio_source(config),
        "data": data,
        "settings": {"batch_size": config.batch_size},
    }
    log(f"writing the feature cache of {config.data.name} ({total} clips) to {directory}")
    if processes == 1:
        feature_cache.write_cache(
            directory,
            manifest,
            {
                name: (len(source), _encoded(encoder, source, spec, batch_size, progress))
                for name, source in splits.items()
            },
        )
    else:
        _write_as_processes(directory, manifest, splits, encoder, spec, batch_size, progress)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return directory, {
        "written": True,
        "directory": str(directory),
        "clips": total,
        "seconds": seconds,
        "bytes": size,
    }
