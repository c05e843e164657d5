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

Question types whose reference answers average TRANSCRIPT_WORDS words or more ("what is said?") are
also scored by word error rate (jiwer, on the normalised forms), next to the WER of the type's majority
training answer; an empty answer's WER is 100%.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping, Sequence

from slit.data.pipeline import example_texts
from slit.errors import UserError

YES_NO, OPEN = "yes/no", "open"
_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
_UNITS += "sixteen seventeen eighteen nineteen"
_NUMBER_WORDS = {word: n for n, word in enumerate(_UNITS.split())}
_TENS_WORDS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_TENS = {word: 10 * n for n, word in enumerate(_TENS_WORDS, start=2)}
_ARTICLES = {"a", "an", "the"}
TRANSCRIPT_WORDS = 3.0
"""A question type whose references average this many words or more is also scored by word error rate."""
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


def answer_kind(answer: str) -> str:
    """ "yes/no" when the answer normalises to yes or no, else "open" (for questions without a type)."""
    return YES_NO if normalize_answer(answer) in ("yes", "no") else OPEN


def majority_baseline(
    train: Sequence[Mapping], references: Mapping[str, str], types: Mapping[str, str] | None
) -> dict | None:
    """Accuracy of always giving the most common training answer of each question type (overall and
    per type, "by_type"), and of one answer for all questions, on the evaluated questions.

    `train`: the training split's examples (questions, answers, maybe question_types); `references`:
    {id: answer} of the evaluated questions; `types`: {id: type}, or None when the data has no types:
    then a question's type is yes/no or open (`answer_kind`), for training and evaluated questions
    alike. None when the training split holds no answers."""
    import collections

    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    overall: collections.Counter = collections.Counter()
    for i in range(len(train)):
        ex = train[i]
        answers = example_texts(ex, "answers")
        qtypes = example_texts(ex, "question_types") if types else []
        for n, answer in enumerate(answers):
            qtype = qtypes[n] if n < len(qtypes) else answer_kind(answer)
            by_type[qtype][normalize_answer(answer)] += 1
            overall[normalize_answer(answer)] += 1
    if not overall or not references:
        return None
    type_of = {k: (types[k] if types else answer_kind(references[k])) for k in references}
    top = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    one = overall.most_common(1)[0][0]
    per_type = {k: top.get(type_of[k]) == normalize_answer(references[k]) for k in references}
    single = [one == normalize_answer(references[k]) for k in references]
    hits_by_type: dict[str, list[bool]] = collections.defaultdict(list)
    for k, hit in per_type.items():
        hits_by_type[type_of[k]].append(hit)
    return {
        "per_question_type_accuracy": sum(per_type.values()) / len(per_type),
        "by_type": {t: sum(h) / len(h) for t, h in sorted(hits_by_type.items())},
        "single_answer_accuracy": sum(single) / len(single),
        "single_answer": one,
        "answers_per_type": top,
    }


def qa_report(
    predictions: dict[str, str],
    references: dict[str, str],
    questions: dict[str, str],
    types: dict[str, str] | None,
    train: Sequence[Mapping] | None,
) -> dict:
    """`aqa_accuracy` of the predictions, with the majority baseline from the `train` examples (when
    given and answerable) and the first 10 (question, answer, predicted) examples."""
    metrics = aqa_accuracy(predictions, references, types or None)
    baseline = majority_baseline(train, references, types or None) if train is not None else None
    if baseline is not None:
        metrics["majority_baseline"] = baseline
    if types:
        wer = word_error_rates(predictions, references, types, (baseline or {}).get("answers_per_type", {}))
        if wer:
            metrics["wer_by_type"] = wer
    metrics["examples"] = {
        k: {"question": questions[k], "answer": references[k], "predicted": predictions[k]}
        for k in list(predictions)[:10]
    }
    metrics["predictions"] = dict(predictions)
    return metrics


def word_error_rates(
    predictions: Mapping[str, str],
    references: Mapping[str, str],
    types: Mapping[str, str],
    majority: Mapping[str, str],
) -> dict[str, dict]:
    """Word error rate per question type whose references average TRANSCRIPT_WORDS words or more:
    {type: {"wer", "num_items", "majority_answer_wer" (when the type has a majority training answer)}},
    over the normalised answers (`normalize_answer`); WER sums the edits over all items of the type and
    divides by the reference words (jiwer's corpus WER)."""
    import jiwer

    out = {}
    for qtype in sorted(set(types.values())):
        keys = [k for k in references if types.get(k) == qtype]
        refs = [normalize_answer(references[k]) for k in keys]
        if not keys or sum(len(r.split()) for r in refs) / len(refs) < TRANSCRIPT_WORDS:
            continue
        kept = [(r, normalize_answer(predictions.get(k, ""))) for r, k in zip(refs, keys, strict=True) if r]
        refs, preds = [r for r, _ in kept], [p for _, p in kept]
        entry = {"wer": jiwer.wer(refs, preds), "num_items": len(refs)}
        if qtype in majority:
            entry["majority_answer_wer"] = jiwer.wer(refs, [majority[qtype]] * len(refs))
        out[qtype] = entry
    return out
