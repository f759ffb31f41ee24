"""Vocabulary and tokenising: captions <-> token ids, and display text."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from nltk.tokenize import TreebankWordTokenizer

PAD, START, END, UNK = 0, 1, 2, 3
# Never generated: padding, a second <start>, and <unk> (a caption saying "<unk>" helps nobody).
NEVER_GENERATED = (PAD, START, UNK)
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
TOKENIZER_NAME = "treebank-lowercase-words"

_treebank = TreebankWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lowercased Treebank words, punctuation dropped: the PTB-tokenised metrics ignore it, and
    `detokenize` puts the full stop back for display."""
    return [w for w in _treebank.tokenize(text.lower()) if any(c.isalnum() for c in w)]


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:%)]|'s\b|n't\b|'re\b|'ll\b|'ve\b|'m\b|'d\b)")


def detokenize(words: Sequence[str]) -> str:
    """['a', 'dog', "'s", 'ball'] -> "A dog's ball." """
    if not words:
        return ""
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(words))
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


# The article goes by the sound, not the letter: "an hour", "a uniform", "a one-way street".
_VOWEL_SOUND_EXCEPTIONS = {"hour", "hours", "honest", "heir", "honor", "honour"}
_CONSONANT_SOUND_EXCEPTIONS = {"one", "once", "uniform", "uniforms", "unicycle", "unicorn", "union", "unique",
                               "unit", "united", "university", "use", "used", "user", "usual", "utensil",
                               "utensils", "ufo", "european", "ewe", "eucalyptus"}
NUMBER_WORDS = {"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many"}
_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people", "foot": "feet",
                      "mouse": "mice", "goose": "geese", "tooth": "teeth", "sheep": "sheep", "deer": "deer"}


def plural(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "x", "z", "ch", "sh")) else "s")


def agree(words: Sequence[str], known: Iterable[str] = ()) -> list[str]:
    """The sentence guard: articles agree with the sound of the next word ("an elephant", "a
    uniform"), and a singular noun after a number becomes plural ("two zebra" -> "two zebras")
    where the plural is a `known` word (the vocabulary's)."""
    known = set(known)
    out = list(words)
    for i, word in enumerate(out[:-1]):
        following = out[i + 1]
        if word in ("a", "an"):
            vowel = (following[0] in "aeiou" and following not in _CONSONANT_SOUND_EXCEPTIONS
                     or following in _VOWEL_SOUND_EXCEPTIONS)
            out[i] = "an" if vowel else "a"
        elif word in NUMBER_WORDS:
            many = plural(following)
            after = out[i + 2] if i + 2 < len(out) else ""
            # "two black dogs": the noun comes later, `following` describes it
            described = after.endswith("s") and after not in ("is", "was", "has", "his", "this", "its")
            if many != following and many in known and following in known and not described:
                out[i + 1] = many
    return out


class Vocabulary:
    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tuple(words[:4])}")
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate words")

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_size: int | None = None) -> "Vocabulary":
        counts = Counter(w for c in captions for w in tokenize(c))
        # Most frequent first, ties alphabetical, so the same data always gives the same ids.
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """<start> w1 ... wn <end>, unknown words as <unk>."""
        return [START] + [self.stoi.get(w, UNK) for w in tokenize(text)] + [END]

    def words(self, ids: Iterable[int]) -> list[str]:
        """The words up to the first <end>, specials dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == END:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
            elif i == UNK:
                out.append("<unk>")
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.words(ids))

    def sentence(self, words: Sequence[str]) -> tuple[list[str], str]:
        """Words of a caption -> (the words made to agree, the display sentence): what every
        caption a user or a metric sees goes through."""
        agreed = agree(words, self.stoi)
        return agreed, detokenize(agreed)

    def to_dict(self) -> dict:
        return {"tokenizer": TOKENIZER_NAME, "words": self.itos}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read vocabulary ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError(f"{path}: expected a JSON object with a 'words' list")
        if data.get("tokenizer", TOKENIZER_NAME) != TOKENIZER_NAME:
            raise ValueError(f"{path}: tokenizer {data['tokenizer']!r}, this version uses {TOKENIZER_NAME!r}")
        try:
            return cls(data["words"])
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
