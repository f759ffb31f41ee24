"""The optional last step of training: detectors for the CHAIR table's objects on the pooled image,
whose probabilities drive a decode-time penalty on the words that name each object (decoder.py,
`person_weight`, `object_weight`). A detector for whether a photo shows people is fitted on one
dataset's training photos (the recipe's `person_detector_from`); a calibrated detector for each other
object named in enough training photos is fitted on all of them (`object_detector_photos`).

Why a detector of its own: a person is what captions invent most on COCO photos, ImageNet has no
person class, and the concept detectors, trained on every dataset at once, read a COCO-style scene
as one with people in it. Fitted on COCO photos alone, a detector for "a reference names a person"
(the CHAIR table's person group) has probabilities that fit COCO photos, and the penalty it drives
takes invented people out of COCO captions and leaves Flickr8k's as they were (train/README.md).
The other objects' detectors are fitted to convergence (L-BFGS, an L2 penalty): their probabilities
are calibrated, so one threshold serves every object, frequent or rare."""

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
from .naming import animal_names
from .vocab import Vocabulary

PERSON = "person"  # the CHAIR table's name for the group
# the decoder's buffers, set here
DETECTOR_BUFFERS = ("person_direction", "person_bias", "person_words", "object_directions", "object_biases",
                    "object_words", "object_animals")


def shows(references: Sequence[Sequence[str]], table: ObjectTable, objects: Sequence[str]) -> torch.Tensor:
    """images x objects bools: whether any of an image's references names the object (as CHAIR judges it)."""
    named = [reference_objects(table, refs)[0] for refs in references]
    rows = [[obj in these for obj in objects] for these in named]
    return torch.tensor(rows, dtype=torch.bool).view(len(named), len(objects))  # also for no images


def shows_person(references: Sequence[Sequence[str]], table: ObjectTable) -> torch.Tensor:
    """One bool an image: whether any of its references names a person."""
    return shows(references, table, [PERSON])[:, 0]


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


def with_detectors(decoder, person: tuple | None = None, objects: tuple | None = None):
    """A copy of `decoder` (one, or an ensemble) that also holds a person detector, (direction, bias,
    word ids), and object detectors, (names, directions, biases, word masks, animal flags); either
    may be None."""
    device = next(decoder.parameters()).device
    changes = {}
    if person is not None:
        changes["person_detector"] = True
    if objects is not None:
        changes["object_detectors"] = tuple(objects[0])
    copy = build_decoder(dataclasses.replace(decoder.config, **changes)).to(device)
    missing, unexpected = copy.load_state_dict(decoder.state_dict(), strict=False)
    if unexpected or any(key.rsplit(".", 1)[-1] not in DETECTOR_BUFFERS for key in missing):
        raise ValueError(f"the decoder's weights do not fit one with these detectors ({missing + unexpected})")
    if person is not None:
        copy.set_person_detector(*person)
    if objects is not None:
        copy.set_object_detectors(*objects[1:])
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


def object_targets(train_records: Sequence[ImageCaptions], table: ObjectTable,
                   min_photos: int) -> tuple[list[str], torch.Tensor]:
    """The objects besides the person that the references of at least `min_photos` training photos
    name, and for each photo whether its references name each (N x K bools); an error if there are none."""
    candidates = [obj for obj in table.objects if obj != PERSON]
    shown = shows([r.captions for r in train_records], table, candidates)
    kept = (shown.sum(0) >= min_photos).nonzero()[:, 0]
    if not len(kept):
        raise ValueError(f"object_detector_photos = {min_photos}: no object of the table is named in that many "
                         f"training photos")
    return [candidates[k] for k in kept.tolist()], shown[:, kept]


def dev_auc(probabilities: torch.Tensor, truth: torch.Tensor, val_records: Sequence[ImageCaptions]) -> dict:
    """{dataset: AUC} of one detector on each dev set that has photos with and without its object."""
    aucs = {}
    for part in sorted({r.dataset for r in val_records}):
        rows = torch.tensor([r.dataset == part for r in val_records])
        if 0 < truth[rows].sum() < rows.sum():
            aucs[part] = round(auc(probabilities[rows], truth[rows]), 3)
    return aucs


def add_detectors(config, best_dir: Path, train_records: Sequence[ImageCaptions], train_features: FeatureStore,
                  val_records: Sequence[ImageCaptions], val_features: torch.Tensor, table: ObjectTable) -> dict:
    """Fits the detectors the recipe asks for on the training photos' unmirrored view: the person
    detector on the dataset `config.person_detector_from`, one detector for each other object of the
    table that the references of at least `config.object_detector_photos` training photos name, on
    all of them. Writes them into `best/`'s decoder; returns what `best/` records of them (the
    photos each was fitted on and its AUC on each dev set)."""
    encoder, decoder, vocab, transform, saved = load_checkpoint(best_dir)
    pooled = pooled_image(train_features[0, torch.arange(len(train_records))], decoder.config)
    val_references = [r.captions for r in val_records]
    person = objects = None
    records = {}
    if config.person_detector_from:
        name = config.person_detector_from
        picked = torch.tensor(detector_photos(name, train_records))
        truth = shows_person([train_records[i].captions for i in picked.tolist()], table)
        direction, bias = fit_person_detector(pooled[picked], truth, config.seed)
        person = (direction, bias, person_word_ids(vocab, table))
        records["person_detector"] = {"from": name, "photos": len(picked), "with_person": int(truth.sum())}
    if config.object_detector_photos:
        names, shown = object_targets(train_records, table, config.object_detector_photos)
        directions, biases = fit_object_detectors(pooled, shown)
        objects = (names, directions, biases, word_masks(vocab, table, names), animal_objects(table, names))
        records["object_detectors"] = {"photos_at_least": config.object_detector_photos, "objects": {
            obj: {"photos": int(n)} for obj, n in zip(names, shown.sum(0).tolist())}}
    with_detector = with_detectors(decoder, person, objects)
    if person is not None:
        record = records["person_detector"]
        record["dev_AUC"] = dev_auc(with_detector.person_probability(val_features),
                                    shows_person(val_references, table), val_records)
        log(f"person detector: fitted on {record['photos']} {record['from']} photos ({record['with_person']} "
            f"with a person); dev AUC {record['dev_AUC']}")
    if objects is not None:
        probabilities = with_detector.object_probabilities(val_features)
        truth = shows(val_references, table, objects[0])
        for k, obj in enumerate(objects[0]):
            records["object_detectors"]["objects"][obj]["dev_AUC"] = dev_auc(probabilities[:, k], truth[:, k],
                                                                               val_records)
        log(f"object detectors: {len(objects[0])} objects named in at least {config.object_detector_photos} "
            f"training photos ({', '.join(objects[0])})")
    save_checkpoint(best_dir, encoder=encoder, decoder=with_detector, vocab=vocab, transform=transform,
                    training=dict(saved["training"], recipe=dataclasses.asdict(config), **records))
    return records
