"""The decoder step with int8 weights (weight-only, per-row scales, bf16 activations), measured
beside the default step in one run; not shipped:

    python bench/int8_step.py [--dataset ../shared/data/flickr8k] [--images 1000]

Greedy at batch 1 per token against the fp32 weight-read reference (bench_caption.py's (e)), and on
the test split greedy and beam 3 scored both ways (BLEU-4, CIDEr, distinct words and captions,
captions cut mid-phrase), with how many captions change. "The default here" is the step as
`precision="auto"` runs it: bf16 weights where the CPU is native, fp32 elsewhere. The int8 product
is PyTorch's `_weight_int8pack_mm`, a private operator: the reason this is a measurement and not
the default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_caption import decode_ms_per_token, weight_read_ms  # noqa: E402
from captioner import Captioner  # noqa: E402
from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.evaluation.metrics import caption_stats, score_captions  # noqa: E402
from captioner.model.runtime import keep_freed_memory  # noqa: E402
from captioner.model.step import StepWeights  # noqa: E402


def int8_product(packed: dict):
    """A StepWeights.product that multiplies by each weight quantised once to int8 per output row."""
    def product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if id(weight) not in packed:
            w = weight.float()
            scales = w.abs().amax(1).clamp_min(1e-12) / 127
            packed[id(weight)] = (torch.round(w / scales[:, None]).to(torch.int8).contiguous(), scales.bfloat16())
        return torch._weight_int8pack_mm(x.bfloat16(), *packed[id(weight)]).float()
    return product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/flickr8k")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--latency-images", type=int, default=50)
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does
    records = load_dataset(args.dataset).split("test")[: args.images]
    cap = Captioner.from_pretrained(None)
    features = torch.cat([cap.encode(torch.stack([cap.transform.load(r.image) for r in records[i:i + 50]]))
                          for i in range(0, len(records), 50)])
    references = {str(r.image): r.captions for r in records}
    decoder = cap.decoder.members[0] if hasattr(cap.decoder, "members") else cap.decoder
    print(f"{len(records)} test images from {args.dataset}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, step weights {decoder.step_dtype}")
    texts, default = {}, f"{str(decoder.step_dtype).removeprefix('torch.')} step (the default here)"
    for name, product in ((default, StepWeights.product), ("int8 step", int8_product({}))):
        StepWeights.product = product
        token_ms, read_ms = decode_ms_per_token(cap, features[: args.latency_images]), weight_read_ms(decoder)
        print(f"{name}: {token_ms:.2f} ms a token at batch 1; reading the fp32 weights once {read_ms:.2f} ms "
              f"({token_ms / read_ms:.2f}x)")
        for method in ("greedy", "beam"):
            captions = [c[0] for c in cap.decode(features, method)]
            texts[name, method] = [c.text for c in captions]
            predictions = dict(zip(references, texts[name, method]))
            scores = score_captions(predictions, references, metrics=("bleu", "cider"))
            stats = caption_stats(texts[name, method], [c.ended for c in captions])
            print(f"  {method:6s} BLEU-4 {scores['BLEU-4']:.2f}  CIDEr {scores['CIDEr']:.2f}  distinct words "
                  f"{stats['distinct_words']}  distinct captions {stats['distinct_captions']}  "
                  f"cut mid-phrase {stats['cut_mid_phrase']}")
    for method in ("greedy", "beam"):
        changed = sum(a != b for a, b in zip(texts[default, method], texts["int8 step", method]))
        print(f"{method}: {changed} of {len(records)} captions change")


if __name__ == "__main__":
    main()
