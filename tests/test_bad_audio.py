"""Bad input at build time: each case is skipped or repaired as documented, counted and listed in the
report with its manifest line; one bad file never aborts a build; too many bad inputs fail it; training
never sees non-finite audio."""

import json

import numpy as np
import pytest
import soundfile as sf

from slit import cli
from slit.data import audio_io, builders, pipeline, sources
from slit.data.audio_io import AudioChecks, BadAudio
from slit.data.tokenizer import TextTokenizer, word_level_tokenizer
from slit.errors import UserError

RATE = 16000
CHECKS = AudioChecks(sample_rate=RATE, min_seconds=0.1, max_seconds=3.0)


def tone(seconds=0.5, channels=1, amplitude=0.5):
    t = np.arange(int(RATE * seconds)) / RATE
    x = (amplitude * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def write_bad_inputs(root):
    """Writes one audio file per case; returns {name: path}."""
    files = {}

    def put(name, data, **kw):
        path = root / name
        sf.write(path, data, RATE, **kw)
        files[name] = path

    for i in range(3):
        put(f"good{i}.wav", tone(0.5 + 0.1 * i))
    (root / "garbage.wav").write_bytes(b"RIFF not really a wave file" * 10)
    files["garbage.wav"] = root / "garbage.wav"
    put("truncated.wav", tone(1.0))
    data = (root / "truncated.wav").read_bytes()
    (root / "truncated.wav").write_bytes(data[: len(data) // 2])
    put("truncated.mp3", tone(2.0))
    data = (root / "truncated.mp3").read_bytes()
    (root / "truncated.mp3").write_bytes(data[: len(data) // 2])
    put("empty.wav", np.zeros(0, np.float32))
    put("silent.wav", np.zeros(RATE, np.float32))
    many_nan = tone(0.5)
    many_nan[::2] = np.nan
    put("many_nan.wav", many_nan, subtype="FLOAT")
    few_nan = tone(0.5)
    few_nan[[10, 500, 4000]] = np.nan
    few_nan[7000] = np.inf
    put("few_nan.wav", few_nan, subtype="FLOAT")
    put("too_long.wav", tone(4.0))
    put("too_short.wav", tone(0.05))
    put("four_channels.wav", tone(0.5, channels=4))
    put("loud_float.wav", tone(0.5, amplitude=2.0), subtype="FLOAT")
    return files


# manifest line -> (expected action, reason); lines without an entry are kept untouched.
EXPECTED = {
    4: ("skipped", "missing_file"),
    5: ("skipped", "unreadable"),
    6: ("skipped", "truncated"),
    7: ("skipped", "truncated"),
    8: ("skipped", "empty_audio"),
    9: ("skipped", "silent"),
    10: ("skipped", "nonfinite"),
    11: ("repaired", "nonfinite_repaired"),
    12: ("skipped", "too_long"),
    13: ("skipped", "too_short"),
    14: ("repaired", "many_channels"),
    15: ("repaired", "out_of_range"),
    16: ("skipped", "empty_text"),
    17: ("repaired", "empty_text"),
    18: ("skipped", "not_utf8"),
    19: ("skipped", "invalid_json"),
    20: ("skipped", "duplicate_id"),
    21: ("skipped", "bad_field"),
    22: ("skipped", "not_utf8"),
    23: ("skipped", "bad_field"),
}
KEPT_IDS = {
    "good0.wav",
    "good1.wav",
    "good2.wav",
    "few_nan.wav",
    "four_channels.wav",
    "loud_float.wav",
    "g1-again",
}


def write_manifest(root):
    files = write_bad_inputs(root)
    lines = [
        json.dumps({"audio": f"good{i}.wav", "captions": [f"a tone number {i}"]}).encode() for i in range(3)
    ]
    for name in [
        "missing.wav", "garbage.wav", "truncated.wav", "truncated.mp3", "empty.wav", "silent.wav",
        "many_nan.wav", "few_nan.wav", "too_long.wav", "too_short.wav", "four_channels.wav", "loud_float.wav",
    ]:  # fmt: skip
        lines.append(json.dumps({"audio": name, "caption": f"the file {name}"}).encode())
    lines += [
        json.dumps({"audio": "good0.wav", "id": "blank", "caption": "   "}).encode(),  # 16
        json.dumps({"audio": "good1.wav", "id": "g1-again", "captions": ["a tone", ""]}).encode(),  # 17
        b'{"audio": "good2.wav", "id": "latin1", "caption": "caf\xe9 noise"}',  # 18: not UTF-8
        b'{"audio": "good2.wav", "caption": "no closing brace"',  # 19
        json.dumps({"audio": "good0.wav", "caption": "the same id again"}).encode(),  # 20
        json.dumps({"caption": "where is the audio"}).encode(),  # 21
        b'{"audio": "good2.wav", "id": "surrogate", "caption": "bad \\ud800 escape"}',  # 22
        json.dumps({"audio": "good2.wav", "id": "no-text"}).encode(),  # 23
        b"",  # blank lines are ignored
    ]
    manifest = root / "clips.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    return manifest, files


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    manifest, files = write_manifest(root)
    data_dir = str(root / "tfds")
    builder = builders.build(
        manifest=manifest,
        name="bad_inputs",
        data_dir=data_dir,
        checks=CHECKS,
        max_bad_fraction=1.0,
        verbose=False,
    )
    return root, data_dir, builder, files


def read_report(directory):
    return [json.loads(line) for line in (directory / "bad_inputs.jsonl").read_text().splitlines()]


def test_every_bad_input_is_skipped_or_repaired_and_reported_with_its_line(built):
    root, data_dir, builder, _ = built
    problems = read_report(root / "tfds" / "bad_inputs" / "1.0.0")
    by_line = {int(p["origin"].rsplit(":", 1)[1]): (p["action"], p["reason"]) for p in problems}
    assert by_line == EXPECTED
    assert all(p["origin"].startswith("clips.jsonl:") and p["message"] for p in problems)
    missing = next(p for p in problems if p["reason"] == "missing_file")
    assert missing["path"].endswith("missing.wav") and missing["id"] == "missing.wav"
    summary = json.loads((root / "tfds" / "bad_inputs" / "1.0.0" / "build_report.json").read_text())
    skipped = sum(a == "skipped" for a, _ in EXPECTED.values())
    assert summary["kept"] == len(KEPT_IDS) and summary["skipped"] == skipped
    assert summary["bad_fraction"] == pytest.approx(skipped / (skipped + len(KEPT_IDS)))
    assert summary["skipped_by_reason"]["truncated"] == 2
    source = sources.open_split("bad_inputs", data_dir, "train")
    assert {source[i]["id"].decode() for i in range(len(source))} == KEPT_IDS


def test_repairs_are_what_the_documentation_says(built):
    _, data_dir, _, files = built
    source = sources.open_split("bad_inputs", data_dir, "train")
    by_id = {source[i]["id"].decode(): source[i] for i in range(len(source))}
    few_nan = audio_io.from_pcm16(by_id["few_nan.wav"]["audio"])
    original, _ = sf.read(files["few_nan.wav"], dtype="float32")
    bad = ~np.isfinite(original)
    assert not few_nan[bad].any()  # NaN/Inf samples set to 0 (same rate: no resampling)
    np.testing.assert_allclose(few_nan[~bad], original[~bad], atol=1 / 32000)
    four, _ = sf.read(files["four_channels.wav"], dtype="float32")
    np.testing.assert_allclose(
        audio_io.from_pcm16(by_id["four_channels.wav"]["audio"]), four.mean(axis=1), atol=1e-4
    )
    loud, _ = sf.read(files["loud_float.wav"], dtype="float32")
    stored = audio_io.from_pcm16(by_id["loud_float.wav"]["audio"])
    np.testing.assert_allclose(stored, loud / np.abs(loud).max(), atol=1e-4)
    assert [c.decode() for c in by_id["g1-again"]["captions"]] == ["a tone"]


def test_training_never_receives_non_finite_audio(built):
    _, data_dir, _, _ = built
    source = sources.open_split("bad_inputs", data_dir, "train")
    tokenizer = TextTokenizer(word_level_tokenizer(["a", "tone", "the", "file", "number", "0", "1", "2"]))
    it = iter(
        pipeline.train_dataset(
            source, tokenizer, pipeline.AudioSpec(RATE, RATE), max_text_length=8, global_batch_size=7, seed=0
        )
    )
    for _ in range(3):
        batch = next(it)
        assert np.isfinite(batch["audio"]).all() and np.abs(batch["audio"]).max() <= 1.0


def test_too_many_bad_inputs_fail_the_build_and_keep_the_report(tmp_path, capsys):
    manifest, _ = write_manifest(tmp_path)
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserError) as error:
        builders.build(
            manifest=manifest, name="too_bad", data_dir=str(data_dir), checks=CHECKS, max_bad_fraction=0.5
        )
    message = str(error.value)
    assert "max_bad_fraction=0.5" in message and "failed_build" in message and "bad_inputs.jsonl" in message
    assert len(read_report(data_dir / "too_bad" / "failed_build")) == len(EXPECTED)
    assert "skipped" in capsys.readouterr().out  # the terminal summary
    with pytest.raises(FileNotFoundError):
        sources.open_split("too_bad", str(data_dir), "train")
    # The command line: exit code 2 and the message, no traceback.
    code = cli.main(
        ["data", "build", "--manifest", str(manifest), "--name", "too_bad", "--data-dir", str(data_dir),
         "--max-seconds", "3", "--max-bad-fraction", "0.5"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and "max_bad_fraction" in captured.err and "Traceback" not in captured.err


def test_read_clip_reasons_directly(tmp_path):
    files = write_bad_inputs(tmp_path)
    expected = {
        "garbage.wav": "unreadable",
        "truncated.wav": "truncated",
        "truncated.mp3": "truncated",
        "empty.wav": "empty_audio",
        "silent.wav": "silent",
        "many_nan.wav": "nonfinite",
        "too_long.wav": "too_long",
        "too_short.wav": "too_short",
    }
    for name, reason in expected.items():
        with pytest.raises(BadAudio) as bad:
            audio_io.read_clip(files[name], CHECKS)
        assert bad.value.reason == reason, name
    with pytest.raises(BadAudio) as bad:
        audio_io.read_clip(tmp_path / "nope.flac", CHECKS)
    assert bad.value.reason == "missing_file"
    cut = audio_io.read_clip(
        files["too_long.wav"], AudioChecks(sample_rate=RATE, max_seconds=3.0, too_long="truncate")
    )
    assert len(cut.samples) == 3 * RATE and cut.repairs[0][0] == "too_long"
