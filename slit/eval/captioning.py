"""Captioning metrics as the field reports them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr.

The numbers equal pycocoevalcap's (the coco-caption code that DCASE and the AudioCaps/Clotho papers use)
on the same inputs. What runs where:

- **Tokenisation** (PTB-style, lowercased, punctuation tokens removed, as coco-caption does):
  Stanford's PTBTokenizer from the jar that pycocoevalcap ships, when Java is on PATH (one JVM start,
  ~1 s; identical to pycocoevalcap by construction). Without Java, `native_ptb_tokenize`, a Python
  re-implementation that agrees with the Java tokenizer on ordinary captions (contractions, possessives,
  quotes, brackets, hyphens, numbers, abbreviations; see tests/test_caption_metrics.py) but is not
  guaranteed identical on exotic text. The report says which one ran.
- **BLEU-1..4, ROUGE-L, CIDEr-D**: computed natively in Python (no Java, milliseconds), re-implemented
  from the definitions with coco-caption's conventions (BLEU: corpus-level, "closest" reference length,
  its smoothing constants; ROUGE-L: beta 1.2, best precision and recall over references; CIDEr-D: n=1..4,
  sigma 6, clipped tf-idf, idf from the evaluated references, x10).
- **METEOR**: delegated to METEOR 1.5 (the jar in pycocoevalcap, through pycocoevalcap's own wrapper):
  it needs the jar's paraphrase tables and WordNet stemming, which are not worth re-implementing. One JVM
  per `CaptionScorer`, reused across calls (start-up loads the paraphrase table: seconds).
- **SPICE**: delegated to pycocoevalcap's spice-1.0.jar, which needs the Stanford CoreNLP 3.6.0 jars.
  Those are not installable offline; when they are absent SPICE and SPIDEr are reported as unavailable,
  with the reason, never as 0. SPIDEr = (CIDEr-D + SPICE) / 2.

If Java is absent, METEOR and SPICE are reported unavailable with the reason.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import pathlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from slit.errors import UserError

ALL_METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "SPIDEr")
# Tokens that coco-caption removes after PTB tokenisation (pycocoevalcap/tokenizer/ptbtokenizer.py). The
# bracket names are upper case there while the tokenizer lowercases, so "-lrb-" and friends survive.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
JAVA = "java"
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


# ----------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE = str.maketrans(
    {
        "\u201c": " `` ",
        "\u201d": " '' ",
        "\u2018": "'",
        "\u2019": "'",
        "\u2014": " -- ",
        "\u2013": " -- ",
        "\u2026": " ... ",
    }
)
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof vs etc approx inc ltd co corp dept est fig gen gov hon lt mt rev sgt capt "
    "col jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "wanna": ["wan", "na"],
    "gotta": ["got", "ta"],
    "lemme": ["lem", "me"],
    "gimme": ["gim", "me"],
    "'tis": ["'t", "is"],
    "'twas": ["'t", "was"],
}
_CONTRACTION = re.compile(r"^(.*[^\W_])('s|'re|'ve|'ll|'d|'m|n't)$", re.IGNORECASE)
_ACRONYM_AMPERSAND = re.compile(r"[A-Z]+&[A-Z]+")
_ABBREVIATION_DOTS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")
# The pieces of one whitespace-free chunk: ellipses, PTB quotes, contractions that start with a quote,
# runs of !/?, dashes, symbols that always stand alone, and words (letters/digits joined by inner
# - ' / . @, by , or : before a digit, and by &), which may end in one dot.
_PIECE = re.compile(
    r"""
      \.\.\.+ | `` | ''
    | '(?i:tis|twas)\b | '\d\ds\b | 'n' | \.\d+
    | </?[^\W_][^<>]*> | [!?]+ | --+ | \#+
    | [(){}\[\]";$%*+=|\\<>^~`]
    | @?[^\W_](?:[^\W_]|[-'/.@](?=[^\W_])|[,:](?=\d)|&(?=[^\W_]))*(?:\.(?!\.))?
    | '+ | [-,:.&@_]
    """,
    re.VERBOSE,
)


def _split_word(word: str) -> list[str]:
    lower = word.lower()
    if lower in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[lower])
    if "&" in word and not _ACRONYM_AMPERSAND.fullmatch(word.rstrip(".")):
        parts = word.split("&")
        return [t for i, part in enumerate(parts) for t in ([*(["&"] if i else []), *_split_word(part)])]
    if word.endswith(".") and len(word) > 1:
        core = word[:-1]
        if not (core.lower() in _ABBREVIATIONS or _ABBREVIATION_DOTS.fullmatch(core)):
            return [*_split_word(core), "."]
        return [word]
    match = _CONTRACTION.match(word)
    if match:
        return [*_split_word(match.group(1)), match.group(2)]
    return [word] if word else []


def _tokens(caption: str) -> list[str]:
    out: list[str] = []
    for chunk in caption.translate(_UNICODE).split():
        pieces = _PIECE.findall(chunk)
        for i, piece in enumerate(pieces):
            if piece == '"':
                out.append("``" if i == 0 else "''")
            elif piece in _BRACKETS:
                out.append(_BRACKETS[piece])
            elif piece.lower() in _SPLIT_WORDS:
                out.extend(_SPLIT_WORDS[piece.lower()])
            elif piece[0] == "'" and piece not in ("''", "'n'") and not re.fullmatch(r"'\d\ds", piece):
                out.append("`" if i == 0 and len(pieces) > 1 else "'")
            elif piece[0].isalnum() or piece[0] == "@":
                out.extend(_split_word(piece))
            else:
                out.append(piece)
    return [t.lower() for t in out]


def native_ptb_tokenize(caption: str) -> str:
    """PTB-style tokenisation in Python, as coco-caption applies it: lowercase, split off punctuation,
    contractions ("isn't" -> "is n't") and possessives ("dog's" -> "dog 's"), then drop punctuation tokens.

    Returns the tokens joined by single spaces.
    """
    return " ".join(t for t in _tokens(caption) if t not in PTB_PUNCTUATION)


def _pycocoevalcap_dir() -> pathlib.Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def java_missing_reason() -> str | None:
    """Why the Java-based tools cannot run (None when they can). They run `java` from PATH, as
    pycocoevalcap's METEOR wrapper does."""
    if shutil.which(JAVA) is None:
        return (
            "Java (the `java` command) is not on PATH; install a Java runtime "
            "(e.g. apt-get install openjdk-17-jre-headless)"
        )
    if _pycocoevalcap_dir() is None:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    return None


_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def java_ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Stanford PTBTokenizer 3.4.1 (the jar in pycocoevalcap) with coco-caption's options and punctuation
    removal; one JVM for all captions. Line breaks inside a caption become spaces (pycocoevalcap replaces
    only '\\n', so a caption holding '\\r' would misalign its output there)."""
    reason = java_missing_reason()
    if reason:
        raise UserError(f"cannot run the Java PTB tokenizer: {reason}")
    jar = _pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    text = "\n".join(c.translate(_LINE_BREAKS) for c in captions)
    command = [JAVA, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    result = subprocess.run(command, input=text.encode(), capture_output=True, check=False)
    lines = result.stdout.decode().split("\n")
    if result.returncode != 0 or len(lines) < len(captions):
        raise RuntimeError(
            f"the PTB tokenizer ({jar}) failed with exit code {result.returncode} and {len(lines)} lines "
            f"for {len(captions)} captions: {result.stderr.decode()[-2000:]}"
        )
    return [
        " ".join(t for t in line.rstrip().split(" ") if t not in PTB_PUNCTUATION)
        for line in lines[: len(captions)]
    ]


def ptb_tokenize(captions: Sequence[str], tokenizer: str = "auto") -> tuple[list[str], str]:
    """Tokenises captions; returns (tokenised captions, the name of the tokenizer that ran).

    tokenizer: "java" (Stanford PTBTokenizer, exact coco-caption), "native" (Python), or "auto" (java when
    Java and pycocoevalcap are available, else native).
    """
    if tokenizer not in ("auto", "java", "native"):
        raise UserError(f"tokenizer={tokenizer!r} is not known; choose auto, java or native")
    if tokenizer == "java" or (tokenizer == "auto" and java_missing_reason() is None):
        return java_ptb_tokenize(captions), "stanford-ptb-3.4.1"
    return [native_ptb_tokenize(c) for c in captions], "native-ptb"


# ----------------------------------------------------------------------------------------------------
# Native metrics on tokenised text (one hypothesis and a list of references per item)
# ----------------------------------------------------------------------------------------------------


def _ngram_counts(words: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(
        tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as coco-caption computes it: clipped n-gram counts summed over the corpus, the
    reference length closest to each hypothesis (shorter on ties), brevity penalty on the totals, and the
    constants 1e-15 / 1e-9 that keep empty counts finite. Returns [BLEU-1, ..., BLEU-n]."""
    tiny, small = 1e-15, 1e-9
    total_test = total_ref = 0
    guess, correct = [0] * n, [0] * n
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        words = hypothesis.split()
        max_ref_counts: dict[tuple, int] = {}
        ref_lengths = []
        for ref in refs:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            for gram, count in _ngram_counts(ref_words, n).items():
                max_ref_counts[gram] = max(max_ref_counts.get(gram, 0), count)
        test_length = len(words)
        total_test += test_length
        total_ref += min((abs(length - test_length), length) for length in ref_lengths)[1]
        for k in range(n):
            guess[k] += max(0, test_length - k)
        for gram, count in _ngram_counts(words, n).items():
            correct[len(gram) - 1] += min(max_ref_counts.get(gram, 0), count)
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> np.ndarray:
    """ROUGE-L per item (coco-caption): LCS F-measure from the best precision and the best recall over the
    references, beta = 1.2. Tokens are split on single spaces, as coco-caption does. Returns (items,)."""
    scores = []
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        candidate = hypothesis.split(" ")
        precision, recall = [], []
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, candidate)
            precision.append(lcs / float(len(candidate)))
            recall.append(lcs / float(len(ref_tokens)))
        p, r = max(precision), max(recall)
        scores.append((1 + beta**2) * p * r / float(r + beta**2 * p) if p != 0 and r != 0 else 0.0)
    return np.array(scores)


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> np.ndarray:
    """CIDEr-D per item, as coco-caption's Cider computes it (its CIDEr is the -D variant).

    tf-idf vectors of 1..n-grams, idf = log(items) - log(max(1, number of items whose references contain
    the n-gram)); per n: sum over references of clipped cosine similarity min(h, r)*r / (|h| |r|) times a
    Gaussian length penalty exp(-delta^2 / (2 sigma^2)); averaged over n and references, times 10. As in
    coco-caption, delta is the difference in bigram counts. Returns (items,).
    """
    hyp_counts = [_ngram_counts(h.split(), n) for h in hypotheses]
    ref_counts = [[_ngram_counts(r.split(), n) for r in refs] for refs in references]
    document_frequency: collections.Counter = collections.Counter()
    for refs in ref_counts:
        document_frequency.update({gram for counts in refs for gram in counts})
    log_items = np.log(float(len(ref_counts)))

    def vectors(counts: collections.Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_items - np.log(max(1.0, document_frequency[gram])))
            norm[k] += pow(vec[k][gram], 2)
            if k == 1:
                bigrams += tf
        return vec, [np.sqrt(x) for x in norm], bigrams

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts, strict=True):
        vec_h, norm_h, length_h = vectors(hyp)
        total = np.zeros(n)
        for ref in refs:
            vec_r, norm_r, length_r = vectors(ref)
            delta = float(length_h - length_r)
            val = np.zeros(n)
            for k in range(n):
                for gram, weight in vec_h[k].items():
                    ref_weight = vec_r[k].get(gram, 0.0)
                    val[k] += min(weight, ref_weight) * ref_weight
                if norm_h[k] != 0 and norm_r[k] != 0:
                    val[k] /= norm_h[k] * norm_r[k]
                val[k] *= np.e ** (-(delta**2) / (2 * sigma**2))
            total += val
        scores.append(np.mean(total) / len(refs) * 10.0)
    return np.array(scores)


# ----------------------------------------------------------------------------------------------------
# Java-backed metrics
# ----------------------------------------------------------------------------------------------------


class MeteorLike(Protocol):
    """pycocoevalcap's Meteor interface: compute_score({id: [refs]}, {id: [hyp]}) -> (corpus, per item)."""

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list]: ...


