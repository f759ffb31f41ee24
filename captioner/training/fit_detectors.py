"""The optional last step of `captioner train`: fit the detectors the recipe asks for
(grounding/detectors.py) on the training photos and write them into `best/`'s decoder, with the
photos each was fitted on and its AUC on each dev set."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from ..data.datasets import ImageCaptions
from ..data.vocab import Vocabulary
from ..evaluation.hallucination import PERSON, ObjectTable
from ..grounding.detectors import (animal_objects, auc, calibrate, fit_object_detectors, fit_person_detector,
                                   label_objects, object_classes, person_word_ids,
                                   shows, shows_person, word_masks)
from ..inference.decoding import beam_search
from ..model.checkpoint import load_checkpoint, save_checkpoint
from ..model.decoder import CaptionDecoder, pooled_image, set_step
from ..model.ensemble import build_decoder
from .distributed import log
from .features import FeatureStore

# the decoder's buffers, set here
DETECTOR_BUFFERS = ("person_direction", "person_bias", "person_words", "object_directions", "object_biases",
                    "object_words", "object_animals")


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


def calibrate_label_objects(decoder, vocab: Vocabulary, features: torch.Tensor, label_probs: torch.Tensor,
                            references: Sequence[Sequence[str]], table: ObjectTable, beam_size: int = 3) -> dict:
    """The decoder config's `label_objects`: each object the encoder's classifier vouches for
    (detectors.label_objects), with the calibration of its classes' summed probability (N x 1000
    `label_probs`) against whether the photos' `references` name it. Fitted on the photos whose
    caption, by the decoder's own beam search, does not name the object already: what a required
    object must be sure of is that it is there when the caption left it out."""
    objects = label_objects(vocab, table)
    names = list(objects)
    captions = [" ".join(vocab.words(beams[0].tokens))
                for start in range(0, len(features), 250)
                for beams in beam_search(decoder, features[start:start + 250], beam_size=beam_size)]
    named = torch.tensor([[name in set(table.mentions(c)) for name in names] for c in captions],
                         dtype=torch.bool).view(len(captions), len(names))
    support = (label_probs.float().cpu() @ object_classes(objects, label_probs.size(1))).masked_fill(named, 0.0)
    slopes, intercepts = calibrate(support, shows(references, table, names))
    for name, slope, intercept in zip(names, slopes.tolist(), intercepts.tolist()):
        objects[name].update(slope=round(slope, 4), intercept=round(intercept, 4))
    return objects
