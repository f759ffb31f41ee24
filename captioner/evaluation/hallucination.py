"""Object hallucination in the manner of CHAIR (Rohrbach et al., EMNLP 2018): which COCO objects a
caption names, and whether the image's reference captions name them too.

The table of objects and their words is the CHAIR synonyms file (one object a line: its name, then
the words that name it). Two-word names are matched before single words; plurals count as their
singular; a few compounds name something else ("toilet seat" is a toilet, "train tracks" no
train, "baby elephant" an elephant, not a person). Without segmentation masks, the objects the
references name are the ground truth:
- CHAIRi: object mentions that no reference names / all object mentions;
- CHAIRs: captions with at least one such mention / all captions;
- object recall: of the objects that at least `salient` of an image's references name, the share
  the caption names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..data.vocab import tokenize

IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "people", "geese": "goose",
             "mice": "mouse", "knives": "knife", "feet": "foot", "teeth": "tooth", "oxen": "ox",
             "sheep": "sheep", "buses": "bus", "glasses": "glass", "dishes": "dish", "benches": "bench",
             "couches": "couch", "boxes": "box", "skis": "ski", "ties": "tie", "scissors": "scissors",
             "wolves": "wolf", "calves": "calf", "leaves": "leaf", "shelves": "shelf"}
ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
# word pairs whose first word is an object word but which name another thing (or no COCO object)
COMPOUNDS = {"toilet seat": "toilet", "train track": None, "home plate": None, "hot dog stand": None,
             "passenger train": "train", "passenger jet": "airplane", "passenger plane": "airplane",
             **{f"{age} {animal}": animal for age in ("baby", "adult", "mother") for animal in ANIMALS}}


def singular(word: str) -> str:
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


@dataclass
class ObjectTable:
    """COCO objects by the words and two-word phrases that name them (singular forms)."""

    words: dict[str, str]

    @classmethod
    def load(cls, path: str | Path) -> "ObjectTable":
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ValueError(f"{path}: cannot read the object table ({err.strerror})") from err
        words: dict[str, str] = {}
        for n, line in enumerate(lines, 1):
            names = [w.strip().lower() for w in line.split(",") if w.strip()]
            if not names:
                continue
            if any(not all(part.isalpha() for part in w.split()) for w in names):
                raise ValueError(f"{path}:{n}: expected 'object, word, word, ...' of letters and spaces")
            for w in names:
                words.setdefault(" ".join(singular(part) for part in w.split()), names[0])
        if not words:
            raise ValueError(f"{path}: no objects")
        return cls(words)

    @property
    def objects(self) -> list[str]:
        return sorted(set(self.words.values()))

    def mentions(self, caption: str) -> list[str]:
        """The objects a caption names, one entry per mention, in order."""
        tokens = [singular(w) for w in tokenize(caption)]
        found, i = [], 0
        while i < len(tokens):
            pair = " ".join(tokens[i:i + 2]) if i + 1 < len(tokens) else None
            if pair in COMPOUNDS or pair in self.words:
                target = self.words.get(COMPOUNDS[pair]) if pair in COMPOUNDS else self.words[pair]
                if target is not None:
                    found.append(target)
                i += 2
                continue
            if tokens[i] in self.words:
                found.append(self.words[tokens[i]])
            i += 1
        return found


PERSON = "person"  # the CHAIR table's group for people


def reference_objects(table: ObjectTable, references: Sequence[str], salient: int = 3) -> tuple[set[str], set[str]]:
    """The objects any of an image's references name, and those at least `salient` of them name."""
    named_by = Counter(obj for ref in references for obj in set(table.mentions(ref)))
    return set(named_by), {obj for obj, n in named_by.items() if n >= salient}


def hallucination(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], table: ObjectTable,
                  salient: int = 3) -> dict:
    """CHAIRs, CHAIRi and object recall (percentages) of `predictions` against `references`, with the
    objects most often named but absent."""
    mentions = hallucinated = bad_captions = recalled = salient_total = 0
    invented: Counter = Counter()
    for key, caption in predictions.items():
        present, wanted = reference_objects(table, references[key], salient)
        named = table.mentions(caption)
        absent = [obj for obj in named if obj not in present]
        mentions += len(named)
        hallucinated += len(absent)
        bad_captions += bool(absent)
        invented.update(absent)
        salient_total += len(wanted)
        recalled += len(wanted & set(named))
    return {
        "CHAIRs": 100 * bad_captions / max(1, len(predictions)),
        "CHAIRi": 100 * hallucinated / max(1, mentions),
        "object_recall": 100 * recalled / max(1, salient_total),
        "object_mentions": mentions,
        "most_invented": invented.most_common(5),
    }


def names_person(table: ObjectTable, references: Sequence[str]) -> bool:
    """Whether any of an image's references names a person: what sets photos with people apart."""
    return PERSON in reference_objects(table, references)[0]


def by_person(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], table: ObjectTable,
              salient: int = 3) -> dict:
    """`hallucination` of the photos with a person and of those without, apart (each with its
    `photos`); for those without, also `person_invented`: how many of them a caption names one in."""
    groups: dict[str, dict[str, str]] = {"with_person": {}, "without_person": {}}
    for key, caption in predictions.items():
        groups["with_person" if names_person(table, references[key]) else "without_person"][key] = caption
    split = {}
    for group, picked in groups.items():
        if picked:
            split[group] = {"photos": len(picked), **hallucination(picked, references, table, salient)}
    if "without_person" in split:
        split["without_person"]["person_invented"] = sum(PERSON in table.mentions(caption)
                                                         for caption in groups["without_person"].values())
    return split
