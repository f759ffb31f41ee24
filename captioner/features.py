"""Encoder features computed once and cached on disk, so training epochs touch only the decoder.

With `boundary=True` the cache holds the activations where the encoder's frozen blocks end instead
of pooled features: fine-tuning the last blocks then never runs the frozen ones again."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import atomic_file
from .encoders import Encoder
from .loading import image_batches
from .runtime import autocast, autocast_dtype


def cache_key(encoder: Encoder, paths: list[Path], flip: bool, device: torch.device, precision: str,
              boundary: bool = False) -> str:
    """Changes whenever the encoder, its weights, the preprocessing, the precision it computes in, the
    block it stops at, or the images (their contents, in order) change.

    Images are keyed by content, not by path and modification time: a dataset that is copied, moved
    or remounted keeps its cache (hashing Flickr8k's 8000 JPEGs takes under a second; encoding them
    takes minutes)."""
    files = [_content_id(Path(p)) for p in paths]
    dtype = autocast_dtype(device, precision) or torch.float32
    what = {"encoder": encoder.name, "weights": encoder.weights_id, "transform": encoder.transform.to_dict(),
            "flip": flip, "dtype": str(dtype), "files": files}
    if boundary:
        what["trainable_blocks"] = encoder.trainable_blocks
    if encoder.with_labels and not boundary:
        what["labels"] = encoder.num_classes  # the class probabilities travel after the pooled features
    blob = json.dumps(what, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _content_id(path: Path) -> str:
    try:
        stat = path.stat()
        return _digest(str(path), stat.st_size, stat.st_mtime_ns)
    except OSError as err:  # encoding reports the file as unreadable; the key just has to be stable
        return f"unreadable: {err.strerror}"


@functools.lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    # Memoised within a process: fine-tuning keys its activations over the same images right after
    # the features, and need not read them all again (a minute for COCO). Size and mtime are part
    # of the memo's key only, so a file rewritten meanwhile is read afresh.
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


@torch.inference_mode()
def compute_features(encoder: Encoder, paths: list[Path], *, flip: bool = False, batch_size: int = 64,
                     workers: int = 1, device: str | torch.device = "cpu", precision: str = "auto",
                     boundary: bool = False, desc: str = "encoding images"):
    """-> (features V x N x D fp16, {index: error}). V is 2 with `flip` (original, mirrored).

    `boundary`: V x N x C x h x w activations at `Encoder.boundary` instead of pooled features."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    run = encoder.boundary if boundary else encoder
    views = 2 if flip else 1
    size = encoder.transform.size
    shape = run(torch.zeros(1, 3, size, size, device=device)).shape[1:]
    out = torch.zeros(views, len(paths), *shape, dtype=torch.float16)
    errors: dict[int, str] = {}
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for indices, pixels, bad in image_batches(paths, encoder.transform, batch_size, workers, flip,
                                                  pin_memory=device.type == "cuda"):
            errors.update(bad)
            if indices:
                x = pixels.to(device, non_blocking=True).flatten(0, 1)
                with autocast(device, precision):
                    feats = run(x).float()
                out[:, indices] = feats.reshape(views, len(indices), *shape).half().cpu()
            bar.update(len(indices) + len(bad))
    return out, errors


def cached_features(encoder: Encoder, paths: list[Path], cache_dir: str | Path, *, flip: bool = False,
                    batch_size: int = 64, workers: int = 1, device: str | torch.device = "cpu",
                    precision: str = "auto", boundary: bool = False, rank: int = 0, processes: int = 1,
                    barrier=lambda: None):
    """Loads features for `paths` from the cache, computing and storing them on a miss.

    Several processes (`rank` of `processes`, meeting at `barrier`) share the work on a miss: every
    rank derives the same cache key from the same inputs, so they agree on the file names without
    talking; each encodes every `processes`-th image from its rank on into its own part file, and
    rank 0 merges the parts into the cache file the others then read. The cache folder must be one
    that every node sees (a shared file system).

    -> (features V x N x D fp16, {index: error}, cache file path)
    """
    key = cache_key(encoder, paths, flip, torch.device(device), precision, boundary)
    cache_dir = Path(cache_dir)
    kind = f"activations-{encoder.frozen_blocks}blocks" if boundary else "features"
    path = cache_dir / f"{kind}-{encoder.name}-{key}.safetensors"
    stored = _load(path)
    if stored is not None:
        return (*stored, path)
    encode = dict(flip=flip, batch_size=batch_size, workers=workers, device=device, precision=precision,
                  boundary=boundary)
    if processes == 1:
        features, errors = compute_features(encoder, paths, **encode)
        _save(path, features, errors, key, encoder.name, len(paths))
        return features, errors, path
    def part(r: int) -> Path:
        return path.with_name(f"{path.stem}.part{r}of{processes}.safetensors")

    mine = range(rank, len(paths), processes)
    features, errors = compute_features(encoder, [paths[i] for i in mine], **encode,
                                        desc=f"encoding images (rank {rank}: 1 in {processes})")
    _save(part(rank), features, {mine[i]: e for i, e in errors.items()}, key, encoder.name, len(mine))
    barrier()  # every part is written
    if rank == 0:
        parts = [part(r) for r in range(processes)]
        loaded = [_load(p) for p in parts]
        merged = torch.zeros(features.size(0), len(paths), *features.shape[2:], dtype=features.dtype)
        for r, (share, share_errors) in enumerate(loaded):
            merged[:, r::processes] = share
            errors.update(share_errors)
        _save(path, merged, errors, key, encoder.name, len(paths))
        for p in parts:
            p.unlink()
    barrier()  # the merged file is in place
    return (*_load(path), path)


def _load(path: Path):
    """(features, errors) of a cache file, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        stored = load_file(str(path))
        errors = {int(k): v for k, v in json.loads(_metadata(path).get("errors", "{}")).items()}
        return stored["features"], errors
    except Exception as err:  # a torn or foreign file: recompute rather than fail
        print(f"feature cache {path} unreadable ({err}); recomputing")
        return None


def _save(path: Path, features: torch.Tensor, errors: dict, key: str, encoder_name: str, images: int) -> None:
    metadata = {"key": key, "encoder": encoder_name, "errors": json.dumps(errors), "images": str(images)}
    atomic_file(path, lambda tmp: save_file({"features": features.contiguous()}, tmp, metadata=metadata))


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}
