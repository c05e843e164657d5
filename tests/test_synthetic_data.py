"""Tests for the procedurally generated sound dataset (slit.data.synthetic and its TFDS builder).

The caption checks measure the signal itself (spectra, envelopes), independently of the generator's code.
"""

import json
import re

import numpy as np
import pytest

from slit.data import audio_io
from slit.data import synthetic as syn

SR = syn.SAMPLE_RATE
NUM_CLIPS = 400

# Caption words per attribute value (written out here, not taken from the module under test).
KIND_WORDS = {
    "beep": {"beep", "beeps", "tone", "tones"},
    "chord": {"chord", "chords"},
    "chirp": {"chirp", "chirps", "sweep", "sweeps"},
    "noise": {"noise"},
    "clicks": {"click", "clicks"},
}
QUALITY_WORDS = {
    ("beep", "low"): {"low"},
    ("beep", "medium"): {"medium"},
    ("beep", "high"): {"high"},
    ("chord", "low"): {"low", "deep"},
    ("chord", "high"): {"high"},
    ("chirp", "up"): {"rising", "upward", "up"},
    ("chirp", "down"): {"falling", "downward", "down"},
    ("noise", "white"): {"white"},
    ("noise", "pink"): {"pink"},
    ("noise", "brown"): {"brown"},
    ("clicks", "slow"): {"slow"},
    ("clicks", "fast"): {"fast", "rapid"},
}
LOUDNESS_WORDS = {"loud": {"loud", "loudly"}, "quiet": {"quiet", "quietly", "soft", "softly"}}
COUNT_WORDS = {2: {"two", "twice"}, 3: {"three"}, 4: {"four"}}
SPACING_WORDS = {"fast": {"quick", "quickly", "rapid", "rapidly"}, "slow": {"slowly", "long", "pauses"}}


@pytest.fixture(scope="module")
def clips():
    return [clip for _, clip in syn.generate_split(seed=123, num_clips=NUM_CLIPS, prefix="test")]


def single_event_clips(clips, kind):
    return [
        c for c in clips if len(c.attributes["events"]) == 1 and c.attributes["events"][0]["kind"] == kind
    ]


def words(caption):
    return set(syn.caption_words(caption))


def event_parts(caption, num_events):
    """Splits a two-event caption at its joiner into the part describing each event."""
    if num_events == 1:
        return [caption]
    parts = re.split(r",? then |,? followed by ", caption)
    assert len(parts) == 2, caption
    return parts


# ---- Signal analysis helpers ------------------------------------------------------------------------------


