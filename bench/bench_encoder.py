"""The encoder through every backend and precision, on the same batches, side by side in one run.

    python bench/bench_encoder.py [--dataset ../shared/data/flickr8k] [--images 128] [--rounds 3] [--compile]

Cases: `Captioner.encode` as it was (eager PyTorch, unfolded), PyTorch with the trunk folded, the
same under bf16 autocast where the CPU is native, `torch.compile` (with --compile: minutes to
compile on 2 cores), ONNX Runtime fp32 and OpenVINO f32 / bf16-hint on the ONNX export of the same
weights, and `Captioner.encode` with default settings (backend "auto"). The process keeps glibc's
allocator as it is, as a plain Python process would. Each case runs every batch once per round,
rounds interleaved; images/s is the median round. Min cosine is to eager fp32 on the same tensors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import Captioner  # noqa: E402
from captioner.inference.engines import OnnxEngine, TorchEngine, installed  # noqa: E402
from captioner.model.runtime import autocast_dtype, native_cpu_bf16  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_caption import image_list  # noqa: E402


def cases(args, checkpoint, device):
    """(name, pixels -> features) for this machine's engines, built with the current thread count."""
    cap = Captioner.from_pretrained(checkpoint, device=device)
    enc, spatial = cap.encoder, cap.decoder.config.takes_map
    native = autocast_dtype(device, "auto") is not None
    out = [("Captioner.encode before (eager, unfolded)",
            Captioner.from_pretrained(checkpoint, device=device, backend="torch", fold=False).encode)]
    out.append(("eager fp32, unfolded", TorchEngine(enc, spatial, device, "fp32", fold=False)))
    out.append(("eager fp32, folded", TorchEngine(enc, spatial, device, "fp32")))
    if native:
        out.append(("eager bf16 autocast, folded", TorchEngine(enc, spatial, device, "auto")))
    if args.compile:
        for precision in ("fp32", "auto") if native else ("fp32",):
            engine = TorchEngine(enc, spatial, device, precision)
            engine.trunk = torch.compile(engine.trunk)
            out.append((f"torch.compile {'bf16' if precision == 'auto' else 'fp32'}, folded", engine))
    if installed("onnxruntime"):
        out.append(("ONNX Runtime fp32", OnnxEngine(enc, spatial, "onnxruntime", "fp32")))
    if installed("openvino"):
        out.append(("OpenVINO f32", OnnxEngine(enc, spatial, "openvino", "fp32")))
        # the bf16 hint is what OpenVINO itself defaults to where bf16 is native; elsewhere it runs f32
        out.append((f"OpenVINO bf16 hint{'' if native_cpu_bf16() else ' (not native here: f32)'}",
                    OnnxEngine(enc, spatial, "openvino", "auto")))
    default = Captioner.from_pretrained(checkpoint, device=device)
    out.append((f"Captioner.encode now (default: backend {default.backend})", default.encode))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/flickr8k")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", default="2,1", help="thread counts to measure, comma-separated")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the folded trunk")
    args = parser.parse_args()
    device = torch.device("cpu")
    probe = Captioner.from_pretrained(args.checkpoint, device=device)
    paths = image_list(Path(args.dataset), args.images)
    pixels = torch.stack([probe.transform.load(p) for p in paths])
    batches = list(pixels.split(args.batch_size))
    with torch.inference_mode():
        exact = torch.cat([TorchEngine(probe.encoder, probe.decoder.config.takes_map, device, "fp32", False)(b)
                           for b in batches])
    print(f"{len(paths)} images from {args.dataset} in batches of {args.batch_size}; torch {torch.__version__}, "
          f"{os.cpu_count()} cores, native bf16: {native_cpu_bf16()}, {args.rounds} rounds")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        measured = cases(args, args.checkpoint, device)
        rates = {name: [] for name, _ in measured}
        cosine = {}
        with torch.inference_mode():
            for name, encode in measured:  # warm-up: first calls compile, allocate, export
                features = torch.cat([encode(b) for b in batches])
                cosine[name] = float(torch.nn.functional.cosine_similarity(features, exact).min())
            for _ in range(args.rounds):
                for name, encode in measured:
                    start = time.perf_counter()
                    for b in batches:
                        encode(b)
                    rates[name].append(len(paths) / (time.perf_counter() - start))
        before = statistics.median(rates[measured[0][0]])
        print(f"\n{threads} thread(s)")
        print("| encoder path | images/s | x before | min cosine to fp32 |\n| --- | --- | --- | --- |")
        for name, _ in measured:
            rate = statistics.median(rates[name])
            print(f"| {name} | {rate:.1f} | {rate / before:.2f} | {cosine[name]:.4f} |")
        engines = [(statistics.median(rates[n]), n) for n, _ in measured if n.startswith(("ONNX", "OpenVINO"))]
        if engines:
            fastest, name = max(engines)
            default = statistics.median(rates[measured[-1][0]])
            print(f"Captioner.encode default / fastest engine ({name}): {default / fastest:.2f}  [>= 0.95]")


if __name__ == "__main__":
    main()
