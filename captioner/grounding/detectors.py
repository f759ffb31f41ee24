"""Detectors for the CHAIR table's objects on the pooled image: which objects an image's references
name, the words that name each, and the logistic fits whose probabilities drive the decode-time
penalties (evidence.py). A detector for whether a photo shows people is fitted on one dataset's
photos; a calibrated detector for each other object on all of them (training/fit_detectors.py runs
both after training).

Why a detector of its own: a person is what captions invent most on COCO photos, ImageNet has no
person class, and the concept detectors, trained on every dataset at once, read a COCO-style scene
as one with people in it. Fitted on COCO photos alone, a detector for "a reference names a person"
(the CHAIR table's person group) has probabilities that fit COCO photos, and the penalty it drives
takes invented people out of COCO captions and leaves Flickr8k's as they were (train/README.md).
The other objects' detectors are fitted to convergence (L-BFGS, an L2 penalty): their probabilities
are calibrated, so one threshold serves every object, frequent or rare."""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.vocab import Vocabulary
from ..evaluation.hallucination import PERSON, ObjectTable, names_person, reference_objects, singular
from .labels import imagenet_classes
from .naming import animal_names

CALIBRATION_FLOOR = 0.02  # classifier support below this is no evidence: the calibration is fitted above it


def shows(references: Sequence[Sequence[str]], table: ObjectTable, objects: Sequence[str]) -> torch.Tensor:
    """images x objects bools: whether any of an image's references names the object (as CHAIR judges it)."""
    named = [reference_objects(table, refs)[0] for refs in references]
    rows = [[obj in these for obj in objects] for these in named]
    return torch.tensor(rows, dtype=torch.bool).view(len(named), len(objects))  # also for no images


def shows_person(references: Sequence[Sequence[str]], table: ObjectTable) -> torch.Tensor:
    """One bool an image: whether any of its references names a person."""
    return torch.tensor([names_person(table, refs) for refs in references], dtype=torch.bool)


def word_masks(vocab: Vocabulary, table: ObjectTable, objects: Sequence[str]) -> torch.Tensor:
    """objects x V: 1 where the table says the word names the object ("man", "skateboarder": person)."""
    masks = torch.zeros(len(objects), len(vocab))
    row = {obj: k for k, obj in enumerate(objects)}
    for i, word in enumerate(vocab.itos):
        k = row.get(table.words.get(singular(word)))
        if k is not None:
            masks[k, i] = 1.0
    return masks


def animal_objects(table: ObjectTable, objects: Sequence[str]) -> torch.Tensor:
    """objects: 1 where some word of the object names an animal (naming.py's animal words: dog, bird)."""
    names, _ = animal_names()
    animals = {obj for word, obj in table.words.items() if word in names}
    return torch.tensor([float(obj in animals) for obj in objects])


def person_word_ids(vocab: Vocabulary, table: ObjectTable) -> torch.Tensor:
    """The vocabulary ids of the words the table says name a person (man, women, skateboarder...)."""
    return word_masks(vocab, table, [PERSON])[0].nonzero()[:, 0]


