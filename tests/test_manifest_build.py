"""The JSON Lines manifest -> TFDS dataset: every field form, `slit data build` / `slit data inspect`,
rebuilding, the stored audio against the analytic signal, and the training pipeline reading it."""

import json

import numpy as np
import pytest
import soundfile as sf

from slit import cli
from slit.data import audio_io, manifest, pipeline, sources
from slit.data.report import BuildReport
from slit.data.tokenizer import TextTokenizer, word_level_tokenizer
from slit.errors import UserError


def write_tone(path, rate, seconds, freq, channels=1, fmt=None):
    t = np.arange(int(round(rate * seconds))) / rate
    x = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate, format=fmt)


def write_manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    (root / "clips").mkdir()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    write_tone(root / "clips" / "a.wav", 44100, 1.0, 440.0, channels=2)
    write_tone(root / "clips" / "b.flac", 22050, 0.8, 600.0)
    write_tone(root / "clips" / "c.ogg", 48000, 1.2, 800.0)
    write_tone(root / "clips" / "d.mp3", 16000, 1.0, 500.0)
    write_tone(elsewhere / "e.wav", 16000, 3.0, 300.0)
    rows = [
        {"audio": "clips/a.wav", "captions": ["a steady tone", "a beep"], "recorded_by": "lab 7"},
        {"audio": "clips/b.flac", "caption": "a higher tone", "split": "validation", "id": 17},
        {"audio": "clips/c.ogg", "question": "is it loud?", "answer": "no", "split": "test"},
        {"audio": "clips/d.mp3", "questions": ["how many tones?", "is it music?"], "answers": ["one", "no"]},
        {
            "audio": str(elsewhere / "e.wav"),
            "start": 1.0,
            "end": 2.5,
            "labels": ["tone", 7],
            "caption": "hum",
        },
        {"audio": str(elsewhere / "e.wav"), "start": 0.0, "end": 1.0, "label": "tone"},
    ]
    path = write_manifest(root / "clips.jsonl", rows)
    data_dir = str(root / "tfds")
    code = cli.main(["data", "build", "--manifest", str(path), "--name", "lab_clips", "--data-dir", data_dir])
    assert code == 0
    return root, elsewhere, data_dir


def by_id(data_dir, split):
    src = sources.open_split("lab_clips", data_dir, split)
    return {src[i]["id"].decode(): src[i] for i in range(len(src))}


def texts(example, key):
    return [t.decode() for t in example[key]]


def test_every_field_form_lands_in_the_dataset(built):
    root, elsewhere, data_dir = built
    train = by_id(data_dir, "train")
    assert set(train) == {
        "clips/a.wav",
        "clips/d.mp3",
        f"{elsewhere / 'e.wav'}@1-2.5",
        f"{elsewhere / 'e.wav'}@0-1",
    }
    a = train["clips/a.wav"]
    assert texts(a, "captions") == ["a steady tone", "a beep"] and texts(a, "labels") == []
    assert json.loads(a["metadata"]) == {"recorded_by": "lab 7"} and a["audio_path"].decode() == "clips/a.wav"
    d = train["clips/d.mp3"]
    assert texts(d, "questions") == ["how many tones?", "is it music?"] and texts(d, "answers") == [
        "one",
        "no",
    ]
    segment = train[f"{elsewhere / 'e.wav'}@1-2.5"]
    assert texts(segment, "labels") == ["tone", "7"] and texts(segment, "captions") == ["hum"]
    assert segment["start_s"] == pytest.approx(1.0) and int(segment["num_samples"]) == 24000
    assert texts(by_id(data_dir, "validation")["17"], "captions") == ["a higher tone"]
    c = by_id(data_dir, "test")["clips/c.ogg"]
    assert texts(c, "questions") == ["is it loud?"] and texts(c, "answers") == ["no"]


def test_stored_audio_is_mono_16k_int16_of_the_source(built):
    _, _, data_dir = built
    train = by_id(data_dir, "train")
    for clip_id, freq, seconds in [("clips/a.wav", 440.0, 1.0)]:
        stored = train[clip_id]["audio"]
        assert stored.dtype == np.int16 and abs(len(stored) - int(16000 * seconds)) <= 1
        want = 0.4 * np.sin(2 * np.pi * freq * np.arange(len(stored)) / 16000)
        np.testing.assert_allclose(audio_io.from_pcm16(stored)[800:-800], want[800:-800], atol=3e-3)
    b = by_id(data_dir, "validation")["17"]["audio"]
    assert abs(len(b) - 12800) <= 1
    # The segment [1.0, 2.5) s of a 300 Hz tone starting at phase 0: it starts at phase 2*pi*300*1.0 = 0.
    segment = audio_io.from_pcm16(train[next(k for k in train if k.endswith("@1-2.5"))]["audio"])
    want = 0.4 * np.sin(2 * np.pi * 300.0 * (1.0 + np.arange(24000) / 16000))
    np.testing.assert_allclose(segment, want, atol=1e-4)


