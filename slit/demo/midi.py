"""Real sampled-instrument clips with exact captions and answers: short General MIDI phrases.

Each clip plays one `Phrase`: an instrument (`INSTRUMENTS`) playing 1 to 6 notes one after another, or
one chord, or a drum kit playing 1 to 6 hits. The phrase is written as a MIDI file with `mido` and
rendered offline by the `fluidsynth` program (Debian package `fluidsynth`) through the General MIDI
soundfont of Debian `fluid-soundfont-gm` (/usr/share/sounds/sf2/FluidR3_GM.sf2). Everything the captions,
questions and answers say is derived from the phrase alone, so they are exact:

- Separate notes are one beat apart and last 0.9 beat. A line of two or more notes goes strictly up,
  strictly down or stays on one repeated pitch (steps of 2 to 4 semitones), so its direction is never
  ambiguous. `tempo` is "slow" (72 beats per minute, 0.83 s a beat) or "fast" (180 beats per minute,
  0.33 s a beat).
- A chord is a major or minor triad, sometimes with the root's octave on top (3 or 4 notes), struck once
  and held two beats; chords are played on the piano, guitar and organ only.
- Drums play on the General MIDI percussion channel (10; 9 counted from 0) with the standard kit: bass
  drum, snare and toms, one beat apart.
- Tempo is described only where there is something to be fast or slow: two or more notes or hits. A
  single note, hit or chord is never called fast or slow (its tempo only sets how long it lasts).

Captions are plain lowercase words with optional commas, numbers spelled out ("three", never "3"). Each
clip has `NUM_CAPTIONS` captions and one question per type that applies (`QUESTION_TYPES`), in one of
several phrasings, with a one or two word answer from `ANSWERS`:

| type         | asked of                              | answer                                  |
|--------------|---------------------------------------|-----------------------------------------|
| `instrument` | every clip                            | the instrument's name ("drums" for drums) |
| `count`      | separate notes and drum hits          | "one" to "six"                          |
| `direction`  | two or more separate notes (no drums) | "up", "down" or "same"                  |
| `tempo`      | two or more notes or hits             | "fast" or "slow"                        |
| `chord`      | chords and two or more separate notes | "chord" or "separate notes"             |

Rendered clips are 16 kHz mono PCM16: the phrase starts after 0.1 s, the render is cut `TAIL_S` after the
last note ends (with a short fade-out, so reverb never runs long), at least `MIN_SECONDS` long (the
longest, six slow notes, lasts about 5.5 s), and scaled to a peak of -3 dBFS.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

import mido
import numpy as np
import soundfile as sf

from slit.errors import UserError

SOUNDFONT = pathlib.Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
"""The General MIDI soundfont of Debian `fluid-soundfont-gm`."""
APT_PACKAGES = ("fluidsynth", "fluid-soundfont-gm")
APT_COMMAND = "sudo apt-get install " + " ".join(APT_PACKAGES)

SAMPLE_RATE = 16000
"""Sample rate of the rendered clips, in Hz."""
LEAD_S = 0.1
"""Silence before the first note, in seconds."""
TAIL_S = 0.5
"""Seconds kept after the last note ends (the instrument's release and the reverb)."""
FADE_S = 0.05
"""Raised-cosine fade-out at the end of the kept tail, in seconds."""
MIN_SECONDS = 1.0
"""The shortest clip (a single fast note is padded with its own tail to this length)."""
PEAK_DBFS = -3.0
"""Every rendered clip is scaled to this peak level."""
RENDER_VERSION = 1
"""Bumped whenever rendering changes; it is written into each MIDI file, so old renders are not reused."""

NUM_CAPTIONS = 5
MAX_NOTES = 6
SOURCE = "instruments"
"""The `source` of every manifest line, and the folder (under the output directory) of the clips."""
DEFAULT_SPLITS: dict[str, float] = {"train": 0.8, "validation": 0.1, "test": 0.1}

INSTRUMENTS: dict[str, int] = {
    "piano": 0,  # acoustic grand piano
    "xylophone": 13,
    "organ": 19,  # church organ
    "guitar": 25,  # acoustic guitar (steel strings)
    "violin": 40,
    "cello": 42,
    "trumpet": 56,
    "flute": 73,
    "drums": 0,  # the standard drum kit, on the percussion channel
}
"""Instrument name -> General MIDI program number (0-based)."""
DRUMS = "drums"
DRUM_CHANNEL = 9
"""The General MIDI percussion channel ("channel 10"), counted from 0."""
MELODY_CHANNEL = 0

PITCH_RANGES: dict[str, tuple[int, int]] = {
    "piano": (48, 84),
    "xylophone": (65, 96),
    "organ": (43, 79),
    "guitar": (40, 76),
    "violin": (55, 88),
    "cello": (36, 67),
    "trumpet": (55, 79),
    "flute": (60, 91),
}
"""MIDI note range (inclusive) each instrument's notes are drawn from: a comfortable register."""
DRUM_KEYS: dict[int, str] = {
    36: "bass drum",
    38: "snare drum",
    41: "low floor tom",
    45: "low tom",
    48: "high mid tom",
    50: "high tom",
}
"""General MIDI percussion keys the drum hits are drawn from."""
CHORD_INSTRUMENTS: tuple[str, ...] = ("piano", "guitar", "organ")
CHORD_PROBABILITY = 0.35
"""How often a phrase on a `CHORD_INSTRUMENTS` instrument is a chord."""

TEMPO_BPM: dict[str, float] = {"slow": 72.0, "fast": 180.0}
"""Beats per minute of each tempo; a separate note or hit starts every beat."""
NOTE_BEATS = 0.9
"""How long a separate note is held, in beats (drum hits are struck, not held)."""
CHORD_BEATS = 2.0
"""How long a chord is held, in beats."""
DRUM_BEATS = 0.25
TICKS_PER_BEAT = 480

DIRECTIONS: tuple[str, ...] = ("up", "down", "same")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_TYPES: tuple[str, ...] = ("instrument", "count", "direction", "tempo", "chord")
ANSWERS: dict[str, tuple[str, ...]] = {
    "instrument": tuple(INSTRUMENTS),
    "count": NUMBER_WORDS[1 : MAX_NOTES + 1],
    "direction": DIRECTIONS,
    "tempo": tuple(TEMPO_BPM),
    "chord": ("chord", "separate notes"),
}
"""Every answer a question of each type can have."""


@dataclasses.dataclass(frozen=True)
class Phrase:
    """What one clip plays: everything its captions and answers are derived from.

    `pitches` are MIDI note numbers: the separate notes in the order played, the chord's notes from low to
    high (struck together, once), or General MIDI percussion keys (`DRUM_KEYS`) for drums. `velocities`
    (1..127, one per pitch) only set how hard each note is struck. `tempo` is "slow" or "fast"
    (`TEMPO_BPM`).
    """

    instrument: str
    pitches: tuple[int, ...]
    chord: bool
    tempo: str
    velocities: tuple[int, ...]

    def __post_init__(self) -> None:
        problems = []
        if self.instrument not in INSTRUMENTS:
            problems.append(f"unknown instrument {self.instrument!r} (use one of {', '.join(INSTRUMENTS)})")
        if self.tempo not in TEMPO_BPM:
            problems.append(f"tempo {self.tempo!r} is not one of {', '.join(TEMPO_BPM)}")
        if not 1 <= len(self.pitches) <= MAX_NOTES:
            problems.append(f"{len(self.pitches)} pitches: use 1 to {MAX_NOTES}")
        if len(self.velocities) != len(self.pitches):
            problems.append("need one velocity per pitch")
        if any(not 0 <= p <= 127 for p in self.pitches) or any(not 1 <= v <= 127 for v in self.velocities):
            problems.append("pitches must be in 0..127 and velocities in 1..127")
        if self.chord and (self.instrument == DRUMS or len(self.pitches) < 2):
            problems.append("a chord needs two or more pitches on a melodic instrument")
        if self.chord and len(set(self.pitches)) != len(self.pitches):
            problems.append("a chord's pitches must differ")
        if not self.chord and not self.drums and len(self.pitches) > 1 and self.direction is None:
            problems.append("separate notes must go strictly up, strictly down or repeat one pitch")
        if problems:
            raise ValueError(f"bad phrase {self}: " + "; ".join(problems))

    @property
    def drums(self) -> bool:
        return self.instrument == DRUMS

    @property
    def count(self) -> int:
        """How many separate notes or hits are played (a chord counts as 1: it is struck once)."""
        return 1 if self.chord else len(self.pitches)

    @property
    def direction(self) -> str | None:
        """The way two or more separate notes go: "up", "down" or "same"; None otherwise (or if mixed)."""
        if self.chord or self.drums or len(self.pitches) < 2:
            return None
        steps = np.diff(self.pitches)
        if (steps > 0).all():
            return "up"
        if (steps < 0).all():
            return "down"
        if (steps == 0).all():
            return "same"
        return None

    @property
    def beat_seconds(self) -> float:
        return 60.0 / TEMPO_BPM[self.tempo]

    @property
    def seconds(self) -> float:
        """When the last note ends, in seconds from the start of the clip (the lead-in included)."""
        if self.chord:
            return LEAD_S + CHORD_BEATS * self.beat_seconds
        held = DRUM_BEATS if self.drums else NOTE_BEATS
        return LEAD_S + (len(self.pitches) - 1 + held) * self.beat_seconds


def _balanced_instrument(seed: int, index: int) -> str:
    """The instrument of clip `index`: every run of len(INSTRUMENTS) clips holds each instrument once."""
    names = list(INSTRUMENTS)
    block, place = divmod(index, len(names))
    order = np.random.default_rng([seed, 1, block]).permutation(len(names))
    return names[int(order[place])]


def random_phrase(rng: np.random.Generator, instrument: str | None = None) -> Phrase:
    """A random phrase (on `instrument`, or on one drawn uniformly from `INSTRUMENTS`).

    Separate notes and hits number 1 to 6 (uniformly); lines of two or more notes go up or down (40% each)
    or repeat one pitch (20%), in steps of 2 to 4 semitones within the instrument's `PITCH_RANGES`.
    Velocities are 90..110 (drums 100..120). Tempo is slow or fast with equal chance.
    """
    names = list(INSTRUMENTS)
    instrument = instrument or names[int(rng.integers(len(names)))]
    if instrument not in INSTRUMENTS:
        raise ValueError(f"unknown instrument {instrument!r} (use one of {', '.join(names)})")
    tempo = ("slow", "fast")[int(rng.integers(2))]
    if instrument == DRUMS:
        keys = list(DRUM_KEYS)
        count = int(rng.integers(1, MAX_NOTES + 1))
        pitches = tuple(keys[int(i)] for i in rng.integers(len(keys), size=count))
        velocities = tuple(int(v) for v in rng.integers(100, 121, size=count))
        return Phrase(instrument, pitches, False, tempo, velocities)
    low, high = PITCH_RANGES[instrument]
    if instrument in CHORD_INSTRUMENTS and rng.random() < CHORD_PROBABILITY:
        third = 4 if rng.random() < 0.5 else 3  # major or minor
        shape = (0, third, 7, 12) if rng.random() < 0.5 else (0, third, 7)
        root = int(rng.integers(low, high - shape[-1] + 1))
        pitches = tuple(root + s for s in shape)
        velocities = tuple(int(v) for v in rng.integers(90, 111, size=len(pitches)))
        return Phrase(instrument, pitches, True, tempo, velocities)
    count = int(rng.integers(1, MAX_NOTES + 1))
    direction = DIRECTIONS[int(rng.choice(3, p=[0.4, 0.4, 0.2]))] if count > 1 else "same"
    steps = rng.integers(2, 5, size=count - 1) if direction != "same" else np.zeros(count - 1, int)
    span = int(steps.sum())
    start = int(rng.integers(low, high - span + 1))
    offsets = np.concatenate([[0], np.cumsum(steps)])
    if direction == "down":
        start, offsets = start + span, -offsets
    pitches = tuple(int(start + o) for o in offsets)
    velocities = tuple(int(v) for v in rng.integers(90, 111, size=count))
    return Phrase(instrument, pitches, False, tempo, velocities)


def phrase_midi(phrase: Phrase) -> mido.MidiFile:
    """The phrase as a one-track MIDI file (type 0, `TICKS_PER_BEAT` ticks a beat, one program change).

    The first note starts after `LEAD_S`; the track ends with the last note-off, so the file's `length`
    is `phrase.seconds` (to a tick).
    """
    channel = DRUM_CHANNEL if phrase.drums else MELODY_CHANNEL
    beat_ticks = TICKS_PER_BEAT
    lead = round(LEAD_S / phrase.beat_seconds * beat_ticks)
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("track_name", name=f"slit demo: {phrase.instrument}", time=0))
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(TEMPO_BPM[phrase.tempo]), time=0))
    track.append(mido.Message("program_change", channel=channel, program=INSTRUMENTS[phrase.instrument]))
    events: list[tuple[int, int, mido.Message]] = []  # (tick, order: offs first, message)
    for i, (pitch, velocity) in enumerate(zip(phrase.pitches, phrase.velocities, strict=True)):
        if phrase.chord:
            on, off = lead, lead + round(CHORD_BEATS * beat_ticks)
        else:
            held = DRUM_BEATS if phrase.drums else NOTE_BEATS
            on = lead + i * beat_ticks
            off = on + round(held * beat_ticks)
        events.append((on, 1, mido.Message("note_on", channel=channel, note=pitch, velocity=velocity)))
        events.append((off, 0, mido.Message("note_off", channel=channel, note=pitch, velocity=64)))
    now = 0
    for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(message.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    midi = mido.MidiFile(type=0, ticks_per_beat=beat_ticks)
    midi.tracks.append(track)
    return midi


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_TEMPO_WORDS = {"slow": ("slow", "slowly"), "fast": ("fast", "quickly")}
_DIRECTION_WORDS = {  # (adjective, "going ..." phrase, clause)
    "up": ("rising", "going up", "each higher than the last"),
    "down": ("falling", "going down", "each lower than the last"),
    "same": ("repeated", "on the same pitch", "all on the same pitch"),
}
_LINE_CAPTIONS = (
    "{a_inst} plays {n} {adj} notes {adv}",
    "{n} {tempo} {inst} notes {going}",
    "{n} notes on the {inst}, {clause}, played {adv}",
    "the {inst} plays a {tempo} line of {n} notes {going}",
    "a {tempo} {inst} phrase of {n} {adj} notes",
    "{n} {inst} notes, {clause}, at a {tempo} pace",
)
_NOTE_CAPTIONS = (
    "{a_inst} plays one note",
    "one {inst} note",
    "a single note on the {inst}, just one",
    "one note played on the {inst}",
    "the {inst} plays just one note",
    "just one {inst} note, played on its own",
)
_CHORD_CAPTIONS = (
    "a chord on the {inst}",
    "{a_inst} plays a chord",
    "{a_inst} chord, its notes struck together",
    "the {inst} plays a chord, all its notes at once",
    "a single {inst} chord",
    "several notes struck together as a chord on the {inst}",
)
_DRUM_CAPTIONS = (
    "a {tempo} drum pattern of {n} hits",
    "{n} drum hits played {adv}",
    "the drums are struck {n} times, {adv}",
    "someone hits the drums {n} times at a {tempo} pace",
    "{n} {tempo} drum beats",
    "a drummer plays {n} {tempo} hits",
)
_DRUM_HIT_CAPTIONS = (
    "a single drum hit, just one",
    "one drum hit",
    "a drum is hit one time",
    "one hit on the drums",
    "just one drum beat",
    "a drummer plays one hit",
)
_QUESTIONS = {
    "instrument": (
        "which instrument is playing?",
        "what instrument do you hear?",
        "what instrument is this?",
        "which instrument makes this sound?",
    ),
    "count": ("how many notes are played?", "how many notes do you hear?", "how many notes are there?"),
    "drum_count": (
        "how many drum hits are there?",
        "how many times are the drums hit?",
        "how many hits do you hear?",
    ),
    "direction": (
        "do the notes go up or down?",
        "is the melody rising, falling or staying the same?",
        "do the notes go up, go down or stay on the same pitch?",
    ),
    "tempo": ("is it played fast or slow?", "is the tempo fast or slow?", "is the playing fast or slow?"),
    "chord": (
        "is it a chord or separate notes?",
        "does it play a chord or separate notes?",
        "is this one chord or separate notes?",
    ),
}


def _captions(phrase: Phrase) -> tuple[str, ...]:
    if phrase.drums:
        return _DRUM_CAPTIONS if phrase.count > 1 else _DRUM_HIT_CAPTIONS
    if phrase.chord:
        return _CHORD_CAPTIONS
    return _LINE_CAPTIONS if phrase.count > 1 else _NOTE_CAPTIONS


def describe(phrase: Phrase, rng: np.random.Generator) -> dict:
    """Captions, questions and labels of `phrase`; `rng` only picks among equivalent phrasings.

    Returns {"captions": [NUM_CAPTIONS distinct captions], "qa": [{"question", "answer", "type"}, one per
    applicable type in `QUESTION_TYPES` order], "labels": [instrument name]} (see the module docstring for
    which types apply).
    """
    inst = phrase.instrument
    tempo, adv = _TEMPO_WORDS[phrase.tempo]
    adj, going, clause = _DIRECTION_WORDS[phrase.direction or "same"]
    words = {
        "inst": inst,
        "a_inst": _article(inst),
        "n": NUMBER_WORDS[phrase.count],
        "tempo": tempo,
        "adv": adv,
        "adj": adj,
        "going": going,
        "clause": clause,
    }
    templates = _captions(phrase)
    chosen = rng.permutation(len(templates))[:NUM_CAPTIONS]
    captions = [templates[int(i)].format(**words) for i in chosen]

    answers: list[tuple[str, str]] = [("instrument", inst)]
    if not phrase.chord:
        answers.append(("count", NUMBER_WORDS[phrase.count]))
    if phrase.direction is not None:
        answers.append(("direction", phrase.direction))
    if phrase.count > 1:
        answers.append(("tempo", phrase.tempo))
    if not phrase.drums and (phrase.chord or phrase.count > 1):
        answers.append(("chord", "chord" if phrase.chord else "separate notes"))
    qa = []
    for kind, answer in answers:
        phrasings = _QUESTIONS["drum_count" if kind == "count" and phrase.drums else kind]
        qa.append({"question": phrasings[int(rng.integers(len(phrasings)))], "answer": answer, "type": kind})
    return {"captions": captions, "qa": qa, "labels": [inst]}


def find_soundfont() -> pathlib.Path:
    """The General MIDI soundfont (`SOUNDFONT`), after checking that it and the `fluidsynth` program exist.

    Raises UserError naming the missing Debian packages and the apt-get command that installs them.
    """
    missing = []
    if shutil.which("fluidsynth") is None:
        missing.append("the fluidsynth program (Debian package fluidsynth)")
    if not SOUNDFONT.is_file():
        missing.append(f"the General MIDI soundfont {SOUNDFONT} (Debian package fluid-soundfont-gm)")
    if missing:
        raise UserError(
            "the instrument clips are rendered from MIDI with fluidsynth, but "
            + " and ".join(missing)
            + f" {'is' if len(missing) == 1 else 'are'} missing: install them with `{APT_COMMAND}`"
        )
    return SOUNDFONT


def render(
    midi_path: str | os.PathLike,
    wav_path: str | os.PathLike,
    soundfont: str | os.PathLike,
    timeout_s: float = 120.0,
) -> None:
    """Renders a MIDI file to `wav_path`: 16 kHz mono PCM16, cut `TAIL_S` after the file's last event
    (at least `MIN_SECONDS`), faded out over `FADE_S` and scaled to a peak of `PEAK_DBFS`. Notes still on
    at the cut are silenced there (all sound off), so the render always ends.

    fluidsynth renders (with its default reverb and chorus) stereo float audio to a temporary file, which is
    averaged to mono. Any error fluidsynth reports fails the render, even where it carries on (it renders
    through its default soundfont when `soundfont` cannot be loaded). `wav_path` is replaced at once, never
    left half written. Raises UserError naming the file and fluidsynth's message if the render fails or
    comes out silent.
    """
    midi_path, wav_path, soundfont = pathlib.Path(midi_path), pathlib.Path(wav_path), pathlib.Path(soundfont)
    try:
        source = mido.MidiFile(midi_path)
        seconds = max(MIN_SECONDS, source.length + TAIL_S)
    except (OSError, ValueError, EOFError, KeyError, IndexError) as e:
        raise UserError(f"cannot read the MIDI file {midi_path}: {e}") from e
    if not soundfont.is_file():
        raise UserError(f"soundfont {soundfont} does not exist: install it with `{APT_COMMAND}`")
    with tempfile.TemporaryDirectory(prefix="slit-fluidsynth-") as tmp:
        raw, bounded = pathlib.Path(tmp) / "render.wav", pathlib.Path(tmp) / "bounded.mid"
        _silenced_at(source, seconds).save(bounded)
        command = ["fluidsynth", "-ni", "-q", "-T", "wav", "-O", "float", "-r", str(SAMPLE_RATE)]
        command += ["-F", str(raw), str(soundfont), str(bounded)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except FileNotFoundError as e:
            raise UserError(
                f"cannot render {midi_path}: fluidsynth is not installed (`{APT_COMMAND}`)"
            ) from e
        except subprocess.TimeoutExpired as e:
            raise UserError(f"fluidsynth took over {timeout_s:.0f} s to render {midi_path}") from e
        message = " ".join((done.stderr + " " + done.stdout).split()) or "no message"
        # A soundfont fluidsynth cannot load is only reported (it falls back to its default soundfont).
        if done.returncode != 0 or not raw.is_file() or "error" in done.stderr.lower():
            raise UserError(
                f"fluidsynth could not render {midi_path} (exit status {done.returncode}): {message}"
            )
        try:
            audio, rate = sf.read(raw, dtype="float32", always_2d=True)
        except sf.LibsndfileError as e:
            raise UserError(f"fluidsynth's render of {midi_path} is unreadable ({e}): {message}") from e
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        raise UserError(f"fluidsynth rendered {midi_path} at {rate} Hz, not {SAMPLE_RATE} Hz: {message}")
    length = int(round(seconds * SAMPLE_RATE))
    audio = np.pad(audio[:length], (0, max(0, length - len(audio))))
    fade = min(length, int(round(FADE_S * SAMPLE_RATE)))
    audio[length - fade :] *= 0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, fade, dtype=np.float32))
    peak = float(np.abs(audio).max()) if length else 0.0
    if not np.isfinite(peak) or peak < 1e-4:
        raise UserError(f"fluidsynth rendered {midi_path} as silence (peak {peak:.2g}): {message}")
    audio *= 10 ** (PEAK_DBFS / 20) / peak
    partial = wav_path.with_name(wav_path.name + ".partial")
    sf.write(partial, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(partial, wav_path)


def _silenced_at(midi: mido.MidiFile, seconds: float) -> mido.MidiFile:
    """`midi` as one track (type 0) that ends with "all sound off" and "all notes off" on every channel at
    `seconds` (at or after its last event): fluidsynth renders until every note has ended, so a note left
    on would otherwise keep it rendering until the timeout."""
    track = mido.merge_tracks(midi.tracks)
    end = track.pop()  # the end_of_track, whose delta counts towards `midi.length`
    tempos = [m.tempo for m in track if m.type == "set_tempo"] or [mido.bpm2tempo(120)]
    after = mido.second2tick(max(0.0, seconds - midi.length), midi.ticks_per_beat, tempos[-1])
    silence = [
        mido.Message("control_change", channel=channel, control=control, value=0, time=0)
        for channel in range(16)
        for control in (120, 123)  # all sound off, all notes off
    ]
    silence[0] = silence[0].copy(time=end.time + after)
    track.extend([*silence, mido.MetaMessage("end_of_track", time=0)])
    out = mido.MidiFile(type=0, ticks_per_beat=midi.ticks_per_beat)
    out.tracks.append(track)
    return out


def _midi_bytes(phrase: Phrase, soundfont: pathlib.Path) -> bytes:
    """The phrase's MIDI file as saved, stamped with the render settings (so a change re-renders)."""
    midi = phrase_midi(phrase)
    stamp = (
        f"slit render {RENDER_VERSION}: {soundfont.name} ({soundfont.stat().st_size} bytes), {SAMPLE_RATE} Hz"
    )
    midi.tracks[0].insert(1, mido.MetaMessage("text", text=stamp, time=0))
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


def _is_rendered(wav: pathlib.Path, mid: pathlib.Path, midi: bytes) -> bool:
    """Whether `wav` was rendered from exactly `midi` (kept as `mid`, written after the wav)."""
    try:
        if mid.read_bytes() != midi:
            return False
        info = sf.info(wav)
    except (OSError, sf.LibsndfileError):
        return False
    return info.samplerate == SAMPLE_RATE and info.channels == 1 and info.frames > 0


def _make_clip(folder: pathlib.Path, clip_id: str, midi: bytes, soundfont: pathlib.Path) -> bool:
    """Renders one clip unless it is already there; returns whether it rendered."""
    wav, mid = folder / f"{clip_id}.wav", folder / f"{clip_id}.mid"
    if _is_rendered(wav, mid, midi):
        return False
    partial = folder / f"{clip_id}.mid.partial"
    partial.write_bytes(midi)
    render(partial, wav, soundfont)
    os.replace(partial, mid)  # after the wav: a stale wav never sits beside its new MIDI file
    return True


def split_names(count: int, seed: int, fractions: dict[str, float] | None = None) -> list[str]:
    """The split of each of `count` clips: a seeded shuffle of exact counts (largest remainders) in
    proportion to `fractions` (normalised; default `DEFAULT_SPLITS`); every split with a positive fraction
    gets a clip when there are at least as many clips as such splits."""
    fractions = dict(DEFAULT_SPLITS if fractions is None else fractions)
    if not fractions or any(not f >= 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise UserError(
            f"split fractions {fractions}: give each split a fraction >= 0, summing to more than 0"
        )
    names = list(fractions)
    shares = np.array([fractions[n] for n in names], float) / sum(fractions.values()) * count
    sizes = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - sizes), kind="stable")[: count - int(sizes.sum())]:
        sizes[i] += 1
    positive = [i for i, n in enumerate(names) if fractions[n] > 0]
    if count >= len(positive):
        for i in positive:
            while sizes[i] == 0:
                sizes[int(np.argmax(sizes))] -= 1
                sizes[i] += 1
    order = np.repeat(np.arange(len(names)), sizes)
    order = np.random.default_rng([seed, 3, count]).permutation(order)
    return [names[int(i)] for i in order]


