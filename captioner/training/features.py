"""Encoder features computed once and kept on disk, so training epochs touch only the decoder.

The cache is a folder of chunk files (safetensors, `chunk_mb` each at most), written one by one as
encoding goes, and memory-mapped when read: a batch pages in only the rows it picks, so a cache
larger than RAM trains (an attention decoder's maps: 2 GB for Flickr8k, ~31 GB for COCO), and an
interrupted encoding keeps every chunk it finished.

With `boundary=True` the cache holds the activations where the encoder's frozen blocks end instead
of pooled features: fine-tuning the last blocks then never runs the frozen ones again."""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data.atomic import atomic_file
from ..data.loading import image_batches
from ..data.shards import ShardMember, content_digest
from ..model.encoders import Encoder
from ..model.runtime import autocast, autocast_dtype


def cache_key(encoder: Encoder, paths: list[Path | ShardMember], flip: bool, device: torch.device, precision: str,
              boundary: bool = False) -> str:
    """Changes whenever the encoder, its weights, the preprocessing, the precision it computes in, the
    block it stops at, or the images (their contents, in order) change.

    Images are keyed by content, not by path and modification time: a dataset that is copied, moved
    or remounted keeps its cache (hashing Flickr8k's 8000 JPEGs takes under a second; encoding them
    takes minutes)."""
    files = [_content_id(p) for p in paths]
    dtype = autocast_dtype(device, precision) or torch.float32
    what = {"encoder": encoder.name, "weights": encoder.weights_id, "transform": encoder.transform.to_dict(),
            "flip": flip, "dtype": str(dtype), "files": files}
    if boundary:
        what["trainable_blocks"] = encoder.trainable_blocks
    if encoder.with_labels and not boundary:
        what["labels"] = encoder.num_classes  # the class probabilities travel after the pooled features
    blob = json.dumps(what, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _content_id(image: Path | ShardMember) -> str:
    if isinstance(image, ShardMember):
        return image.digest  # taken when the shard was indexed
    try:
        stat = Path(image).stat()
        return _digest(str(image), stat.st_size, stat.st_mtime_ns)
    except OSError as err:  # encoding reports the file as unreadable; the key just has to be stable
        return f"unreadable: {err.strerror}"


@functools.lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    # Memoised within a process: fine-tuning keys its activations over the same images right after
    # the features, and need not read them all again (a minute for COCO). Size and mtime are part
    # of the memo's key only, so a file rewritten meanwhile is read afresh.
    return content_digest(Path(path).read_bytes())


class FeatureStore:
    """Cached features as one V x N x ... array over memory-mapped chunk files, indexed as
    `store[views, images]` (views an int or one per image): only the picked rows are read. `subset`
    narrows it to some images (a split) without reading anything."""

    def __init__(self, chunks: list[torch.Tensor], images: torch.Tensor | None = None):
        self.chunks = chunks
        sizes = torch.tensor([c.size(1) for c in chunks])
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.images = torch.arange(int(sizes.sum())) if images is None else images

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.chunks[0].size(0), len(self.images), *self.chunks[0].shape[2:])

    def size(self, dim: int) -> int:
        return self.shape[dim]

    def subset(self, images) -> "FeatureStore":
        return FeatureStore(self.chunks, self.images[torch.as_tensor(images, dtype=torch.long)])

    def __getitem__(self, key) -> torch.Tensor:
        views, images = key
        wanted = self.images[images].reshape(-1)
        views = torch.as_tensor(views, dtype=torch.long).expand(len(wanted))
        chunk_of = torch.searchsorted(self.starts, wanted, right=True) - 1
        out = torch.empty(len(wanted), *self.shape[2:], dtype=self.chunks[0].dtype)
        for c in chunk_of.unique().tolist():
            rows = (chunk_of == c).nonzero().squeeze(1)
            out[rows] = self.chunks[c][views[rows], wanted[rows] - self.starts[c]]
        return out

    def tensor(self, view: int = 0) -> torch.Tensor:
        """Every image of one view, read into memory (a dev split, decoded each epoch)."""
        return self[view, slice(None)]


