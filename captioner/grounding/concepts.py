"""Visual concepts learned from the caption words themselves (Fang et al., CVPR 2015): which content
words an image's captions use. They supply what ImageNet's 1000 classes lack (there is no person
class) and, with the classes' everyday words, tell decoding which object words the image supports."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ..data.vocab import Vocabulary, tokenize

# Words that say nothing about what is in the picture: articles, pronouns, prepositions, auxiliaries.
FUNCTION_WORDS = frozenset("""
a an the this that these those it its it's his her hers their theirs them they he she him we us our you
your i my me one some any each every other another such own same both all several many much more most
few lot lots of in on at by for with without from to into onto over under above below behind beside
besides between near next through across along around up down out off away back front top side middle
while as and or but nor so than then there here where when which who whom whose what how is are was
were be been being am has have had having do does did doing can could will would should may might must
not no very just also only too still while during before after again about against among upon within
s 's n't get gets getting got
""".split())


def concept_words(captions_per_image: Sequence[Sequence[str]], vocab: Vocabulary, count: int,
                  min_images: int = 10) -> list[str]:
    """The `count` content words used by the most images' captions (at least `min_images` of them),
    most used first; only words in `vocab`."""
    images_using = Counter()
    for captions in captions_per_image:
        images_using.update({w for c in captions for w in tokenize(c)})
    kept = [w for w, n in images_using.items()
            if n >= min_images and w in vocab.stoi and w not in FUNCTION_WORDS and w.isalpha()]
    return sorted(kept, key=lambda w: (-images_using[w], w))[:count]


def concept_targets(captions_per_image: Sequence[Sequence[str]], words: Sequence[str]) -> torch.Tensor:
    """N x K: 1 where any of the image's captions uses the concept word."""
    column = {w: k for k, w in enumerate(words)}
    targets = torch.zeros(len(captions_per_image), len(words))
    for i, captions in enumerate(captions_per_image):
        for w in {w for c in captions for w in tokenize(c)}:
            if w in column:
                targets[i, column[w]] = 1.0
    return targets
