"""The demo's instrument clips: MIDI phrases read back independently, their captions and answers, and
fluidsynth renders checked by their sound (length, level, onsets)."""

from __future__ import annotations

import collections
import pathlib
import re
import shutil

import mido
import numpy as np
import pytest
import soundfile as sf

from slit.demo import midi
from slit.errors import UserError

WORDS = ("one", "two", "three", "four", "five", "six")
ALLOWED = {
    "instrument": {"piano", "violin", "trumpet", "flute", "guitar", "organ", "cello", "xylophone", "drums"},
    "count": set(WORDS),
    "direction": {"up", "down", "same"},
    "tempo": {"fast", "slow"},
    "chord": {"chord", "separate notes"},
}
GM_PROGRAMS = {"piano": 0, "xylophone": 13, "organ": 19, "guitar": 25, "violin": 40, "cello": 42}
GM_PROGRAMS |= {"trumpet": 56, "flute": 73}
TEMPO_WORDS = {"slow": {"slow", "slowly"}, "fast": {"fast", "quickly"}}


def many_phrases(n: int = 400) -> list[midi.Phrase]:
    names = list(midi.INSTRUMENTS)
    return [midi.random_phrase(np.random.default_rng([i, 11]), names[i % len(names)]) for i in range(n)]


def read_back(path: pathlib.Path) -> dict:
    """What a MIDI file plays, read with mido alone: program changes, and the struck notes with their
    start times in seconds."""
    programs, notes, now, tempos = [], [], 0.0, []
    for message in mido.MidiFile(path):  # message.time: seconds since the previous message
        now += message.time
        if message.type == "program_change":
            programs.append((message.channel, message.program))
        elif message.type == "note_on" and message.velocity > 0:
            notes.append((now, message.note, message.channel, message.velocity))
        elif message.type == "set_tempo":
            tempos.append(mido.tempo2bpm(message.tempo))
    return {"programs": programs, "notes": notes, "bpm": tempos, "seconds": now}


def facts(played: dict) -> dict:
    """Instrument, count, direction, tempo and chord of what was read back, worked out from the events."""
    (channel, program), *others = played["programs"]
    assert not others
    notes = played["notes"]
    assert {n[2] for n in notes} == {channel}
    starts = sorted({round(n[0], 6) for n in notes})
    pitches = [n[1] for n in notes]
    if channel == 9:
        instrument = "drums"
    else:
        (instrument,) = [name for name, p in GM_PROGRAMS.items() if p == program]
    out = {"instrument": instrument, "chord": len(starts) == 1 and len(notes) > 1, "pitches": pitches}
    out["count"] = len(starts)
    if len(starts) > 1:
        gaps = np.diff(starts)
        assert np.allclose(gaps, gaps[0], atol=1e-3)
        out["tempo"] = "slow" if gaps[0] > 0.6 else "fast"  # 72 bpm: 0.83 s a note; 180 bpm: 0.33 s
        assert gaps[0] == pytest.approx(0.8333, abs=0.01) or gaps[0] == pytest.approx(0.3333, abs=0.01)
        if instrument != "drums":
            steps = np.diff(pitches)
            out["direction"] = "up" if (steps > 0).all() else "down" if (steps < 0).all() else "same"
            assert (steps > 0).all() or (steps < 0).all() or (steps == 0).all(), pitches
    return out