def standardised(pooled: torch.Tensor):
    """-> (the N x D features standardised per dimension, a function that takes K x D weights and K
    biases on them to weights and biases on the raw features): a detector fits on the first and
    keeps the second, the standardisation folded in."""
    mean, std = pooled.mean(0), pooled.std(0) + 1e-3

    def fold(weights: torch.Tensor, biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        directions = weights / std
        return directions, biases - directions @ mean

    return (pooled - mean) / std, fold


def fit_person_detector(pooled: torch.Tensor, shows: torch.Tensor, seed: int, epochs: int = 20,
                        lr: float = 1e-4) -> tuple[torch.Tensor, float]:
    """A logistic regression on standardised pooled features (N x D, N bools) -> (direction D, bias)
    with the standardisation folded in: P(person) = sigmoid(pooled . direction + bias). It starts
    from zero: a random start over 1,280 features is noise that a few thousand photos do not train
    away (dev AUC on COCO photos 0.82 against 0.89; train/README.md). `seed` orders the batches."""
    generator = torch.Generator().manual_seed(seed)
    x, fold = standardised(pooled)
    y = shows.float()[:, None]
    head = torch.nn.Linear(x.size(1), 1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(128):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    [direction], [bias] = fold(head.weight.detach(), head.bias.detach())
    return direction, float(bias)


def fit_object_detectors(pooled: torch.Tensor, shown: torch.Tensor,
                         l2: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic regression an object on standardised pooled features (N x D, N x K bools), fitted
    to convergence with an L2 penalty -> (directions K x D, biases K) with the standardisation
    folded in: P(object k) = sigmoid(pooled . directions[k] + biases[k]). Deterministic."""
    x, fold = standardised(pooled)
    y = shown.float()
    weight = torch.zeros(x.size(1), y.size(1), requires_grad=True)
    bias = torch.zeros(y.size(1), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = (torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y, reduction="sum") / len(x)
                 + l2 * weight.square().sum())
        value.backward()
        return value

    optimizer.step(loss)
    return fold(weight.detach().T, bias.detach())


def label_objects(vocab: Vocabulary, table: ObjectTable) -> dict[str, dict]:
    """The objects the encoder's ImageNet classifier can vouch for: {object: {"classes": the classes
    whose everyday word names it, "words": the words and two-word phrases, plurals included, that
    name it and that the vocabulary can write}}, for the objects with both."""
    _, class_words = imagenet_classes()
    objects: dict[str, dict] = {}
    for index, word in enumerate(class_words):
        obj = table.words.get(" ".join(singular(part) for part in word.split()))
        if obj is not None:
            objects.setdefault(obj, {"classes": [], "words": []})["classes"].append(index)
    for name, obj in table.words.items():
        if obj not in objects:
            continue
        *head, last = name.split()
        for form in sorted({last} | {w for w in vocab.itos if singular(w) == last}):
            words = [*head, form]
            if len(words) <= 2 and all(w in vocab.stoi for w in words):
                objects[obj]["words"].append(" ".join(words))
    return {obj: entry for obj, entry in sorted(objects.items()) if entry["words"]}


def named_once(vocab: Vocabulary, table: ObjectTable) -> list[list[str]]:
    """The vocabulary's one-word names of each object of `table` that is neither a person nor an
    animal, grouped by object: what grounding lets a caption name once (evidence.repeat_mask)."""
    animals = {obj for word, obj in table.words.items() if word in animal_names()[0]}
    groups: dict[str, list[str]] = {}
    for word in vocab.itos:
        obj = table.words.get(singular(word))
        if obj is not None and obj != PERSON and obj not in animals:
            groups.setdefault(obj, []).append(word)
    return [words for _, words in sorted(groups.items())]


def object_classes(objects: dict[str, dict], num_classes: int) -> torch.Tensor:
    """num_classes x O, for `label_objects`' objects in order: 1 where a class is one of the object's,
    so that class probabilities times it sum each object's."""
    classes = torch.zeros(num_classes, len(objects))
    for k, entry in enumerate(objects.values()):
        classes[entry["classes"], k] = 1.0
    return classes


def calibrate(support: torch.Tensor, present: torch.Tensor, floor: float = CALIBRATION_FLOOR,
              l2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Platt scaling of a classifier's support for each object (N x K probabilities, N x K bools:
    whether the references name it) -> (slopes K, intercepts K): P(named) = sigmoid(slope *
    logit(support) + intercept), for support >= `floor`. Objects share one slope and intercept, and
    each departs from them by what its own photos show against an L2 penalty `l2`: an object seen in
    a handful of photos keeps the shared fit."""
    z = torch.logit(support.float().clamp(1e-4, 1 - 1e-4))
    used = support >= floor
    y = present.float()
    shared = torch.tensor([1.0, 0.0], requires_grad=True)
    own = torch.zeros(2, support.size(1), requires_grad=True)
    optimizer = torch.optim.LBFGS([shared, own], max_iter=300, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        logits = (shared[0] + own[0]) * z + shared[1] + own[1]
        value = (torch.nn.functional.binary_cross_entropy_with_logits(logits[used], y[used], reduction="sum")
                 + l2 * own.square().sum()) / used.sum().clamp_min(1)
        value.backward()
        return value

    optimizer.step(loss)
    slopes, intercepts = (shared[:, None] + own).detach()
    return slopes, intercepts


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())
