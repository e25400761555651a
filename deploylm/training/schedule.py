"""Optimizer and learning-rate schedule: AdamW (no weight decay on biases and LayerNorm weights)
and linear warmup followed by inverse-sqrt or cosine decay."""
from __future__ import annotations

import math

import torch
from torch import nn

from deploylm.errors import UsageError
from deploylm.training.config import SCHEDULES   # defined there without torch (`deploylm --help` imports config)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-9) -> torch.optim.AdamW:
    """AdamW where matrices decay and rank-1 parameters (biases, LayerNorm weights) do not."""
    decay, no_decay = [], []
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, warmup: int, total: int, kind: str, min_factor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): warmup up to 1, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise UsageError(f"unknown schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, kind: str,
                   min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over lr_factor; its state_dict holds only the step count."""
    if kind not in SCHEDULES:
        raise UsageError(f"unknown schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, kind, min_factor))