def test_describe_matches_the_midi_file_read_back(tmp_path):
    seen = collections.Counter()
    for i, phrase in enumerate(many_phrases()):
        path = tmp_path / f"{i}.mid"
        midi.phrase_midi(phrase).save(path)
        played = read_back(path)
        truth = facts(played)
        text = midi.describe(phrase, np.random.default_rng(i))
        qa = {q["type"]: q["answer"] for q in text["qa"]}
        assert len(qa) == len(text["qa"]), "one question per type"
        assert text["labels"] == [truth["instrument"]]
        assert qa["instrument"] == truth["instrument"]
        assert all(q["question"].endswith("?") and q["answer"] in ALLOWED[q["type"]] for q in text["qa"])
        assert min(v for _, _, _, v in played["notes"]) >= 80, "clearly audible velocities"
        if truth["chord"]:
            assert set(qa) == {"instrument", "chord"} and qa["chord"] == "chord"
            assert sorted(truth["pitches"]) == list(phrase.pitches)
        else:
            assert qa["count"] == WORDS[truth["count"] - 1] and truth["count"] == len(played["notes"])
            assert truth["pitches"] == list(phrase.pitches)
        if truth["count"] > 1:
            assert qa["tempo"] == truth["tempo"] == phrase.tempo
        else:
            assert "tempo" not in qa
        if truth["instrument"] == "drums" or truth["count"] == 1:
            assert "direction" not in qa
        else:
            assert qa["direction"] == truth["direction"]
            assert qa["chord"] == "separate notes"
        assert played["bpm"] == [pytest.approx(72.0 if phrase.tempo == "slow" else 180.0, abs=0.01)]
        assert mido.MidiFile(path).length == pytest.approx(phrase.seconds, abs=0.01)
        assert 0.1 < phrase.seconds and 1.0 <= max(1.0, phrase.seconds + 0.5) < 6.0, "clip length"

        captions = text["captions"]
        assert len(captions) == 5 and len(set(captions)) == 5
        name = "drum" if truth["instrument"] == "drums" else truth["instrument"]
        for caption in captions:
            words = caption.replace(",", "").split()
            assert re.fullmatch(r"[a-z ,]+", caption), caption
            assert name in caption, caption
            if truth["chord"]:
                assert "chord" in words, caption
            else:
                assert WORDS[truth["count"] - 1] in words, caption
                assert not {w for w in WORDS if w != WORDS[truth["count"] - 1]} & set(words), caption
            if truth["count"] > 1:
                assert TEMPO_WORDS[truth["tempo"]] & set(words), caption
                assert not TEMPO_WORDS["slow" if truth["tempo"] == "fast" else "fast"] & set(words), caption
            else:
                assert not (TEMPO_WORDS["slow"] | TEMPO_WORDS["fast"]) & set(words), caption
        seen[truth["instrument"], truth["chord"]] += 1
        seen["direction", truth.get("direction")] += 1
        seen["count", truth["count"]] += 1
    assert {("direction", d) for d in ("up", "down", "same")} <= set(seen)
    assert {("count", n) for n in range(1, 7)} <= set(seen)
    assert {(name, True) for name in ("piano", "guitar", "organ")} <= set(seen)
    assert {(name, False) for name in ALLOWED["instrument"]} <= set(seen)


def test_drums_use_the_percussion_channel_and_instruments_their_programs(tmp_path):
    assert {k: v for k, v in midi.INSTRUMENTS.items() if k != "drums"} == GM_PROGRAMS
    for name in midi.INSTRUMENTS:
        phrase = midi.random_phrase(np.random.default_rng(5), name)
        midi.phrase_midi(phrase).save(tmp_path / "p.mid")
        channels = {m.channel for m in mido.MidiFile(tmp_path / "p.mid") if not m.is_meta}
        assert channels == ({9} if name == "drums" else {0})


def test_bad_phrases_are_refused():
    with pytest.raises(ValueError, match="strictly up"):
        midi.Phrase("violin", (60, 64, 62), False, "slow", (100, 100, 100))
    with pytest.raises(ValueError, match="unknown instrument"):
        midi.Phrase("banjo", (60,), False, "slow", (100,))
    with pytest.raises(ValueError, match="chord"):
        midi.Phrase("drums", (36, 38), True, "slow", (100, 100))


def test_instruments_are_balanced_and_splits_deterministic():
    names = [midi.clip_phrase(4, i)[0].instrument for i in range(9 * 7)]
    assert collections.Counter(names) == {name: 7 for name in midi.INSTRUMENTS}
    assert names != [midi.clip_phrase(5, i)[0].instrument for i in range(9 * 7)]

    splits = midi.split_names(600, seed=1)
    assert splits == midi.split_names(600, seed=1)
    assert splits != midi.split_names(600, seed=2)
    assert collections.Counter(splits) == {"train": 480, "validation": 60, "test": 60}
    assert splits[:100].count("train") > 60, "shuffled, not in blocks"
    custom = collections.Counter(midi.split_names(100, 0, {"train": 0.5, "test": 0.5}))
    assert custom == {"train": 50, "test": 50}
    small = collections.Counter(midi.split_names(5, 0))
    assert small["validation"] == 1 and small["test"] == 1 and small["train"] == 3
    with pytest.raises(UserError, match="fraction"):
        midi.split_names(10, 0, {"train": -1.0})


def test_missing_fluidsynth_or_soundfont_names_the_debian_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(midi, "SOUNDFONT", tmp_path / "FluidR3_GM.sf2")
    with pytest.raises(UserError, match="fluid-soundfont-gm") as e:
        midi.find_soundfont()
    assert "apt-get install" in str(e.value)
    monkeypatch.setattr(midi.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="Debian package fluidsynth"):
        midi.find_soundfont()