def spice_missing_reason(corenlp_dir: str | pathlib.Path | None = None) -> str | None:
    """Why SPICE cannot run (None when it can)."""
    reason = java_missing_reason()
    if reason:
        return reason
    lib = pathlib.Path(corenlp_dir) if corenlp_dir else _pycocoevalcap_dir() / "spice" / "lib"
    missing = [name for name in CORENLP_JARS if not (lib / name).is_file()]
    if missing:
        return (
            f"SPICE needs the Stanford CoreNLP 3.6.0 jars; missing from {lib}: {', '.join(missing)}. Copy "
            f"{' and '.join(CORENLP_JARS)} there (from stanford-corenlp-full-2015-12-09.zip) or point "
            "corenlp_dir / --corenlp-dir at the folder that holds them"
        )
    return None


def run_spice(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    corenlp_dir: str | pathlib.Path | None = None,
    max_memory: str = "8G",
) -> np.ndarray:
    """SPICE F-scores per item from pycocoevalcap's spice-1.0.jar (tokenised inputs, as coco-caption
    feeds it). Items SPICE cannot score are NaN, as in pycocoevalcap. Returns (items,)."""
    reason = spice_missing_reason(corenlp_dir)
    if reason:
        raise UserError(reason)
    spice_dir = _pycocoevalcap_dir() / "spice"
    classpath = [str(spice_dir / "spice-1.0.jar")]
    if corenlp_dir:
        classpath += [str(pathlib.Path(corenlp_dir) / name) for name in CORENLP_JARS]
    items = [
        {"image_id": i, "test": h, "refs": list(r)}
        for i, (h, r) in enumerate(zip(hypotheses, references, strict=True))
    ]
    with tempfile.TemporaryDirectory(prefix="slit-spice-") as tmp:
        in_file, out_file = pathlib.Path(tmp) / "in.json", pathlib.Path(tmp) / "out.json"
        in_file.write_text(json.dumps(items))
        command = [JAVA, f"-Xmx{max_memory}", "-cp", ":".join(classpath), "edu.anu.spice.SpiceScorer"]
        command += [str(in_file), "-out", str(out_file), "-subset", "-silent"]
        result = subprocess.run(command, capture_output=True, cwd=spice_dir, check=False)
        if result.returncode != 0 or not out_file.is_file():
            raise RuntimeError(
                f"SPICE failed (exit code {result.returncode}): {result.stderr.decode()[-2000:]}"
            )
        return spice_scores_from_output(json.loads(out_file.read_text()), len(items))


