"""Captioning speed, measured side by side in one run on the same real images.

    python bench/bench_caption.py [--dataset ../shared/data/flickr8k] [--images 500] [--checkpoint DIR]

(a) the encoder alone on preprocessed tensors: the bound for this machine;
(b) our pipeline, JPEG files -> written captions, greedy and beam 3;
(c) a naive loop as tutorials write it: per image load -> preprocess -> encode -> greedy;
(d) single-image latency of `Captioner.caption` (greedy), p50 and p95: what the web UI pays.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import Captioner  # noqa: E402
from captioner.batch import ResultWriter, caption_files  # noqa: E402
from captioner.decoding import greedy  # noqa: E402
from captioner.runtime import PRECISIONS, autocast_dtype, keep_freed_memory  # noqa: E402


def image_list(dataset: Path, count: int) -> list[str]:
    names = (dataset / "test.txt").read_text().split()
    if len(names) < count:
        names += (dataset / "train.txt").read_text().split()
    return [str(dataset / "images" / n) for n in names[:count]]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/flickr8k")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="default: the CLI's (0 on 2 cores or fewer)")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (the CLI tunes it)")
    args = parser.parse_args()
    tuned = not args.default_malloc and keep_freed_memory()

    paths = image_list(Path(args.dataset), args.images)
    cap = Captioner.from_pretrained(args.checkpoint, precision=args.precision)
    n = len(paths)
    print(f"{n} images from {args.dataset}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, device {cap.device}, encoder autocast "
          f"{autocast_dtype(cap.device, args.precision) or 'off (fp32)'}, allocator {'tuned' if tuned else 'default'}")
    cap.caption(paths[:4])  # warm-up: first calls pay one-off allocations

    # (a) encoder alone, on tensors already decoded and resized
    pixels = torch.stack([cap.transform.load(p) for p in paths])
    with torch.inference_mode():
        encoder_s = timed(lambda: [cap.encode(pixels[i:i + args.batch_size]) for i in range(0, n, args.batch_size)])

    # (b) the pipeline: JPEGs in, captions written
    def pipeline(method, **options):
        with tempfile.TemporaryDirectory() as tmp:
            writer = ResultWriter.open(str(Path(tmp) / "out.jsonl"), {"method": method, "options": options})
            try:
                return timed(lambda: caption_files(cap, paths, writer, method=method, batch_size=args.batch_size,
                                                   workers=args.workers, progress=False, **options))
            finally:
                writer.close()

    greedy_s = pipeline("greedy")
    beam_s = pipeline("beam", beam_size=3)

    # (c) the tutorial loop, one image at a time: the same weights in PyTorch's default (NCHW)
    # memory format and fp32, as a model built the usual way has them
    plain_trunk = copy.deepcopy(cap.encoder.trunk).to(memory_format=torch.contiguous_format)

    def naive():
        with torch.no_grad():
            for p in paths:
                x = cap.transform(Image.open(p).convert("RGB"))[None]
                greedy(cap.decoder, plain_trunk(x).mean((2, 3)), max_length=20)

    naive_s = timed(naive)

    # (d) latency of one image through the public API
    latencies = []
    for p in paths[: args.latency_runs]:
        start = time.perf_counter()
        cap.caption(p)
        latencies.append(1000 * (time.perf_counter() - start))
    p50 = statistics.median(latencies)
    p95 = statistics.quantiles(latencies, n=20)[-1]

    rate = {"a": n / encoder_s, "b_greedy": n / greedy_s, "b_beam3": n / beam_s, "c": n / naive_s}
    print(f"(a) encoder alone            {rate['a']:7.1f} images/s")
    print(f"(b) pipeline, greedy         {rate['b_greedy']:7.1f} images/s")
    print(f"(b) pipeline, beam 3         {rate['b_beam3']:7.1f} images/s")
    print(f"(c) naive loop, greedy       {rate['c']:7.1f} images/s")
    print(f"(d) single image, greedy     p50 {p50:.0f} ms, p95 {p95:.0f} ms ({len(latencies)} runs)")
    print("ratios (targets in brackets):")
    print(f"  (b greedy)/(a)       {rate['b_greedy'] / rate['a']:.2f}  [>= 0.8]")
    print(f"  (b greedy)/(c)       {rate['b_greedy'] / rate['c']:.2f}  [>= 3]")
    print(f"  beam 3 time / greedy {beam_s / greedy_s:.2f}  [<= 1.5]")
    print(f"  p50 latency          {p50:.0f} ms  [< 150]")


if __name__ == "__main__":
    main()
