"""Which captions `name_animals` changes (captioner/grounding/naming.py), and what that does to CHAIR: each
split is captioned once, and the decoder's own caption is rebuilt from each caption's `renamed`.

    python bench/animal_names.py --dataset ../shared/data/flickr8k --dataset ../shared/data/coco_extra \
        --split val --method greedy --method beam --objects ../shared/data/coco_objects/synonyms.txt
"""

from __future__ import annotations

import argparse

from captioner import Captioner
from captioner.data.datasets import load_dataset
from captioner.evaluation.hallucination import ObjectTable, hallucination


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the built-in model")
    parser.add_argument("--dataset", action="append", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--method", action="append", choices=("greedy", "beam"))
    parser.add_argument("--objects", default=None, help="the CHAIR table, for hallucination with and without")
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.checkpoint)
    table = ObjectTable.load(args.objects) if args.objects else None
    for dataset in args.dataset:
        records = load_dataset(dataset).split(args.split)
        references = {str(r.image): r.captions for r in records}
        for method in args.method or ["greedy"]:
            named, decoded, seen = {}, {}, {}
            for result in captioner.caption_paths([r.image for r in records], method, seed=0, labels=3):
                best = result.captions[0]
                named[result.source] = best.text
                decoded[result.source] = captioner.vocab.sentence(
                    [best.renamed.get(i, w) for i, w in enumerate(best.words)])[1]
                seen[result.source] = ", ".join(f"{label.name} {label.probability:.2f}" for label in result.labels)
            changed = [k for k in named if named[k] != decoded[k]]
            print(f"{dataset} {args.split} {method}: {len(changed)} of {len(named)} captions name another animal")
            for k in changed:
                print(f"  {decoded[k]} -> {named[k]}\n    classifier: {seen[k]}\n    references: "
                      f"{' / '.join(references[k][:2])}")
            if table is not None:
                for name, predictions in (("decoder's words", decoded), ("animals named", named)):
                    h = hallucination(predictions, references, table)
                    print(f"  {name}: CHAIRs {h['CHAIRs']:.2f} CHAIRi {h['CHAIRi']:.2f} "
                          f"object recall {h['object_recall']:.2f}")


if __name__ == "__main__":
    main()
