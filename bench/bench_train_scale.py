"""Seconds per training epoch in one process, two processes (torchrun, one node) and two "nodes"
(two torchrun launches meeting at one c10d rendezvous on 127.0.0.1), on the same Flickr8k subset
and a feature cache filled beforehand, side by side in one run:

    python bench/bench_train_scale.py [--dataset ../shared/data/flickr8k] [--train 600] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def flags(data: Path, out: Path, cache: Path, epochs: int) -> list[str]:
    return ["--dataset", str(data / "subset.csv"), "--images", str(data / "images"), "--output", str(out),
            "--cache-dir", str(cache), "--epochs", str(epochs), "--embed-dim", "256", "--hidden-dim", "512",
            "--batch-size", "64", "--no-flip", "--no-test-report", "--workers", "0", "--min-count", "3",
            "--patience", "10"]


def seconds_per_epoch(run: Path) -> float:
    elapsed = [json.loads(line)["elapsed_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/flickr8k")
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dataset).resolve()
    captions: dict[str, list[str]] = {}
    for line in (root / "captions.txt").read_text().splitlines():
        name, _, text = line.partition("\t")
        captions.setdefault(name.split("#")[0], []).append(text.replace('"', "'"))
    train = (root / "train.txt").read_text().split()[:args.train]
    val = (root / "dev.txt").read_text().split()[:args.val]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = ["image,caption,split"] + [f'{n},"{c}",{split}' for split, names in (("train", train), ("val", val))
                                          for n in names for c in captions[n]]
        (tmp / "subset.csv").write_text("\n".join(rows) + "\n")
        os.symlink(root / "images", tmp / "images")
        cache, env = tmp / "cache", {**os.environ, "OMP_NUM_THREADS": "1"}
        cli = [sys.executable, "-m", "captioner", "train"]
        subprocess.run([*cli, *flags(tmp, tmp / "warm", cache, 1)], check=True, capture_output=True)  # fills the cache
        subprocess.run([*cli, *flags(tmp, tmp / "one", cache, args.epochs)], check=True, capture_output=True)
        torchrun = [sys.executable, "-m", "torch.distributed.run"]
        subprocess.run([*torchrun, "--standalone", "--nproc-per-node=2", "-m", "captioner", "train",
                        *flags(tmp, tmp / "two", cache, args.epochs)], check=True, capture_output=True, env=env)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        nodes = [subprocess.Popen([*torchrun, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                   f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench", "-m", "captioner",
                                   "train", *flags(tmp, tmp / "nodes", cache, args.epochs)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for _ in range(2)]
        if any(node.wait() for node in nodes):
            raise SystemExit("the two-node run failed")
        one = seconds_per_epoch(tmp / "one")
        print(f"{len(train)} training images ({sum(len(captions[n]) for n in train)} captions), batch 64, "
              f"{args.epochs} epochs, {os.cpu_count()} cores")
        for name, run in (("one process", "one"), ("two processes, one node", "two"),
                          ("two nodes (two torchrun launches, c10d)", "nodes")):
            seconds = seconds_per_epoch(tmp / run)
            print(f"  {name:42s} {seconds:6.2f} s an epoch  ({one / seconds:.2f}x one process)")


if __name__ == "__main__":
    main()
