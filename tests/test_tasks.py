"""Stage-two tasks from what the data holds (slit/data/tasks.py): tasks per field, weights by name,
templates from the config, mixtures over datasets with different fields, and stage two end to end on a
manifest nobody wrote for slit (train and test splits only; captions and question/answer pairs in
another vocabulary), trained and evaluated through the CLI."""

from __future__ import annotations

import collections
import json
import pathlib

import ml_collections
import numpy as np
import pytest
import soundfile as sf

from slit import cli
from slit import config as config_lib
from slit.data import pipeline, sources
from slit.data import tasks as tasks_lib
from slit.errors import UserError
from tests.conftest import TINY_DATA, run_slit
from tests.test_train_stage2 import CONFIG_FILE, cli_args, stage2_overrides, write_tiny_llama

SAMPLE_RATE = 16000


# --------------------------------------------------------------------------------------------------
# Datasets as plain lists of examples
# --------------------------------------------------------------------------------------------------


def example(i: int, **fields: list[str]) -> dict:
    out = {"id": f"clip{i}".encode(), "audio": np.full(160, i, np.int16), "num_samples": np.int32(160)}
    for key in ("captions", "questions", "answers", "labels"):
        out[key] = np.array([t.encode() for t in fields.get(key, [])], dtype=object)
    return out


CAPTIONS_ONLY = [example(i, captions=[f"caption {i}", f"another {i}"]) for i in range(6)]
QA_ONLY = [example(i, questions=[f"q{i}?"], answers=[f"a{i}"]) for i in range(5)] + [example(5, labels=["x"])]
LABELS_ONLY = [example(i, labels=[["wind", "dog", "rain"][i % 3]]) for i in range(7)]


def contents_and_mixture(source: list[dict], weights: dict, name: str = "d") -> tuple:
    contents = tasks_lib.split_contents(source, name)
    spec = tasks_lib.DatasetSpec(name)
    mixture = tasks_lib.build_mixture(
        [(spec, source, contents)], tasks_lib.task_weights(weights), tasks_lib.templates()
    )
    return contents, mixture


def decoded(example: dict, key: str) -> list[str]:
    return [t.decode() for t in example[key]]


def test_captions_only_gives_captioning_and_names_the_weighted_tasks_it_cannot_make():
    contents, mixture = contents_and_mixture(CAPTIONS_ONLY, {"caption": 0.2, "qa": 0.8, "classify": 0.5})
    assert contents.num_clips == 6 and contents.indices["caption"] == tuple(range(6))
    assert contents.count("qa") == contents.count("classify") == 0 and contents.labels == ()
    assert [(t.name, t.kind) for t in mixture.tasks] == [("caption", "caption")]
    assert mixture.weights == [0.2]
    assert len(mixture.notes) == 2
    assert "task qa (weight 0.8) is left out for d: d has no questions with answers" in mixture.notes
    assert "task classify (weight 0.5) is left out for d: d has no labels" in mixture.notes
    rng = np.random.default_rng(0)
    (part,) = mixture.parts
    for i in range(len(part.source)):
        instruction, target = part.task.texts(part.source[i], rng)
        assert instruction in tasks_lib.DEFAULT_TEMPLATES["caption"]
        assert target in decoded(CAPTIONS_ONLY[i], "captions")


def test_qa_only_reads_only_the_clips_with_questions():
    contents, mixture = contents_and_mixture(QA_ONLY, {"caption": 0.2, "qa": 0.8})
    with_questions = [i for i, ex in enumerate(QA_ONLY) if len(ex["questions"])]
    assert list(contents.indices["qa"]) == with_questions == [0, 1, 2, 3, 4]
    assert contents.labels == ("x",) and contents.count("caption") == 0
    (part,) = mixture.parts
    assert part.task.kind == "qa" and part.weight == 0.8 and len(part.source) == 5
    assert [n for n in mixture.notes if "caption" in n]
    rng = np.random.default_rng(1)
    for i in range(len(part.source)):
        instruction, target = part.task.texts(part.source[i], rng)
        question, answer = decoded(QA_ONLY[i], "questions")[0], decoded(QA_ONLY[i], "answers")[0]
        assert question in instruction and target == answer
    with pytest.raises(ValueError, match="no question/answer"):  # why the view is needed
        part.task.texts(QA_ONLY[5], rng)


