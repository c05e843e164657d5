"""A `gs://` workdir end to end, against a Cloud Storage emulator on localhost.

The emulator (the PyPI package gcp-storage-emulator) answers Cloud Storage's JSON API. Both clients that
reach Cloud Storage are pointed at it, so the code path is the one a pod takes: epath -> fsspec's gcsfs
(and google-cloud-storage: tensorboardX, orbax) via STORAGE_EMULATOR_HOST, and orbax's array data through
tensorstore's `gcs` kvstore driver via TENSORSTORE_GCS_HTTP_URL. Nothing leaves this machine. Not covered:
Cloud Storage itself (credentials, retries, latency, consistency beyond what the emulator models).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import socket

import numpy as np
import pytest

from tests.conftest import ROOT, tiny_overrides

# gcsfs's default filesystem first asks Cloud Storage's gRPC control API for the bucket's type, which the
# emulator does not serve (a 60 s time-out per bucket): the plain JSON-API filesystem, chosen at import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
emulator = pytest.importorskip(
    "gcp_storage_emulator.server", reason="gcp-storage-emulator (pip install .[test])"
)
objects = pytest.importorskip("gcp_storage_emulator.handlers.objects")
pytest.importorskip("gcsfs", reason="gcsfs")

BUCKET = "slit-test"


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch):
    """A Cloud Storage emulator on localhost holding the bucket BUCKET; yields the bucket's client."""
    import fsspec
    import gcsfs
    from etils.epath import backend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs and google-cloud-storage
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore's gcs driver (orbax's arrays)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "slit-test")
    # No credentials are looked up anywhere but here: left alone, google-auth and tensorstore ask the GCE
    # metadata server (169.254.169.254) for a token, thousands of times in one run. gcsfs goes anonymous;
    # tensorstore takes a fixed token; any google-auth probe left goes to a closed port on localhost.
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "anonymous")
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
        monkeypatch.setenv(name, "127.0.0.1:9")
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setattr(socket.socket, "connect", _loopback_only(socket.socket.connect))
    # The emulator's downloads leave out the object's generation, which tensorstore's gcs driver reads
    # (OCDBT's manifest is read back and updated by generation): send it as Cloud Storage does.
    monkeypatch.setattr(objects, "download", functools.partial(_download_with_generation, objects.download))
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    # Filesystems made before this test would still talk to another endpoint.
    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield gcsfs.GCSFileSystem()
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        backend.fsspec_backend._get_filesystem.cache_clear()
        server.stop()


def _loopback_only(connect):
    """socket.connect, refusing (and so failing the test) any address but this machine's: the Python
    clients (gcsfs, google-auth) reach nothing else. (tensorstore connects from C++; a run under
    `strace -f -e trace=connect` showed it reaching only 127.0.0.1 with the settings above.)"""

    def checked(self: socket.socket, address: object) -> object:
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            raise AssertionError(f"the gs:// test tried to reach {address}")
        return connect(self, address)

    return checked


def _download_with_generation(download, request, response, storage, *args, **kwargs) -> None:
    download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 (not found: the 404 stands)
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


def _train(workdir: str, data_dir: str, **extra: object) -> int:
    from slit import cli

    args = [f"--config.{k}={v}" for k, v in tiny_overrides(data_dir, **extra).items()]
    return cli.main(
        ["train", "--config", str(ROOT / "configs" / "stage1_synthetic.py"), "--workdir", workdir, *args]
    )


