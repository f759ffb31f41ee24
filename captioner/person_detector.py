"""The optional last step of training: a detector for whether a photo shows people, fitted on one
dataset's training photos (the recipe's `person_detector_from`), whose probability drives a
decode-time penalty on every word that names a person (decoder.py, `person_weight`).

Why a detector of its own: a person is what captions invent most on COCO photos, ImageNet has no
person class, and the concept detectors, trained on every dataset at once, read a COCO-style scene
as one with people in it. Fitted on COCO photos alone, a detector for "a reference names a person"
(the CHAIR table's person group) has probabilities that fit COCO photos, and the penalty it drives
takes invented people out of COCO captions and leaves Flickr8k's as they were (train/README.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .datasets import ImageCaptions
from .decoder import CaptionDecoder, build_decoder, pooled_image, set_step
from .distributed import log
from .features import FeatureStore
from .hallucination import ObjectTable, reference_objects, singular
from .vocab import Vocabulary

PERSON = "person"  # the CHAIR table's name for the group
PERSON_BUFFERS = ("person_direction", "person_bias", "person_words")  # the decoder's, set here


def shows_person(references: Sequence[Sequence[str]], table: ObjectTable) -> torch.Tensor:
    """One bool an image: whether any of its references names a person (as CHAIR judges it)."""
    return torch.tensor([PERSON in reference_objects(table, refs)[0] for refs in references], dtype=torch.bool)


def person_word_ids(vocab: Vocabulary, table: ObjectTable) -> torch.Tensor:
    """The vocabulary ids of the words the table says name a person (man, women, skateboarder...)."""
    return torch.tensor([i for i, w in enumerate(vocab.itos) if table.words.get(singular(w)) == PERSON],
                        dtype=torch.long)


def fit_person_detector(pooled: torch.Tensor, shows: torch.Tensor, seed: int, epochs: int = 20,
                        lr: float = 1e-4) -> tuple[torch.Tensor, float]:
    """A logistic regression on standardised pooled features (N x D, N bools) -> (direction D, bias)
    with the standardisation folded in: P(person) = sigmoid(pooled . direction + bias). It starts
    from zero: a random start over 1,280 features is noise that a few thousand photos do not train
    away (dev AUC on COCO photos 0.82 against 0.89; train/README.md). `seed` orders the batches."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = pooled.mean(0), pooled.std(0) + 1e-3
    x, y = (pooled - mean) / std, shows.float()[:, None]
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
    weight = head.weight.detach()[0] / std
    return weight, float(head.bias.detach()[0] - weight @ mean)


def with_person_detector(decoder, direction: torch.Tensor, bias: float, word_ids: torch.Tensor):
    """A copy of `decoder` (one, or an ensemble) that also holds this person detector."""
    device = next(decoder.parameters()).device
    copy = build_decoder(dataclasses.replace(decoder.config, person_detector=True)).to(device)
    missing, unexpected = copy.load_state_dict(decoder.state_dict(), strict=False)
    if unexpected or any(key.rsplit(".", 1)[-1] not in PERSON_BUFFERS for key in missing):
        raise ValueError(f"the decoder's weights do not fit one with a person detector ({missing + unexpected})")
    copy.set_person_detector(direction, bias, word_ids)
    step = next(m for m in decoder.modules() if isinstance(m, CaptionDecoder))
    set_step(copy, step.fold_step, step.step_dtype)  # decodes in the precision the original was set to
    return copy.train(decoder.training)


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())


def detector_photos(name: str, train_records: Sequence[ImageCaptions]) -> list[int]:
    """The indices of the training photos from the dataset `name`; an error naming the datasets there
    are if it has none."""
    picked = [i for i, r in enumerate(train_records) if r.dataset == name]
    if not picked:
        raise ValueError(f"person_detector_from = {name!r}: no training photos from a dataset of that name "
                         f"(datasets: {', '.join(sorted({r.dataset for r in train_records}))})")
    return picked


def add_person_detector(config, best_dir: Path, train_records: Sequence[ImageCaptions], train_features: FeatureStore,
                        val_records: Sequence[ImageCaptions], val_features: torch.Tensor, table: ObjectTable) -> dict:
    """Fits the detector on the training photos of the dataset `config.person_detector_from` (their
    unmirrored view) and writes it into `best/`'s decoder; returns what `best/` records of it (the
    photos it was fitted on and its AUC on each dev set)."""
    name = config.person_detector_from
    picked = detector_photos(name, train_records)
    encoder, decoder, vocab, transform, saved = load_checkpoint(best_dir)
    shows = shows_person([train_records[i].captions for i in picked], table)
    direction, bias = fit_person_detector(pooled_image(train_features[0, torch.tensor(picked)], decoder.config),
                                          shows, config.seed)
    with_detector = with_person_detector(decoder, direction, bias, person_word_ids(vocab, table))
    p = with_detector.person_probability(val_features)
    record = {"from": name, "photos": len(picked), "with_person": int(shows.sum()), "dev_AUC": {}}
    for part in sorted({r.dataset for r in val_records}):
        rows = torch.tensor([r.dataset == part for r in val_records])
        truth = shows_person([r.captions for r in val_records if r.dataset == part], table)
        if 0 < truth.sum() < len(truth):
            record["dev_AUC"][part] = round(auc(p[rows], truth), 3)
    log(f"person detector: fitted on {len(picked)} {name} photos ({record['with_person']} with a person); "
        f"dev AUC {record['dev_AUC']}")
    save_checkpoint(best_dir, encoder=encoder, decoder=with_detector, vocab=vocab, transform=transform,
                    training=dict(saved["training"], recipe=dataclasses.asdict(config), person_detector=record))
    return record