def test_labels_only_classifies_among_the_training_splits_sorted_labels():
    contents, mixture = contents_and_mixture(LABELS_ONLY, {"caption": 0.2, "qa": 0.8, "classify": 0.1})
    want = sorted({t for ex in LABELS_ONLY for t in decoded(ex, "labels")})
    assert list(contents.labels) == want == ["dog", "rain", "wind"]
    (part,) = mixture.parts
    assert part.task.kind == "classify" and part.task.choices == tuple(want)
    instruction, target = part.task.texts(part.source[1], np.random.default_rng(0))
    assert "dog, rain, wind" in instruction and target == "dog"


def test_nothing_to_train_is_an_error_naming_what_is_missing():
    with pytest.raises(ValueError, match="no task to train.*d has no questions with answers"):
        contents_and_mixture(CAPTIONS_ONLY, {"qa": 1.0})


def test_weights_by_name_and_the_older_tuple():
    assert tasks_lib.task_weights({"qa": 1}) == {"caption": 0.0, "qa": 1.0, "classify": 0.0}
    assert tasks_lib.task_weights((0.2, 0.8, 0.0)) == {"caption": 0.2, "qa": 0.8, "classify": 0.0}
    assert tasks_lib.task_weights([0.2, 0.8, 0.0]) == {"caption": 0.2, "qa": 0.8, "classify": 0.0}
    cfg = ml_collections.ConfigDict({"caption": 0.5, "qa": 0.5, "classify": 0.0})
    assert tasks_lib.task_weights(cfg)["caption"] == 0.5
    for bad, message in (
        ((1.0, 0.0), "one weight per task"),
        ({"captions": 1.0}, "unknown task"),
        ({"qa": -1.0}, "non-negative"),
        ({"qa": 0.0}, "every weight is 0"),
    ):
        with pytest.raises(ValueError, match=message):
            tasks_lib.task_weights(bad)


# The synthetic sounds' instruction templates before tasks came from the data: the measured demo numbers
# (configs/stage2_synthetic.py) were trained with these, so the defaults must stay them.
SYNTHETIC_TEMPLATES = {
    "caption": (
        "describe the sound.",
        "what do you hear? describe it in a sentence.",
        "write a short caption for the clip.",
        "summarize the audio in one sentence.",
    ),
    "qa": ("{question}", "question: {question} answer in one word.", "listen and answer: {question}"),
    "classify": (
        "which kinds of sound does the clip contain? choose from {choices}.",
        "classify the sounds in the clip: {choices}.",
        "name the kinds of sound you hear, from {choices}.",
    ),
}


def test_templates_are_checked_and_default_to_the_synthetic_ones():
    assert tasks_lib.templates() == SYNTHETIC_TEMPLATES
    config = config_lib.load_config_file(CONFIG_FILE)
    assert tasks_lib.templates(config.tasks.templates) == tasks_lib.DEFAULT_TEMPLATES
    assert tasks_lib.templates({"qa": ["Q: {question}"]})["qa"] == ("Q: {question}",)
    for bad, message in (
        ({"qa": ["answer it"]}, "lacks {question}"),
        ({"classify": ["which? {options}"]}, "lacks {choices}"),
        ({"caption": ["say {what}"]}, "only {question}"),
        ({"caption": []}, "at least one"),
    ):
        with pytest.raises(ValueError, match=message):
            tasks_lib.templates(bad)