@torch.inference_mode()
def compute_features(encoder: Encoder, paths: list[Path], *, flip: bool = False, batch_size: int = 64,
                     workers: int = 1, device: str | torch.device = "cpu", precision: str = "auto",
                     boundary: bool = False, desc: str = "encoding images", bar: tqdm | None = None):
    """-> (features V x N x D fp16, {index: error}). V is 2 with `flip` (original, mirrored).

    `boundary`: V x N x C x h x w activations at `Encoder.boundary` instead of pooled features.
    `bar`: a progress bar to advance instead of a new one."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    run = encoder.boundary if boundary else encoder
    shape = _output_shape(encoder, boundary, device)
    views = 2 if flip else 1
    out = torch.zeros(views, len(paths), *shape, dtype=torch.float16)
    errors: dict[int, str] = {}
    with tqdm(total=len(paths), desc=desc, unit="img", disable=bar is not None) as own_bar:
        for indices, pixels, bad in image_batches(paths, encoder.transform, batch_size, workers, flip,
                                                  pin_memory=device.type == "cuda"):
            errors.update(bad)
            if indices:
                x = pixels.to(device, non_blocking=True).flatten(0, 1)
                with autocast(device, precision):
                    feats = run(x).float()
                out[:, indices] = feats.reshape(views, len(indices), *shape).half().cpu()
            (bar or own_bar).update(len(indices) + len(bad))
    return out, errors


@torch.inference_mode()
def _output_shape(encoder: Encoder, boundary: bool, device: torch.device) -> tuple[int, ...]:
    encoder = encoder.to(device).eval()
    run = encoder.boundary if boundary else encoder
    size = encoder.transform.size
    return tuple(run(torch.zeros(1, 3, size, size, device=device)).shape[1:])


def cached_features(encoder: Encoder, paths: list[Path], cache_dir: str | Path, *, flip: bool = False,
                    batch_size: int = 64, workers: int = 1, device: str | torch.device = "cpu",
                    precision: str = "auto", boundary: bool = False, chunk_mb: float = 256.0,
                    rank: int = 0, processes: int = 1, barrier=lambda: None):
    """Opens the cached features of `paths`, encoding the chunks that are missing first.

    Several processes (`rank` of `processes`, meeting at `barrier`) share the encoding: every rank
    derives the same cache key and chunking from the same inputs, so they agree on the file names
    without talking; chunk c is encoded by rank c % processes, and after the barrier every rank
    maps them all. The cache folder must be one that every node sees (a shared file system).

    -> (FeatureStore V x N x ..., {index: error}, cache folder)
    """
    device = torch.device(device)
    key = cache_key(encoder, paths, flip, device, precision, boundary)
    kind = f"activations-{encoder.frozen_blocks}blocks" if boundary else "features"
    folder = Path(cache_dir) / f"{kind}-{encoder.name}-{key}"
    shape = _output_shape(encoder, boundary, device)
    views = 2 if flip else 1
    per_chunk = max(1, int(chunk_mb * 2**20) // (views * int(np.prod(shape)) * 2))
    bounds = [(start, min(start + per_chunk, len(paths))) for start in range(0, len(paths), per_chunk)]
    files = [folder / f"images-{start:09d}-{stop:09d}.safetensors" for start, stop in bounds]
    opened = {c: _open_chunk(files[c]) for c in range(rank, len(files), processes)}
    mine = [c for c, chunk in opened.items() if chunk is None]
    if mine:
        folder.mkdir(parents=True, exist_ok=True)
        todo = sum(bounds[c][1] - bounds[c][0] for c in mine)
        desc = "encoding images" + (f" (rank {rank} of {processes}: {len(mine)} chunks)" if processes > 1 else "")
        with tqdm(total=todo, desc=desc, unit="img") as bar:
            for c in mine:
                start, stop = bounds[c]
                features, errors = compute_features(encoder, paths[start:stop], flip=flip, batch_size=batch_size,
                                                    workers=workers, device=device, precision=precision,
                                                    boundary=boundary, bar=bar)
                metadata = {"key": key, "encoder": encoder.name, "start": str(start), "images": str(stop - start),
                            "errors": json.dumps({start + i: e for i, e in errors.items()})}
                atomic_file(files[c], lambda tmp: save_file({"features": features}, tmp, metadata=metadata))
    barrier()  # every rank's chunks are written
    chunks, errors = [], {}
    for c, path in enumerate(files):
        chunk = opened.get(c) or _open_chunk(path)  # a chunk found at the start is mapped already
        if chunk is None:
            raise RuntimeError(f"feature cache {path} is missing or unreadable after encoding")
        chunks.append(chunk[0])
        errors.update(chunk[1])
    return FeatureStore(chunks), errors, folder


def _open_chunk(path: Path):
    """(features memory-mapped, {index: error}) of a chunk file, or None when it is missing or unreadable.

    The safetensors header is read as the format defines it (8-byte length, JSON), and the tensor
    mapped copy-on-write: nothing is loaded until indexed, and the file is never written."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(length))
        entry = header["features"]
        if entry["dtype"] != "F16":
            raise ValueError(f"dtype {entry['dtype']}, expected F16")
        begin, _ = entry["data_offsets"]
        array = np.memmap(path, dtype=np.float16, mode="c", offset=8 + length + begin, shape=tuple(entry["shape"]))
        errors = {int(k): v for k, v in json.loads(header.get("__metadata__", {}).get("errors", "{}")).items()}
        return torch.from_numpy(array), errors
    except Exception as err:  # a torn or foreign file: encode its images again rather than fail
        print(f"feature cache {path} unreadable ({err}); encoding its images again")
        return None
