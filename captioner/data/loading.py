"""Many images at once for a PyTorch model: decoded and preprocessed (images.py) in DataLoader
workers, in input order, a bad file reported as its error instead of stopping the batch."""

from __future__ import annotations

import os

import torch
from PIL import ImageOps

from .images import MAX_IMAGE_PIXELS, ImageError, ImageInput, ImageTransform, describe, load_image


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers; a bad file yields its error, not an exception."""

    def __init__(self, sources: list[ImageInput], transform: ImageTransform, flip: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.sources, self.transform, self.flip, self.max_pixels = sources, transform, flip, max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        try:
            img = load_image(self.sources[index], draft_size=self.transform.resize or self.transform.size,
                             max_pixels=self.max_pixels)
            views = [self.transform(img)]
            if self.flip:
                views.append(self.transform(ImageOps.mirror(img)))
            return index, torch.stack(views), None
        except ImageError as err:
            return index, None, str(err)
        except Exception as err:  # a worker must never die on one file
            return index, None, f"{describe(self.sources[index])}: {type(err).__name__}: {err}"


def collate_images(items):
    """-> (indices, stacked good views V x B x 3 x H x W or None, good indices, {index: error})."""
    good = [(i, x) for i, x, _ in items if x is not None]
    errors = {i: e for i, _, e in items if e is not None}
    pixels = torch.stack([x for _, x in good], dim=1) if good else None
    return [i for i, _ in good], pixels, errors


def default_workers() -> int:
    """Image-decoding processes for captioning files: none on a machine of 2 cores or fewer, where a
    worker process competes with the model's own threads (26% slower here, bench/README.md)."""
    return 0 if (os.cpu_count() or 1) <= 2 else 1


def image_batches(sources: list[ImageInput], transform: ImageTransform, batch_size: int = 32,
                  workers: int | None = 0, flip: bool = False, pin_memory: bool = False,
                  max_pixels: int = MAX_IMAGE_PIXELS):
    """Yields (indices, pixels, errors) batches in input order; decoding runs in `workers` processes
    (None: `default_workers()`)."""
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(
        ImageFiles(sources, transform, flip, max_pixels), batch_size=batch_size, num_workers=workers,
        collate_fn=collate_images, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    yield from loader
