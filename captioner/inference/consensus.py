"""Consensus re-ranking of beam search (minimum Bayes risk decoding).

Beam search ranks its captions by the decoder's own score, which favours its most generic
phrasing. Re-ranked, the beam that wins is the one closest on average to the other beams and to
`samples` of the decoder's own captions of the same image: the caption the decoder's distribution
agrees on, not its single most probable path (Kumar & Byrne 2004, minimum Bayes risk; for captions,
consensus re-ranking as in Devlin et al. 2015, with the decoder's samples in place of neighbouring
photos' captions).

Closeness is CIDEr-D's: the cosine of clipped n-gram counts (n = 1..4), each n-gram weighted by
how rare its words are, times a Gaussian penalty on the difference in length. A word's rarity is
log(its vocabulary id + 2): the vocabulary lists words most frequent first (Vocabulary.build), and
as a word's frequency falls roughly as one over its rank (Zipf), that stands in for CIDEr's log
inverse document frequency without shipping a table built from the training captions.

A beam wins only if it names the same objects as the best-scored beam: samples imagine objects
freely, and which objects a caption names is grounding's decision (grounding/evidence.py), not a vote.
Nor may it repeat words more often, the vocabulary's most frequent few ("a", "the", "on") aside:
clipped n-gram counts do not stop "a plate of food with plates of food" from agreeing with many."""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

from ..data.vocab import SPECIALS

MAX_N = 4
LENGTH_SIGMA = 6.0  # CIDEr-D's
FREQUENT_WORDS = 8  # ids after the special tokens: function words a caption repeats freely ("a", "the")


def repeats(tokens: Sequence[int]) -> int:
    """How many of a caption's words repeat one before them, the most frequent words aside."""
    content = [t for t in tokens if t >= len(SPECIALS) + FREQUENT_WORDS]
    return len(content) - len(set(content))


def _vectors(tokens: Sequence[int]) -> list[tuple[dict, float]]:
    """Per n: {n-gram: count * mean rarity of its words}, and the vector's norm."""
    out = []
    for n in range(1, MAX_N + 1):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        vector = {g: c * sum(math.log(t + 2) for t in g) / n for g, c in counts.items()}
        out.append((vector, math.sqrt(sum(v * v for v in vector.values()))))
    return out


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """CIDEr-D-like closeness of two token lists (symmetric; 0 for nothing shared)."""
    return _similarity(_vectors(a), len(a), _vectors(b), len(b))


def _similarity(va, la: int, vb, lb: int) -> float:
    total = 0.0
    for (a, norm_a), (b, norm_b) in zip(va, vb):
        if norm_a and norm_b:
            total += sum(min(x, b[g]) * b[g] for g, x in a.items() if g in b) / (norm_a * norm_b)
    return total / MAX_N * math.exp(-((la - lb) ** 2) / (2 * LENGTH_SIGMA ** 2))


def consensus_order(beams: Sequence[Sequence[int]], samples: Sequence[Sequence[int]],
                    objects: Callable[[Sequence[int]], set]) -> list[int]:
    """Beams (best-scored first) and samples as token lists; `objects(tokens)`: the objects a caption
    names. -> the beams' indices, the consensus winner first, then the others in beam order. A beam
    is scored by its mean closeness to every other caption, beams and samples; ties go to the
    better-scored beam. Only beams that name the best beam's objects and repeat no more words compete."""
    if len(beams) < 2:
        return list(range(len(beams)))
    vectors = [(_vectors(t), len(t)) for t in [*beams, *samples]]
    named, repeated = objects(beams[0]), repeats(beams[0])
    best, best_score = 0, -1.0
    for i, tokens in enumerate(beams):
        if i and (objects(tokens) != named or repeats(tokens) > repeated):
            continue
        score = sum(_similarity(*vectors[i], *other) for j, other in enumerate(vectors) if j != i) / (len(vectors) - 1)
        if score > best_score:
            best, best_score = i, score
    return [best, *(i for i in range(len(beams)) if i != best)]
