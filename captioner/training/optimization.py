"""One optimisation step and the learning-rate schedule, shared by every training phase."""

from __future__ import annotations

import math

import torch

from ..model.runtime import autocast_dtype
from .recipe import TrainConfig


def learning_rate(config: TrainConfig, step: int, total_steps: int, plateau_scale: float) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.schedule == "plateau":
        return config.lr * warm * plateau_scale
    progress = min(1.0, step / max(1, total_steps))
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * warm * cosine


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    # fp16 gradients can underflow and need loss scaling; bf16 has fp32's range and does not
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, precision) == torch.float16)


def optimization_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      clip_norm: float) -> float:
    """Backward, clip the global gradient norm to `clip_norm` (0: no clipping), step. -> the global
    gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                          clip_norm if clip_norm > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    return float(norm)