def spice_scores_from_output(results: list[dict], num_items: int) -> np.ndarray:
    """Per-item SPICE F-score from spice-1.0.jar's output JSON ([{"image_id", "scores": {"All": {"f"}}}]);
    missing or non-numeric scores become NaN. Returns (num_items,)."""
    scores = np.full(num_items, np.nan)
    for item in results:
        try:
            scores[int(item["image_id"])] = float(item["scores"]["All"]["f"])
        except (TypeError, ValueError, KeyError):
            pass
    return scores


# ----------------------------------------------------------------------------------------------------
# Inputs and the scorer
# ----------------------------------------------------------------------------------------------------


def check_captions(
    predictions: Mapping[str, Any],
    references: Mapping[str, Any],
    predictions_name: str = "predictions",
    references_name: str = "references",
) -> None:
    """Raises UserError naming the id and the file when predictions ({id: caption}) and references
    ({id: [captions]}) do not fit together."""
    for name, value in ((predictions_name, predictions), (references_name, references)):
        if not isinstance(value, Mapping):
            raise UserError(f"{name}: expected a JSON object {{id: ...}}, got {type(value).__name__}")
    if not predictions:
        raise UserError(f"{predictions_name}: no predictions to score")
    missing_refs = [k for k in predictions if k not in references]
    missing_preds = [k for k in references if k not in predictions]
    if missing_refs:
        raise UserError(
            f"{len(missing_refs)} id(s) of {predictions_name} have no references in {references_name}, e.g. "
            f"{', '.join(map(repr, missing_refs[:5]))}; score the same ids on both sides"
        )
    if missing_preds:
        raise UserError(
            f"{len(missing_preds)} id(s) of {references_name} have no prediction in {predictions_name}, e.g. "
            f"{', '.join(map(repr, missing_preds[:5]))}; score the same ids on both sides"
        )
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise UserError(
                f"{predictions_name}: the prediction for id {key!r} is {type(caption).__name__} "
                f"({str(caption)[:80]}); expected one caption string"
            )
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise UserError(
                f"{references_name}: the references for id {key!r} must be a non-empty list of caption "
                "strings, "
                f"got {type(refs).__name__}"
            )
        for caption in refs:
            if not isinstance(caption, str):
                raise UserError(
                    f"{references_name}: a reference for id {key!r} is {type(caption).__name__} "
                    f"({str(caption)[:80]}); expected caption strings"
                )


