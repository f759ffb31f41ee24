"""How strongly decoding should penalise object words the image does not support, measured on dev
splits: each dataset's images are encoded once, then captioned with every setting side by side.

    python bench/evidence_sweep.py CHECKPOINT --dataset ../shared/data/coco_extra --dataset ../shared/data/flickr8k \
        --objects ../shared/data/coco_objects/synonyms.txt [--split val] [--weights 0,0.5,1,2] [--thresholds 0.3,0.5] \
        [--person-weights 0,4] [--person-thresholds 0.3,0.5] [--object-weights 0,2] [--object-thresholds 0.3,0.5] \
        [--include-thresholds 0,0.5] [--include-costs 4,6] [--consensus-samples 0,20] [--name-once 0,1] \
        [--grounding avoid]

Prints, per dataset and setting: BLEU-4, CIDEr, CHAIRs, CHAIRi, object recall, distinct words,
distinct captions, captions cut mid-phrase, and how many photos no reference puts a person in get a
caption that does (beam 3 unless --beam-size says otherwise). --person-weights sweeps the person
penalty too, for a checkpoint with a person detector (the recipe's person_detector_from, and
--person-thresholds its threshold), --object-weights / --object-thresholds the object detectors'
(object_detector_photos), and --include-thresholds how surely an object the classifier vouches for
must be there to be required (`captioner export --calibrate`; 0: none is), --include-costs at most
how many nats writing it in may cost the caption, --consensus-samples how many of the decoder's
samples re-rank the beams (0: none), --name-once whether a
caption names an object once (`captioner export --objects`); what is not swept keeps the
checkpoint's setting. --grounding off / avoid / full (default) as `captioner eval` takes it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import Captioner  # noqa: E402
from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.evaluation.hallucination import ObjectTable, by_person, hallucination  # noqa: E402
from captioner.evaluation.metrics import caption_stats, score_captions  # noqa: E402
from captioner.model.runtime import keep_freed_memory  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def score_cells(predictions: dict, references: dict, ended: list, table: ObjectTable) -> str:
    """BLEU-4 | CIDEr | CHAIRs | CHAIRi | recall | words | captions | cut | person invented, as table cells."""
    scores = score_captions(predictions, references, metrics=("bleu", "cider"))
    h = hallucination(predictions, references, table)
    stats = caption_stats(list(predictions.values()), ended)
    without = by_person(predictions, references, table).get("without_person", {"photos": 0, "person_invented": 0})
    return (f"{scores['BLEU-4']:.2f} | {scores['CIDEr']:.2f} | {h['CHAIRs']:.1f} | {h['CHAIRi']:.1f} | "
            f"{h['object_recall']:.1f} | {stats['distinct_words']} | {stats['distinct_captions']} | "
            f"{stats['cut_mid_phrase']} | {without['person_invented']} of {without['photos']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dataset", action="append", required=True)
    parser.add_argument("--objects", required=True, help="the CHAIR table (synonyms.txt)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--weights", type=floats, default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--thresholds", type=floats, default=[0.5])
    parser.add_argument("--person-weights", type=floats, default=None, help="default: the checkpoint's")
    parser.add_argument("--person-thresholds", type=floats, default=None, help="default: the checkpoint's")
    parser.add_argument("--object-weights", type=floats, default=None, help="default: the checkpoint's")
    parser.add_argument("--object-thresholds", type=floats, default=None, help="default: the checkpoint's")
    parser.add_argument("--include-thresholds", type=floats, default=None, help="default: the checkpoint's")
    parser.add_argument("--include-costs", type=floats, default=None, help="default: the checkpoint's")
    parser.add_argument("--consensus-samples", type=lambda text: [int(x) for x in text.split(",")], default=None,
                        help="default: the checkpoint's")
    parser.add_argument("--name-once", type=lambda text: [bool(int(x)) for x in text.split(",")], default=None,
                        help="0 / 1; default: as --grounding has it")
    parser.add_argument("--grounding", choices=("off", "avoid", "full"), default="full")
    parser.add_argument("--beam-size", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    captioner = Captioner.from_pretrained(args.checkpoint)
    table = ObjectTable.load(args.objects)
    config = captioner.decoder.config
    if args.person_weights and not config.person_detector:
        parser.error(f"--person-weights: {args.checkpoint} has no person detector")
    if (args.object_weights or args.object_thresholds) and not config.object_detectors:
        parser.error(f"--object-weights, --object-thresholds: {args.checkpoint} has no object detectors")
    grid = {"evidence_weight": args.weights, "evidence_threshold": args.thresholds,
            "person_weight": args.person_weights or [config.person_weight],
            "person_threshold": args.person_thresholds or [config.person_threshold],
            "object_weight": args.object_weights or [config.object_weight],
            "object_threshold": args.object_thresholds or [config.object_threshold],
            "include_threshold": args.include_thresholds or [config.include_threshold],
            "include_cost": args.include_costs or [config.include_cost],
            "consensus_samples": args.consensus_samples or [config.consensus_samples],
            "name_once": args.name_once or [None]}
    print("dataset | weight | threshold | person weight / threshold | object weight / threshold | include / cost | consensus | once | "
          "BLEU-4 | CIDEr | CHAIRs | CHAIRi | recall | words | captions | cut | person invented")
    for dataset in args.dataset:
        records = load_dataset(dataset).split(args.split)
        good, features = captioner.encode_files([r.image for r in records], 50)
        records = [records[i] for i in good]
        references = {str(r.image): r.captions for r in records}
        for values in itertools.product(*grid.values()):
            setting = dict(zip(grid, values))
            texts, ended = [], []
            for start in range(0, len(features), 250):
                for [best, *_] in captioner.decode(features[start:start + 250], "beam", beam_size=args.beam_size,
                                                   grounding=args.grounding, **setting):
                    texts.append(best.text)
                    ended.append(best.ended)
            predictions = {str(r.image): t for r, t in zip(records, texts)}
            print(f"{Path(dataset).name} | {values[0]} | {values[1]} | {values[2]} / {values[3]} | "
                  f"{values[4]} / {values[5]} | {values[6]} / {values[7]} | {values[8]} | {values[9]} | "
                  f"{score_cells(predictions, references, ended, table)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
