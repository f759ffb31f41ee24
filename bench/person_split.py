"""Captions of photos with people and of photos without, scored apart. coco_extra's photos nearly all
show a person, while COCO at large (and the private photos of issue #15) has many scenes without
one, where the errors differ: the captions put people in. Scoring the two groups apart says how a
model would fare on a mix other than coco_extra's.

    python bench/person_split.py [CHECKPOINT ...] --dataset ../shared/data/coco_extra \
        --objects ../shared/data/coco_objects/synonyms.txt [--split val] [--beam-size 3]

A photo is "without a person" when none of its references names one (the CHAIR table's person
group). Each checkpoint (default: the built-in model) decodes with its own settings; prints BLEU-4,
CIDEr, CHAIRs, CHAIRi, object recall and the objects most invented, per checkpoint and group (each
group's CIDEr takes its document frequencies from that group's references), the share of photos
without a person whose caption invents one, then the two groups' figures averaged: a rough estimate
for photos half of which show a person, as COCO's do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import Captioner  # noqa: E402
from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.evaluation.hallucination import ObjectTable, by_person, hallucination, names_person  # noqa: E402
from captioner.evaluation.metrics import score_captions  # noqa: E402
from captioner.model.runtime import keep_freed_memory  # noqa: E402


def cells(figures: list[float]) -> str:
    """BLEU-4 | CIDEr | CHAIRs | CHAIRi | recall, as table cells."""
    return " | ".join(f"{x:.2f}" if i < 2 else f"{x:.1f}" for i, x in enumerate(figures))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", default=[None], help="default: the built-in model")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--objects", required=True, help="the CHAIR table (synonyms.txt)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--beam-size", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    table = ObjectTable.load(args.objects)
    records = load_dataset(args.dataset).split(args.split)
    references = {str(r.image): r.captions for r in records}
    without = {key for key, refs in references.items() if not names_person(table, refs)}
    groups = {"all": set(references), "with a person": set(references) - without, "without a person": without}
    groups = {name: keys for name, keys in groups.items() if keys}
    print("checkpoint | photos | BLEU-4 | CIDEr | CHAIRs | CHAIRi | recall | most invented")
    for checkpoint in args.checkpoints:
        captioner = Captioner.from_pretrained(checkpoint)
        good, features = captioner.encode_files([r.image for r in records], 50)
        beams = captioner.decode(features, "beam", beam_size=args.beam_size)
        predictions = {str(records[i].image): b[0].text for i, b in zip(good, beams)}
        split = by_person(predictions, references, table)
        chair = {"all": hallucination(predictions, references, table), "with a person": split.get("with_person"),
                 "without a person": split.get("without_person")}
        figures = {}
        for group, keys in groups.items():
            picked = {k: predictions[k] for k in keys if k in predictions}  # an unreadable photo is left out
            scores = score_captions(picked, {k: references[k] for k in keys}, metrics=("bleu", "cider"))
            h = chair[group]
            figures[group] = [scores["BLEU-4"], scores["CIDEr"], h["CHAIRs"], h["CHAIRi"], h["object_recall"]]
            invented = ", ".join(f"{obj} {n}" for obj, n in h["most_invented"][:3])
            print(f"{checkpoint or 'built-in'} | {group} ({len(keys)}) | {cells(figures[group])} | {invented}",
                  flush=True)
        if without:
            h = split["without_person"]
            print(f"{checkpoint or 'built-in'} | a person invented in {h['person_invented']} of the {h['photos']} "
                  f"photos without one ({100 * h['person_invented'] / h['photos']:.1f}%) |", flush=True)
        if figures.keys() >= {"with a person", "without a person"}:
            half = [(a + b) / 2 for a, b in zip(figures["with a person"], figures["without a person"])]
            print(f"{checkpoint or 'built-in'} | half and half | {cells(half)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
