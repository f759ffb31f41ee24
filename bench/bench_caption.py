"""Captioning speed, measured side by side in one run on the same real images.

    python bench/bench_caption.py [--dataset ../shared/data/flickr8k] [--images 500] [--checkpoint DIR]

(a) the encoder alone on preprocessed tensors: the bound for this machine;
(b) our pipeline, JPEG files -> written captions, greedy and beam 3 (also with objects named freely,
    and without consensus re-ranking);
(c) a naive loop as tutorials write it: per image load -> preprocess -> encode -> greedy;
(d) single-image latency of `Captioner.caption`, greedy and beam 3, p50 and p95: what the web UI pays;
(e) greedy decoding at batch 1, per token, beside the time the decoder's fp32 weights take to read.
With --baseline the path before encoder backends and folding is measured in the same run.
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
from captioner.inference.decoding import greedy  # noqa: E402
from captioner.inference.engines import BACKENDS  # noqa: E402
from captioner.model.runtime import PRECISIONS, autocast_dtype, keep_freed_memory  # noqa: E402


def image_list(dataset: Path, count: int) -> list[str]:
    names = (dataset / "test.txt").read_text().split()
    if len(names) < count:
        names += (dataset / "train.txt").read_text().split()
    return [str(dataset / "images" / n) for n in names[:count]]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_read_ms(decoder, runs: int = 200) -> float:
    """The time to read the decoder's fp32 weights once: two bare matrix-vector products of the
    LSTM's [W_ih | W_hh] and the output layer's sizes. A step that streams every weight once
    per token cannot beat it without fewer bytes per weight."""
    lstm = decoder.lstm
    w = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], dim=1).detach().float().contiguous()
    out = decoder.classifier.weight.detach().float().contiguous()
    x, y = torch.randn(w.size(1)), torch.randn(out.size(1))
    with torch.inference_mode():
        for _ in range(20):
            torch.mv(w, x), torch.mv(out, y)
        start = time.perf_counter()
        for _ in range(runs):
            torch.mv(w, x), torch.mv(out, y)
    return 1000 * (time.perf_counter() - start) / runs


def decode_ms_per_token(cap, features: torch.Tensor) -> float:
    """Greedy decoding one image at a time (what the web UI pays after the encoder), per token."""
    total, tokens = 0.0, 0
    for i in range(features.size(0)):
        start = time.perf_counter()
        caption = cap.decode(features[i:i + 1])[0][0]
        total += time.perf_counter() - start
        tokens += len(caption.token_logprobs)
    return 1000 * total / tokens


def measure(cap, paths, args) -> dict:
    n = len(paths)
    cap.caption(paths[:4])  # warm-up: first calls build the engine and pay one-off allocations

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
    beam_free_s = pipeline("beam", beam_size=3, name_once=False)  # what naming an object once costs
    beam_unranked_s = pipeline("beam", beam_size=3, consensus_samples=0)  # what consensus re-ranking costs

    # (c) the tutorial loop, one image at a time: the same weights in PyTorch's default (NCHW)
    # memory format and fp32, as a model built the usual way has them
    plain_trunk = copy.deepcopy(cap.encoder.trunk).to(memory_format=torch.contiguous_format)

    def naive():
        with torch.no_grad():
            for p in paths[:args.naive_images]:
                x = cap.transform(Image.open(p).convert("RGB"))[None]
                greedy(cap.decoder, cap.encoder.pool(plain_trunk(x)), max_length=20)

    naive_s = timed(naive)

    # (d) latency of one image through the public API, greedy and beam 3 (the web UI's default)
    latencies = {"greedy": [], "beam": []}
    for p in paths[: args.latency_runs]:
        for method, times in latencies.items():
            start = time.perf_counter()
            cap.caption(p, method)
            times.append(1000 * (time.perf_counter() - start))

    # (e) greedy decoding at batch 1, per token, beside the time to read the weights once
    features = cap.encode(pixels[: args.latency_runs])
    return {"a": n / encoder_s, "b_greedy": n / greedy_s, "b_beam3": n / beam_s,
            "c": min(n, args.naive_images) / naive_s, "p50": statistics.median(latencies["greedy"]),
            "p95": statistics.quantiles(latencies["greedy"], n=20)[-1], "beam_p50": statistics.median(latencies["beam"]),
            "beam_p95": statistics.quantiles(latencies["beam"], n=20)[-1], "token_ms": decode_ms_per_token(cap, features),
            "read_ms": weight_read_ms(cap.decoder.members[0] if hasattr(cap.decoder, "members") else cap.decoder),
            "beam_over_greedy": beam_s / greedy_s, "b_beam3_free": n / beam_free_s,
            "b_beam3_unranked": n / beam_unranked_s}


def report(name: str, r: dict) -> None:
    print(f"{name}")
    print(f"  (a) encoder alone            {r['a']:7.1f} images/s")
    print(f"  (b) pipeline, greedy         {r['b_greedy']:7.1f} images/s")
    print(f"  (b) pipeline, beam 3         {r['b_beam3']:7.1f} images/s")
    print(f"  (b) beam 3, named freely     {r['b_beam3_free']:7.1f} images/s (naming a thing once: "
          f"{r['b_beam3'] / r['b_beam3_free']:.2f}x as fast)")
    print(f"  (b) beam 3, not re-ranked    {r['b_beam3_unranked']:7.1f} images/s (consensus re-ranking: "
          f"{r['b_beam3'] / r['b_beam3_unranked']:.2f}x as fast)")
    print(f"  (c) naive loop, greedy       {r['c']:7.1f} images/s")
    print(f"  (d) single image, greedy     p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms")
    print(f"  (d) single image, beam 3     p50 {r['beam_p50']:.0f} ms, p95 {r['beam_p95']:.0f} ms "
          f"({r['beam_p50'] / r['p50']:.2f}x greedy's p50)")
    print(f"  (e) greedy at batch 1        {r['token_ms']:.2f} ms a token; reading the fp32 weights once "
          f"{r['read_ms']:.2f} ms ({r['token_ms'] / r['read_ms']:.2f}x)")
    print(f"  (b greedy)/(a) {r['b_greedy'] / r['a']:.2f}   (b greedy)/(c) {r['b_greedy'] / r['c']:.2f}   "
          f"beam 3 time / greedy {r['beam_over_greedy']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/flickr8k")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--naive-images", type=int, default=100, help="(c) is slow: time it on this many")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="default: the CLI's (0 on 2 cores or fewer)")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--no-fold", dest="fold", action="store_false")
    parser.add_argument("--baseline", action="store_true",
                        help="also measure the path before backends and folding (--backend torch --no-fold) "
                             "in the same run, and print the ratios")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (the CLI tunes it)")
    args = parser.parse_args()
    tuned = not args.default_malloc and keep_freed_memory()

    paths = image_list(Path(args.dataset), args.images)
    cap = Captioner.from_pretrained(args.checkpoint, precision=args.precision, backend=args.backend, fold=args.fold)
    print(f"{len(paths)} images from {args.dataset}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, device {cap.device}, autocast "
          f"{autocast_dtype(cap.device, args.precision) or 'off (fp32)'}, allocator {'tuned' if tuned else 'default'}")
    setups = [(f"backend {cap.backend}, fold {args.fold}", cap)]
    if args.baseline:
        setups.append(("before: backend torch, no fold", Captioner.from_pretrained(
            args.checkpoint, precision=args.precision, backend="torch", fold=False)))
    results = {name: measure(c, paths, args) for name, c in setups}
    for name, r in results.items():
        report(name, r)
    if args.baseline:
        now, before = results.values()
        print(f"now / before: (a) {now['a'] / before['a']:.2f}, (b) greedy {now['b_greedy'] / before['b_greedy']:.2f} "
              f"[>= 1.5], (b) beam 3 {now['b_beam3'] / before['b_beam3']:.2f}, (d) p50 {now['p50'] / before['p50']:.2f}, "
              f"(e) {now['token_ms'] / before['token_ms']:.2f}")


if __name__ == "__main__":
    main()
