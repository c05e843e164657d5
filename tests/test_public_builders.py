"""Public-set builders on tiny fake copies of their published layouts (file names, CSV columns, JSON
structure as the datasets publish them; the audio is short synthetic tones)."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from slit import cli
from slit.data import audio_io, builders, sources
from slit.data.audio_io import AudioChecks
from slit.errors import UserError

CHECKS = AudioChecks(sample_rate=16000)


def write_tone(path, rate=44100, seconds=0.3, freq=440.0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format=fmt)
    return path


def write_csv(path, header, rows, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def build(source, manual_dir, data_dir, **kw):
    return builders.build(
        source=source, manual_dir=str(manual_dir), data_dir=str(data_dir), checks=CHECKS, verbose=False, **kw
    )


def examples(data_dir, name, split):
    src = sources.open_split(name, str(data_dir), split)
    return {src[i]["id"].decode(): src[i] for i in range(len(src))}


def texts(example, key):
    return [t.decode() for t in example[key]]


def problems(builder):
    return [(p.action, p.reason, p.id) for p in builder.report.problems]


def test_clotho_v21_five_captions_three_splits(tmp_path):
    manual = tmp_path / "manual"
    header = ["file_name", *[f"caption_{i}" for i in range(1, 6)]]
    published = {"train": "development", "validation": "validation", "test": "evaluation"}
    for split, folder in published.items():
        rows = []
        for i in range(2):
            name = f"{folder} clip {i}.wav"  # Clotho file names have spaces
            write_tone(manual / folder / name, freq=300 + 100 * i)
            rows.append([name, *[f"{split} caption {k} of clip {i}" for k in range(1, 6)]])
        if split == "train":
            rows.append(["not downloaded.wav", *["a caption"] * 5])
        write_csv(manual / f"clotho_captions_{folder}.csv", header, rows)
    # A metadata CSV with a Windows-1252 row, as the published ones have.
    write_csv(
        manual / "clotho_metadata_development.csv",
        ["file_name", "keywords", "sound_id", "sound_link", "start_end_samples", "manufacturer", "license"],
        [["development clip 0.wav", "café;rain", "123", "link", "[0, 1]", "someone", "CC"]],
        encoding="cp1252",
    )
    builder = build("clotho", manual, tmp_path / "tfds", max_bad_fraction=0.5)
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
        "train": 2,
        "validation": 2,
        "test": 2,
    }
    train = examples(tmp_path / "tfds", "clotho", "train")
    clip = train["development clip 1.wav"]
    assert texts(clip, "captions") == [f"train caption {k} of clip 1" for k in range(1, 6)]
    assert clip["audio"].dtype == np.int16 and abs(int(clip["num_samples"]) - 4800) <= 1
    assert json.loads(train["development clip 0.wav"]["metadata"])["keywords"] == "café;rain"
    assert ("skipped", "missing_file", "not downloaded.wav") in problems(builder)
    assert ("repaired", "not_utf8", "") in problems(builder)
    test = examples(tmp_path / "tfds", "clotho", "test")
    assert set(test) == {"evaluation clip 0.wav", "evaluation clip 1.wav"}


def test_audiocaps_merges_caption_rows_and_finds_renamed_files(tmp_path):
    manual = tmp_path / "manual"
    header = ["audiocap_id", "youtube_id", "start_time", "caption"]
    write_csv(manual / "dataset" / "train.csv", header, [[1, "abcDEF12345", 30, "a dog barks"]])
    write_tone(manual / "audio" / "train" / "abcDEF12345_30.wav", rate=32000, seconds=1.0)
    test_rows = [[10 + k, "zzzYYY00000", 0, f"rain falls, take {k}"] for k in range(5)]
    test_rows += [[20, "gone_video1", 50, "deleted from youtube"]]
    write_csv(manual / "dataset" / "test.csv", header, test_rows)
    write_tone(manual / "audio" / "test" / "YzzzYYY00000.flac", rate=48000, seconds=1.0)  # AudioSet naming
    builder = build("audiocaps", manual, tmp_path / "tfds", max_bad_fraction=0.5)
    assert set(builder.info.splits) == {"train", "test"}
    test = examples(tmp_path / "tfds", "audiocaps", "test")
    clip = test["zzzYYY00000_0"]
    assert texts(clip, "captions") == [f"rain falls, take {k}" for k in range(5)]
    assert json.loads(clip["metadata"])["audiocap_ids"] == ["10", "11", "12", "13", "14"]
    assert clip["audio_path"].decode() == "audio/test/YzzzYYY00000.flac"
    assert abs(int(clip["num_samples"]) - 16000) <= 1
    assert ("skipped", "missing_file", "gone_video1_50") in problems(builder)
    assert list(examples(tmp_path / "tfds", "audiocaps", "train")) == ["abcDEF12345_30"]


def test_wavcaps_json_per_source(tmp_path):
    manual = tmp_path / "manual"
    sets = {
        "AudioSet_SL/as_final.json": ("AudioSet_SL", ["Y0a1b2c3d4e5.wav", "Y9z8y7x6w5v4.wav"]),
        "FreeSound/fsd_final.json": ("FreeSound", ["180913", "42"]),
        "SoundBible/sb_final.json": ("SoundBible", ["42"]),  # same id as a FreeSound clip
    }
    for json_path, (source, ids) in sets.items():
        data = [
            {
                "id": i,
                "caption": f"{source} sound {i}",
                "duration": 0.3,
                "audio": f"wav_path/{i}",
                "tags": ["x"],
            }
            for i in ids
        ]
        (manual / "json_files" / json_path).parent.mkdir(parents=True, exist_ok=True)
        (manual / "json_files" / json_path).write_text(
            json.dumps({"num_captions_per_audio": 1, "data": data})
        )
        for i in ids:
            if i != "Y9z8y7x6w5v4.wav":  # one AudioSet clip is missing
                write_tone(manual / "Audio" / source / f"{i.removesuffix('.wav')}.flac", rate=32000)
    builder = build("wavcaps", manual, tmp_path / "tfds", max_bad_fraction=0.5)
    train = examples(tmp_path / "tfds", "wavcaps", "train")
    assert set(train) == {"AudioSet_SL/Y0a1b2c3d4e5", "FreeSound/180913", "FreeSound/42", "SoundBible/42"}
    assert train["SoundBible/42"]["audio_path"].decode() == "Audio/SoundBible/42.flac"
    assert texts(train["FreeSound/42"], "captions") == ["FreeSound sound 42"]
    assert json.loads(train["FreeSound/42"]["metadata"]) == {
        "source": "FreeSound",
        "duration": 0.3,
        "tags": ["x"],
    }
    assert ("skipped", "missing_file", "AudioSet_SL/Y9z8y7x6w5v4") in problems(builder)


def test_esc50_folds_and_labels(tmp_path):
    manual = tmp_path / "manual" / "ESC-50-master"
    header = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    rows = []
    for fold in range(1, 6):
        for target, category in [(0, "dog"), (20, "crying_baby")]:
            name = f"{fold}-{1000 + target}-A-{target}.wav"
            write_tone(manual / "audio" / name, seconds=0.5, freq=200 + 50 * fold)
            rows.append(
                [name, fold, target, category, "True" if target == 0 else "False", 1000 + target, "A"]
            )
    write_csv(manual / "meta" / "esc50.csv", header, rows)
    build("esc50", tmp_path / "manual", tmp_path / "tfds")
    fold3 = examples(tmp_path / "tfds", "esc50", "fold3")
    assert set(fold3) == {"3-1000-A-0", "3-1020-A-20"}
    assert texts(fold3["3-1020-A-20"], "labels") == ["crying_baby"]
    assert json.loads(fold3["3-1000-A-0"]["metadata"]) == {
        "fold": 3, "target": 0, "esc10": True, "src_file": "1000", "take": "A"
    }  # fmt: skip
    train = sources.open_split("esc50", str(tmp_path / "tfds"), "fold1+fold2+fold4+fold5")
    assert len(train) == 8 and not {train[i]["id"].decode() for i in range(8)} & set(fold3)


def test_clotho_aqa_groups_questions_per_clip(tmp_path):
    manual = tmp_path / "manual"
    header = ["file_name", "QuestionText", "answer", "confidence"]
    rows = []
    for question in ["Is it raining?", "What is making noise?"]:
        for annotator, answer in enumerate(["yes", "yes", "no"] if "raining" in question else ["rain"] * 3):
            rows.append(["rain.wav", question, answer, ["yes", "maybe", "yes"][annotator]])
    rows.append(["wind.wav", "Is a bird singing?", "no", "yes"])
    write_csv(manual / "clotho_aqa_train.csv", header, rows)
    write_csv(manual / "clotho_aqa_test.csv", header, [["sea.wav", "Is it loud?", "no", "yes"]])
    for name in ("rain.wav", "wind.wav", "sea.wav"):
        write_tone(manual / "audio_files" / name)
    build("clotho_aqa", manual, tmp_path / "tfds")
    train = examples(tmp_path / "tfds", "clotho_aqa", "train")
    rain = train["rain.wav"]
    assert texts(rain, "questions") == ["Is it raining?"] * 3 + ["What is making noise?"] * 3
    assert texts(rain, "answers") == ["yes", "yes", "no", "rain", "rain", "rain"]
    assert json.loads(rain["metadata"])["confidence"] == ["yes", "maybe", "yes"] * 2
    assert texts(examples(tmp_path / "tfds", "clotho_aqa", "test")["sea.wav"], "questions") == ["Is it loud?"]


def test_cli_builds_a_public_set_under_another_name_and_inspects_it(tmp_path, capsys):
    manual = tmp_path / "manual"
    header = ["file_name", *[f"caption_{i}" for i in range(1, 6)]]
    write_csv(
        manual / "clotho_captions_evaluation.csv", header, [["a.wav", "one", "two", "three", "four", "five"]]
    )
    write_tone(manual / "evaluation" / "a.wav", seconds=1.0)
    data_dir = str(tmp_path / "tfds")
    args = ["data", "build", "--source", "clotho", "--manual-dir", str(manual), "--data-dir", data_dir]
    assert cli.main([*args, "--name", "clotho_32k", "--sample-rate", "32000"]) == 0
    assert "clotho_32k: built" in capsys.readouterr().out
    test = examples(tmp_path / "tfds", "clotho_32k", "test")
    assert abs(int(test["a.wav"]["num_samples"]) - 32000) <= 1
    assert cli.main(["data", "inspect", "clotho_32k", "--data-dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert "32000 Hz" in out and "test: 1 clips" in out and "one | two | three" in out
    assert cli.main(["data", "build", "--source", "clotho", "--data-dir", data_dir]) == 2  # no manual dir
    assert "manual directory" in capsys.readouterr().err


def test_missing_manual_files_give_a_clear_error(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "readme.txt").write_text("nothing here")
    for source, expected in [
        ("clotho", "clotho_captions"),
        ("esc50", "esc50.csv"),
        ("wavcaps", "as_final.json"),
    ]:
        with pytest.raises(UserError) as error:
            build(source, tmp_path / "manual", tmp_path / "tfds")
        assert expected in str(error.value)


def test_stored_audio_is_the_resampled_source(tmp_path):
    """ESC-50 clips are 44.1 kHz: the stored audio is the same 1 kHz tone sampled at 16 kHz, as int16."""
    manual = tmp_path / "manual"
    write_tone(manual / "audio" / "1-5-A-0.wav", seconds=1.0, freq=1000.0)
    header = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    write_csv(manual / "meta" / "esc50.csv", header, [["1-5-A-0.wav", 1, 0, "dog", "True", 5, "A"]])
    build("esc50", manual, tmp_path / "tfds")
    stored = examples(tmp_path / "tfds", "esc50", "fold1")["1-5-A-0"]["audio"]
    assert stored.dtype == np.int16 and abs(len(stored) - 16000) <= 1
    want = 0.3 * np.sin(2 * np.pi * 1000.0 * np.arange(16000) / 16000)
    np.testing.assert_allclose(audio_io.from_pcm16(stored)[800:15000], want[800:15000], atol=3e-3)