# --- rendering (fluidsynth and the soundfont) ---


@pytest.fixture(scope="module")
def soundfont() -> pathlib.Path:
    if shutil.which("fluidsynth") is None:
        pytest.skip("fluidsynth is not installed (Debian package fluidsynth)")
    if not midi.SOUNDFONT.is_file():
        pytest.skip(f"no {midi.SOUNDFONT} (Debian package fluid-soundfont-gm)")
    return midi.find_soundfont()


def onset_count(audio: np.ndarray) -> int:
    """Note onsets by spectral flux: the summed rise of log magnitude between 10 ms frames (32 ms Hann
    windows), peaks above 30% of the largest, at least 150 ms apart."""
    win, hop = 512, 160
    frames = 1 + (len(audio) - win) // hop
    index = np.arange(win)[None, :] + hop * np.arange(frames)[:, None]
    spectrum = np.abs(np.fft.rfft(audio[index] * np.hanning(win), axis=1))
    log = np.log1p(100 * spectrum / spectrum.max())
    flux = np.maximum(np.diff(log, axis=0), 0).sum(axis=1)
    count, last = 0, -100
    for i in range(1, len(flux) - 1):
        peak = flux[i] >= flux[i - 1] and flux[i] >= flux[i + 1]
        if peak and flux[i] > 0.3 * flux.max() and i - last > 15:
            count, last = count + 1, i
    return count


def note_pitches(audio: np.ndarray, phrase: midi.Phrase) -> list[float]:
    """The pitch in the middle of each separate note, as a fractional MIDI note number: the lowest
    spectral peak above 30% of the strongest (for the flute and the piano, the fundamental)."""
    pitches = []
    for i in range(len(phrase.pitches)):
        start = int((midi.LEAD_S + (i + 0.2) * phrase.beat_seconds) * 16000)
        part = audio[start : start + int(0.6 * phrase.beat_seconds * 16000)]
        spectrum = np.abs(np.fft.rfft(part * np.hanning(len(part)), 16384))
        j = np.flatnonzero(spectrum > 0.3 * spectrum.max())[0]
        while spectrum[j + 1] > spectrum[j]:  # climb to the top of that peak
            j += 1
        pitches.append(69 + 12 * np.log2(np.fft.rfftfreq(16384, 1 / 16000)[j] / 440))
    return pitches


def rendered(phrase: midi.Phrase, folder: pathlib.Path, soundfont: pathlib.Path) -> np.ndarray:
    name = f"{phrase.instrument}-{len(phrase.pitches)}-{phrase.tempo}-{phrase.chord}"
    midi.phrase_midi(phrase).save(folder / f"{name}.mid")
    midi.render(folder / f"{name}.mid", folder / f"{name}.wav", soundfont)
    info = sf.info(folder / f"{name}.wav")
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    audio, _ = sf.read(folder / f"{name}.wav", dtype="float32")
    assert len(audio) / 16000 == pytest.approx(max(1.0, phrase.seconds + 0.5), abs=0.01)
    assert 0.5 < np.abs(audio).max() < 0.8  # scaled to -3 dBFS
    assert np.sqrt(np.mean(audio**2)) > 0.01, "not silent"
    assert np.abs(audio[:800]).max() < 1e-3, "silent lead-in"
    return audio


def test_renders_have_the_phrase_length_and_its_onsets(tmp_path, soundfont):
    notes = (60, 64, 67, 71)
    slow = rendered(midi.Phrase("piano", notes, False, "slow", (100,) * 4), tmp_path, soundfont)
    fast = rendered(midi.Phrase("piano", notes, False, "fast", (100,) * 4), tmp_path, soundfont)
    assert len(slow) > 1.8 * len(fast)
    assert onset_count(slow) == onset_count(fast) == 4
    assert np.allclose(
        note_pitches(slow, midi.Phrase("piano", notes, False, "slow", (100,) * 4)), notes, atol=0.5
    )
    falling = midi.Phrase("flute", (84, 79, 76, 72), False, "slow", (100,) * 4)
    assert np.allclose(
        note_pitches(rendered(falling, tmp_path, soundfont), falling), falling.pitches, atol=0.5
    )
    same = rendered(midi.Phrase("xylophone", (76,) * 5, False, "fast", (100,) * 5), tmp_path, soundfont)
    assert onset_count(same) == 5
    drums = midi.Phrase("drums", (36, 38, 45, 38, 36, 50), False, "fast", (110,) * 6)
    assert onset_count(rendered(drums, tmp_path, soundfont)) == 6
    chord = rendered(midi.Phrase("organ", (55, 59, 62), True, "slow", (100,) * 3), tmp_path, soundfont)
    assert onset_count(chord) == 1
    one = rendered(midi.Phrase("guitar", (52,), False, "fast", (100,)), tmp_path, soundfont)
    assert len(one) == 16000 and onset_count(one) == 1


