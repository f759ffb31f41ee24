"""What explaining a caption costs beside captioning it: one image at a time, as the web UI runs.

    python bench/bench_explain.py [--checkpoint DIR] [--images N] [--repeats 5]

For each photo (gradio's example photos, then Flickr8k's test photos if ../shared is there):
p50 of `Captioner.caption` (greedy) and of `Captioner.explain` (greedy caption, Grad-CAM for each
word, labels), measured alternately in one run, and their ratio. Target: explain <= 3x caption.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import gradio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import Captioner  # noqa: E402


def photos(count: int) -> list[Path]:
    found = sorted((Path(gradio.__file__).parent / "media_assets" / "images").glob("*.jpg"))
    flickr = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
    if (flickr / "test.txt").is_file():
        found += [flickr / "images" / n for n in (flickr / "test.txt").read_text().split()]
    return found[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.checkpoint)
    images = photos(args.images)
    captioner.caption(images[0])
    captioner.explain(images[0])  # warm-up
    caption_ms, explain_ms, words = [], [], []
    for image in images:
        for _ in range(args.repeats):
            start = time.perf_counter()
            captioner.caption(image)
            caption_ms.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            words.append(len(captioner.explain(image).words))
            explain_ms.append(1000 * (time.perf_counter() - start))
    c, e = statistics.median(caption_ms), statistics.median(explain_ms)
    print(f"{len(images)} images x {args.repeats}, {torch.get_num_threads()} threads, "
          f"mean caption length {statistics.mean(words):.1f} words")
    print(f"caption (greedy)       p50 {c:6.1f} ms")
    print(f"explain (greedy + maps) p50 {e:6.1f} ms   ratio {e / c:.2f}x (target <= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