def test_synthetic_mixture_is_the_batches_it_was(tiny_data_dir):
    """The demo config's mixture (weights 0.2 / 0.8 / 0, the default templates) reads exactly the
    batches the synthetic-only code made: captioning and QA over the whole split, synthetic templates."""
    from slit.train import stage2

    config = config_lib.load_config_file(CONFIG_FILE)
    config_lib.apply_overrides(config, [("data.name", TINY_DATA), ("data.data_dir", tiny_data_dir)])
    source = sources.open_split(TINY_DATA, tiny_data_dir, "train")
    mixture = stage2.make_tasks(config)
    assert [t.kind for t in mixture.tasks] == ["caption", "qa"] and mixture.weights == [0.2, 0.8]
    assert not mixture.notes
    old_tasks = [
        pipeline.Task("caption", "caption", SYNTHETIC_TEMPLATES["caption"]),
        pipeline.Task("qa", "qa", SYNTHETIC_TEMPLATES["qa"]),
    ]
    spec = pipeline.AudioSpec(SAMPLE_RATE, 2 * SAMPLE_RATE)

    def batches(task_list: list, task_sources: list, weights: list) -> list[dict]:
        it = iter(
            pipeline.mixture_dataset(
                task_list,
                task_sources,
                CharEncoder(),
                spec,
                max_instruction_length=80,
                max_target_length=80,
                global_batch_size=8,
                seed=0,
                weights=weights,
            )
        )
        return [next(it) for _ in range(3)]

    new = batches(mixture.tasks, mixture.sources, mixture.weights)
    old = batches(old_tasks, [source, source], [0.2, 0.8])
    for a, b in zip(new, old, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class CharEncoder:
    """Texts -> their characters' code points, 0-padded: decodable without a vocabulary."""

    def encode(self, texts: list[str], max_length: int) -> np.ndarray:
        out = np.zeros((len(texts), max_length), np.int32)
        for i, text in enumerate(texts):
            codes = [ord(c) for c in text[:max_length]]
            out[i, : len(codes)] = codes
        return out


def chars(row: np.ndarray) -> str:
    return "".join(chr(c) for c in row if c)


# --------------------------------------------------------------------------------------------------
# Datasets built from manifests
# --------------------------------------------------------------------------------------------------


def write_clip(path: pathlib.Path, freq: float, seconds: float = 0.5, seed: int = 0) -> None:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(seed).standard_normal(len(t)) * 0.01
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), SAMPLE_RATE)


