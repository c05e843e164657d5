"""Procedurally generated sound clips with captions: slit's built-in, download-free dataset.

Every clip holds one or two *events*, one after the other. An event is one sound repeated 1 to 4 times with
fast or slow spacing (click trains are a single train). Five kinds of sound exist:

- ``beep``: a sine tone; pitch ``low`` (200-350 Hz), ``medium`` (500-900 Hz) or ``high`` (1500-3000 Hz).
- ``chord``: three simultaneous tones (a major or minor triad); register ``low`` (root 110-200 Hz) or
  ``high`` (root 700-1200 Hz).
- ``chirp``: a logarithmic sweep between ~250-450 Hz and ~1800-3500 Hz; direction ``up`` or ``down``.
- ``noise``: a burst of ``white``, ``pink`` (1/f power) or ``brown`` (1/f^2 power) noise.
- ``clicks``: a train of short clicks, ``slow`` (3-5 per second) or ``fast`` (12-20 per second).

Each event is ``quiet`` or ``loud``. Its level is set on a short-term scale: the loudest 50 ms window's RMS
plus 3 dB (the peak of a sine of that RMS) is drawn from -32..-28 dBFS (quiet) or -8..-4 dBFS (loud), with the
true peak capped at -1 dBFS (this caps only loud noise bursts and clicks). Loud and quiet events therefore
differ by at least ~12 dB of short-term RMS whatever their kind. Tones get 8-10 ms raised-cosine fades; a
faint white background noise (-70..-60 dBFS RMS) is always present. Clips last 0.5 s to 10 s, with random
leading and trailing silence.

Captions describe only what is audible and unambiguous (kind, pitch / register / direction / colour / click
speed, count, spacing, loudness, order), never exact frequencies or times. They are lowercase words with
optional commas, at most ``MAX_CAPTION_WORDS`` words, drawn from ``CAPTION_VOCABULARY``. The structured
description is in ``SyntheticClip.attributes`` (JSON-serialisable).

Questions and answers (``SyntheticClip.questions`` / ``answers`` / ``question_types``) are derived from the
same generating parameters, one question per applicable type, each in one of several phrasings
(``QUESTION_TEMPLATES``): how many sounds there are, how many times a sound repeats, whether the pitch is
rising or falling (clips with one chirp), whether a sound is loud or quiet, what kind of sound comes first,
whether a given kind of sound is present, and a beep's pitch. Answers are single words. Class labels
(``SyntheticClip.labels``) are the kinds of sound present, in order of appearance.

Pure NumPy; no TensorFlow Datasets import (see ``slit.data.synthetic_builder`` for the TFDS builder).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
"""Sample rate of generated clips, in Hz."""

MIN_DURATION_S = 0.5
MAX_DURATION_S = 10.0
NUM_CAPTIONS = 5
MAX_CAPTION_WORDS = 20

KINDS: tuple[str, ...] = ("beep", "chord", "chirp", "noise", "clicks")
QUALITIES: dict[str, tuple[str, ...]] = {
    "beep": ("low", "medium", "high"),
    "chord": ("low", "high"),
    "chirp": ("up", "down"),
    "noise": ("white", "pink", "brown"),
    "clicks": ("slow", "fast"),
}
"""The distinguishing quality of each kind of sound (its values)."""
QUALITY_KEY: dict[str, str] = {
    "beep": "pitch",
    "chord": "register",
    "chirp": "direction",
    "noise": "colour",
    "clicks": "speed",
}
"""The attribute name under which each kind stores its quality."""
LOUDNESS_LEVELS: tuple[str, ...] = ("quiet", "loud")
SPACINGS: tuple[str, ...] = ("fast", "slow")

# Sound parameters (ranges are drawn uniformly; frequencies log-uniformly).
_LEVEL_DBFS = {"quiet": (-32.0, -28.0), "loud": (-8.0, -4.0)}  # short-term RMS + 3 dB
_PEAK_CAP_DBFS = -1.0
_LEVEL_WINDOW_S = 0.05
_BEEP_HZ = {"low": (200.0, 350.0), "medium": (500.0, 900.0), "high": (1500.0, 3000.0)}
_CHORD_ROOT_HZ = {"low": (110.0, 200.0), "high": (700.0, 1200.0)}
_CHIRP_LOW_HZ = (250.0, 450.0)
_CHIRP_HIGH_HZ = (1800.0, 3500.0)
_CLICK_RATE_HZ = {"slow": (3.0, 5.0), "fast": (12.0, 20.0)}
_CLICK_HZ = (2000.0, 3000.0)
_CLICK_DECAY_S = 0.002
_CLICK_LENGTH_S = 0.012
_UNIT_DURATION_S = {
    "beep": (0.1, 0.35),
    "chord": (0.25, 0.6),
    "chirp": (0.25, 0.6),
    "noise": (0.15, 0.5),
    "clicks": (1.0, 1.8),  # the whole train
}
_FADE_S = {"beep": 0.008, "chord": 0.01, "chirp": 0.008, "noise": 0.01, "clicks": 0.0}
_GAP_S = {"fast": (0.06, 0.15), "slow": (0.4, 0.7)}  # silence between repetitions
_BETWEEN_EVENTS_S = (0.4, 0.8)
_EDGE_SILENCE_S = (0.05, 0.4)
_BACKGROUND_RMS_DBFS = (-70.0, -60.0)
_NOISE_FLOOR_HZ = 30.0  # pink/brown spectra are flat below this


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticClip:
    """One generated clip.

    Attributes:
      audio: float32 mono waveform, shape ``(num_samples,)``, values in [-1, 1], at ``SAMPLE_RATE`` Hz
        (or the ``sample_rate`` it was generated at), 0.5 s to 10 s long.
      captions: ``NUM_CAPTIONS`` distinct lowercase captions, each fully determined by the audio.
      questions, answers, question_types: parallel lists, one question per applicable type (see
        ``QUESTION_TEMPLATES``); answers are single lowercase words.
      labels: the kinds of sound present (``KINDS`` values), in order of appearance, without repeats.
      attributes: JSON-serialisable structured description: ``sample_rate``, ``duration_s``,
        ``num_samples``, ``background_rms_dbfs`` and ``events``, a list (in time order) of dicts with
        ``kind``, ``quality`` and the kind's own quality key (``pitch`` / ``register`` / ``direction`` /
        ``colour`` / ``speed``), ``loudness`` ("quiet" / "loud"), ``level_dbfs`` (short-term RMS + 3 dB),
        ``peak_dbfs``, ``count`` (repetitions), ``spacing`` ("fast" / "slow", None when count is 1),
        ``unit_duration_s``, ``start_s`` / ``end_s`` and ``segments_s`` (``[start, end]`` of every
        repetition, seconds from the clip start), plus kind-specific values (``frequency_hz``,
        ``frequencies_hz``, ``start_hz`` / ``end_hz``, ``rate_hz`` / ``num_clicks``).
    """

    audio: np.ndarray
    captions: list[str]
    attributes: dict[str, Any]
    questions: list[str] = dataclasses.field(default_factory=list)
    answers: list[str] = dataclasses.field(default_factory=list)
    question_types: list[str] = dataclasses.field(default_factory=list)
    labels: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Signal generation.


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _fade_envelope(n: int, fade_n: int) -> np.ndarray:
    """Raised-cosine fade-in and fade-out envelope, shape ``(n,)``."""
    env = np.ones(n)
    f = min(fade_n, n // 2)
    if f > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(f) + 0.5) / f)
        env[:f] = ramp
        env[n - f :] = ramp[::-1]
    return env


def _tones(freqs_hz: list[float], n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of sines with random phases, shape ``(n,)``."""
    t = np.arange(n) / sr
    phases = rng.uniform(0.0, 2 * np.pi, size=(len(freqs_hz), 1))
    return np.sin(2 * np.pi * np.asarray(freqs_hz)[:, None] * t[None, :] + phases).sum(axis=0)


