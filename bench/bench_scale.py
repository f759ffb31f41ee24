"""Captioning past one folder, measured side by side in one run on the same real images:

    python bench/bench_scale.py [--dataset ../shared/data/flickr8k] [--images 500] [--shard-size 100]

(1) the single-process CLI path on JPEG files; (2) the same JPEGs packed into WebDataset shards
(written here with tarfile, as img2dataset lays them out) and streamed; (3) Ray Data with a local
Ray (started before the clock, as a running cluster is) and 2 CPU actors of 1 thread each on the
files, the actors' start-up (loading the model, compiling the encoder) included; (4) training's
encoding pass (the feature cache's fill, eager PyTorch as training runs it) over the same images as
files and as shards indexed and read in place. Prints images/s, the ratios (targets: (2)/(1) >= 0.9,
(3)/(1) >= 0.8, shards against files in (4) >= 0.9) and, on paper, what N machines would take for
COCO and CC3M.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_caption import image_list  # noqa: E402
from captioner import Captioner  # noqa: E402
from captioner.batch import ResultWriter, caption_files, caption_shards  # noqa: E402
from captioner.data.datasets import load_dataset  # noqa: E402
from captioner.model.encoders import build_encoder  # noqa: E402
from captioner.model.runtime import keep_freed_memory  # noqa: E402
from captioner.training.features import compute_features  # noqa: E402


def write_shards(paths: list[str], folder: Path, per_shard: int) -> list[str]:
    shards = []
    for start in range(0, len(paths), per_shard):
        shard = folder / f"{start // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, path in enumerate(paths[start:start + per_shard], start):
                for ext, data in (("jpg", Path(path).read_bytes()), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(str(shard))
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/flickr8k")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does
    paths = image_list(Path(args.dataset), args.images)
    cap = Captioner.from_pretrained(args.checkpoint)
    cap.caption(paths[:4])
    settings = {"method": "greedy", "options": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = write_shards(paths, tmp, args.shard_size)

        def timed(run, out):
            writer = ResultWriter.open(str(tmp / out), settings)
            start = time.perf_counter()
            try:
                run(writer)
            finally:
                writer.close()
            return len(paths) / (time.perf_counter() - start)

        files = timed(lambda w: caption_files(cap, paths, w, progress=False), "files.jsonl")
        streamed = timed(lambda w: caption_shards(cap, shards, w, progress=False), "shards.jsonl")
        import ray

        from captioner.ray_batch import caption_with_ray

        # a cluster that is already up, as `--ray auto` joins one; the actors' start-up is timed
        ray.init(include_dashboard=False, log_to_driver=False)
        on_ray = timed(lambda w: caption_with_ray(paths, False, str(tmp / "ray.jsonl"), w, actors=2,
                                                  checkpoint=args.checkpoint), "ray.jsonl")
        ray.shutdown()
        encoder = build_encoder("efficientnet_lite0")
        members = [r.image for r in load_dataset(f"{tmp}/{{00000..{len(shards) - 1:05d}}}.tar").records]
        assert len(members) == len(paths)
        compute_features(encoder, paths[:64], workers=0, desc="warming up")  # the first pass pays for setup
        encoding = {}
        for name, sources in (("files", paths), ("shards", members)):
            start = time.perf_counter()
            compute_features(encoder, sources, workers=0, desc=f"encoding {name}")
            encoding[name] = len(paths) / (time.perf_counter() - start)
    print(f"{len(paths)} images from {args.dataset}, {len(shards)} shards of {args.shard_size}; {os.cpu_count()} cores")
    print(f"(1) files, one process        {files:6.1f} images/s")
    print(f"(2) WebDataset shards         {streamed:6.1f} images/s   (2)/(1) {streamed / files:.2f}  [>= 0.9]")
    print(f"(3) Ray Data, 2 actors        {on_ray:6.1f} images/s   (3)/(1) {on_ray / files:.2f}  [>= 0.8]")
    print(f"(4) training's encoding pass  files {encoding['files']:.1f}, shards in place {encoding['shards']:.1f} "
          f"images/s   shards/files {encoding['shards'] / encoding['files']:.2f}  [>= 0.9]")
    per_core = files / (os.cpu_count() or 1)
    print(f"on paper, at this machine's {per_core:.1f} images/s a core, Ray's start-up aside:")
    for name, count in (("COCO (123k)", 123_000), ("CC3M (3.3M)", 3_300_000)):
        row = ", ".join(f"{n} x 16 cores {count / (per_core * 16 * n) / 3600:.2f} h" for n in (1, 4, 16))
        print(f"  {name}: {row}")


if __name__ == "__main__":
    main()
