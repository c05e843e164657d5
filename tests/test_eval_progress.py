"""Resumable evaluation state: per-batch results saved, reloaded, keyed and cleared."""

import numpy as np

from slit.eval.progress import BatchProgress, progress_key


def test_saved_batches_come_back_equal_and_others_are_missing(tmp_path):
    progress = BatchProgress(tmp_path, progress_key(task="retrieval", data="d", split="test", step=4))
    emb = np.random.default_rng(0).normal(size=(8, 4, 16)).astype(np.float32)
    progress.save(0, {"emb": emb, "captions": ["a dog barks", "ünïcödé"], "valid": np.ones(8, bool)})
    again = BatchProgress(tmp_path, progress.directory.name)
    got = again.load(0)
    np.testing.assert_array_equal(got["emb"], emb)
    assert got["emb"].dtype == np.float32 and got["valid"].dtype == bool
    assert got["captions"] == ["a dog barks", "ünïcödé"]
    assert again.load(1) is None and again.resumed == 1


def test_keys_differ_when_anything_that_changes_results_differs():
    base = dict(task="captioning", data="clotho/v2.1", split="test", step=100, num_beams=1)
    assert progress_key(**base) == progress_key(**dict(base))
    assert progress_key(**base) != progress_key(**dict(base, step=200))
    assert progress_key(**base) != progress_key(**dict(base, num_beams=3))
    assert "/" not in progress_key(**base) and progress_key(**base).startswith(
        "captioning-clotho_v2.1-test-100"
    )


def test_torn_file_is_recomputed_and_clear_removes_everything(tmp_path, capsys):
    progress = BatchProgress(tmp_path, "k")
    progress.save(0, {"x": np.arange(3)})
    (progress.directory / "batch-000001.npz").write_bytes(b"not an npz")
    assert progress.load(1) is None and "ignoring unreadable" in capsys.readouterr().out
    reader = BatchProgress(tmp_path, "k", write=False)
    reader.save(2, {"x": np.arange(3)})  # a non-writing process writes nothing
    assert reader.load(2) is None
    progress.clear()
    assert not (tmp_path / "eval" / "partial").exists()


def test_generation_stopped_part_way_resumes_with_only_the_missing_batches(tmp_path):
    """A generation eval stopped after two batches, run again, generates only the rest and gives the
    same answers as an uninterrupted run (a stand-in answerer: the clip's loudest sample and the
    instruction)."""
    from slit.data import pipeline
    from slit.eval.generative import generate_over_split

    rng = np.random.default_rng(0)
    source = [
        {"audio": (rng.normal(size=800) * 1000).astype(np.int16), "questions": ["q1", "q2"][: 1 + i % 2]}
        for i in range(11)
    ]
    spec = pipeline.AudioSpec(16000, 1000)

    def instructions_for(examples):
        per_clip = [ex["questions"] for ex in examples]
        return [[q[k] if k < len(q) else "" for q in per_clip] for k in range(max(map(len, per_clip)))]

    calls = []

    def answer(audio, num_samples, instructions):
        calls.append(len(instructions))
        return [f"{np.abs(a).max():.4f}/{text}" for a, text in zip(audio, instructions, strict=True)]

    args = (source, spec, 4, instructions_for, answer)
    want = generate_over_split(*args, BatchProgress(tmp_path, "ref"), lambda: False)
    assert [len(a) for a in want] == [1 + i % 2 for i in range(11)] and want[3][1].endswith("/q2")

    stops = iter([False, False, True])
    progress = BatchProgress(tmp_path, "run")
    assert generate_over_split(*args, progress, lambda: next(stops)) is None
    assert sorted(p.name for p in progress.directory.iterdir()) == ["batch-000000.npz", "batch-000001.npz"]
    calls.clear()
    again = BatchProgress(tmp_path, "run")
    assert generate_over_split(*args, again, lambda: False) == want
    assert again.resumed == 2 and len(calls) == 2  # the last batch only: two rounds of questions
