"""Caption metrics against pycocoevalcap's Scorer classes run here on the same inputs, and `slit score`.

The JVM starts four times in this file: pycocoevalcap's PTB tokenizer, slit's PTB tokenizer twice (about a
second each), and one METEOR process shared by the reference and slit (METEOR loads its paraphrase table at
start-up: 10-40 s on a busy 2-core machine).
"""

import json
import shutil

import numpy as np
import pytest

from slit.cli import main as slit_main
from slit.eval import captioning

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")

# Clotho/AudioCaps-style references (five per clip, one clip with three) and system outputs of mixed
# quality, with the punctuation, case and contractions that the tokenizer has to handle.
REFERENCES = {
    "rain_roof": [
        "Rain falls steadily on a tin roof while thunder rumbles in the distance.",
        "Heavy rain is pouring onto a metal roof and thunder rolls.",
        "A rainstorm hits a roof, with thunder in the background",
        "rain drums on a roof as thunder rumbles far away",
        "Steady rain pours down and thunder can be heard.",
    ],
    "dog_door": [
        "A dog barks twice and then a door slams shut.",
        "a dog is barking and a door closes loudly",
        "The dog's barking is followed by a door being slammed.",
        "A small dog barks, then someone shuts a door.",
        "Barking from a dog and the bang of a door.",
    ],
    "birds_stream": [
        "Birds are chirping near a stream of running water.",
        "water flows in a creek while birds sing",
        "Several birds tweet as a brook babbles nearby.",
        "A stream trickles and birds chirp in the trees.",
        "birds singing and water running in a forest",
    ],
    "train_pass": [
        "A train passes by on the tracks and blows its horn.",
        "A train horn honks as the train rushes past.",
        "the train's horn sounds while it goes by quickly",
        "A passing train clatters over the rails and honks.",
        "a train blows its whistle as it passes",
    ],
    "crowd_applause": [
        "A large crowd applauds and cheers.",
        "people clapping and cheering loudly in an audience",
        "An audience gives a round of applause with whistles.",
        "Many people clap and shout after a performance.",
        "A crowd is clapping and cheering enthusiastically",
    ],
    "typing_talk": [
        "A man talks while typing on a computer keyboard.",
        "someone is typing quickly on a keyboard as a man speaks",
        "Keys clack on a keyboard and a man's voice is heard.",
        "a person types on a keyboard while talking",
        "Typing on a keyboard with a man speaking in the background.",
    ],
    "engine_idle": [
        "A car engine starts, idles, and then revs up.",
        "A vehicle's motor turns on and idles roughly",
        "an engine is started and left running",
        "A motor vehicle engine idles and revs (loudly).",
        "The engine of a car starts up and rumbles.",
    ],
    "baby_woman": [
        "A baby cries while a woman speaks softly.",
        "a woman tries to comfort a crying baby",
        "An infant is crying and a lady talks gently to it.",
        "A baby is wailing and a woman is talking",
        "a crying baby and a woman's soothing voice",
    ],
    "footsteps_gravel": [
        "Footsteps crunch on gravel as someone walks.",
        "A person walks slowly on a gravel path.",
        "someone's footsteps on loose stones",
    ],
    "church_bells": [
        "Church bells ring loudly several times.",
        "bells are ringing from a church tower",
        "A bell tolls repeatedly and then stops.",
        "Large bells chime in a rhythmic pattern.",
        "church bells ringing out over a town",
    ],
    "frying_pan": [
        "Food sizzles as it's fried in a pan.",
        "Something is frying in hot oil and sizzling.",
        "a pan sizzles while food cooks on a stove",
        "Oil crackles and pops in a frying pan.",
        "cooking sounds: food sizzling in a skillet",
    ],
    "wind_mic": [
        "Wind blows hard against the microphone.",
        "strong gusts of wind hit the mic",
        "Wind is blowing and making a rumbling noise.",
        "A heavy wind howls across an open field.",
        "loud wind noise buffets the microphone",
    ],
}
PREDICTIONS = {
    "rain_roof": "rain falls on a roof and thunder rumbles",
    "dog_door": "A dog barks and a door closes.",
    "birds_stream": "birds are chirping and water is running",
    "train_pass": "a train passes by and honks its horn",
    "crowd_applause": "a crowd of people applauds and cheers",
    "typing_talk": "a man is talking and typing on a keyboard",
    "engine_idle": "an engine idles",
    "baby_woman": "a baby is crying and a woman is speaking",
    "footsteps_gravel": "a person is walking on gravel",
    "church_bells": "bells are ringing",
    "frying_pan": "Food is sizzling in a frying pan (it's hot)!",
    "wind_mic": "wind is blowing into a microphone",
}
# Harder text for the tokenizer: contractions, possessives, quotes, brackets, hyphens, numbers, symbols.
TOKENIZER_CASES = [
    "It isn't clear what's making the noise; it can't be a dog's bark.",
    'A man says "go!" loudly -- then (after a pause) a door creaks...',
    "The dogs' owners shout, and the 3-year-old child laughs.",
    "Mr. Smith's radio plays at 5 p.m. near the U.S. border, e.g. at 10:30.",
    "Price: $5.00, 50% off, #1 & more: 1,000 people; 3.14 km/h.",
    "“Smart quotes” and ‘single’ ones — with an em dash – and an ellipsis…",
    "I'd've gone, we'll see, they've left, she'd stay, I'm here, you're there.",
    "cannot gonna wanna gotta 'Tis rock 'n' roll from the '80s and the 1990's",
    "the [UNK] ##ing sound of a <unk> car [SEP] AT&T fish&chips",
    "BIRDS CHIRP!!! Loud?! word..word word...word 5. .5 hello.world",
]