def frame_rms(x, frame_s=0.01):
    n = int(frame_s * SR)
    frames = x[: len(x) // n * n].reshape(-1, n).astype(np.float64)
    return np.sqrt((frames**2).mean(axis=1))


def active_runs(x, frame_s=0.01, rel_db=-20.0):
    """(start_frame, end_frame) of runs of frames within rel_db of the loudest frame."""
    rms = frame_rms(x, frame_s)
    active = rms > rms.max() * 10 ** (rel_db / 20)
    edges = np.diff(np.concatenate([[0], active.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def dominant_hz(x):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / SR)[spectrum.argmax()]


def short_term_rms_db(x, window_s=0.05):
    w = int(window_s * SR)
    energy = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    return 10 * np.log10((energy[w:] - energy[:-w]).max() / w)


# ---- Generation -------------------------------------------------------------------------------------------


def test_deterministic_and_seed_dependent():
    a = list(syn.generate_split(seed=5, num_clips=6, prefix="x"))
    b = list(syn.generate_split(seed=5, num_clips=6, prefix="x"))
    prefix = list(syn.generate_split(seed=5, num_clips=3, prefix="x"))
    other = list(syn.generate_split(seed=6, num_clips=6, prefix="x"))
    assert [i for i, _ in a] == [f"x-{i:06d}" for i in range(6)]
    for (_, ca), (_, cb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ca.audio, cb.audio)
        assert ca.captions == cb.captions and ca.attributes == cb.attributes
    for (_, ca), (_, cp) in zip(a, prefix, strict=False):
        np.testing.assert_array_equal(ca.audio, cp.audio)
    assert not any(
        len(ca.audio) == len(co.audio) and np.array_equal(ca.audio, co.audio)
        for (_, ca), (_, co) in zip(a, other, strict=True)
    )
    assert [c.captions for _, c in a] != [c.captions for _, c in other]


def test_generate_clip_uses_only_the_given_rng():
    c1 = syn.generate_clip(np.random.default_rng(9))
    c2 = syn.generate_clip(np.random.default_rng(9))
    np.testing.assert_array_equal(c1.audio, c2.audio)
    assert c1.captions == c2.captions


def test_audio_invariants(clips):
    for clip in clips:
        x = clip.audio
        assert x.dtype == np.float32 and x.ndim == 1
        assert syn.MIN_DURATION_S * SR <= len(x) <= syn.MAX_DURATION_S * SR
        assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
        assert np.abs(x).max() > 10 ** (-34 / 20)  # an event at -32 dBFS at the least: never silent
        assert clip.attributes["num_samples"] == len(x)


def test_clips_vary(clips):
    durations = np.array([len(c.audio) / SR for c in clips])
    assert durations.min() < 1.0 and durations.max() > 4.0
    kinds = {e["kind"] for c in clips for e in c.attributes["events"]}
    assert kinds == set(syn.KINDS)
    assert {len(c.attributes["events"]) for c in clips} == {1, 2}
    assert {e["count"] for c in clips for e in c.attributes["events"]} == {1, 2, 3, 4}
    assert len({c.captions[0] for c in clips}) > 0.6 * len(clips)


def test_attributes_are_json_and_consistent(clips):
    for clip in clips:
        attrs = clip.attributes
        assert json.loads(json.dumps(attrs)) == attrs
        duration = len(clip.audio) / SR
        previous_end = 0.0
        for ev in attrs["events"]:
            assert ev["quality"] in syn.QUALITIES[ev["kind"]]
            assert ev[syn.QUALITY_KEY[ev["kind"]]] == ev["quality"]
            assert len(ev["segments_s"]) == ev["count"]
            assert (ev["spacing"] is None) == (ev["count"] == 1)
            assert previous_end <= ev["start_s"] < ev["end_s"] <= duration + 1e-3
            previous_end = ev["end_s"]
            if ev["loudness"] == "loud":
                assert -8.5 < ev["level_dbfs"] < -3.5 or ev["peak_dbfs"] > -1.5  # peak capped at -1 dBFS
            else:
                assert -32.5 < ev["level_dbfs"] < -27.5


# ---- Captions: form and consistency with the attributes ---------------------------------------------------


def test_caption_form_and_vocabulary(clips):
    vocabulary = set(syn.CAPTION_VOCABULARY)
    assert syn.CAPTION_VOCABULARY == sorted(vocabulary) and len(vocabulary) < 300
    used = set()
    for clip in clips:
        assert len(clip.captions) == syn.NUM_CAPTIONS == len(set(clip.captions))
        for caption in clip.captions:
            assert re.fullmatch(r"[a-z]+(,? [a-z]+)*", caption), caption
            assert len(caption.split()) <= syn.MAX_CAPTION_WORDS
            caption_words = syn.caption_words(caption)
            assert set(caption_words) <= vocabulary, set(caption_words) - vocabulary
            assert not {"hz", "seconds", "second"} & set(caption_words)
            used |= set(caption_words)
    assert len(used) > 0.8 * len(vocabulary)  # the vocabulary is not padded with unused words


def test_captions_describe_every_event_in_order(clips):
    for clip in clips:
        events = clip.attributes["events"]
        for caption in clip.captions:
            for part, ev in zip(event_parts(caption, len(events)), events, strict=True):
                w = words(part)
                assert w & KIND_WORDS[ev["kind"]], (part, ev)
                assert w & QUALITY_WORDS[(ev["kind"], ev["quality"])], (part, ev)
                others = set().union(
                    *(QUALITY_WORDS[(ev["kind"], q)] for q in syn.QUALITIES[ev["kind"]] if q != ev["quality"])
                )
                assert not w & (others - QUALITY_WORDS[(ev["kind"], ev["quality"])]), (part, ev)
                assert w & LOUDNESS_WORDS[ev["loudness"]], (part, ev)
                other_loudness = "quiet" if ev["loudness"] == "loud" else "loud"
                assert not w & LOUDNESS_WORDS[other_loudness], (part, ev)
                all_counts = set().union(*COUNT_WORDS.values()) | {"times"}
                if ev["count"] == 1:
                    assert not w & all_counts, (part, ev)
                else:
                    assert w & COUNT_WORDS[ev["count"]], (part, ev)
                    other_counts = set().union(*(v for k, v in COUNT_WORDS.items() if k != ev["count"]))
                    assert not w & other_counts, (part, ev)
                    assert w & SPACING_WORDS[ev["spacing"]], (part, ev)


# ---- Captions are determined by the audio: measured from the signal ---------------------------------------


def test_beep_and_chord_pitch_matches_dominant_frequency(clips):
    checked = 0
    for kind in ("beep", "chord"):
        for clip in single_event_clips(clips, kind):
            hz = dominant_hz(clip.audio)
            band = "low" if hz < 450 else "medium" if hz < 1200 else "high"
            if kind == "chord":  # a high chord's strongest partial may be its root (700-1200 Hz)
                band = "low" if hz < 450 else "high"
            for caption in clip.captions:
                assert words(caption) & QUALITY_WORDS[(kind, band)], (hz, caption)
            checked += 1
    assert checked >= 40


def test_repetition_count_and_spacing_match_envelope(clips):
    checked = 0
    for kind in ("beep", "chord", "chirp"):
        for clip in single_event_clips(clips, kind):
            runs = active_runs(clip.audio)
            count_words = {1: set(), **COUNT_WORDS}[len(runs)] if len(runs) <= 4 else None
            for caption in clip.captions:
                w = words(caption)
                if len(runs) == 1:
                    assert not w & {"two", "twice", "three", "four", "times"}, caption
                else:
                    assert w & count_words, (len(runs), caption)
            if len(runs) > 1:
                gaps_s = np.array([b[0] - a[1] for a, b in zip(runs[:-1], runs[1:], strict=True)]) * 0.01
                spacing = "fast" if gaps_s.max() < 0.25 else "slow"
                assert gaps_s.min() > 0.3 or gaps_s.max() < 0.25, gaps_s  # clearly one or the other
                assert gaps_s.min() >= 0.04, gaps_s  # audible silences between repetitions
                assert all(words(c) & SPACING_WORDS[spacing] for c in clip.captions), (gaps_s, clip.captions)
            checked += 1
    assert checked >= 80


def test_chirp_direction_matches_instantaneous_frequency(clips):
    chirps = single_event_clips(clips, "chirp")
    assert len(chirps) >= 10
    for clip in chirps:
        start, end = active_runs(clip.audio)[0]
        seg = clip.audio[start * 160 : end * 160]
        third = len(seg) // 3
        rising = dominant_hz(seg[-third:]) > dominant_hz(seg[:third])
        expected = QUALITY_WORDS[("chirp", "up" if rising else "down")]
        assert all(words(c) & expected for c in clip.captions), clip.captions


def test_noise_colour_matches_spectral_slope(clips):
    noises = single_event_clips(clips, "noise")
    assert len(noises) >= 10
    for clip in noises:
        # Welch spectrum of the audible part (the bursts), fitted in dB per octave over 100-2000 Hz.
        x = np.concatenate([clip.audio[a * 160 : b * 160] for a, b in active_runs(clip.audio)]).astype(
            np.float64
        )
        n = 512
        frames = x[np.arange(0, len(x) - n + 1, n // 2)[:, None] + np.arange(n)] * np.hanning(n)
        psd = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(axis=0)
        f = np.fft.rfftfreq(n, 1 / SR)
        band = (f >= 100) & (f <= 2000)
        slope_db_per_octave = np.polyfit(np.log2(f[band]), 10 * np.log10(psd[band]), 1)[0]
        colour = "white" if slope_db_per_octave > -1.5 else "pink" if slope_db_per_octave > -4.5 else "brown"
        assert all(words(c) & {colour} for c in clip.captions), (slope_db_per_octave, clip.captions)


def test_click_speed_matches_click_rate(clips):
    trains = single_event_clips(clips, "clicks")
    assert len(trains) >= 10
    for clip in trains:
        peaks = frame_rms(clip.audio, 0.002)
        active = peaks > peaks.max() * 0.3
        onsets = np.flatnonzero(np.diff(active.astype(int)) == 1) * 0.002
        rate = (len(onsets) - 1) / (onsets[-1] - onsets[0])
        speed = "fast" if rate > 8 else "slow"
        assert rate > 10 or rate < 6, rate
        assert all(words(c) & QUALITY_WORDS[("clicks", speed)] for c in clip.captions), (rate, clip.captions)


def test_loud_is_clearly_louder_than_quiet(clips):
    levels = {"loud": [], "quiet": []}
    for clip in clips:
        if len(clip.attributes["events"]) == 1:
            heard = "loud" if any(words(c) & {"loud", "loudly"} for c in clip.captions) else "quiet"
            levels[heard].append(short_term_rms_db(clip.audio))
    assert min(len(v) for v in levels.values()) >= 20
    assert min(levels["loud"]) > max(levels["quiet"]) + 10, (min(levels["loud"]), max(levels["quiet"]))


# ---- Questions, answers and labels -----------------------------------------------------------------------


def test_answers_follow_from_the_events(clips):
    """Every answer is recomputed here from the events (written out independently of the generator)."""
    number = {1: "one", 2: "two", 3: "three", 4: "four"}
    nouns = {"beep": "beep", "chord": "chord", "chirp": "chirp", "noise": "noise burst"}
    nouns["clicks"] = "click train"
    seen_types = set()
    for clip in clips:
        events = clip.attributes["events"]
        kinds = [e["kind"] for e in events]
        assert clip.labels == list(dict.fromkeys(kinds))
        assert len(clip.questions) == len(clip.answers) == len(clip.question_types)
        assert len(set(clip.question_types)) == len(clip.question_types)  # one question per type
        for qtype, question, answer in zip(clip.question_types, clip.questions, clip.answers, strict=True):
            seen_types.add(qtype)
            assert question.endswith("?") and len(answer.split()) == 1
            if qtype == "count_events":
                assert answer == number[len(events)]
            elif qtype in ("repeat_count", "loudness"):
                # The question names its event by kind (when unique) or by position.
                spaced = question.replace("?", " ?").replace(",", " ,") + " "
                named = [k for k, e in enumerate(events) if f"the {nouns[e['kind']]} " in spaced]
                if "first sound" in question:
                    named = [0]
                elif "second sound" in question:
                    named = [1]
                assert len(named) == 1, question
                event = events[named[0]]
                assert answer == (number[event["count"]] if qtype == "repeat_count" else event["loudness"])
            elif qtype == "pitch_direction":
                (chirp,) = [e for e in events if e["kind"] == "chirp"]
                assert answer == {"up": "rising", "down": "falling"}[chirp["direction"]]
            elif qtype == "first_kind":
                assert answer == kinds[0]
            elif qtype == "presence":
                (kind,) = [k for k, n in nouns.items() if f" {n} " in question.replace("?", " ")]
                assert answer == ("yes" if kind in kinds else "no")
            elif qtype == "beep_pitch":
                (beep,) = [e for e in events if e["kind"] == "beep"]
                assert answer == beep["pitch"]
            else:
                raise AssertionError(f"unknown question type {qtype}")
        if kinds.count("chirp") == 1:
            assert "pitch_direction" in clip.question_types
    assert seen_types == set(syn.QUESTION_TEMPLATES)


def test_questions_vary_in_phrasing_and_answers_in_value(clips):
    by_type: dict[str, tuple[set, set]] = {}
    for clip in clips:
        for qtype, question, answer in zip(clip.question_types, clip.questions, clip.answers, strict=True):
            phrasings, answers = by_type.setdefault(qtype, (set(), set()))
            phrasings.add(re.sub(r"the (\w+ )?(\w+) (repeat|played|loud|quiet|in|\?)", "X", question))
            answers.add(answer)
    for qtype, (phrasings, answers) in by_type.items():
        assert len(phrasings) >= 3, (qtype, phrasings)
        assert answers == set(syn.ANSWER_WORDS[qtype]), qtype
    words = set(syn.TOKENIZER_VOCABULARY)
    for clip in clips[:50]:
        for text in [*clip.questions, *clip.answers]:
            assert set(re.sub(r"[,?]", " ", text).split()) <= words, text


def test_pcm16_round_trip():
    x = np.array([-1.0, -0.5, 0.0, 0.25, 1.0], np.float32)
    pcm = syn.to_pcm16(x)
    assert pcm.dtype == np.int16 and pcm[0] == -32767 and pcm[-1] == 32767
    np.testing.assert_allclose(audio_io.from_pcm16(pcm), x, atol=1.5 / 32767)  # as the pipeline reads it


# ---- TFDS builder -----------------------------------------------------------------------------------------


def test_tfds_build_and_read_back(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    from slit.data import synthetic_builder as sb

    builder = sb.prepare(str(tmp_path), "tiny")
    assert "generated" in capsys.readouterr().out
    assert builder.info.metadata["sample_rate"] == SR
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").rglob("*.*"))
    data_path = tmp_path / "slit_synthetic_sounds" / "tiny" / "1.1.0"
    for split in sb.SPLITS:
        assert list(data_path.glob(f"slit_synthetic_sounds-{split}.array_record-*")), split
    assert not list(data_path.glob("*.tfrecord*"))

    sb.prepare(str(tmp_path), "tiny")  # second call reuses the files
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "found" in out[0]

    expected_sizes = {"train": 64, "validation": 16, "test": 16}
    first_audio = {}
    for split, size in expected_sizes.items():
        src = sb.data_source(str(tmp_path), "tiny", split)
        assert len(src) == size
        by_name = tfds.data_source("slit_synthetic_sounds/tiny", data_dir=str(tmp_path), split=split)
        assert len(by_name) == size and by_name[0]["id"] == src[0]["id"]
        n_check = size if split != "train" else 8
        for i, (clip_id, clip) in enumerate(syn.generate_split(sb.SPLIT_SEEDS[split], n_check, split)):
            ex = src[i]
            assert ex["id"].decode() == clip_id == f"{split}-{i:06d}"
            assert ex["audio"].dtype == np.int16 and ex["num_samples"] == len(clip.audio)
            np.testing.assert_array_equal(ex["audio"], syn.to_pcm16(clip.audio))
            assert [c.decode() for c in ex["captions"]] == clip.captions
            assert json.loads(ex["attributes"]) == clip.attributes
            for key in ("questions", "answers", "question_types", "labels"):
                assert [t.decode() for t in ex[key]] == getattr(clip, key), key
        first_audio[split] = src[0]["audio"]
    assert not np.array_equal(first_audio["train"][:8000], first_audio["validation"][:8000])
    assert not np.array_equal(first_audio["validation"][:8000], first_audio["test"][:8000])
