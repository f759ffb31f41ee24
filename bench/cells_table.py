"""The cells table of train/README.md: one row per training run of `captioner train` with a cell, from
what the run left (metrics.jsonl, best/config.json, test/predictions.jsonl).

    python bench/cells_table.py runs/cells/lstm runs/cells/gru1200 ... --dataset ../shared/data/flickr8k \
        --objects ../shared/data/coco_objects/synonyms.txt

Columns: cell, hidden size and seed, clip_norm, decoder parameters, dev CIDEr (greedy) at the best epoch,
test BLEU-4 / CIDEr / CHAIRs / distinct words (the run's test report, beam 3), |dL/dh_1| / |dL/dh_T|
of the first and the last gradient record, the last word's |dl_T/dh_1| / |dl_T/dh_T| (and for the
LSTM |dl_T/dc_1| / |dl_T/dh_T|, along the cell state) at the start and the end (measured here on `--reach-images` dev photos and their captions, teacher-forced with
dropout off: a fresh decoder of the run's config and seed, and best/), the share of steps clipping
changed, the largest global gradient norm seen, and seconds per epoch (the run's fastest epoch,
validation included: other jobs may have shared the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from captioner import Captioner  # noqa: E402
from captioner.training.batches import encode_captions, pad_batch  # noqa: E402
from captioner.training.grad_flow import flow_record, hidden_gradients  # noqa: E402
from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.evaluation.hallucination import ObjectTable, hallucination  # noqa: E402
from captioner.model.checkpoint import load_checkpoint  # noqa: E402
from captioner.model.ensemble import build_decoder  # noqa: E402


def last_word_reach(decoder, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> str:
    """|dl_T/dh_1| / |dl_T/dh_T| over the captions, teacher-forced with dropout off; for the LSTM also
    |dl_T/dc_1| / |dl_T/dh_T|, after a slash."""
    decoder.eval()
    norms, reach, cell_reach = hidden_gradients(decoder, features, captions, lengths)
    record = flow_record(0, norms, reach, lengths, cell_reach)
    cell = f" / {record['ratio_last_word_cell']:.2g}" if "ratio_last_word_cell" in record else ""
    return f"{record['ratio_last_word']:.2g}{cell}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--dataset", required=True, help="the dataset whose test split the runs were scored on")
    parser.add_argument("--objects", required=True, help="the CHAIR table (synonyms.txt)")
    parser.add_argument("--reach-images", type=int, default=256, help="dev photos whose captions the last word's reach is measured on")
    args = parser.parse_args()
    table = ObjectTable.load(args.objects)
    data = load_dataset(args.dataset)
    references = {Path(str(r.image)).name: r.captions for r in data.split("test")}
    dev = data.split("val")[:args.reach_images]
    captioner = Captioner.from_pretrained(Path(args.runs[0]) / "best")  # every run's encoder is the same
    good, dev_features = captioner.encode_files([r.image for r in dev])
    dev = [dev[i] for i in good]
    print("| cell | clip | parameters | dev CIDEr (epoch) | test BLEU-4 | test CIDEr | CHAIRs | words | "
          "ratio, first record | ratio, last | last word's reach, start | at the end | steps clipped | largest norm | s / epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in map(Path, args.runs):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "train_loss" in r]  # the teacher-forced epochs
        config = json.loads((run / "best" / "config.json").read_text())
        decoder, training = config["decoder"], config["training"]
        _, trained, vocab, _, _ = load_checkpoint(run / "best")
        parameters = sum(p.numel() for p in trained.parameters())
        owners, captions = encode_captions(dev, vocab, training["recipe"]["max_caption_length"])
        tokens, lengths = pad_batch(captions)
        torch.manual_seed(training["recipe"]["seed"])
        reach = [last_word_reach(d, dev_features[owners], tokens, lengths)
                 for d in (build_decoder(trained.config), trained)]
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
              f"{flows[0]['ratio_first_last']:.3g} | {flows[-1]['ratio_first_last']:.3g} | {reach[0]} | {reach[1]} | "
              f"{clipped / rows[-1]['step']:.1f} % | {max(r['grad_norm_max'] for r in rows):.3g} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
