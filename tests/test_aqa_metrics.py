"""AQA accuracy: each normalisation rule, and accuracy split by question type against a direct count."""

import numpy as np
import pytest

from slit.errors import UserError
from slit.eval.aqa import aqa_accuracy, normalize_answer


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Yes.", "yes"),
        ("  NO!  ", "no"),
        ("A dog", "dog"),  # articles
        ("the sound of an engine", "sound of engine"),
        ("Three", "3"),  # number words
        ("twenty-one birds", "21 birds"),
        ("ninety nine", "99"),
        ("twenty", "20"),
        ("zero", "0"),
        ("3.5 seconds", "3.5 seconds"),  # decimal point kept
        ("end. Start", "end start"),
        ("don't know", "dont know"),  # apostrophes dropped
        ("“Quoted” answer—with dashes", "quoted answer with dashes"),
        ("ﬁve", "5"),  # NFKC: the ligature fi
        ("another", "another"),  # articles only as whole words
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_accuracy_split_by_yes_no_and_open():
    references = {
        "q1": "yes",
        "q2": ["no", "No", "no."],
        "q3": "yes",
        "q4": ["a dog", "dog", "dogs"],
        "q5": "three",
        "q6": "rain",
        "q7": "no",
    }
    predictions = {
        "q1": "Yes, a dog barks.",  # yes/no: first word decides -> correct
        "q2": "yes",  # wrong
        "q3": "yes",  # correct
        "q4": "The dog",  # correct (matches "dog")
        "q5": "3",  # correct (three -> 3)
        "q6": "wind",  # wrong
        "q7": "nope",  # wrong
    }
    report = aqa_accuracy(predictions, references)
    expected_correct = {"q1": True, "q2": False, "q3": True, "q4": True, "q5": True, "q6": False, "q7": False}
    assert report["correct"] == expected_correct
    assert report["accuracy"] == pytest.approx(4 / 7)
    assert report["by_type"] == {
        "open": {"accuracy": pytest.approx(2 / 3), "num_items": 3},
        "yes/no": {"accuracy": pytest.approx(2 / 4), "num_items": 4},
    }
    # "Yes, a dog barks." is not reduced to "yes" for an open question.
    assert not aqa_accuracy({"q": "Yes, a dog"}, {"q": "yes a dog barks"})["correct"]["q"]


def test_explicit_question_types_and_bad_input():
    report = aqa_accuracy({"a": "two", "b": "yes"}, {"a": "2", "b": "yes"}, {"a": "counting", "b": "binary"})
    assert set(report["by_type"]) == {"counting", "binary"} and report["accuracy"] == 1.0
    with pytest.raises(UserError, match="same ids"):
        aqa_accuracy({"a": "yes"}, {"b": "yes"})
    with pytest.raises(UserError, match="id 'a'"):
        aqa_accuracy({"a": "yes"}, {"a": [1]})


def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance by the textbook dynamic programme (NumPy table)."""
    table = np.zeros((len(ref) + 1, len(hyp) + 1), dtype=int)
    table[:, 0], table[0, :] = np.arange(len(ref) + 1), np.arange(len(hyp) + 1)
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            table[i, j] = min(
                table[i - 1, j] + 1, table[i, j - 1] + 1, table[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1])
            )
    return int(table[-1, -1])


def test_word_error_rate_of_transcript_questions_matches_edit_distance():
    from slit.eval import aqa

    references = {
        "a": "please hold while I try that extension",
        "b": "goodbye",
        "c": "the party you are calling is busy",
        "d": "yes",
    }
    predictions = {
        "a": "please hold while try the extension now",
        "b": "",
        "c": "party you are calling is busy",
        "d": "no",
    }
    types = {"a": "speech", "b": "speech", "c": "speech", "d": "presence"}
    wer = aqa.word_error_rates(predictions, references, types, {"speech": "goodbye", "presence": "yes"})
    assert set(wer) == {"speech"}  # "presence" answers are single words: accuracy only
    norm = {k: aqa.normalize_answer(v).split() for k, v in references.items()}
    hyp = {k: aqa.normalize_answer(v).split() for k, v in predictions.items()}
    keys = ("a", "b", "c")
    words = sum(len(norm[k]) for k in keys)
    expected = sum(_edit_distance(norm[k], hyp[k]) for k in keys) / words
    assert wer["speech"]["wer"] == pytest.approx(expected)
    majority = sum(_edit_distance(norm[k], ["goodbye"]) for k in keys) / words
    assert wer["speech"]["majority_answer_wer"] == pytest.approx(majority)
    assert wer["speech"]["num_items"] == 3
    report = aqa.qa_report(predictions, references, {k: "?" for k in references}, types, None)
    assert report["wer_by_type"]["speech"]["wer"] == pytest.approx(expected)
    assert report["predictions"] == predictions
