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


def test_processes_read_their_rows_of_the_single_process_global_batches(source, tokenizer):
    """P processes together yield exactly the global batches one process yields, row for row (the
    data order does not depend on the number of hosts)."""
    steps = 10  # crosses an epoch boundary (64 clips / 8)
    whole = iter(stream(source, tokenizer, global_batch_size=8))
    expected = [next(whole) for _ in range(steps)]
    for count in (2, 4):
        parts = [
            iter(stream(source, tokenizer, process_index=p, process_count=count, global_batch_size=8))
            for p in range(count)
        ]
        for want in expected:
            rows = [next(part) for part in parts]
            assert rows[0]["audio"].shape[0] == 8 // count
            for key in ("audio", "text_ids", "num_samples"):
                np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), want[key])
    with pytest.raises(ValueError, match="not divisible"):
        stream(source, tokenizer, process_count=3, process_index=0, global_batch_size=8)


def test_a_data_position_saved_by_two_processes_resumes_in_one(source, tokenizer):
    parts = [iter(stream(source, tokenizer, process_index=p, process_count=2)) for p in range(2)]
    for _ in range(5):
        for part in parts:
            next(part)
    states = [part.get_state() for part in parts]
    assert states[0] == states[1]  # one position, whatever the process
    whole = iter(stream(source, tokenizer))
    expected = [next(whole) for _ in range(8)][5:]
    resumed = iter(stream(source, tokenizer))
    resumed.set_state(states[1])
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["audio"], want["audio"])


def test_epochs_are_reshuffled_and_cover_the_dataset_by_id(source):
    ids = [source[i]["id"] for i in range(len(source))]
    ds = pipeline.global_order(source, seed=5)
    first, second = [ds[i]["id"] for i in range(64)], [ds[i]["id"] for i in range(64, 128)]
    assert sorted(first) == sorted(second) == sorted(ids) and first != second


def test_text_is_padded_and_truncated(tokenizer):
    long_caption = " ".join(["loud"] * 40)
    clips = [{"audio": np.ones(100, np.int16), "captions": [c]} for c in ("a beep", long_caption)]
    spec = pipeline.AudioSpec(16000, 200)
    it = iter(pipeline.train_dataset(clips, tokenizer, spec, max_text_length=10, global_batch_size=2, seed=0))
    batch = next(it)
    rows = {int((r != tokenizer.pad_id).sum()): r for r in batch["text_ids"]}
    short, long = rows[4], rows[10]  # [CLS] a beep [SEP] + 6 [PAD]; [CLS] loud x 8 [SEP]
    assert (
        short[0] == tokenizer.cls_id
        and short[3] == tokenizer.sep_id
        and (short[4:] == tokenizer.pad_id).all()
    )
    assert long[0] == tokenizer.cls_id and long[-1] == tokenizer.sep_id
    assert tokenizer.decode(long) == " ".join(["loud"] * 8)
    assert sorted(batch["num_samples"].tolist()) == [100, 100] and not batch["audio"][:, 100:].any()


def test_grain_worker_processes_give_the_same_batches(source, tokenizer):
    threads, workers = iter(stream(source, tokenizer)), iter(stream(source, tokenizer, worker_count=1))
    for _ in range(3):
        want, have = next(threads), next(workers)
        np.testing.assert_array_equal(want["audio"], have["audio"])
        np.testing.assert_array_equal(want["text_ids"], have["text_ids"])


@pytest.mark.slow  # starts worker processes twice (~10-20 s); resume itself is tested above with threads
def test_grain_worker_iterator_resumes_the_same_sequence(source, tokenizer):
    threads = iter(stream(source, tokenizer))
    expected = [next(threads) for _ in range(4)]
    workers = iter(stream(source, tokenizer, worker_count=1))
    got = [next(workers) for _ in range(2)]
    state = workers.get_state()
    resumed = iter(stream(source, tokenizer, worker_count=1))
    resumed.set_state(state)
    got += [next(resumed) for _ in range(2)]
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want["audio"], have["audio"])
        np.testing.assert_array_equal(want["text_ids"], have["text_ids"])


def test_eval_windows_cover_every_clip(source):
    spec = pipeline.AudioSpec(16000, 16000)
    rows = {}
    for batch in pipeline.eval_audio_batches(source, spec, batch_size=8, windows=True, hop_samples=12000):
        for i in np.flatnonzero(batch["valid"]):
            rows.setdefault(int(batch["index"][i]), []).append(
                (int(batch["window"][i]), batch["audio"][i][: batch["num_samples"][i]])
            )
    assert sorted(rows) == list(range(len(source)))
    for index, windows in rows.items():
        audio = source[index]["audio"].astype(np.float32) / 32768.0
        assert [k for k, _ in windows] == list(range(len(windows)))
        assert len(windows) == max(1, 1 + int(np.ceil((len(audio) - 16000) / 12000)))
        for k, piece in windows:
            np.testing.assert_array_equal(piece, audio[12000 * k : 12000 * k + 16000])
        assert 12000 * (len(windows) - 1) + len(windows[-1][1]) == len(audio)
    plain = list(pipeline.eval_audio_batches(source, spec, batch_size=8))
    assert sum(b["valid"].sum() for b in plain) == len(source)