def test_inspect_prints_splits_counts_durations_and_examples(built, capsys):
    _, _, data_dir = built
    assert cli.main(["data", "inspect", "lab_clips", "--data-dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert "lab_clips at " in out and "16000 Hz" in out
    assert "train: 4 clips" in out and "validation: 1 clips" in out and "test: 1 clips" in out
    assert "max 1.50" in out  # the longest train clip: the 1.5 s segment
    assert "a steady tone | a beep" in out and "kept 6, skipped 0" in out
    assert cli.main(["data", "inspect", "lab_clips", "--data-dir", data_dir, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["seconds_min"] == pytest.approx(1.0, abs=0.01)
    assert cli.main(["data", "inspect", "no_such_set", "--data-dir", data_dir]) == 2


def test_rebuild_needs_overwrite_and_then_reads_the_new_manifest(tmp_path, capsys):
    write_tone(tmp_path / "x.wav", 16000, 0.5, 440.0)
    path = write_manifest(tmp_path / "m.jsonl", [{"audio": "x.wav", "caption": "first"}])
    args = ["data", "build", "--manifest", str(path), "--name", "again", "--data-dir", str(tmp_path / "tfds")]
    assert cli.main(args) == 0
    write_manifest(path, [{"audio": "x.wav", "caption": "second"}])
    assert cli.main(args) == 0
    assert "already built" in capsys.readouterr().out
    src = sources.open_split("again", str(tmp_path / "tfds"), "train")
    assert [c.decode() for c in src[0]["captions"]] == ["first"]
    assert cli.main([*args, "--overwrite"]) == 0
    src = sources.open_split("again", str(tmp_path / "tfds"), "train")
    assert [c.decode() for c in src[0]["captions"]] == ["second"]
    assert cli.main(["data", "build", "--manifest", str(path), "--data-dir", str(tmp_path)]) == 2  # no --name
    assert cli.main([*args[:-2], "--name", "Bad-Name"]) == 2
    assert "--name" in capsys.readouterr().err


def test_sample_rate_mismatch_is_refused(built):
    _, _, data_dir = built
    assert len(sources.open_split("lab_clips", data_dir, "train", sample_rate=16000)) == 4
    with pytest.raises(UserError, match="16000 Hz but the config asks for 22050"):
        sources.open_split("lab_clips", data_dir, "train", sample_rate=22050)


def test_training_pipeline_reads_a_manifest_dataset(built):
    _, _, data_dir = built
    source = sources.open_split("lab_clips", data_dir, "train[:1]+validation")
    tokenizer = TextTokenizer(word_level_tokenizer("a steady tone beep higher".split()))
    spec = pipeline.AudioSpec(16000, 16000)
    batch = next(
        iter(pipeline.train_dataset(source, tokenizer, spec, max_text_length=6, global_batch_size=2, seed=0))
    )
    assert batch["audio"].shape == (2, 16000) and sorted(batch["num_samples"].tolist()) == [12800, 16000]
    words = {tokenizer.decode(row) for row in batch["text_ids"]}
    assert words <= {"a steady tone", "a beep", "a higher tone"} and "a higher tone" in words


def test_manifest_lines_parse_to_records(tmp_path):
    report = BuildReport()
    path = write_manifest(
        tmp_path / "m.jsonl",
        [
            {"audio": "sub/x.wav", "caption": " padded  ", "extra": [1, 2]},
            {"audio": "/abs/y.flac", "labels": [3, "dog"], "id": "y", "split": "fold_2"},
            {"audio": "z.wav", "question": "q?", "answer": "a", "start": 1, "end": 2},
            {"audio": "w.wav", "caption": "x", "split": "train/dev"},
            {"audio": "v.wav", "caption": "x", "start": 3, "end": 2},
            {"audio": "u.wav", "question": "q?"},
            {"audio": "t.wav", "caption": ["not", "a", "string"], "labels": [True]},
        ],
    )
    records = manifest.read_manifest(path, report)
    x, y, z = records
    assert x.audio == tmp_path / "sub" / "x.wav" and x.id == "sub/x.wav" and x.captions == ["padded"]
    assert x.metadata == {"extra": [1, 2]} and x.split == "train" and x.origin == "m.jsonl:1"
    assert str(y.audio) == "/abs/y.flac" and y.labels == ["3", "dog"] and y.split == "fold_2"
    assert (z.questions, z.answers, z.start_s, z.end_s, z.id) == (["q?"], ["a"], 1.0, 2.0, "z.wav@1-2")
    assert [(p.origin, p.reason) for p in report.problems] == [
        ("m.jsonl:4", "bad_field"),
        ("m.jsonl:5", "bad_field"),
        ("m.jsonl:6", "bad_field"),
        ("m.jsonl:7", "bad_field"),
    ]
    with pytest.raises(FileNotFoundError, match="no_manifest.jsonl"):
        manifest.read_manifest(tmp_path / "no_manifest.jsonl", report)


def test_failed_builds_say_why_in_one_line_and_leave_only_the_bad_input_report(tmp_path, capsys):
    out = tmp_path / "tfds"
    # A manifest that does not exist: refused before TFDS starts, nothing created.
    code = cli.main(
        [
            "data",
            "build",
            "--manifest",
            str(tmp_path / "nope.jsonl"),
            "--name",
            "nope",
            "--data-dir",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 2 and "nope.jsonl does not exist" in captured.err
    assert "Downloading" not in captured.out + captured.err and not out.exists()
    # Every clip bad: one line naming the split and the report; only that report is left.
    write_manifest(tmp_path / "m.jsonl", [{"audio": "missing.wav", "captions": ["a hum"]}])
    code = cli.main(
        ["data", "build", "--manifest", str(tmp_path / "m.jsonl"), "--name", "bad", "--data-dir", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert 'split "train" has no usable clip (every one was bad)' in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "bad",
        "bad/failed_build",
        "bad/failed_build/bad_inputs.jsonl",
        "bad/failed_build/build_report.json",
    ]
    assert "missing_file" in (out / "bad" / "failed_build" / "bad_inputs.jsonl").read_text()
