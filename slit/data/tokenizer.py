"""Text tokenisation for the Q-Former: BERT-style [CLS] text [SEP], padded, plus a [DEC] token.

Three sources: a word-level tokenizer built from a known vocabulary (the built-in synthetic dataset,
no download needed) or from the words of the training captions (`training_vocabulary`), or a BERT
tokenizer directory (`tokenizer.json` or `vocab.txt`) to which [DEC] is added, as BLIP-2 does. Either
way the tokenizer is saved into the run's workdir, so evaluation and generation use exactly the
tokenizer the model was trained with.
"""

from __future__ import annotations

import collections
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from etils import epath
from tokenizers import models, pre_tokenizers, processors

from slit import paths

PAD, DEC, UNK, CLS, SEP, MASK = "[PAD]", "[DEC]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
TOKENIZER_FILE = "tokenizer.json"

_PUNCTUATION = re.compile(r"[^\w\s']")


def normalize_caption(text: str) -> str:
    """BLIP's caption processing: lowercase, punctuation to spaces, single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def word_level_tokenizer(vocabulary: Sequence[str]) -> tokenizers.Tokenizer:
    """A whitespace word-level tokenizer: [PAD]=0, then [DEC], [UNK], [CLS], [SEP], [MASK], then words."""
    words = sorted(set(vocabulary) - {PAD, DEC, UNK, CLS, SEP, MASK})
    vocab = {tok: i for i, tok in enumerate([PAD, DEC, UNK, CLS, SEP, MASK, *words])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.add_special_tokens([PAD, DEC, UNK, CLS, SEP, MASK])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])]
    )
    return tok


def training_vocabulary(captions: Iterable[str], min_count: int = 1) -> list[str]:
    """The words (after `normalize_caption`) that occur at least `min_count` times in `captions`."""
    counts = collections.Counter(word for caption in captions for word in normalize_caption(caption).split())
    return sorted(word for word, n in counts.items() if n >= min_count)


class TextTokenizer:
    """Encodes captions to fixed-length id arrays for the Q-Former."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        if tokenizer.token_to_id(DEC) is None:
            tokenizer.add_special_tokens([DEC])
        for token in (PAD, CLS, SEP):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer has no {token} token; a BERT-style vocabulary is needed")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id(PAD)
        self.dec_id = tokenizer.token_to_id(DEC)
        self.cls_id = tokenizer.token_to_id(CLS)
        self.sep_id = tokenizer.token_to_id(SEP)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        """Captions -> int32 (len(texts), max_length): [CLS] words [SEP] [PAD]...; long texts keep [SEP]."""
        out = np.full((len(texts), max_length), self.pad_id, np.int32)
        for i, encoding in enumerate(self.tokenizer.encode_batch([normalize_caption(t) for t in texts])):
            ids = encoding.ids
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [self.sep_id]
            out[i, : len(ids)] = ids
        return out

    def unknown_words(self, texts: Sequence[str]) -> tuple[float, collections.Counter]:
        """(the fraction of the texts' words that the vocabulary does not know (a word is unknown when
        any of its tokens is [UNK]), those words with their counts)."""
        unk = self.tokenizer.token_to_id(UNK)
        counts = collections.Counter(w for t in texts for w in normalize_caption(t).split())
        if unk is None or not counts:
            return 0.0, collections.Counter()
        words = list(counts)
        encodings = self.tokenizer.encode_batch(words, add_special_tokens=False)
        unknown = collections.Counter(
            {w: counts[w] for w, e in zip(words, encodings, strict=True) if unk in e.ids}
        )
        return sum(unknown.values()) / sum(counts.values()), unknown

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | pathlib.Path) -> epath.Path:
        """Writes `tokenizer.json` into `directory` (a local path or a URI such as gs://)."""
        path = paths.workdir_path(directory) / TOKENIZER_FILE
        path.write_text(self.tokenizer.to_str(pretty=True))
        return path

    @classmethod
    def from_directory(cls, directory: str | pathlib.Path) -> TextTokenizer:
        """Loads `tokenizer.json` (or a BERT `vocab.txt`) from a directory (a local path or a URI)."""
        directory = paths.workdir_path(directory)
        if (directory / TOKENIZER_FILE).is_file():
            return cls(tokenizers.Tokenizer.from_str((directory / TOKENIZER_FILE).read_text()))
        if (directory / "vocab.txt").is_file():
            with paths.local_copy(directory / "vocab.txt") as vocab:
                return cls(tokenizers.BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer)
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} or vocab.txt in {directory}; point to a tokenizer directory"
        )


CLIP_TOKENIZER_CLASS = "CLIPTokenizer"  # tokenizer_config.json's tokenizer_class that marks a CLIP one


class CLIPInstructionTokenizer:
    """CLIP's tokenizer with `TextTokenizer`'s interface, for a bridge whose prompt encoder is CLIP's text
    tower (Pengi): `<|startoftext|> text <|endoftext|>` padded with the pad id (`<|endoftext|>`), long
    texts keep their start and the end token (as CLIP's tokenizer truncates; `own_truncation`).

    Built from a directory with CLIP's `tokenizer.json` (and `tokenizer_config.json`), as
    `CLIPTokenizerFast.save_pretrained` writes; `save` writes both into a run's workdir.
    """

    own_truncation = True  # QFormerInstructionEncoder uses `encode` as it is

    def __init__(self, directory: str | pathlib.Path):
        from slit.models.text.clip import CLIPPromptTokenizer

        self.clip = CLIPPromptTokenizer(directory)
        self.tokenizer = self.clip.tokenizer
        self.pad_id = self.clip.pad_id
        self.cls_id, self.sep_id = self.clip.bos_id, self.clip.eos_id

    @property
    def vocab_size(self) -> int:
        return self.clip.vocab_size

    def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        """Texts -> int32 (len(texts), max_length) ids."""
        return self.clip.encode(list(texts), max_length)[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: str | pathlib.Path) -> epath.Path:
        """Writes `tokenizer.json` and `tokenizer_config.json` into `directory` (a local path or a URI)."""
        import json

        path = paths.workdir_path(directory) / TOKENIZER_FILE
        path.write_text(self.tokenizer.to_str(pretty=True))
        special = {
            "bos_token": self.tokenizer.id_to_token(self.clip.bos_id),
            "eos_token": self.tokenizer.id_to_token(self.clip.eos_id),
            "pad_token": self.tokenizer.id_to_token(self.clip.pad_id),
        }
        config = {"tokenizer_class": CLIP_TOKENIZER_CLASS, **special}
        path.with_name("tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return path


def is_clip_tokenizer(directory: str | pathlib.Path) -> bool:
    """Whether `directory` holds a CLIP tokenizer (tokenizer_config.json says CLIPTokenizer[Fast])."""
    import json

    path = paths.workdir_path(directory) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return False
    return str(config.get("tokenizer_class", "")).startswith(CLIP_TOKENIZER_CLASS)


def load_text_tokenizer(directory: str | pathlib.Path) -> TextTokenizer | CLIPInstructionTokenizer:
    """The bridge-side tokenizer saved in a run's workdir (or a tokenizer directory): CLIP's when the
    directory's tokenizer_config.json says so (a Pengi bridge with a CLIP prompt encoder), else the
    Q-Former's BERT-style one."""
    if is_clip_tokenizer(directory):
        # CLIP's tokenizer reads local files
        with paths.local_copy(directory, only=(TOKENIZER_FILE, "tokenizer_config.json")) as local:
            return CLIPInstructionTokenizer(local)
    return TextTokenizer.from_directory(directory)
