"""How decoding reads what the image shows, in both directions.

Kept out (every decoding method): additions to the word logits that lower the words the image does
not evidently support, one rule `weight * log(support / threshold)` below the threshold, on three
sources, each with its own weight (0: off):
- the concept evidence (`evidence_weight`, `evidence_threshold`): a concept word whose support (its
  concept detector's probability, or that of the ImageNet classes whose everyday word it is) is
  below the threshold loses `evidence_weight * log(support / evidence_threshold)`;
- the person detector (`person_weight`, `person_threshold`): every word that names a person loses
  `person_weight * log(p / person_threshold)` where the photo's person probability p is below it;
- the object detectors (`object_weight`, `object_threshold`): the words that name each object lose
  the same on that object's probability. Unlike the concept penalty only object words are touched,
  so a caption loses objects that are not there and keeps its other words. An animal's detector
  stands down where the encoder's classifier is sure some animal is there: a decoder that never read
  "cheetah" calls one "a dog", and which animal it is, the classifier says (naming.py).

Named once (every decoding method): no word follows itself ("a cell cell cell"), and an object that
is neither a person nor an animal is not named again once named, except by the very next word ("a
laptop computer"). A decoder writing "a bed on a bed next to a bed" is looping, not counting; two
people or two dogs are often there, and "a dog plays with a brown dog" is how it says so.

Brought in (beam search): the objects the encoder's ImageNet classifier vouches for, its classes'
probabilities summed per object and calibrated (P(a reference names it), detectors.calibrate) on
the dev photos whose caption leaves the object out (training/fit_detectors.py), are required in
the caption where that probability reaches `include_threshold`, the most probable
`max_constraints` of them; constrained beam search (inference/decoding.py) writes them where the
decoder finds them fluent, by any of their words, unless that costs the caption more than
`include_cost` nats against the best caption found without them: a word forced in at any price
lands badly ("a tennis player hitting a racket").

The detectors' weights are the decoder's buffers (model/decoder.py), fitted after training
(detectors.py); the classifier's calibration is in the decoder's config (`label_objects`).
Animal renaming (naming.py) comes last: a finished caption's animal takes the name of the one the
classifier is sure of. `GROUNDING` is the one switch over all of it (pipeline.Captioner.decode)."""

from __future__ import annotations

import torch

from ..data.vocab import plural
from .detectors import CALIBRATION_FLOOR, object_classes
from .naming import ANIMAL_CLASSES, PRESENT, animal_names

# What the image's evidence does to a caption: nothing; keeps out the words it does not support (and
# names the animal the classifier recognises); or also brings in, in beam search, the objects it
# surely shows.
GROUNDING = ("off", "avoid", "full")


def evidence_bias(decoder, features: torch.Tensor, label_probs, concept_probs, weight: float, threshold: float,
                  person_weight: float, person_threshold: float, object_weight: float,
                  object_threshold: float) -> torch.Tensor | None:
    """B x V additions to the word logits: `weight * log(support / threshold)` for concept
    words whose support is below `threshold`, and the person and object detectors' penalties on
    the words that name their objects; 0 elsewhere; None when there is nothing to add."""
    c = decoder.config
    terms = []
    if weight > 0 and concept_probs is not None:
        terms.append(concept_bias(decoder, label_probs, concept_probs, weight, threshold))
    if person_weight > 0 and c.person_detector:
        terms.append(detector_penalty(decoder.person_probability(features)[:, None], person_threshold,
                                      person_weight, decoder.person_words[None]))
    if object_weight > 0 and c.object_detectors:
        probs = decoder.object_probabilities(features)
        if label_probs is not None:  # an animal's word may be the stand-in naming.py renames
            sure = label_probs[:, :ANIMAL_CLASSES].float().sum(1, keepdim=True) >= PRESENT
            probs = torch.where(sure & decoder.object_animals.bool(), torch.ones_like(probs), probs)
        terms.append(detector_penalty(probs, object_threshold, object_weight, decoder.object_words))
    return sum(terms) if terms else None