def build_manifest_dataset(root: pathlib.Path, name: str, rows: list[dict]) -> str:
    """Writes the clips named in `rows` (key "freq" -> a tone), the manifest, and builds it with
    `slit data build`; returns the data directory."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, row in enumerate(rows):
        row = dict(row)
        write_clip(root / row["audio"], row.pop("freq"), seed=n)
        lines.append(json.dumps(row))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    data_dir = str(root / "tfds")
    code = cli.main(
        ["data", "build", "--manifest", str(root / "manifest.jsonl"), "--name", name, "--data-dir", data_dir]
    )
    assert code == 0
    return data_dir


def test_mixture_of_two_datasets_with_different_fields(tmp_path):
    """A captions dataset (two of its clips have only a question) and a labels dataset, weighted 3:1:
    the batches hold the datasets in that proportion and every row is a clip that has its task's field,
    with a target from that clip."""
    from slit.train import stage2

    caption_rows = [
        {"audio": f"c{i}.wav", "freq": 200 + 40 * i, "captions": [f"kettle whistles {i}", f"steam hiss {i}"]}
        for i in range(6)
    ] + [
        {"audio": f"q{i}.wav", "freq": 900 + 40 * i, "qa": [{"question": "loud?", "answer": "yes"}]}
        for i in range(2)
    ]
    label_rows = [
        {"audio": f"l{i}.wav", "freq": 1500 + 40 * i, "labels": [("siren", "bell", "horn")[i % 3]]}
        for i in range(6)
    ]
    captions_dir = build_manifest_dataset(tmp_path / "a", "kitchen_sounds", caption_rows)
    labels_dir = build_manifest_dataset(tmp_path / "b", "street_sounds", label_rows)
    config = config_lib.load_config_file(CONFIG_FILE)
    mixture_entries = [
        {"name": "kitchen_sounds", "data_dir": captions_dir, "weight": 3.0},
        {"name": "street_sounds", "data_dir": labels_dir, "weight": 1.0, "test_split": "train"},
    ]
    config_lib.apply_overrides(
        config,
        [
            ("data.mixture", repr(mixture_entries)),
            ("tasks.weights.caption", "0.5"),
            ("tasks.weights.qa", "0.0"),
            ("tasks.weights.classify", "0.5"),
        ],
    )
    stage2.validate(config, num_devices=1)
    training_data = stage2.open_training_data(config)
    mixture = stage2.make_tasks(config, training_data)
    assert [(p.dataset, p.task.kind) for p in mixture.parts] == [
        ("kitchen_sounds", "caption"),
        ("street_sounds", "classify"),
    ]
    assert mixture.weights == [3.0, 1.0]  # each dataset's share, all of it to the one task it holds
    assert [len(p.source) for p in mixture.parts] == [6, 6]
    assert any("classify" in n and "kitchen_sounds" in n for n in mixture.notes)
    assert any("caption" in n and "street_sounds" in n for n in mixture.notes)

    clips = {}  # audio -> (dataset, example): which clip a row's audio is
    for dataset, data_dir in (("kitchen_sounds", captions_dir), ("street_sounds", labels_dir)):
        source = sources.open_split(dataset, data_dir, "train")
        for i in range(len(source)):
            clips[source[i]["audio"].tobytes()] = (dataset, source[i])
    assert len(clips) == 14
    spec = pipeline.AudioSpec(SAMPLE_RATE, SAMPLE_RATE)
    it = iter(
        pipeline.mixture_dataset(
            mixture.tasks,
            mixture.sources,
            CharEncoder(),
            spec,
            max_instruction_length=120,
            max_target_length=40,
            global_batch_size=16,
            seed=0,
            weights=mixture.weights,
        )
    )
    rows = collections.Counter()
    for _ in range(25):  # 400 rows
        batch = next(it)
        for audio, n, task_id, instruction, target in zip(
            batch["audio"],
            batch["num_samples"],
            batch["task_id"],
            batch["instruction_ids"],
            batch["target_ids"],
            strict=True,
        ):
            pcm = np.round(audio[:n] * 32768).astype(np.int16).tobytes()
            dataset, ex = clips[pcm]
            part = mixture.parts[int(task_id)]
            assert dataset == part.dataset
            rows[dataset] += 1
            if part.task.kind == "caption":
                assert chars(target) in decoded(ex, "captions")  # clips with only a question never come
            else:
                assert chars(target) in decoded(ex, "labels")
                assert "bell, horn, siren" in chars(instruction)
    assert rows["kitchen_sounds"] / 400 == pytest.approx(0.75, abs=0.03)


def test_mixture_config_errors_name_the_entry():
    from slit.train import stage2

    config = config_lib.load_config_file(CONFIG_FILE)
    config_lib.apply_overrides(
        config,
        [
            ("data.mixture", repr([{"name": "a", "weight": -1}])),
            ("tasks.templates.qa", repr(("no placeholder",))),
        ],
    )
    with pytest.raises(config_lib.ConfigError) as error:
        stage2.validate(config, num_devices=1)
    assert "data.mixture[0] (a): weight=-1" in str(error.value)
    assert "tasks.templates: qa template 'no placeholder' lacks {question}" in str(error.value)


# --------------------------------------------------------------------------------------------------
# Stage two end to end on a user's manifest: train and test splits only, another vocabulary
# --------------------------------------------------------------------------------------------------

SOURCES = {"kettle": 300.0, "drill": 700.0, "bird": 1800.0}
WORDS = [
    "a",
    "kettle",
    "drill",
    "bird",
    "whistles",
    "screeches",
    "sings",
    "softly",
    "loudly",
    "in",
    "the",
    "kitchen",
]


def user_rows() -> list[dict]:
    verbs = {"kettle": "whistles", "drill": "screeches", "bird": "sings"}
    rows = []
    for i in range(18):
        thing = list(SOURCES)[i % 3]
        loud = i % 2 == 0
        rows.append(
            {
                "audio": f"rec_{i:02d}.wav",
                "freq": SOURCES[thing],
                "captions": [f"a {thing} {verbs[thing]} {'loudly' if loud else 'softly'}"],
                "qa": [
                    {"question": f"is a {thing} heard?", "answer": "yes"},
                    {"question": "which thing makes the sound?", "answer": thing},
                ],
                "split": "test" if i >= 12 else "train",
            }
        )
    return rows


@pytest.fixture(scope="module")
def user_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A manifest dataset (12 train / 6 test clips, no validation split), a tiny LLM whose vocabulary has
    its words, and a 4-step stage-two run on it through the CLI, periodic evaluation asked every 2 steps."""
    from slit.interop.pretrained import minilm_directory

    root = tmp_path_factory.mktemp("user_data")
    data_dir = build_manifest_dataset(root, "workshop_clips", user_rows())
    llm_dir = write_tiny_llama(
        root / "llm", words=[*WORDS, "heard", "is", "which", "thing", "makes", "sound", "yes"]
    )
    workdir = root / "run"
    overrides = stage2_overrides(
        data_dir,
        llm_dir,
        **{
            "data.name": "workshop_clips",
            "data.max_seconds": 1.0,
            "total_steps": 4,
            "eval_every_steps": 2,
            "tokenizer.kind": "directory",
            "tokenizer.path": str(minilm_directory()),
            "data.max_qformer_instruction_length": 16,
        },
    )
    result = run_slit("train", "--config", str(CONFIG_FILE), "--workdir", str(workdir), *cli_args(overrides))
    assert result.returncode == 0, result.stderr[-4000:]
    return {"workdir": workdir, "data_dir": data_dir, "result": result, "root": root}