def _normalise_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    by_lower = {m.lower(): m for m in ALL_METRICS}
    chosen = []
    for m in metrics:
        if m.lower() not in by_lower:
            raise UserError(f"metric {m!r} is not known; choose from {', '.join(ALL_METRICS)}")
        chosen.append(by_lower[m.lower()])
    return tuple(m for m in ALL_METRICS if m in chosen)


class CaptionScorer:
    """Scores captions; keeps the METEOR JVM alive between calls (its start-up takes seconds).

    Use as a context manager, or call close(). `meteor` may be an already started pycocoevalcap Meteor
    (or anything with its compute_score) to share one JVM.
    """

    def __init__(
        self,
        metrics: Iterable[str] = ALL_METRICS,
        tokenizer: str = "auto",
        corenlp_dir: str | pathlib.Path | None = None,
        meteor: MeteorLike | None = None,
    ) -> None:
        self.metrics = _normalise_metrics(metrics)
        self.tokenizer, self.corenlp_dir = tokenizer, corenlp_dir
        self._meteor, self._owns_meteor = meteor, meteor is None

    def _meteor_scorer(self) -> MeteorLike:
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self._meteor

    def _meteor_score(self, gts: dict, res: dict) -> float:
        try:
            return float(self._meteor_scorer().compute_score(gts, res)[0])
        except Exception as e:  # the JVM died or never started: say why
            process = getattr(self._meteor, "meteor_p", None)
            stderr = process.stderr.read().decode()[-1000:] if process and process.poll() is not None else ""
            self.close()
            raise RuntimeError(f"METEOR failed: {e!r} {stderr}") from e

    def score(self, predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
        """Scores {id: caption} against {id: [captions]} (the same ids).

        Returns {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "SPIDEr": float or None,
        "unavailable": {metric: reason}, "per_item": {"CIDEr-D": {id: score}, ...}, "num_items",
        "tokenizer"}; a metric that could not run is None with its reason under "unavailable".
        """
        check_captions(predictions, references)
        ids = list(predictions)
        flat = [predictions[i] for i in ids] + [c for i in ids for c in references[i]]
        tokenised, tokenizer_name = ptb_tokenize(flat, self.tokenizer)
        hyps, cursor, refs = tokenised[: len(ids)], len(ids), []
        for i in ids:
            refs.append(tokenised[cursor : cursor + len(references[i])])
            cursor += len(references[i])

        out: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        per_item: dict[str, dict] = {}
        if "BLEU" in self.metrics:
            for k, value in enumerate(bleu(hyps, refs), start=1):
                out[f"BLEU-{k}"] = value
        if "METEOR" in self.metrics:
            reason = java_missing_reason() if self._meteor is None else None
            if not reason:
                gts = {i: refs[n] for n, i in enumerate(ids)}
                res = {i: [hyps[n]] for n, i in enumerate(ids)}
                try:
                    out["METEOR"] = self._meteor_score(gts, res)
                except RuntimeError as e:  # a failed JVM costs this metric, not the whole eval
                    reason = str(e)
            if reason:
                out["METEOR"], unavailable["METEOR"] = None, reason
        if "ROUGE-L" in self.metrics:
            out["ROUGE-L"] = float(np.mean(rouge_l(hyps, refs)))
        cider = None
        if "CIDEr-D" in self.metrics or "SPIDEr" in self.metrics:
            cider = cider_d(hyps, refs)
            if "CIDEr-D" in self.metrics:
                out["CIDEr-D"] = float(np.mean(cider))
                per_item["CIDEr-D"] = dict(zip(ids, cider.tolist(), strict=True))
        if "SPICE" in self.metrics or "SPIDEr" in self.metrics:
            reason, spice = spice_missing_reason(self.corenlp_dir), None
            if not reason:
                try:
                    spice = run_spice(hyps, refs, self.corenlp_dir)
                except RuntimeError as e:  # e.g. the JVM could not get its 8 GB heap
                    reason = str(e)
            if "SPICE" in self.metrics:
                out["SPICE"] = None if spice is None else float(np.mean(spice))
                if spice is None:
                    unavailable["SPICE"] = reason
                else:
                    per_item["SPICE"] = dict(zip(ids, spice.tolist(), strict=True))
            if "SPIDEr" in self.metrics:
                out["SPIDEr"] = None if spice is None else float((np.mean(cider) + np.mean(spice)) / 2)
                if spice is None:
                    unavailable["SPIDEr"] = (
                        f"SPIDEr = (CIDEr-D + SPICE) / 2 and SPICE is unavailable: {reason}"
                    )
                else:
                    per_item["SPIDEr"] = dict(zip(ids, ((cider + spice) / 2).tolist(), strict=True))
        return {
            **out,
            "unavailable": unavailable,
            "per_item": per_item,
            "num_items": len(ids),
            "tokenizer": tokenizer_name,
        }

    def close(self) -> None:
        """Stops the METEOR JVM this scorer started."""
        if self._owns_meteor and self._meteor is not None:
            meteor, self._meteor = self._meteor, None
            process = getattr(meteor, "meteor_p", None)
            if process is not None and process.poll() is None:
                process.stdin.close()
                process.kill()
                process.wait()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_captions(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], **scorer_args: Any
) -> dict:
    """Scores captions once (starts and stops the JVMs); see CaptionScorer.score for the result."""
    with CaptionScorer(**scorer_args) as scorer:
        return scorer.score(predictions, references)