def test_render_failures_name_the_file(tmp_path, soundfont):
    (tmp_path / "junk.mid").write_bytes(b"not a midi file")
    with pytest.raises(UserError, match="junk.mid"):
        midi.render(tmp_path / "junk.mid", tmp_path / "junk.wav", soundfont)
    midi.phrase_midi(midi.Phrase("flute", (72,), False, "slow", (100,))).save(tmp_path / "ok.mid")
    (tmp_path / "junk.sf2").write_bytes(b"RIFX" + bytes(2000))
    with pytest.raises(UserError, match=r"ok\.mid.*fluidsynth|fluidsynth.*ok\.mid") as e:
        midi.render(tmp_path / "ok.mid", tmp_path / "ok.wav", tmp_path / "junk.sf2")
    assert "junk.sf2" in str(e.value), "fluidsynth's own message"
    assert not (tmp_path / "ok.wav").exists()


def test_a_note_left_on_is_cut_and_does_not_keep_fluidsynth_rendering(tmp_path, soundfont):
    track = mido.MidiTrack([mido.Message("program_change", program=19)])  # an organ: it never fades
    track += [mido.Message("note_on", note=60, velocity=100), mido.Message("note_on", note=67, time=960)]
    held = mido.MidiFile(type=0, ticks_per_beat=480)
    held.tracks.append(track)  # 120 bpm: the last event at 1 s, and no note-off
    held.save(tmp_path / "held.mid")
    midi.render(tmp_path / "held.mid", tmp_path / "held.wav", soundfont, timeout_s=20)
    audio, _ = sf.read(tmp_path / "held.wav")
    assert len(audio) == 24000  # cut 0.5 s after the last event
    assert np.abs(audio[-3000:-800]).max() > 0.05, "still sounding until the fade-out"


def test_make_instrument_clips_writes_lines_and_reuses_renders(tmp_path, soundfont):
    done = []
    lines = midi.make_instrument_clips(tmp_path, 10, seed=3, workers=2, progress=done.append)
    assert sum(done) == 10
    assert [line["id"] for line in lines] == [f"instrument-{i:04d}" for i in range(10)]
    for line in lines:
        assert set(line) == {"id", "audio", "split", "captions", "qa", "labels", "source"}
        assert line["audio"] == f"instruments/{line['id']}.wav" and line["source"] == "instruments"
        assert line["split"] in {"train", "validation", "test"}
        info = sf.info(tmp_path / line["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 1.0 <= info.duration <= 6.0
        assert (tmp_path / "instruments" / f"{line['id']}.mid").is_file()
        phrase, rng = midi.clip_phrase(3, int(line["id"][-4:]))
        assert {k: line[k] for k in ("captions", "qa", "labels")} == midi.describe(phrase, rng)
    assert collections.Counter(line["split"] for line in lines) == {"train": 8, "validation": 1, "test": 1}
    assert len({line["labels"][0] for line in lines}) == 9

    wavs = sorted((tmp_path / "instruments").glob("*.wav"))
    assert len(wavs) == 10 and not list((tmp_path / "instruments").glob("*.partial"))
    stamps = {p: p.stat().st_mtime_ns for p in wavs}
    again = midi.make_instrument_clips(tmp_path, 10, seed=3, workers=2)
    assert again == lines
    assert {p: p.stat().st_mtime_ns for p in wavs} == stamps, "nothing re-rendered"

    # A clip whose MIDI file no longer matches is rendered again, and only that one.
    (tmp_path / "instruments" / "instrument-0004.mid").write_bytes(b"stale")
    more = midi.make_instrument_clips(tmp_path, 11, seed=3, workers=1)
    assert [line["id"] for line in more[:10]] == [line["id"] for line in lines]
    assert [line["captions"] for line in more[:10]] == [line["captions"] for line in lines]
    changed = {p.name for p in wavs if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {"instrument-0004.wav"}
    assert (tmp_path / "instruments" / "instrument-0010.wav").is_file()