def test_user_manifest_keeps_qa_pairs_and_has_no_validation_split(user_run):
    train = sources.open_split("workshop_clips", user_run["data_dir"], "train")
    rows = [r for r in user_rows() if r["split"] == "train"]
    assert len(train) == len(rows) == 12
    for i in range(len(train)):
        want = {r["audio"]: r for r in rows}[train[i]["id"].decode()]
        assert decoded(train[i], "questions") == [p["question"] for p in want["qa"]]
        assert decoded(train[i], "answers") == [p["answer"] for p in want["qa"]]
    with pytest.raises(FileNotFoundError):
        sources.open_split("workshop_clips", user_run["data_dir"], "validation")


def test_qformer_tokenizer_reads_the_user_vocabulary(user_run):
    """The packaged MiniLM WordPiece knows these words: few [UNK] tokens (the synthetic word-level
    vocabulary would make most of them [UNK])."""
    from slit.data.tokenizer import TextTokenizer

    tok = TextTokenizer.from_directory(user_run["workdir"])
    texts = [c for r in user_rows() for c in r["captions"]] + [
        p["question"] for r in user_rows() for p in r["qa"]
    ]
    ids = tok.encode(texts, 32)
    unk = tok.tokenizer.token_to_id("[UNK]")
    assert unk is not None and int((ids == unk).sum()) == 0