def _coco_format(captions):
    return {key: [{"caption": c} for c in value] for key, value in captions.items()}


@pytest.fixture(scope="module")
def reference():
    """pycocoevalcap on the fixed captions: its PTB tokenizer (one JVM) and METEOR (one JVM, kept)."""
    if shutil.which("java") is None:
        pytest.skip("Java is not installed")
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tricky = {f"tricky{i}": [c] for i, c in enumerate(TOKENIZER_CASES)}
    tokenized = PTBTokenizer().tokenize(
        _coco_format({**REFERENCES, **tricky, **{f"pred:{k}": [v] for k, v in PREDICTIONS.items()}})
    )
    gts = {k: tokenized[k] for k in REFERENCES}
    res = {k: tokenized[f"pred:{k}"] for k in PREDICTIONS}
    meteor = Meteor()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {
        **{f"BLEU-{n + 1}": b for n, b in enumerate(bleu)},
        "METEOR": meteor.compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr-D": Cider().compute_score(gts, res)[0],
    }
    yield {"scores": scores, "meteor": meteor, "tokenized": tokenized, "gts": gts, "res": res}
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()


@needs_java
def test_scores_equal_pycocoevalcap(reference):
    scorer = captioning.CaptionScorer(tokenizer="java", meteor=reference["meteor"])
    report = scorer.score(PREDICTIONS, REFERENCES)
    assert report["tokenizer"] == "stanford-ptb-3.4.1" and report["num_items"] == len(PREDICTIONS)
    for name, expected in reference["scores"].items():
        assert report[name] == pytest.approx(expected, rel=0, abs=1e-12), name
    assert 0.2 < report["CIDEr-D"] < 5 and 0 < report["BLEU-4"] < report["BLEU-1"] < 1  # not degenerate
    # SPICE without the CoreNLP jars: unavailable with the reason, never 0.
    if captioning.spice_missing_reason() is not None:
        assert report["SPICE"] is None and report["SPIDEr"] is None
        assert "stanford-corenlp-3.6.0" in report["unavailable"]["SPICE"]
        assert "SPICE is unavailable" in report["unavailable"]["SPIDEr"]
    assert json.loads(json.dumps(report)) == report  # plain JSON


@needs_java
def test_native_tokenizer_matches_stanford_ptb(reference):
    tokenized = reference["tokenized"]
    for key, refs in REFERENCES.items():
        assert [captioning.native_ptb_tokenize(c) for c in refs] == tokenized[key], key
    for key, prediction in PREDICTIONS.items():
        assert captioning.native_ptb_tokenize(prediction) == tokenized[f"pred:{key}"][0], key
    for i, case in enumerate(TOKENIZER_CASES):
        assert captioning.native_ptb_tokenize(case) == tokenized[f"tricky{i}"][0], case


@needs_java
def test_slit_java_tokenizer_equals_pycocoevalcaps(reference):
    captions = [*TOKENIZER_CASES, "", "a caption with a\rcarriage return"]
    tokenized, name = captioning.ptb_tokenize(captions, "java")
    assert name == "stanford-ptb-3.4.1"
    assert tokenized[: len(TOKENIZER_CASES)] == [reference["tokenized"][f"tricky{i}"][0] for i in range(10)]
    assert tokenized[-2:] == ["", "a caption with a carriage return"]


