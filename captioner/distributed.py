"""Several training processes (torchrun, DDP): each one's rank, device and share. A no-op in a
process that torchrun did not start."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .recipe import TrainConfig


def world() -> tuple[int, int]:
    """-> (this process's rank, how many processes)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_device(config: TrainConfig) -> torch.device:
    _, processes = world()
    wants_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if processes > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    if wants_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def log(message: str) -> None:
    if world()[0] == 0:
        print(message, flush=True)