def test_user_manifest_trains_and_notes_come_before_step_one(user_run):
    stderr = user_run["result"].stderr
    assert "Data: the train split of workshop_clips: 12 clips: 12 with captions, 12 with questions" in stderr
    note = "periodic evaluation (eval_every_steps=2) is off: no validation split"
    assert note in stderr and "workshop_clips has no 'validation' split" in stderr
    # classify has weight 0.1 in the test overrides, but the data has no labels: a note, not an error.
    assert "note: task classify (weight 0.1) is left out for workshop_clips: the train split" in stderr
    assert stderr.index(note) < stderr.index("/4 [")  # before the progress bar's first step
    assert "unknown to the Q-Former" not in stderr
    rows = [json.loads(line) for line in (user_run["workdir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert not any(k.startswith("validation/") for r in rows for k in r)


def test_user_manifest_is_evaluated_for_captioning_and_aqa_on_its_test_split(user_run):
    directory = user_run["workdir"] / "eval"
    caption = json.loads((directory / "captioning-workshop_clips-test.json").read_text())["metrics"]
    qa = json.loads((directory / "aqa-workshop_clips-test.json").read_text())["metrics"]
    test_rows = [r for r in user_rows() if r["split"] == "test"]
    assert caption["num_items"] == len(test_rows) == 6 and 0 <= caption["CIDEr-D"]
    assert qa["num_items"] == 6  # one question per clip
    # The majority baseline without question types: yes/no and open questions, from the train split.
    train_answers = collections.defaultdict(collections.Counter)
    for r in user_rows():
        if r["split"] == "train":
            for p in r["qa"]:
                train_answers["yes/no" if p["answer"] == "yes" else "open"][p["answer"]] += 1
    hits = []
    for i, r in enumerate(test_rows):
        pair = r["qa"][i % 2]  # test clip i is asked its (i mod 2)-th question
        kind = "yes/no" if pair["answer"] == "yes" else "open"
        hits.append(train_answers[kind].most_common(1)[0][0] == pair["answer"])
    assert qa["majority_baseline"]["per_question_type_accuracy"] == pytest.approx(np.mean(hits))
    assert not (directory / "classification-workshop_clips-test.json").exists()
    stdout = user_run["result"].stdout
    assert "classification (the test split of workshop_clips has no labels)" in stdout


def test_eval_all_on_a_dataset_without_questions_names_aqa_as_skipped(user_run):
    rows = [
        {
            "audio": f"p{i}.wav",
            "freq": SOURCES["kettle"],
            "captions": ["a kettle whistles softly"],
            "split": "test",
        }
        for i in range(3)
    ] + [{"audio": "t.wav", "freq": SOURCES["bird"], "captions": ["a bird sings"], "split": "train"}]
    data_dir = build_manifest_dataset(user_run["root"] / "captions_only", "captions_only", rows)
    workdir = str(user_run["workdir"])
    result = run_slit("eval", "--workdir", workdir, "--data", "captions_only", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped aqa: the test split of captions_only has no questions with answers" in result.stdout
    assert "skipped classification: the test split of captions_only has no labels" in result.stdout
    report = json.loads((user_run["workdir"] / "eval" / "captioning-captions_only-test.json").read_text())
    assert report["metrics"]["num_items"] == 3 and report["metrics"]["clips_without_captions"] == 0
    result = run_slit(
        "eval", "--workdir", workdir, "--task", "aqa", "--data", "captions_only", "--data-dir", data_dir
    )
    assert result.returncode == 2 and "has no questions with answers" in result.stderr
    assert "Traceback" not in result.stderr


def test_manifest_qa_field_errors_are_per_line(tmp_path):
    from slit.data import manifest
    from slit.data.report import BuildReport

    lines = [
        {"audio": "a.wav", "qa": [{"question": "q?", "answer": "a"}], "captions": ["c"]},
        {"audio": "b.wav", "qa": {"question": "q?", "answer": "a"}},
        {"audio": "c.wav", "qa": ["q?"]},
        {"audio": "d.wav", "qa": [{"question": "q?"}]},
        {"audio": "e.wav", "qa": [{"question": "q?", "answer": 3}]},
        {"audio": "f.wav", "qa": [{"question": "q?", "answer": "a", "kind": "count"}]},
        {"audio": "t.wav", "qa": [{"question": "how many?", "answer": "two", "type": "count"}]},
        {
            "audio": "g.wav",
            "question": "first?",
            "answer": "1",
            "qa": [{"question": "second?", "answer": "2"}],
        },
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = BuildReport()
    records = manifest.read_manifest(path, report)
    assert [(r.id, r.questions, r.answers, r.question_types) for r in records] == [
        ("a.wav", ["q?"], ["a"], []),
        ("t.wav", ["how many?"], ["two"], ["count"]),  # typed: every question has a type
        ("g.wav", ["first?", "second?"], ["1", "2"], []),  # one untyped question: no types kept
    ]
    messages = {p.origin: p.message for p in report.problems}
    assert set(messages) == {f"m.jsonl:{n}" for n in range(2, 7)}
    assert "`qa` must be a list" in messages["m.jsonl:2"]
    assert "`qa` item 0 must be an object" in messages["m.jsonl:3"]
    assert "missing answer" in messages["m.jsonl:4"]
    assert "`answer` must be a string" in messages["m.jsonl:5"]
    assert "unknown key(s) kind" in messages["m.jsonl:6"]
    assert all(p.reason == "bad_field" for p in report.problems)


def test_train_reports_a_task_it_cannot_make_before_step_one(tiny_data_dir):
    """UserError (not a traceback) when no weighted task can be made."""
    from slit.train import stage2

    config = config_lib.load_config_file(CONFIG_FILE)
    config_lib.apply_overrides(
        config,
        [("data.name", TINY_DATA), ("data.data_dir", tiny_data_dir), ("data.mixture", repr([]))],
    )
    source = [example(0, captions=["c"])]
    spec = tasks_lib.datasets(config.data)[0]
    with pytest.raises(UserError, match="no task to train.*holds"):
        stage2.make_tasks(
            config_with_weights(config, {"caption": 0.0, "qa": 1.0, "classify": 0.0}),
            [(spec, source, tasks_lib.split_contents(source, "mine"))],
        )


def config_with_weights(config: ml_collections.ConfigDict, weights: dict) -> ml_collections.ConfigDict:
    config_lib.apply_overrides(config, [(f"tasks.weights.{k}", str(v)) for k, v in weights.items()])
    return config


def test_a_tokenizer_that_does_not_know_the_words_is_noted():
    from slit.data.synthetic import TOKENIZER_VOCABULARY
    from slit.data.tokenizer import TextTokenizer, word_level_tokenizer
    from slit.interop.pretrained import minilm_directory

    source = [example(i, captions=[r["captions"][0]]) for i, r in enumerate(user_rows())]
    splits = [(tasks_lib.DatasetSpec("d"), source, tasks_lib.split_contents(source))]
    synthetic_words = TextTokenizer(word_level_tokenizer(TOKENIZER_VOCABULARY))
    words = [w for r in user_rows() for w in r["captions"][0].split()]
    unknown = sum(w not in set(TOKENIZER_VOCABULARY) for w in words) / len(words)
    assert unknown > 0.1
    note = tasks_lib.unknown_token_note(synthetic_words, splits)
    assert note is not None and note.startswith(f"{100 * unknown:.0f}% of the training texts' tokens")
    assert tasks_lib.unknown_token_note(TextTokenizer.from_directory(minilm_directory()), splits) is None


def test_stage_one_on_a_dataset_without_validation_split_notes_it_and_trains_from_its_cache(
    user_run, tmp_path
):
    """Stage one on the same train/test-only manifest dataset, from the feature cache: the cache holds
    the splits that exist, the missing validation split is a note before step 1 (not a crash at the
    first validation), and the test split is evaluated at the end."""
    from tests.conftest import ROOT, tiny_overrides

    overrides = tiny_overrides(
        user_run["data_dir"],
        **{
            "data.name": "workshop_clips",
            "data.max_seconds": 1.0,
            "total_steps": 2,
            "eval_every_steps": 1,
            "batch_size": 4,
            "tokenizer.kind": "train_words",
            "features": "cached",
            "features_dir": str(tmp_path / "features"),
        },
    )
    args = ["--config", str(ROOT / "configs" / "stage1_synthetic.py"), *cli_args(overrides)]
    cached = run_slit("cache-features", *args)
    assert cached.returncode == 0, cached.stderr[-3000:]
    (directory,) = (tmp_path / "features" / "workshop_clips").iterdir()
    assert sorted(p.name for p in directory.iterdir() if p.is_dir()) == ["test", "train"]
    # The synthetic sounds' word list knows few of these words: refused before step 1, naming the fix.
    refused = run_slit(
        "train", "--workdir", str(tmp_path / "refused"), *args, "--config.tokenizer.kind=synthetic_words"
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "of the training captions' words are unknown to the tokenizer" in refused.stderr
    assert "--config.tokenizer.kind=train_words" in refused.stderr and "/2 [" not in refused.stderr

    result = run_slit("train", "--workdir", str(tmp_path / "run"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenizer: 0.0% of the training captions' words are unknown ([UNK])" in result.stderr
    note = "note: workshop_clips has no 'validation' split, so it is not evaluated during training"
    assert note in result.stderr and result.stderr.index(note) < result.stderr.index("/2 [")
    assert "Test-split retrieval" in result.stdout
    report = json.loads((tmp_path / "run" / "eval" / "retrieval.json").read_text())
    assert report["num_audio"] == 6
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("validation/") for r in rows for k in r)


def test_the_evaluator_table_plans_each_stage_from_what_a_split_holds():
    from slit.eval import registry

    # Stage two's evaluations are those its task kinds permit (tasks_lib.EVAL_TASKS), in one table.
    assert registry.needs("stage2") == {task: kind for kind, task in tasks_lib.EVAL_TASKS.items()}
    assert registry.needs("stage1") == {"retrieval": "caption", "classification": "classify"}
    captions_only = tasks_lib.SplitContents(
        "the test split of mine", 3, {"caption": (0, 1, 2), "qa": (), "classify": ()}, ()
    )
    run, skipped = tasks_lib.eval_plan(
        captions_only, ("retrieval", "classification"), registry.needs("stage1")
    )
    assert run == ["retrieval"] and skipped == {"classification": "the test split of mine has no labels"}
    run, skipped = tasks_lib.eval_plan(captions_only, ("captioning",))
    assert run == ["captioning"]
    assert skipped == {"aqa": "not asked for (eval.tasks)", "classification": "not asked for (eval.tasks)"}
    with pytest.raises(
        UserError, match=r"--task retrieval evaluates stage1 runs; stage2 runs: use captioning"
    ):
        registry.find("stage2", "retrieval")
