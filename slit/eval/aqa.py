"""Audio question answering accuracy with answer normalisation, split by yes/no and open questions.

Normalisation (`normalize_answer`), applied to predictions and references alike, in this order:
1. Unicode NFKC, lowercase;
2. apostrophes are dropped ("don't" -> "dont"); every other punctuation character becomes a space
   ("twenty-one" -> "twenty one"), except a period between digits ("3.5" stays);
3. the articles "a", "an", "the" are removed as words;
4. number words become digits: "zero".."nineteen", the tens "twenty".."ninety", and tens followed by a
   unit ("twenty one" -> "21");
5. whitespace is collapsed.

A prediction is correct when its normalised form equals the normalised form of any reference answer
(datasets such as ClothoAQA have several annotators per question). A question is yes/no when all its
reference answers normalise to "yes" or "no" (or when question_types says so); for those, a prediction
whose first word is "yes" or "no" is reduced to that word, so that "Yes, a dog barks." counts as "yes".
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping, Sequence

from slit.errors import UserError

YES_NO, OPEN = "yes/no", "open"
_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
_UNITS += "sixteen seventeen eighteen nineteen"
_NUMBER_WORDS = {word: n for n, word in enumerate(_UNITS.split())}
_TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_TENS = {word: 10 * n for n, word in enumerate(_TENS_WORDS, start=2)}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2013\u2014\u2026]")


def normalize_answer(answer: str) -> str:
    """The normalised answer (see the module docstring for the steps)."""
    text = unicodedata.normalize("NFKC", answer).lower()
    text = re.sub(r"['\u2018\u2019]", "", text)
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)  # keep decimal points
    text = _PUNCTUATION.sub(" ", text).replace("\0", ".")
    words = [w for w in text.split() if w not in _ARTICLES]
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in _TENS:
            value = _TENS[word]
            if i + 1 < len(words) and words[i + 1] in _NUMBER_WORDS and 0 < _NUMBER_WORDS[words[i + 1]] < 10:
                value += _NUMBER_WORDS[words[i + 1]]
                i += 1
            out.append(str(value))
        elif word in _NUMBER_WORDS:
            out.append(str(_NUMBER_WORDS[word]))
        else:
            out.append(word)
        i += 1
    return " ".join(out)


def _as_list(value: str | Sequence[str], key: str) -> list[str]:
    answers = [value] if isinstance(value, str) else list(value)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(
            f"references: the answer(s) for id {key!r} must be a string or a non-empty list of strings"
        )
    return answers


def aqa_accuracy(
    predictions: Mapping[str, str],
    references: Mapping[str, str | Sequence[str]],
    question_types: Mapping[str, str] | None = None,
) -> dict:
    """Accuracy overall and per question type.

    Args:
      predictions: {id: answer}.
      references: {id: answer or [answers]} (the same ids).
      question_types: optional {id: type}; ids not in it get "yes/no" or "open" from the references.

    Returns:
      {"accuracy", "num_items", "by_type": {type: {"accuracy", "num_items"}}, "correct": {id: bool}}.
    """
    missing = [k for k in references if k not in predictions] + [
        k for k in predictions if k not in references
    ]
    if missing:
        raise UserError(
            f"predictions and references must have the same ids; {len(missing)} differ, e.g. {missing[:5]}"
        )
    if not references:
        raise UserError("no questions to score")
    correct: dict[str, bool] = {}
    kinds: dict[str, str] = {}
    for key, value in references.items():
        answers = {normalize_answer(a) for a in _as_list(value, key)}
        kind = (question_types or {}).get(key) or (YES_NO if answers <= {"yes", "no"} else OPEN)
        predicted = normalize_answer(predictions[key])
        if kind == YES_NO and predicted.split()[:1] in (["yes"], ["no"]):
            predicted = predicted.split()[0]
        correct[key], kinds[key] = predicted in answers, kind
    by_type = {}
    for kind in sorted(set(kinds.values())):
        hits = [correct[k] for k in correct if kinds[k] == kind]
        by_type[kind] = {"accuracy": sum(hits) / len(hits), "num_items": len(hits)}
    return {
        "accuracy": sum(correct.values()) / len(correct),
        "num_items": len(correct),
        "by_type": by_type,
        "correct": correct,
    }
