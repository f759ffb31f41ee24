"""What recording gradients through time costs a training run: one training step and one record
(training/grad_flow.py) timed side by side on the same batch, for each cell at a recipe's sizes.

    python bench/grad_flow_cost.py [--hidden-dim 1024] [--batch-size 64] [--every 500]

Prints, per cell: ms a step, ms a record, and the share of training time a record every `--every`
steps adds. Random features and 12-word captions (Flickr8k's mean is 11.8) of a 2,500-word vocabulary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.data.vocab import END, START  # noqa: E402
from captioner.model.decoder import CaptionDecoder, DecoderConfig, caption_loss  # noqa: E402
from captioner.training.grad_flow import hidden_gradients  # noqa: E402


def timed_side_by_side(first, second, repeats: int) -> tuple[float, float]:
    """ms a call of each, the two alternated so that a busy machine slows both alike."""
    first(), second()  # warm-up
    totals = [0.0, 0.0]
    for _ in range(repeats):
        for k, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            totals[k] += time.perf_counter() - start
    return 1000 * totals[0] / repeats, 1000 * totals[1] / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab, words = 2500, 12
    features = torch.randn(args.batch_size, 1280)
    captions = torch.cat([torch.full((args.batch_size, 1), START), torch.randint(4, vocab, (args.batch_size, words)),
                          torch.full((args.batch_size, 1), END)], dim=1)
    lengths = torch.full((args.batch_size,), words + 2)
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, hidden {args.hidden_dim}")
    print("cell | ms a step | ms a record | added at every", args.every)
    for cell in ("lstm", "gru", "rnn"):
        decoder = CaptionDecoder(DecoderConfig(1280, vocab, embed_dim=256, hidden_dim=args.hidden_dim, cell=cell)).train()
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)

        def step():
            loss = caption_loss(decoder(features, captions, lengths), captions)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step_ms, record_ms = timed_side_by_side(step, lambda: hidden_gradients(decoder, features, captions, lengths),
                                                args.repeats)
        print(f"{cell} | {step_ms:.1f} | {record_ms:.1f} | {100 * record_ms / (args.every * step_ms):.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
