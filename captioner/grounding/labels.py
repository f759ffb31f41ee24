"""What the encoder sees: the top ImageNet classes of an image, each with the everyday word a caption
would use for it (`imagenet_words.json` beside this file, made by `data/imagenet_words.py` from WordNet)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS_FILE = Path(__file__).parent / "imagenet_words.json"


@dataclass
class Label:
    name: str  # the ImageNet class, e.g. "Indian elephant"
    word: str  # what a caption calls it, e.g. "elephant"
    probability: float


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-> (class names in ImageNet-1k's order, the everyday word of each)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    words = json.loads(WORDS_FILE.read_text(encoding="utf-8"))["words"]
    if len(words) != len(_IMAGENET_CATEGORIES):
        raise ValueError(f"{WORDS_FILE}: {len(words)} words for {len(_IMAGENET_CATEGORIES)} ImageNet classes")
    return tuple(_IMAGENET_CATEGORIES), tuple(words)


def top_labels(probs: torch.Tensor, k: int = 5) -> list[list[Label]]:
    """B x 1000 class probabilities -> each image's `k` most probable classes, most probable first."""
    names, words = imagenet_classes()
    if probs.size(-1) != len(names):
        raise ValueError(f"expected {len(names)} ImageNet class probabilities, got {probs.size(-1)}")
    values, indices = probs.float().topk(min(k, len(names)), dim=-1)
    return [[Label(names[i], words[i], round(p, 4)) for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(values.tolist(), indices.tolist())]