def test_stage_one_trains_resumes_evaluates_exports_and_reports_in_a_gs_workdir(
    gcs, tiny_data_dir, tmp_path, capfd
):
    from etils import epath

    workdir = f"gs://{BUCKET}/runs/s1"
    assert _train(workdir, tiny_data_dir, total_steps=2, eval_every_steps=2) == 0
    run = epath.Path(workdir)
    assert json.loads((run / "config.json").read_text())["total_steps"] == 2
    assert (run / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert list((run / "tensorboard").iterdir())
    assert (run / "eval" / "retrieval.json").is_file()
    # The arrays are in the bucket (tensorstore's gcs driver), and no path fell back to a local "gs:/...".
    assert gcs.find(f"{BUCKET}/runs/s1/checkpoints/2/state")
    assert not (pathlib.Path.cwd() / "gs:").exists()

    # Extending the run resumes from the bucket's checkpoint with its data position.
    capfd.readouterr()
    assert _train(workdir, tiny_data_dir, total_steps=4, eval_every_steps=2) == 0
    assert "Resuming from gs://" in capfd.readouterr().err
    steps = [
        m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m
    ]
    assert steps == [2, 4]

    from slit import cli

    evaluate = ["eval", "--workdir", workdir, "--task", "retrieval", "--data", "slit_synthetic_sounds/tiny"]
    assert cli.main(evaluate) == 0
    report = json.loads((run / "eval" / "retrieval-slit_synthetic_sounds_tiny-test.json").read_text())
    assert report["checkpoint_step"] == 4

    # Export from the bucket to a local directory, and into the bucket.
    local = tmp_path / "st"
    assert cli.main(["export", "--workdir", workdir, "--format", "safetensors", "--out", str(local)]) == 0
    assert (local / "model.safetensors").is_file() and (local / "tokenizer.json").is_file()
    out = f"gs://{BUCKET}/exports/bundle"
    assert cli.main(["export", "--workdir", workdir, "--format", "bundle", "--out", out]) == 0
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in epath.Path(out).iterdir()
    }

    assert cli.main(["report", workdir, "--out", f"gs://{BUCKET}/report"]) == 0
    assert "s1" in epath.Path(f"gs://{BUCKET}/report/report.md").read_text()


@pytest.mark.slow  # a second run in a bucket: stage two's own files (the LLM's tokenizer, generation)
def test_stage_two_trains_evaluates_and_generates_from_a_gs_workdir(gcs, tiny_data_dir, tmp_path):
    import soundfile
    from etils import epath

    from slit import cli
    from tests.test_train_stage2 import stage2_overrides, write_tiny_llama

    llm_dir = write_tiny_llama(tmp_path / "llm")
    overrides = stage2_overrides(tiny_data_dir, llm_dir, total_steps=2, **{"eval.max_clips": 4})
    workdir = f"gs://{BUCKET}/runs/s2"
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    config = str(ROOT / "configs" / "stage2_synthetic.py")
    assert cli.main(["train", "--config", config, "--workdir", workdir, *args]) == 0
    run = epath.Path(workdir)
    assert (run / "llm_tokenizer").is_dir() and (run / "checkpoints" / "2").is_dir()
    assert any(p.name.startswith("captioning") for p in (run / "eval").iterdir())

    clip = tmp_path / "clip.wav"
    soundfile.write(clip, np.zeros(16000, np.float32) + 0.01, 16000)
    assert (
        cli.main(["generate", "--workdir", workdir, "--audio", str(clip), "--prompt", "describe the sound."])
        == 0
    )
    out = f"gs://{BUCKET}/exports/s2"
    assert cli.main(["export", "--workdir", workdir, "--format", "bundle", "--out", out]) == 0
    assert (epath.Path(out) / "model.safetensors").is_file()


@pytest.mark.slow  # two processes (startup and compilation of each: a minute or two)
def test_two_processes_train_and_resume_in_a_gs_workdir(gcs, tiny_data_dir):
    """As a pod runs: 2 processes x 4 devices write one run's checkpoints into the bucket (each its
    shards), then resume it; the emulator's address reaches them through the environment."""
    import os
    import subprocess

    from etils import epath

    from tests.test_multiprocess import LAUNCHER, MESH, slit_command

    workdir = f"gs://{BUCKET}/runs/mp"
    for steps in (2, 4):
        overrides = tiny_overrides(tiny_data_dir, total_steps=steps) | MESH | {"data.test_split": "none"}
        command = slit_command("stage1_synthetic.py", workdir, overrides)
        result = subprocess.run(
            [*LAUNCHER, "--", *command], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ),
            timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Resuming from gs://" in result.stdout + result.stderr
    steps = sorted(int(p.name) for p in (epath.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4
