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


def setup_device(config: TrainConfig) -> tuple[torch.device, bool]:
    """-> (this process's device, whether this call started the process group: then the caller ends it)."""
    _, processes = world()
    wants_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    started = processes > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    if wants_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), started
    return torch.device("cpu"), started


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def log(message: str) -> None:
    if world()[0] == 0:
        print(message, flush=True)


def check_same_weights(module: torch.nn.Module) -> None:
    """Raises unless every rank holds the same weights, as DDP is meant to keep them (one all_gather
    of per-tensor sums and sums of squares); a no-op in a single process."""
    if not dist.is_initialized():
        return
    params = [p.detach().double() for p in module.parameters()]
    mine = torch.stack([torch.stack([p.sum(), p.square().sum()]) for p in params]).flatten()
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the ranks' weights differ after training")
    log(f"weights identical on all {len(gathered)} ranks")
