"""Decoders trained side by side on the same features (`members` > 1), decoding as one: the mean of
their word distributions."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .decoder import CaptionDecoder, DecoderConfig


class DecoderEnsemble(nn.Module):
    """`members` decoders of one config. Training sums their losses on the same batches; decoding
    averages their word distributions, so it decodes exactly like one `CaptionDecoder`."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(CaptionDecoder(config) for _ in range(config.members))

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-> members x B x (T-1) x V logits."""
        return torch.stack([m(features, captions, lengths) for m in self.members])

    def set_evidence_words(self, concept_words: torch.Tensor, label_words: torch.Tensor) -> None:
        for m in self.members:
            m.set_evidence_words(concept_words, label_words)

    def person_probability(self, features: torch.Tensor) -> torch.Tensor:
        return self.members[0].person_probability(features)  # the members share one detector

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        """-> members x B x concepts."""
        return torch.stack([m.concept_logits(features) for m in self.members])

    def object_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return self.members[0].object_probabilities(features)

    def set_person_detector(self, direction: torch.Tensor, bias: float, words: torch.Tensor) -> None:
        for m in self.members:
            m.set_person_detector(direction, bias, words)

    def set_object_detectors(self, directions: torch.Tensor, biases: torch.Tensor, words: torch.Tensor,
                             animals: torch.Tensor) -> None:
        for m in self.members:
            m.set_object_detectors(directions, biases, words, animals)

    def start(self, features: torch.Tensor, evidence_weight: float | None = None,
              evidence_threshold: float | None = None, person_weight: float | None = None,
              person_threshold: float | None = None, object_weight: float | None = None,
              object_threshold: float | None = None):
        return tuple(m.start(features, evidence_weight, evidence_threshold, person_weight, person_threshold,
                             object_weight, object_threshold) for m in self.members)

    def step(self, tokens: torch.Tensor, state):
        outputs = [m.step(tokens, s) for m, s in zip(self.members, state)]
        return members_log_probs(torch.stack([logits for logits, _ in outputs])), tuple(s for _, s in outputs)


def members_log_probs(member_logits: torch.Tensor) -> torch.Tensor:
    """An ensemble's logits (members first) -> the log of its members' mean distribution, which is
    what an ensemble decodes with."""
    log_probs = nn.functional.log_softmax(member_logits.float(), -1)
    return log_probs.logsumexp(0) - math.log(member_logits.size(0))


def keep_members(decoder: DecoderEnsemble, count: int) -> CaptionDecoder | DecoderEnsemble:
    """The first `count` members of an ensemble, as a smaller model (a single decoder for 1)."""
    if not 1 <= count <= len(decoder.members):
        raise ValueError(f"the ensemble has {len(decoder.members)} members; cannot keep {count}")
    smaller = build_decoder(dataclasses.replace(decoder.config, members=count))
    if count == 1:
        smaller.load_state_dict(decoder.members[0].state_dict())
    else:
        for mine, theirs in zip(smaller.members, decoder.members):
            mine.load_state_dict(theirs.state_dict())
    return smaller.eval()


def build_decoder(config: DecoderConfig) -> CaptionDecoder | DecoderEnsemble:
    return CaptionDecoder(config) if config.members == 1 else DecoderEnsemble(config)