def _log_chirp(f0_hz: float, f1_hz: float, n: int, sr: int) -> np.ndarray:
    """Exponential sweep from ``f0_hz`` to ``f1_hz`` over ``n`` samples."""
    duration = n / sr
    t = np.arange(n) / sr
    k = np.log(f1_hz / f0_hz)
    return np.sin(2 * np.pi * f0_hz * duration / k * (np.exp(k * t / duration) - 1.0))


def _coloured_noise(colour: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink (power ~ 1/f) or brown (power ~ 1/f^2) Gaussian noise, zero mean, shape ``(n,)``."""
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    exponent = {"pink": 1.0, "brown": 2.0}[colour]
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    gain = np.maximum(freqs, _NOISE_FLOOR_HZ) ** (-exponent / 2)
    gain[0] = 0.0
    return np.fft.irfft(np.fft.rfft(white) * gain, n)


def _click_train(rate_hz: float, click_hz: float, n: int, sr: int) -> tuple[np.ndarray, int]:
    """Decaying-sine clicks at ``rate_hz`` filling ``n`` samples; returns (signal, number of clicks)."""
    click_n = int(round(_CLICK_LENGTH_S * sr))
    tc = np.arange(click_n) / sr
    click = np.sin(2 * np.pi * click_hz * tc) * np.exp(-tc / _CLICK_DECAY_S)
    starts = np.round(np.arange(0.0, n / sr, 1.0 / rate_hz) * sr).astype(np.int64)
    starts = starts[starts + click_n <= n]
    out = np.zeros(n)
    out[starts[:, None] + np.arange(click_n)[None, :]] = click[None, :]
    return out, len(starts)


def _short_term_level_db(x: np.ndarray, sr: int) -> float:
    """Max RMS over sliding ``_LEVEL_WINDOW_S`` windows, in dB, plus 3 dB (a sine's peak-to-RMS ratio)."""
    w = min(len(x), max(1, int(round(_LEVEL_WINDOW_S * sr))))
    energy = np.concatenate([[0.0], np.cumsum(x * x)])
    mean_sq = (energy[w:] - energy[:-w]).max() / w
    return float(10 * np.log10(max(mean_sq, 1e-20)) + 10 * np.log10(2.0))


def _sample_event(rng: np.random.Generator, exclude: tuple[str, str] | None) -> dict[str, Any]:
    """Draws an event's parameters (kind, quality, count, spacing, loudness, sound parameters)."""
    while True:
        kind = KINDS[rng.integers(len(KINDS))]
        quality = QUALITIES[kind][rng.integers(len(QUALITIES[kind]))]
        if (kind, quality) != exclude:
            break
    count = 1 if kind == "clicks" else int(rng.integers(1, 5))
    spacing = SPACINGS[rng.integers(2)] if count > 1 else None
    loudness = LOUDNESS_LEVELS[rng.integers(2)]
    ev: dict[str, Any] = {
        "kind": kind,
        "quality": quality,
        QUALITY_KEY[kind]: quality,
        "loudness": loudness,
        "count": count,
        "spacing": spacing,
        "unit_duration_s": float(rng.uniform(*_UNIT_DURATION_S[kind])),
        "gap_s": float(rng.uniform(*_GAP_S[spacing])) if spacing else 0.0,
        "level_dbfs": float(rng.uniform(*_LEVEL_DBFS[loudness])),
    }
    if kind == "beep":
        ev["frequency_hz"] = _log_uniform(rng, *_BEEP_HZ[quality])
    elif kind == "chord":
        root = _log_uniform(rng, *_CHORD_ROOT_HZ[quality])
        third = 4 if rng.random() < 0.5 else 3  # major or minor triad
        ev["frequencies_hz"] = [root, root * 2 ** (third / 12), root * 2 ** (7 / 12)]
    elif kind == "chirp":
        low, high = _log_uniform(rng, *_CHIRP_LOW_HZ), _log_uniform(rng, *_CHIRP_HIGH_HZ)
        ev["start_hz"], ev["end_hz"] = (low, high) if quality == "up" else (high, low)
    elif kind == "clicks":
        ev["rate_hz"] = float(rng.uniform(*_CLICK_RATE_HZ[quality]))
        ev["click_hz"] = float(rng.uniform(*_CLICK_HZ))
    return ev


def _render_unit(ev: dict[str, Any], n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One repetition of an event, peak-normalised to 1, shape ``(n,)``."""
    kind = ev["kind"]
    if kind == "beep":
        x = _tones([ev["frequency_hz"]], n, sr, rng)
    elif kind == "chord":
        x = _tones(ev["frequencies_hz"], n, sr, rng)
    elif kind == "chirp":
        x = _log_chirp(ev["start_hz"], ev["end_hz"], n, sr)
    elif kind == "noise":
        x = _coloured_noise(ev["quality"], n, sr, rng)
    else:
        x, ev["num_clicks"] = _click_train(ev["rate_hz"], ev["click_hz"], n, sr)
    x = x * _fade_envelope(n, int(round(_FADE_S[kind] * sr)))
    return x / np.abs(x).max()


def _render_event(ev: dict[str, Any], sr: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """All repetitions of an event at its level; returns (signal, repetition onsets in samples)."""
    unit_n = int(round(ev["unit_duration_s"] * sr))
    gap_n = int(round(ev["gap_s"] * sr))
    onsets = [k * (unit_n + gap_n) for k in range(ev["count"])]
    x = np.zeros(onsets[-1] + unit_n)
    for onset in onsets:
        x[onset : onset + unit_n] = _render_unit(ev, unit_n, sr, rng)
    gain = min(
        10 ** ((ev["level_dbfs"] - _short_term_level_db(x, sr)) / 20),
        10 ** (_PEAK_CAP_DBFS / 20) / np.abs(x).max(),
    )
    x *= gain
    ev["level_dbfs"] = _short_term_level_db(x, sr)
    ev["peak_dbfs"] = float(20 * np.log10(np.abs(x).max()))
    return x, onsets


def _event_length_s(ev: dict[str, Any]) -> float:
    return ev["count"] * ev["unit_duration_s"] + (ev["count"] - 1) * ev["gap_s"]


def _rounded(value: Any) -> Any:  # noqa: ANN401
    """Rounds floats (recursively) to 4 decimals for tidy JSON."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------------
# Captions.

# (singular, plural) noun phrases naming each (kind, quality); click trains have no plural.
_NOUNS: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("beep", "low"): [
        ("low beep", "low beeps"),
        ("low pitched beep", "low pitched beeps"),
        ("low tone", "low tones"),
    ],
    ("beep", "medium"): [
        ("medium beep", "medium beeps"),
        ("medium pitched beep", "medium pitched beeps"),
        ("medium tone", "medium tones"),
    ],
    ("beep", "high"): [
        ("high beep", "high beeps"),
        ("high pitched beep", "high pitched beeps"),
        ("high tone", "high tones"),
    ],
    ("chord", "low"): [
        ("low chord", "low chords"),
        ("deep chord", "deep chords"),
        ("chord in a low register", "chords in a low register"),
    ],
    ("chord", "high"): [
        ("high chord", "high chords"),
        ("high pitched chord", "high pitched chords"),
        ("chord in a high register", "chords in a high register"),
    ],
    ("chirp", "up"): [
        ("rising chirp", "rising chirps"),
        ("upward sweep", "upward sweeps"),
        ("chirp sweeping up", "chirps sweeping up"),
    ],
    ("chirp", "down"): [
        ("falling chirp", "falling chirps"),
        ("downward sweep", "downward sweeps"),
        ("chirp sweeping down", "chirps sweeping down"),
    ],
    **{
        ("noise", c): [
            (f"burst of {c} noise", f"bursts of {c} noise"),
            (f"{c} noise burst", f"{c} noise bursts"),
        ]
        for c in QUALITIES["noise"]
    },
    ("clicks", "slow"): [
        ("slow click train", ""),
        ("slow train of clicks", ""),
        ("series of slow clicks", ""),
    ],
    ("clicks", "fast"): [
        ("fast click train", ""),
        ("fast train of clicks", ""),
        ("series of rapid clicks", ""),
    ],
}
_LOUD_ADJ = {"quiet": ("quiet", "soft"), "loud": ("loud",)}
_LOUD_ADV = {"quiet": ("quietly", "softly"), "loud": ("loudly",)}
_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}
_TIMES = {1: "once", 2: "twice", 3: "three times", 4: "four times"}
# Spacing of repetitions: prepositional phrases ({spp}) and, for {sp}, adverbs as well.
_SPACING_PHRASES = {
    "fast": ("in quick succession", "in rapid succession"),
    "slow": ("with long pauses", "with pauses in between"),
}
_SPACING_ADVERBS = {"fast": ("quickly", "rapidly"), "slow": ("slowly",)}
# Event phrasings: (template, is_noun_phrase). Placeholders: {art} a/an, {adj} loudness adjective, {adv}
# loudness adverb, {one}/{many} singular/plural noun phrase, {num} count word, {times} "twice".."four times",
# {sp} spacing phrase or adverb, {spp} spacing phrase.
_SINGLE_TEMPLATES = (
    ("{art} {adj} {one}", True),
    ("a single {adj} {one}", True),
    ("{art} {one} sounds once {adv}", False),
    ("one {adj} {one}", True),
    ("{art} {adj} {one} plays once", False),
)
_REPEAT_TEMPLATES = (
    ("{art} {adj} {one} repeats {times} {sp}", False),
    ("{num} {adj} {many} {spp}", True),
    ("{art} {one} sounds {adv} {times} {sp}", False),
    ("{art} {adj} {one} repeated {times} {sp}", True),
    ("{num} {many} played {adv} {spp}", True),
)
# Two-event captions: (template, needs both parts to be noun phrases).
_JOINERS = (
    ("{a}, then {b}", False),
    ("{a} followed by {b}", True),
    ("first {a}, then {b}", False),
    ("{a} and then {b}", False),
)


def _with_articles(text: str) -> str:
    """Resolves ``{art}`` to "a" or "an" from the following word."""
    return re.sub(r"\{art\} (\w)", lambda m: ("an " if m.group(1) in "aeiou" else "a ") + m.group(1), text)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.integers(len(options))]