def clip_phrase(seed: int, index: int) -> tuple[Phrase, np.random.Generator]:
    """Clip `index`'s phrase and the generator that picks its phrasings; independent of the clip count."""
    phrase = random_phrase(np.random.default_rng([seed, 0, index]), _balanced_instrument(seed, index))
    return phrase, np.random.default_rng([seed, 2, index])


def make_instrument_clips(
    out_dir: pathlib.Path,
    count: int,
    seed: int,
    split_fractions: dict[str, float] | None = None,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Writes `count` instrument clips to `out_dir`/instruments/<id>.mid and <id>.wav and returns their
    manifest lines, in id order:

    {"id": "instrument-0007", "audio": "instruments/instrument-0007.wav" (relative to `out_dir`),
    "split": "train" | "validation" | "test", "captions": [...], "qa": [{"question", "answer", "type"}],
    "labels": ["violin"], "source": "instruments"}

    Clip i's phrase, captions and questions depend only on (`seed`, i), so a larger `count` keeps the
    smaller set's clips (and reuses their renders); their splits are drawn afresh for each `count`.
    Instruments are balanced: each run of len(INSTRUMENTS) clips plays every instrument once. Splits are
    from `split_names` (default 80/10/10). A clip whose .mid file already holds exactly the MIDI it would
    render (render settings included) and whose .wav exists is not rendered again. `workers` fluidsynth
    processes run at once; `progress`, if given, is called with 1 as each clip is done.
    """
    if count < 0 or seed < 0:
        raise UserError(f"instrument clips: count ({count}) and seed ({seed}) must be >= 0")
    soundfont = find_soundfont()
    folder = pathlib.Path(out_dir) / SOURCE
    folder.mkdir(parents=True, exist_ok=True)
    splits = split_names(count, seed, split_fractions)
    lines: list[dict] = []
    jobs: list[tuple[str, bytes]] = []
    for i in range(count):
        clip_id = f"instrument-{i:04d}"
        phrase, rng = clip_phrase(seed, i)
        text = describe(phrase, rng)
        lines.append(
            {
                "id": clip_id,
                "audio": f"{SOURCE}/{clip_id}.wav",
                "split": splits[i],
                "captions": text["captions"],
                "qa": text["qa"],
                "labels": text["labels"],
                "source": SOURCE,
            }
        )
        jobs.append((clip_id, _midi_bytes(phrase, soundfont)))
    _run_all(folder, jobs, soundfont, workers, progress)
    return lines


def _run_all(
    folder: pathlib.Path,
    jobs: Sequence[tuple[str, bytes]],
    soundfont: pathlib.Path,
    workers: int,
    progress: Callable[[int], None] | None,
) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        futures = [pool.submit(_make_clip, folder, clip_id, midi, soundfont) for clip_id, midi in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
                if progress is not None:
                    progress(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
