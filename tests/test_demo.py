"""`slit demo`: its real sound sources, and the whole recipe end to end at a tiny size.

The sources read the real packaged audio (Debian's Asterisk prompts and freedesktop sounds, PyPI's
animal recordings, the General MIDI soundfont through fluidsynth), which `make test` installs. The
end-to-end test runs every phase (gather, build, cache, both stages with their evaluations, export,
generate) on the real frozen Whisper tiny.en, MiniLM and SmolLM2, then runs again to show that a second
run reuses what the first made.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from slit.demo import recipe, sources


def _debian(package: str) -> bool:
    return subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0


needs_speech = pytest.mark.skipif(
    not (_debian(sources.SPEECH_PACKAGE) and _debian(sources.TRANSCRIPTS_PACKAGE)),
    reason="Debian asterisk-core-sounds-en(-wav) not installed (make test installs it)",
)
needs_all = pytest.mark.skipif(
    not all(_debian(p) for p in ("asterisk-core-sounds-en-wav", "sound-theme-freedesktop", "fluidsynth"))
    or shutil.which("fluidsynth") is None,
    reason="the demo's Debian packages are not installed (make test installs them)",
)


@pytest.mark.parametrize(
    ("written", "spoken"),
    [
        ("Please press 1 to mute.", "please press one to mute"),
        ("Press * to toggle pause, press # to enter", "press star to toggle pause press pound to enter"),
        ("Agent Logged off.", "agent logged off"),
        ("That's all, goodbye...", "that's all goodbye"),
        ("[ascending tones]", None),
        ("Please enter extension 162.", None),
        ("", None),
    ],
)
def test_transcripts_become_lowercase_words(written, spoken):
    assert sources.normalise_transcript(written) == spoken


@needs_speech
def test_speech_clips_are_the_packaged_prompts_with_their_transcripts():
    lines = sources.speech_clips(seed=0)
    by_id = {line["id"]: line for line in lines}
    assert by_id["speech-digits-7"]["qa"][0] == {
        "question": "what is said?",
        "answer": "seven",
        "type": "speech",
    }
    assert "please hold" in by_id["speech-pls-hold-while-try"]["qa"][0]["answer"]
    assert len(lines) > 400
    for line in lines:
        answer = line["qa"][0]["answer"]
        assert answer and not any(ch.isdigit() for ch in answer)
        assert len(answer.split()) <= sources.MAX_TRANSCRIPT_WORDS
        assert sf.info(line["audio"]).duration <= sources.MAX_SECONDS
    splits = {line["split"] for line in lines}
    assert splits == {"train", "validation", "test"}
    assert [x["split"] for x in sources.speech_clips(seed=0)] == [x["split"] for x in lines]  # deterministic


def test_variants_change_pitch_level_and_noise_but_keep_the_sound():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for seed in range(5):
        out = sources.vary(tone, np.random.default_rng(seed))
        assert out.dtype == np.float32 and np.max(np.abs(out)) <= 0.98
        # Resampling by 2^(s/12), |s| <= 3 semitones, plus up to 0.5 s of silence in front.
        assert 16000 * 2 ** (-3 / 12) - 2 <= len(out) <= 16000 * 2 ** (3 / 12) + 8000 + 2
        spectrum = np.abs(np.fft.rfft(out))
        peak_hz = np.argmax(spectrum) * 16000 / len(out)
        assert 440 * 2 ** (-3 / 12) - 2 <= peak_hz <= 440 * 2 ** (3 / 12) + 2
    assert not np.array_equal(sources.vary(tone, rng), sources.vary(tone, rng))


def test_animal_variants_put_every_animal_in_every_split_and_are_written_once(tmp_path):
    lines = sources.animal_clips(tmp_path, variants=10, seed=0)
    assert len(lines) == 10 * len(sources.ANIMAL_VERBS)
    for animal in sources.ANIMAL_VERBS:
        mine = [x for x in lines if x["labels"] == [animal]]
        assert sorted(x["split"] for x in mine) == ["test"] + ["train"] * 8 + ["validation"]
        assert all(x["qa"][0]["answer"] == animal and animal in x["captions"][0] for x in mine)
    first = tmp_path / lines[0]["audio"]
    written = first.stat().st_mtime_ns
    assert sources.animal_clips(tmp_path, variants=10, seed=0) == lines
    assert first.stat().st_mtime_ns == written
    audio, rate = sf.read(str(first))
    assert rate == sources.SAMPLE_RATE and audio.ndim == 1 and np.abs(audio).max() > 0.05


TINY = recipe.Size(
    name="tiny",
    speech=24,
    animal_variants=3,
    event_variants=1,
    instruments=12,
    synthetic=12,
    stage1_steps=2,
    stage2_steps=2,
    eval_clips=6,
    validate=False,
)


@needs_all
def test_demo_runs_every_phase_then_reuses_it(tmp_path, capsys):
    root = tmp_path / "demo"
    summary = recipe.run(root, size=TINY)
    printed = capsys.readouterr().out
    for phase in range(1, 8):
        assert f"=== [{phase}/7] done" in printed
    written = json.loads((root / "summary.json").read_text())
    assert written["size"] == "tiny" and written == json.loads(json.dumps(summary))
    assert set(written["clips"]) == {"speech", "animals", "events", "instruments", "synthetic"}
    tasks = {row["task"].strip() for row in written["metrics"]}
    assert {"retrieval", "zero-shot classification (stage one)", "captioning", "question answering"} <= tasks
    for row in written["metrics"]:
        assert row["value"] is None or np.isfinite(row["value"])
    retrieval = {row["metric"]: row for row in written["metrics"] if row["task"] == "retrieval"}
    num_test = json.loads((root / "stage1" / "eval" / "retrieval.json").read_text())["num_audio"]
    assert retrieval["text_to_audio R@1"]["baseline"] == pytest.approx(1 / num_test)
    # The exported bundle answered every prompt about one held-out clip per source that has one.
    answers = json.loads((root / "answers.json").read_text())
    assert answers and all(set(item["answers"]) == set(recipe_prompts()) for item in answers)
    assert (root / "export" / "model.safetensors").is_file()
    # Majority class: always the most common training label, scored on the labelled test clips.
    manifest = [json.loads(x) for x in (root / "data" / "manifest.jsonl").read_text().splitlines()]
    train_labels = [label for x in manifest if x["split"] == "train" for label in x.get("labels", [])]
    top = max(set(train_labels), key=train_labels.count)
    test = [x["labels"] for x in manifest if x["split"] == "test" and x.get("labels")]
    assert written["majority_class"]["accuracy"] == pytest.approx(sum(top in t for t in test) / len(test))

    # A second run reuses the manifest, dataset, cache, both trained runs and the bundle.
    checkpoints = sorted(p.name for p in (root / "stage2" / "checkpoints").iterdir())
    recipe.run(root, size=TINY)
    again = capsys.readouterr().out
    assert "reusing" in again and "$ slit train" not in again and "$ slit export" not in again
    assert "up to date" in again and "already built" in again
    assert sorted(p.name for p in (root / "stage2" / "checkpoints").iterdir()) == checkpoints


def recipe_prompts() -> tuple[str, ...]:
    from slit.demo import summary

    return summary.PROMPTS
