"""Training captions as token ids, and the batches an epoch draws from them."""

from __future__ import annotations

import torch

from ..data.vocab import END, Vocabulary


def encode_captions(records, vocab: Vocabulary, max_words: int) -> tuple[torch.Tensor, list[list[int]]]:
    """-> image index per caption, token ids per caption (<start> words <end>, cut to max_words)."""
    owners, captions = [], []
    for i, record in enumerate(records):
        for text in record.captions:
            ids = vocab.encode(text)
            if len(ids) <= 2:
                continue
            captions.append(ids[: max_words + 1] + [END] if len(ids) > max_words + 2 else ids)
            owners.append(i)
    return torch.tensor(owners), captions


def pad_batch(captions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in captions])
    batch = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for row, ids in enumerate(captions):
        batch[row, : len(ids)] = torch.tensor(ids)
    return batch, lengths


def shuffled_batches(pool: torch.Tensor, views: int, batch_size: int, generator: torch.Generator, rank: int = 0,
                     world: int = 1):
    """One epoch over the caption indices of `pool` in random order (a caption in it twice is drawn
    twice): batches of caption indices, each drawn with the image view (original or mirrored) it
    trains on. Each of `world` processes takes its share."""
    positions = torch.randperm(len(pool), generator=generator)
    view_of = torch.randint(views, (len(pool),), generator=generator)
    for local_step in range(len(pool) // (batch_size * world)):
        start = (local_step * world + rank) * batch_size
        drawn = positions[start:start + batch_size]
        yield pool[drawn], view_of[drawn]


def draws(repeats: torch.Tensor) -> torch.Tensor:
    """Each index of `repeats` as many times as it says: [1, 3, 1] -> [0, 1, 1, 1, 2]."""
    return torch.arange(len(repeats)).repeat_interleave(repeats)
