"""The grain input pipeline: batch layout, padding masks, determinism, per-process shards, resume."""

import numpy as np
import pytest

from slit.data import pipeline, sources
from slit.data.synthetic import CAPTION_VOCABULARY
from slit.data.tokenizer import TextTokenizer, word_level_tokenizer

SPEC = pipeline.AudioSpec(16000, 32000)


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(word_level_tokenizer(CAPTION_VOCABULARY))


@pytest.fixture(scope="module")
def source(tiny_data_dir):
    return sources.open_split("slit_synthetic_sounds/tiny", tiny_data_dir, "train")


def stream(source, tokenizer, **kw):
    args = dict(max_text_length=24, global_batch_size=8, seed=3)
    args.update(kw)
    return pipeline.train_dataset(source, tokenizer, SPEC, **args)


def test_decode_pads_and_crops():
    pcm = (np.arange(40000) % 1000 - 500).astype(np.int16)
    audio, n = pipeline.decode_audio(pcm[:1000], SPEC, None)
    assert n == 1000 and audio.shape == (32000,) and not audio[1000:].any()
    np.testing.assert_allclose(audio[:1000], pcm[:1000] / 32768.0)
    audio, n = pipeline.decode_audio(pcm, SPEC, None)  # evaluation: deterministic crop from the start
    assert n == 32000 and np.allclose(audio, pcm[:32000] / 32768.0)
    starts = set()
    for seed in range(20):  # training: seeded random crops
        audio, _ = pipeline.decode_audio(pcm, SPEC, np.random.default_rng(seed))
        starts.add(int(np.argmax(pcm == int(round(audio[0] * 32768)))))
    assert len(starts) > 1
    audio, _ = pipeline.decode_audio(np.array([np.nan, np.inf, 0.5], np.float32), SPEC, None)
    assert np.isfinite(audio).all()


def test_batches_have_the_documented_layout(source, tokenizer):
    batch = next(iter(stream(source, tokenizer)))
    assert batch["audio"].shape == (8, 32000) and batch["audio"].dtype == np.float32
    assert batch["num_samples"].shape == (8,) and batch["text_ids"].shape == (8, 24)
    for row, n in zip(batch["audio"], batch["num_samples"], strict=True):
        assert not row[n:].any()
    assert (batch["text_ids"][:, 0] == tokenizer.cls_id).all()
    assert ((batch["text_ids"] == tokenizer.sep_id).sum(1) == 1).all()


def test_same_seed_same_stream_other_seed_other_stream(source, tokenizer):
    a = [next(it) for it in [iter(stream(source, tokenizer))] for _ in range(3)]
    b = [next(it) for it in [iter(stream(source, tokenizer))] for _ in range(3)]
    c = next(iter(stream(source, tokenizer, seed=4)))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["text_ids"], y["text_ids"])
        np.testing.assert_array_equal(x["audio"], y["audio"])
    assert not np.array_equal(a[0]["audio"], c["audio"])


def test_resumed_iterator_continues_the_same_sequence(source, tokenizer):
    it = iter(stream(source, tokenizer))
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(12)]  # crosses an epoch boundary (64 clips / 8)
    resumed = iter(stream(source, tokenizer))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["audio"], want["audio"])
        np.testing.assert_array_equal(got["text_ids"], want["text_ids"])


def test_two_processes_read_disjoint_shards_covering_the_epoch(source, tokenizer):
    seen = []
    for index in range(2):
        it = iter(stream(source, tokenizer, process_index=index, process_count=2, global_batch_size=8))
        batches = [next(it) for _ in range(len(source) // 8)]  # one epoch of this process's half
        assert batches[0]["audio"].shape[0] == 4
        seen.append({row.tobytes() for b in batches for row in b["audio"]})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == len(source)