def _random_corpus(seed, items=40):
    rng = np.random.default_rng(seed)
    vocab = "a the dog barks door closes rain falls on roof loud softly and then birds sing".split()

    def sentence(low=1, high=12):
        return " ".join(rng.choice(vocab, rng.integers(low, high)))

    gts = {f"id{i}": [sentence() for _ in range(rng.integers(1, 6))] for i in range(items)}
    res = {f"id{i}": [sentence(0 if i % 7 == 0 else 1)] for i in range(items)}  # some empty hypotheses
    res["id1"] = [gts["id1"][0]]  # an exact match
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_bleu_rouge_cider_equal_pycocoevalcap_on_random_token_sequences(seed):
    gts, res = _random_corpus(seed)
    hyps = [res[k][0] for k in gts]
    refs = [gts[k] for k in gts]
    expected_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert captioning.bleu(hyps, refs) == pytest.approx(expected_bleu, rel=0, abs=1e-12)
    expected_rouge, expected_rouge_items = Rouge().compute_score(gts, res)
    np.testing.assert_allclose(captioning.rouge_l(hyps, refs), expected_rouge_items, rtol=0, atol=1e-12)
    expected_cider, expected_cider_items = Cider().compute_score(gts, res)
    np.testing.assert_allclose(captioning.cider_d(hyps, refs), expected_cider_items, rtol=0, atol=1e-12)
    assert float(np.mean(captioning.cider_d(hyps, refs))) == pytest.approx(expected_cider, abs=1e-12)


def test_without_java_meteor_and_spice_are_unavailable_with_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    report = captioning.score_captions(PREDICTIONS, REFERENCES)
    assert report["tokenizer"] == "native-ptb"
    for name in ("METEOR", "SPICE", "SPIDEr"):
        assert report[name] is None, name
        assert "Java (the `java` command) is not on PATH" in report["unavailable"][name]
    tokenized = [captioning.native_ptb_tokenize(PREDICTIONS[k]) for k in PREDICTIONS]
    refs = [[captioning.native_ptb_tokenize(c) for c in REFERENCES[k]] for k in PREDICTIONS]
    assert report["CIDEr-D"] == pytest.approx(
        np.mean(Cider().compute_score(dict(enumerate(refs)), {i: [h] for i, h in enumerate(tokenized)})[1]),
        abs=1e-12,
    )
    with pytest.raises(captioning.UserError, match="not on PATH"):
        captioning.ptb_tokenize(["a dog"], "java")


def test_spice_output_parsing_and_spider(monkeypatch):
    # The shape of spice-1.0.jar's output (-subset): per item, scores per category with pr/re/f.
    output = [
        {"image_id": 1, "scores": {"All": {"pr": 0.5, "re": 0.25, "f": 0.3333}, "Object": {"f": 0.5}}},
        {"image_id": 0, "scores": {"All": {"pr": 1.0, "re": 0.5, "f": 0.6667}}},
        {"image_id": 2, "scores": {"All": {"pr": "NaN", "re": "NaN", "f": "NaN"}}},
    ]
    np.testing.assert_array_equal(
        captioning.spice_scores_from_output(output, 4), [0.6667, 0.3333, np.nan, np.nan]
    )

    spice = np.array([0.1, 0.2, 0.3] + [0.4] * (len(PREDICTIONS) - 3))
    monkeypatch.setattr(captioning, "spice_missing_reason", lambda *a: None)
    monkeypatch.setattr(captioning, "run_spice", lambda hyps, refs, *a: spice[: len(hyps)])
    report = captioning.score_captions(
        PREDICTIONS, REFERENCES, metrics=["CIDEr-D", "SPICE", "SPIDEr"], tokenizer="native"
    )
    assert set(report["unavailable"]) == set()
    assert report["SPICE"] == pytest.approx(spice.mean())
    assert report["SPIDEr"] == pytest.approx((report["CIDEr-D"] + spice.mean()) / 2)
    first = next(iter(PREDICTIONS))
    assert report["per_item"]["SPIDEr"][first] == pytest.approx(
        (report["per_item"]["CIDEr-D"][first] + 0.1) / 2
    )
    assert "BLEU-1" not in report and "METEOR" not in report


