"""The cells table of train/README.md: one row per training run of `captioner train` with a cell, from
what the run left (metrics.jsonl, best/config.json, test/predictions.jsonl).

    python bench/cells_table.py runs/cells/lstm runs/cells/gru1200 ... --dataset ../shared/data/flickr8k \
        --objects ../shared/data/coco_objects/synonyms.txt

Columns: cell, hidden size and seed, clip_norm, decoder parameters, dev CIDEr (greedy) at the best epoch,
test BLEU-4 / CIDEr / CHAIRs / distinct words (the run's test report, beam 3), |dL/dh_1| / |dL/dh_T|
of the first and the last gradient record, the share of steps clipping changed, the largest global
gradient norm seen, and seconds per epoch (the run's fastest epoch, validation included: other jobs
may have shared the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.evaluation.hallucination import ObjectTable, hallucination  # noqa: E402
from captioner.model.checkpoint import load_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--dataset", required=True, help="the dataset whose test split the runs were scored on")
    parser.add_argument("--objects", required=True, help="the CHAIR table (synonyms.txt)")
    args = parser.parse_args()
    table = ObjectTable.load(args.objects)
    references = {Path(str(r.image)).name: r.captions for r in load_dataset(args.dataset).split("test")}
    print("| cell | clip | parameters | dev CIDEr (epoch) | test BLEU-4 | test CIDEr | CHAIRs | words | "
          "ratio, first record | ratio, last | steps clipped | largest norm | s / epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in map(Path, args.runs):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "train_loss" in r]  # the teacher-forced epochs
        config = json.loads((run / "best" / "config.json").read_text())
        decoder, training = config["decoder"], config["training"]
        parameters = sum(p.numel() for p in load_checkpoint(run / "best")[1].parameters())
        test = training["test"]
        predictions = {Path(r["image"]).name: r["caption"] for r in
                       map(json.loads, (run / "test" / "predictions.jsonl").read_text().splitlines())}
        chairs = hallucination(predictions, references, table)["CHAIRs"]
        flows = [f for r in rows for f in r["grad_flow"]]
        best = max(rows, key=lambda r: r["val_CIDEr"])
        seconds = min(b["elapsed_s"] - a["elapsed_s"] for a, b in zip([{"elapsed_s": 0.0}] + rows, rows))
        clip = training["recipe"]["clip_norm"]
        clipped = 100 * sum(r["clipped_share"] * (r["step"] - a["step"]) for a, r in zip([{"step": 0}] + rows, rows))
        print(f"| {decoder['cell'].upper()}-{decoder['hidden_dim']}, seed {training['recipe']['seed']} | {clip or 'off'} | {parameters / 1e6:.1f} M | "
              f"{best['val_CIDEr']:.1f} ({best['epoch']}) | {test['scores']['BLEU-4']:.1f} | "
              f"{test['scores']['CIDEr']:.1f} | {chairs:.1f} | {test['stats']['distinct_words']} | "
              f"{flows[0]['ratio_first_last']:.3g} | {flows[-1]['ratio_first_last']:.3g} | "
              f"{clipped / rows[-1]['step']:.1f} % | {max(r['grad_norm_max'] for r in rows):.3g} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