def concept_bias(decoder, label_probs, concept_probs, weight: float, threshold: float) -> torch.Tensor:
    """B x V: the concept evidence penalty alone."""
    support = concept_probs.float()
    if label_probs is not None:
        mapped = decoder.label_words >= 0
        by_word = label_probs.new_zeros(label_probs.size(0), decoder.config.vocab_size).float()
        by_word.index_add_(1, decoder.label_words[mapped], label_probs[:, mapped].float())
        support = torch.maximum(support, by_word[:, decoder.concept_words])
    bias = concept_probs.new_zeros(concept_probs.size(0), decoder.config.vocab_size).float()
    bias[:, decoder.concept_words] = weight * torch.log(support.clamp_min(1e-6) / threshold).clamp(max=0)
    return bias


def detector_penalty(probs: torch.Tensor, threshold: float, weight: float, words: torch.Tensor) -> torch.Tensor:
    """B x K detector probabilities, K x V word masks -> B x V: `weight * log(p / threshold)` on the
    words of each detector whose p is below the threshold."""
    return weight * torch.log(probs.clamp_min(1e-6) / threshold).clamp(max=0) @ words.float()


def object_word_groups(vocab, named_once: list[list[str]]) -> torch.Tensor | None:
    """The config's `named_once` -> V longs: each word's object (its index in `named_once`), or
    len(named_once) for a word of none; None where `named_once` is empty."""
    if not named_once:
        return None
    groups = torch.full((len(vocab),), len(named_once), dtype=torch.long)
    for index, words in enumerate(named_once):
        groups[[vocab.stoi[w] for w in words if w in vocab.stoi]] = index
    return groups


def word_objects(vocab, named_once: list[list[str]], person_words: torch.Tensor | None) -> dict[int, str]:
    """Each vocabulary id that names an object -> that object: the groups of `named_once`, the words
    that name a person (a decoder's `person_words`; None where it has no person detector) and the
    animal names (naming.py) and their plurals."""
    objects = {vocab.stoi[w]: f"object {i}" for i, words in enumerate(named_once) for w in words if w in vocab.stoi}
    objects.update({vocab.stoi[form]: f"animal {w}" for w in animal_names()[0] for form in (w, plural(w))
                    if form in vocab.stoi})
    if person_words is not None:
        objects.update({i: "person" for i in person_words.nonzero().flatten().tolist()})
    return objects


def repeat_mask(word_groups: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """V word groups (object_word_groups), N x T words written (T >= 1) -> N x V: the words each
    row may not write next: its last word, and every word of an object it named before that."""
    spare = int(word_groups.max())  # the group of the words that name no object, never banned
    named = torch.zeros(history.size(0), spare + 1, dtype=torch.bool, device=history.device)
    named.scatter_(1, word_groups[history[:, :-1]], True)
    named[:, spare] = False
    return named.gather(1, word_groups.expand(history.size(0), -1)).scatter_(1, history[:, -1:], True)


def object_presence(config, label_probs: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """-> (the objects of `config.label_objects`, B x O calibrated probabilities that the image's
    references would name each; 0 where the classifier's support is below the calibration's floor)."""
    names = list(config.label_objects)
    support = label_probs.float() @ object_classes(config.label_objects, label_probs.size(1)).to(label_probs.device)
    slopes, intercepts = (torch.tensor([[config.label_objects[n][key] for n in names]], device=label_probs.device)
                          for key in ("slope", "intercept"))
    presence = torch.sigmoid(slopes * torch.logit(support.clamp(1e-4, 1 - 1e-4)) + intercepts)
    return names, torch.where(support >= CALIBRATION_FLOOR, presence, torch.zeros_like(presence))


def required_objects(config, label_probs: torch.Tensor, include: float, limit: int) -> list[list[str]]:
    """Each image's objects whose calibrated presence reaches `include` (> 0), the `limit` most
    probable, most probable first."""
    if not config.label_objects or include <= 0 or limit <= 0:
        return [[] for _ in range(label_probs.size(0))]
    names, presence = object_presence(config, label_probs)
    values, order = presence.topk(min(limit, len(names)), dim=1)
    return [[names[k] for p, k in zip(row_p, row_k) if p >= include]
            for row_p, row_k in zip(values.tolist(), order.tolist())]