def _describe_event(ev: dict[str, Any], rng: np.random.Generator, template: int) -> tuple[str, bool]:
    """One phrasing of an event: (text, is_noun_phrase). ``template`` is taken modulo the template count;
    word choices within the template are random."""
    nouns = _NOUNS[(ev["kind"], ev["quality"])]
    one, many = nouns[rng.integers(len(nouns))]
    fill = {
        "adj": _pick(rng, _LOUD_ADJ[ev["loudness"]]),
        "adv": _pick(rng, _LOUD_ADV[ev["loudness"]]),
        "one": one,
        "many": many,
        "num": _NUMBER[ev["count"]],
        "times": _TIMES[ev["count"]],
    }
    if ev["count"] == 1:
        text, is_np = _SINGLE_TEMPLATES[template % len(_SINGLE_TEMPLATES)]
    else:
        text, is_np = _REPEAT_TEMPLATES[template % len(_REPEAT_TEMPLATES)]
        fill["spp"] = _pick(rng, _SPACING_PHRASES[ev["spacing"]])
        fill["sp"] = _pick(rng, _SPACING_PHRASES[ev["spacing"]] + _SPACING_ADVERBS[ev["spacing"]])
    for key, value in fill.items():
        text = text.replace("{" + key + "}", value)
    return _with_articles(text), is_np


