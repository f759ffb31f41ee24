"""Can the image evidence tell when a photo shows no person? "person" is the object captions invent
most often, so this measures, on dev splits, (1) how well person presence is detected from the
pooled features: the checkpoint's own detectors for the person words, combined, against one
detector trained here for the person group as a whole (any reference names a person); and (2) what
a decode-time penalty on every person word, driven by that group detector, does to the captions.

    python bench/person_evidence.py runs/flickr8k_coco/best --dataset ../shared/data/coco_extra \
        --dataset ../shared/data/flickr8k --objects ../shared/data/coco_objects/synonyms.txt \
        [--weights 0,2,4,8] [--threshold 0.3] [--detector-from coco_extra] [--seed 0]

The CHAIR table (--objects) says which words name a person, and its ground truth (the objects the
references name) is the detector's target, fitted as the recipe's `person_detector_from` fits it
(captioner/grounding/detectors.py). The group penalty comes on top of the checkpoint's own evidence
setting: each word that names a person loses weight * log(p_person / threshold) where p_person is
below the threshold (the decoder's `person_weight`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import Captioner  # noqa: E402
from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.evaluation.hallucination import ObjectTable, singular  # noqa: E402
from captioner.grounding.detectors import auc, fit_person_detector, person_word_ids, shows_person
from captioner.model.decoder import pooled_image  # noqa: E402
from captioner.model.runtime import keep_freed_memory  # noqa: E402
from captioner.training.fit_detectors import with_detectors
from evidence_sweep import score_cells  # noqa: E402  (bench/ is this script's folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="default: the built-in model")
    parser.add_argument("--dataset", action="append", required=True)
    parser.add_argument("--objects", required=True, help="the CHAIR table (synonyms.txt)")
    parser.add_argument("--weights", default="0,2,4,8", help="group penalty weights, comma-separated")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--detector-from", default=None,
                        help="train the group detector on this dataset's training photos only (its folder name); "
                             "default: every dataset's")
    parser.add_argument("--seed", type=int, default=0, help="the group detector's seed")
    args = parser.parse_args()
    keep_freed_memory()
    captioner = Captioner.from_pretrained(args.checkpoint)
    decoder, vocab = captioner.decoder, captioner.vocab
    table = ObjectTable.load(args.objects)
    concept_words = [vocab.itos[i] for i in decoder.concept_words.tolist()]
    person = torch.tensor([k for k, w in enumerate(concept_words) if table.words.get(singular(w)) == "person"])
    print("person words among the concept detectors:", ", ".join(concept_words[k] for k in person))

    def encoded(records):
        good, features = captioner.encode_files([r.image for r in records], 50)
        return features.float(), shows_person([records[i].captions for i in good], table)

    train_features, train_shows, dev = [], [], []
    for dataset in args.dataset:
        data = load_dataset(dataset)
        if args.detector_from in (None, Path(dataset).name):
            features, shows = encoded(data.split("train"))
            train_features.append(pooled_image(features, decoder.config))
            train_shows.append(shows)
        dev.append((Path(dataset).name, data.split("val"), *encoded(data.split("val"))))
    if not train_features:
        parser.error(f"--detector-from {args.detector_from}: no --dataset of that name")
    direction, bias = fit_person_detector(torch.cat(train_features), torch.cat(train_shows), seed=args.seed)
    captioner.decoder = decoder = with_detectors(decoder, person=(direction, bias, person_word_ids(vocab, table)))
    decoder.config.person_threshold = args.threshold
    print("dataset | images (no person) | AUC: word detectors max / noisy-or / group detector")
    for name, records, features, shows in dev:
        words = torch.sigmoid(decoder.concept_logits(features)).detach()[:, person]
        print(f"{name} | {len(records)} ({int((~shows).sum())}) | {auc(words.max(1).values, shows):.3f} / "
              f"{auc(1 - (1 - words).prod(1), shows):.3f} / {auc(decoder.person_probability(features), shows):.3f}")
    print("dataset | group weight | BLEU-4 | CIDEr | CHAIRs | CHAIRi | recall | words | captions | cut | "
          "person invented (in photos without one)")
    for name, records, features, _ in dev:
        references = {str(r.image): r.captions for r in records}
        for weight in [float(w) for w in args.weights.split(",")]:
            beams = captioner.decode(features, "beam", beam_size=args.beam_size, person_weight=weight)
            predictions = {str(r.image): b[0].text for r, b in zip(records, beams)}
            print(f"{name} | {weight} | {score_cells(predictions, references, [b[0].ended for b in beams], table)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