def test_a_failing_jvm_costs_only_its_metric(monkeypatch):
    class DeadMeteor:
        def compute_score(self, gts, res):
            raise ValueError("could not convert string to float: b''")  # what a dead METEOR JVM gives

    def spice_out_of_memory(*args):
        raise RuntimeError("SPICE failed (exit code 1): Could not reserve enough space for object heap")

    monkeypatch.setattr(captioning, "spice_missing_reason", lambda *a: None)
    monkeypatch.setattr(captioning, "run_spice", spice_out_of_memory)
    scorer = captioning.CaptionScorer(tokenizer="native", meteor=DeadMeteor())
    report = scorer.score(PREDICTIONS, REFERENCES)
    assert report["METEOR"] is None and "METEOR failed" in report["unavailable"]["METEOR"]
    assert report["SPICE"] is None and "object heap" in report["unavailable"]["SPICE"]
    assert report["SPIDEr"] is None and "object heap" in report["unavailable"]["SPIDEr"]
    assert report["CIDEr-D"] > 0 and report["BLEU-4"] > 0


# ---------------------------------------------------------------------------------------------- slit score


def _write(tmp_path, name, value):
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return str(path)


def _score(tmp_path, predictions, references, *extra):
    args = ["score", "--predictions", _write(tmp_path, "p.json", predictions)]
    args += ["--references", _write(tmp_path, "r.json", references), *extra]
    return slit_main(args)


def test_score_command_prints_the_metrics_as_json(tmp_path, capsys):
    code = _score(
        tmp_path, PREDICTIONS, REFERENCES, "--metrics", "bleu,rouge-l,cider-d", "--tokenizer", "native"
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    expected = captioning.score_captions(
        PREDICTIONS, REFERENCES, metrics=["BLEU", "ROUGE-L", "CIDEr-D"], tokenizer="native"
    )
    expected.pop("per_item")
    assert printed == expected


@pytest.mark.parametrize(
    "predictions, references, message",
    [
        ({"a": "a dog", "b": "rain"}, {"a": ["a dog barks"]}, "p.json.*'b'"),
        ({"a": "a dog"}, {"a": ["a dog barks"], "c": ["rain falls"]}, "r.json.*'c'"),
        ({"a": ["a dog"]}, {"a": ["a dog barks"]}, "p.json.*id 'a'.*list"),
        ({"a": "a dog"}, {"a": "a dog barks"}, "r.json.*id 'a'.*list"),
        ({"a": "a dog"}, {"a": ["a dog barks", 7]}, "r.json.*id 'a'.*int"),
        ('{"a": "a dog",', {"a": ["a dog barks"]}, "p.json.*not valid JSON.*line 1"),
    ],
)
def test_score_command_names_the_file_and_id_on_bad_input(tmp_path, capsys, predictions, references, message):
    code = _score(tmp_path, predictions, references, "--metrics", "BLEU", "--tokenizer", "native")
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("slit score: ") and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_score_command_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    code = slit_main(["score", "--predictions", str(missing), "--references", _write(tmp_path, "r.json", {})])
    assert code == 2 and "nope.json" in capsys.readouterr().err


def test_constant_caption_baseline_is_the_best_training_caption_scored_by_pycocoevalcap():
    rng = np.random.default_rng(3)
    words = ["dog", "barks", "loudly", "a", "car", "passes", "rain", "falls", "softly", "bird", "sings"]
    # The consensus caption is in half of the clips' references (an n-gram in all of them has idf 0).
    common = "a dog barks loudly"

    def refs(i: int, n: int) -> list[str]:
        return ([common] if i % 2 else []) + [" ".join(rng.choice(words, 5)) for _ in range(n)]

    train = [refs(i, 3) for i in range(40)]
    test = {f"t{i}": refs(i, 2) for i in range(10)}
    base = captioning.constant_caption_baseline(
        train, test, tokenizer="native", num_candidates=20, num_selection_clips=20
    )
    assert base["num_candidates"] == 20 and base["num_selection_clips"] == 20
    assert base["caption"] == common
    gts = {k: [captioning.native_ptb_tokenize(c) for c in refs] for k, refs in test.items()}
    expected, _ = Cider().compute_score(gts, {k: [captioning.native_ptb_tokenize(common)] for k in test})
    assert base["CIDEr-D"] == pytest.approx(expected, abs=1e-12)
    assert captioning.constant_caption_baseline([["only one clip"]], test) == {}