def _make_captions(events: list[dict[str, Any]], rng: np.random.Generator) -> list[str]:
    """``NUM_CAPTIONS`` distinct captions of the clip, each at most ``MAX_CAPTION_WORDS`` words."""
    captions: list[str] = []
    for attempt in range(200):
        # The first attempts walk through the templates; later ones pick at random, and the last ones fall
        # back on the most compact phrasing.
        template = attempt if attempt < NUM_CAPTIONS else int(rng.integers(len(_REPEAT_TEMPLATES)))
        if attempt >= 100:
            template = 1
        parts = [_describe_event(ev, rng, template + 2 * k) for k, ev in enumerate(events)]
        if len(parts) == 1:
            caption = parts[0][0]
        else:
            all_np = all(is_np for _, is_np in parts)
            joiners = [j for j, needs_np in _JOINERS if all_np or not needs_np]
            caption = _pick(rng, joiners).replace("{a}", parts[0][0]).replace("{b}", parts[1][0])
        if len(caption.split()) <= MAX_CAPTION_WORDS and caption not in captions:
            captions.append(caption)
            if len(captions) == NUM_CAPTIONS:
                break
    return captions


def _build_vocabulary() -> list[str]:
    texts = [
        *(p for phrases in _NOUNS.values() for pair in phrases for p in pair),
        *(
            w
            for d in (_LOUD_ADJ, _LOUD_ADV, _SPACING_PHRASES, _SPACING_ADVERBS)
            for o in d.values()
            for w in o
        ),
        *_NUMBER.values(),
        *_TIMES.values(),
        *(t for t, _ in (*_SINGLE_TEMPLATES, *_REPEAT_TEMPLATES, *_JOINERS)),
        "a an",
    ]
    words = {w for text in texts for w in re.sub(r"\{\w+\}|,", " ", text).split()}
    return sorted(words)