def constant_caption_baseline(
    train_captions: Sequence[Sequence[str]],
    references: Mapping[str, Sequence[str]],
    tokenizer: str = "auto",
    num_candidates: int = 64,
    num_selection_clips: int = 128,
    seed: int = 0,
) -> dict:
    """The audio-blind captioning baseline: one training caption given for every clip.

    The caption is chosen on the training split alone (`train_captions`: each training clip's captions,
    read only for the clips drawn): of `num_candidates` training captions (seeded draw), the one with
    the best mean CIDEr-D over `num_selection_clips` other training clips. It is then
    scored on `references` ({id: [captions]}, the evaluated clips) with the same tokenisation and CIDEr-D
    as the predictions. A captioner that does not beat it has not used the audio.

    Returns {"caption", "CIDEr-D", "num_candidates", "num_selection_clips"}; {} without enough training
    captions (fewer than two clips)."""
    rng = np.random.default_rng(seed)
    clips = []  # only the drawn clips are read (`train_captions` may read lazily)
    for i in rng.permutation(len(train_captions)):
        captions = list(train_captions[int(i)])
        if captions:
            clips.append(captions)
        if len(clips) == num_candidates + num_selection_clips:
            break
    if len(clips) < 2 or not references:
        return {}
    num_candidates = min(num_candidates, len(clips) // 2)
    candidates = [c[int(rng.integers(len(c)))] for c in clips[:num_candidates]]
    selection = clips[num_candidates:]
    ids = list(references)
    flat = candidates + [c for refs in selection for c in refs] + [c for i in ids for c in references[i]]
    tokens, _ = ptb_tokenize(flat, tokenizer)
    cursor = len(candidates)

    def take(groups: Sequence[Sequence[str]]) -> list[list[str]]:
        nonlocal cursor
        out = []
        for group in groups:
            out.append(tokens[cursor : cursor + len(group)])
            cursor += len(group)
        return out

    selection_refs, test_refs = take(selection), take([references[i] for i in ids])
    scores = [
        float(np.mean(cider_d([tokens[k]] * len(selection_refs), selection_refs)))
        for k in range(len(candidates))
    ]
    best = int(np.argmax(scores))
    return {
        "caption": candidates[best],
        "CIDEr-D": float(np.mean(cider_d([tokens[best]] * len(test_refs), test_refs))),
        "num_candidates": len(candidates),
        "num_selection_clips": len(selection_refs),
    }


CAPTION_TABLE_ORDER = (
    "BLEU-1",
    "BLEU-2",
    "BLEU-3",
    "BLEU-4",
    "METEOR",
    "ROUGE-L",
    "CIDEr-D",
    "SPICE",
    "SPIDEr",
)
