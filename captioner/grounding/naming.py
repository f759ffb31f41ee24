"""Naming the animal the encoder recognises. The caption data names few animals (no "cheetah",
"lion" or "polar bear" among the built-in model's words), so a decoder calls an animal it never
read about by one it did: a cheetah becomes "a dog", a polar bear "a white dog". The encoder's
ImageNet classifier knows 398 animals. Where it is sure of one (`PRESENT`) and gives the animal the
caption names next to nothing (`ABSENT`: the summed probability of every class that name covers,
"dog" covering all 118 dogs, from `imagenet_words.json`), the caption's animal takes
the classifier's everyday word: the decoder chose that an animal is there and what it does, the
classifier says which one (the slot filling of Lu et al., CVPR 2018 "Neural Baby Talk").

Only a caption that names one kind of animal, wrongly, is changed. It stays as it is when it
already names the recognised animal, names two different ones, or names its animal by a word the
classifier knows in fewer than `MIN_CLASSES` forms: ImageNet's one horse class (a sorrel) cannot
say a horse is absent, and rides on horses would become rides on camels."""

from __future__ import annotations

import functools
import json

import torch

from ..data.vocab import plural
from ..evaluation.hallucination import singular
from .labels import WORDS_FILE, imagenet_classes

PRESENT = 0.7  # the recognised animal's probability, its classes summed
ABSENT = 0.05  # the named animal's, all classes its name covers summed
MIN_CLASSES = 2
ANIMAL_CLASSES = 398  # ImageNet-1k's classes 0..397 are animals


@functools.lru_cache(maxsize=1)
def animal_names() -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """-> (each word a caption may call an animal by -> the ImageNet classes it covers, the
    two-word phrases that end in such a word but are not animals: "hot dog")."""
    data = json.loads(WORDS_FILE.read_text(encoding="utf-8"))
    return {word: tuple(classes) for word, classes in data["animals"].items()}, frozenset(data["not_animals"])


@functools.lru_cache(maxsize=1)
def _animal_words() -> tuple[tuple[str, ...], torch.Tensor]:
    """The distinct everyday words of the animal classes, and the 398 x words matrix that sums
    each word's classes."""
    _, words = imagenet_classes()
    distinct = tuple(dict.fromkeys(words[:ANIMAL_CLASSES]))
    sums = torch.zeros(ANIMAL_CLASSES, len(distinct))
    sums[torch.arange(ANIMAL_CLASSES), torch.tensor([distinct.index(w) for w in words[:ANIMAL_CLASSES]])] = 1
    return distinct, sums


def recognised_animals(probs: torch.Tensor) -> list[tuple[str, float]]:
    """B x 1000 class probabilities -> each image's animal word whose classes have the most, and
    how much."""
    distinct, sums = _animal_words()
    support, index = (probs[:, :ANIMAL_CLASSES].float() @ sums).max(dim=1)
    return [(distinct[i], p) for i, p in zip(index.tolist(), support.tolist())]


def name_animal(words: list[str], probs: torch.Tensor, recognised: tuple[str, float] | None = None,
                present: float = PRESENT, absent: float = ABSENT) -> tuple[list[str], dict[int, str]]:
    """A caption's words and its image's 1000 class probabilities -> the words with the caption's
    animal named as the classifier recognises it ("two dogs" -> "two polar bears"; a two-word name
    stays one item), and {position: the word it replaced}. `recognised`: the image's entry of
    `recognised_animals`, where a batch has them already."""
    animal, support = recognised or recognised_animals(probs[None])[0]
    text = f" {' '.join(words)} "
    if support < present or f" {animal} " in text or f" {plural(animal)} " in text:
        return words, {}
    names, not_animals = animal_names()
    found = {}
    for i, word in enumerate(words):
        name = word if word in names else singular(word)
        if name in names and (i == 0 or f"{words[i - 1]} {name}" not in not_animals):
            found[i] = name
    if len(set(found.values())) != 1:
        return words, {}
    covered = names[next(iter(found.values()))]
    if len(covered) < MIN_CLASSES or float(probs[list(covered)].sum()) >= absent:
        return words, {}
    renamed = list(words)
    for i, name in found.items():
        renamed[i] = animal if words[i] == name else plural(animal)
    return renamed, {i: words[i] for i in found}