CAPTION_VOCABULARY: list[str] = _build_vocabulary()
"""Every word any caption can contain (sorted; commas are the only other token captions use)."""


def caption_words(caption: str) -> list[str]:
    """Splits a caption into words, dropping commas."""
    return caption.replace(",", " ").split()


# ---------------------------------------------------------------------------------------------------------
# Questions, answers and labels.

# Names of each kind in questions ("the {noun}").
_KIND_NOUN = {
    "beep": "beep",
    "chord": "chord",
    "chirp": "chirp",
    "noise": "noise burst",
    "clicks": "click train",
}
_ORDINAL = ("first", "second")
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "count_events": (
        "how many sounds are there?",
        "how many different sounds does the clip contain?",
        "how many events can you hear?",
    ),
    "repeat_count": (
        "how many times does the {subject} repeat?",
        "how many times is the {subject} played?",
        "how often do you hear the {subject}?",
    ),
    "pitch_direction": (
        "is the pitch rising or falling?",
        "does the chirp go up or down in pitch, rising or falling?",
        "is the sweep rising or falling?",
    ),
    "loudness": (
        "is the {subject} loud or quiet?",
        "how loud is the {subject}, loud or quiet?",
        "is the {subject} quiet or loud?",
    ),
    "first_kind": (
        "what kind of sound is heard first?",
        "what is the first sound?",
        "which sound comes first?",
    ),
    "presence": (
        "is there a {noun} in the clip?",
        "does the clip contain a {noun}?",
        "can you hear a {noun}?",
    ),
    "beep_pitch": (
        "is the beep low, medium or high?",
        "what is the pitch of the beep, low, medium or high?",
        "how high is the beep, low, medium or high?",
    ),
}
"""Phrasings of each question type; ``{subject}`` names an event ("beep", "second sound"), ``{noun}``
a kind."""
ANSWER_WORDS: dict[str, tuple[str, ...]] = {
    "count_events": ("one", "two"),
    "repeat_count": ("one", "two", "three", "four"),
    "pitch_direction": ("rising", "falling"),
    "loudness": LOUDNESS_LEVELS,
    "first_kind": KINDS,
    "presence": ("yes", "no"),
    "beep_pitch": QUALITIES["beep"],
}
"""Every answer each question type can have."""