# ---- Multi-task mixtures ---------------------------------------------------------------------------------

WORDS = "describe the sound a dog barks rain falls is it raining yes no which label cat bird".split()


def mixture_sources():
    """Clip k of task t holds audio filled with 1000 * t + k, so every row can be traced back."""

    def clip(t, k, **texts):
        return {"audio": np.full(400 + k % 50, 1000 * t + k, np.int16), "id": f"{t}-{k}", **texts}

    # Sizes in the hundreds: grain's index shuffle takes milliseconds per index on tiny datasets.
    captions = [clip(0, k, captions=["a dog barks", "rain falls"][k % 2 :]) for k in range(800)]
    qa = [clip(1, k, questions=["is it raining", "is it a dog"], answers=["yes", "no"]) for k in range(200)]
    labels = [clip(2, k, labels=[["cat", "bird", "dog"][k % 3]]) for k in range(200)]
    return captions, qa, labels


TASKS = [
    pipeline.Task("caption", "caption", ("describe the sound",)),
    pipeline.Task("qa", "qa", ("{question}",)),
    pipeline.Task("classify", "classify", ("which label {choices}",), choices=("cat", "bird", "dog")),
]


def mixture(weights, **kw):
    tok = TextTokenizer(word_level_tokenizer(WORDS))
    args = dict(max_instruction_length=10, max_target_length=6, global_batch_size=8, seed=1, weights=weights)
    args.update(kw)
    return tok, pipeline.mixture_dataset(
        TASKS, mixture_sources(), tok, pipeline.AudioSpec(16000, 500), **args
    )


def test_mixture_follows_the_weights_and_each_row_matches_its_task():
    tok, ds = mixture([2.0, 1.0, 1.0])
    it = iter(ds)
    sources_ = mixture_sources()
    counts = np.zeros(3)
    for _ in range(30):
        batch = next(it)
        for row in range(8):
            task = int(batch["task_id"][row])
            counts[task] += 1
            value = int(round(batch["audio"][row, 0] * 32768))
            assert value // 1000 == task
            example = sources_[task][value % 1000]
            assert batch["num_samples"][row] == len(example["audio"])
            instruction, target = (
                tok.decode(batch["instruction_ids"][row]),
                tok.decode(batch["target_ids"][row]),
            )
            if task == 0:
                assert instruction == "describe the sound" and target in example["captions"]
            elif task == 1:
                assert target == example["answers"][example["questions"].index(instruction)]
            else:
                assert instruction == "which label cat bird dog" and target == example["labels"][0]
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.25, 0.25], atol=0.03)


def test_mixture_default_weights_are_sqrt_of_sizes_and_it_resumes():
    assert pipeline.sqrt_size_weights([100, 25, 0]) == pytest.approx([2 / 3, 1 / 3, 0.0])
    _, ds = mixture(None)
    it = iter(ds)
    task_ids = np.concatenate([next(it)["task_id"] for _ in range(40)])
    want = np.sqrt([800, 200, 200]) / np.sqrt([800, 200, 200]).sum()
    np.testing.assert_allclose(np.bincount(task_ids, minlength=3) / len(task_ids), want, atol=0.03)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]
    _, again = mixture(None)
    resumed = iter(again)
    resumed.set_state(state)
    for want_batch in expected:
        got = next(resumed)
        for key in want_batch:
            np.testing.assert_array_equal(got[key], want_batch[key])


def test_mixture_shards_are_disjoint_per_process():
    seen = []
    for p in range(2):
        _, ds = mixture([1.0, 1.0, 1.0], process_index=p, process_count=2)
        it = iter(ds)
        seen.append({int(round(v * 32768)) for _ in range(6) for v in next(it)["audio"][:, 0]})
    assert not seen[0] & seen[1]


def test_unknown_words_and_the_training_vocabulary():
    from slit.data.tokenizer import TextTokenizer, training_vocabulary, word_level_tokenizer

    captions = ["A drill whines, loudly!", "a drill stops", "rain on a tin roof"]
    assert training_vocabulary(captions) == sorted(
        {"a", "drill", "whines", "loudly", "stops", "rain", "on", "tin", "roof"}
    )
    assert training_vocabulary(captions, min_count=2) == ["a", "drill"]
    tok = TextTokenizer(word_level_tokenizer(["a", "drill"]))
    fraction, unknown = tok.unknown_words(captions)
    # 12 words, of which "a" x3 and "drill" x2 are known.
    assert fraction == pytest.approx(7 / 12)
    assert unknown == {"whines": 1, "loudly": 1, "stops": 1, "rain": 1, "on": 1, "tin": 1, "roof": 1}