def _subject(events: list[dict[str, Any]], k: int) -> str:
    """How a question names event ``k``: by its kind when that is unambiguous, else by its position."""
    kinds = [ev["kind"] for ev in events]
    if kinds.count(kinds[k]) == 1:
        return _KIND_NOUN[kinds[k]]
    return f"{_ORDINAL[k]} sound"


def make_questions(events: list[dict[str, Any]], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(question type, question, answer) for every question type that applies to the clip's events."""
    out: list[tuple[str, str, str]] = []

    def ask(kind: str, answer: str, **fill: str) -> None:
        out.append((kind, _pick(rng, QUESTION_TEMPLATES[kind]).format(**fill), answer))

    ask("count_events", _NUMBER[len(events)])
    k = int(rng.integers(len(events)))
    ask("repeat_count", _NUMBER[events[k]["count"]], subject=_subject(events, k))
    chirps = [ev for ev in events if ev["kind"] == "chirp"]
    if len(chirps) == 1:
        ask("pitch_direction", "rising" if chirps[0]["quality"] == "up" else "falling")
    k = int(rng.integers(len(events)))
    ask("loudness", events[k]["loudness"], subject=_subject(events, k))
    ask("first_kind", events[0]["kind"])
    kind = KINDS[rng.integers(len(KINDS))]
    ask("presence", "yes" if any(ev["kind"] == kind for ev in events) else "no", noun=_KIND_NOUN[kind])
    beeps = [ev for ev in events if ev["kind"] == "beep"]
    if len(beeps) == 1:
        ask("beep_pitch", beeps[0]["quality"])
    return out


def class_labels(events: list[dict[str, Any]]) -> list[str]:
    """The kinds of sound present, in order of appearance, without repeats."""
    return list(dict.fromkeys(ev["kind"] for ev in events))


def _build_instruction_vocabulary() -> list[str]:
    from slit.data.tasks import DEFAULT_TEMPLATES  # the stage-two instructions the synthetic runs use

    templates = (*QUESTION_TEMPLATES.values(), *DEFAULT_TEMPLATES.values())
    texts = [t for group in templates for t in group]
    texts += [*_KIND_NOUN.values(), *_ORDINAL, "sound", *(w for ws in ANSWER_WORDS.values() for w in ws)]
    words = {w for text in texts for w in re.sub(r"\{\w+\}|[,?.:]", " ", text).split()}
    return sorted(words)


INSTRUCTION_VOCABULARY: list[str] = _build_instruction_vocabulary()
"""Every word a question, an answer or a task instruction can contain (sorted)."""
TOKENIZER_VOCABULARY: list[str] = sorted(set(CAPTION_VOCABULARY) | set(INSTRUCTION_VOCABULARY))
"""Caption and question words together: a word-level Q-Former tokenizer over it reads both."""


# ---------------------------------------------------------------------------------------------------------
# Public API.


def generate_clip(rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> SyntheticClip:
    """Generates one random clip.

    Args:
      rng: source of all randomness (the clip is a deterministic function of its state).
      sample_rate: in Hz; frequencies stay below 3.5 kHz, so 8 kHz and up is safe.

    Returns:
      A ``SyntheticClip`` with float32 audio of shape ``(num_samples,)``, 0.5 s to 10 s long.
    """
    sr = sample_rate
    while True:  # rejection sampling on the total duration
        events = [_sample_event(rng, None)]
        if rng.random() < 0.5:
            events.append(_sample_event(rng, (events[0]["kind"], events[0]["quality"])))
        lead, trail = rng.uniform(*_EDGE_SILENCE_S, size=2)
        between = float(rng.uniform(*_BETWEEN_EVENTS_S))
        content = sum(_event_length_s(ev) for ev in events) + between * (len(events) - 1)
        if lead + content + trail <= MAX_DURATION_S - 0.05:
            break

    signals = [_render_event(ev, sr, rng) for ev in events]
    lead_n = int(round(lead * sr))
    between_n = int(round(between * sr))
    content_n = sum(len(x) for x, _ in signals) + between_n * (len(events) - 1)
    total_n = lead_n + content_n + int(round(trail * sr))
    total_n = min(max(total_n, int(np.ceil(MIN_DURATION_S * sr))), int(MAX_DURATION_S * sr))

    background_db = float(rng.uniform(*_BACKGROUND_RMS_DBFS))
    audio = rng.standard_normal(total_n, dtype=np.float32) * np.float32(10 ** (background_db / 20))
    cursor = lead_n
    for ev, (x, onsets) in zip(events, signals, strict=True):
        audio[cursor : cursor + len(x)] += x
        unit_n = int(round(ev["unit_duration_s"] * sr))
        ev["segments_s"] = [[(cursor + o) / sr, (cursor + o + unit_n) / sr] for o in onsets]
        ev["start_s"], ev["end_s"] = cursor / sr, (cursor + len(x)) / sr
        ev["unit_duration_s"] = unit_n / sr
        ev.pop("gap_s")
        cursor += len(x) + between_n
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)

    attributes = _rounded(
        {
            "sample_rate": sr,
            "num_samples": total_n,
            "duration_s": total_n / sr,
            "background_rms_dbfs": background_db,
            "events": events,
        }
    )
    captions = _make_captions(events, rng)
    qa = make_questions(events, rng)  # drawn after the captions: audio and captions do not depend on it
    return SyntheticClip(
        audio=audio,
        captions=captions,
        attributes=attributes,
        questions=[q for _, q, _ in qa],
        answers=[a for _, _, a in qa],
        question_types=[t for t, _, _ in qa],
        labels=class_labels(events),
    )


def generate_split(seed: int, num_clips: int, prefix: str = "clip") -> Iterator[tuple[str, SyntheticClip]]:
    """Yields ``(id, clip)`` for ``num_clips`` clips, deterministically from ``seed``.

    Clip ``i`` depends only on ``(seed, i)`` (its generator is seeded with ``[seed, i]``), so a prefix of a
    split is the same whatever ``num_clips`` is. Ids are ``f"{prefix}-{i:06d}"``, e.g. ``"test-000042"``.
    """
    for i in range(num_clips):
        yield f"{prefix}-{i:06d}", generate_clip(np.random.default_rng([seed, i]))


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Quantises float audio in [-1, 1] to int16 PCM (``round(x * 32767)``), same shape.

    This is how the built-in dataset (version 1.1.0) was written, and stays so that it keeps its bytes;
    every dataset is read back by ``slit.data.audio_io.from_pcm16`` (``/ 32768``), so a synthetic clip reads
    0.003% quieter than it was generated (no caption depends on that)."""
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
