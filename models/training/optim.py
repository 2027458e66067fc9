"""Optimisation helpers of training: the learning-rate schedule, parameter groups, precision and weight averaging."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from segpipe.core.errors import ConfigError
from segpipe.core.runtime import cpu_has_bf16, resolve_device


class WarmupCosine:
    """Learning-rate factor per step: linear warmup, then cosine decay to ``min_ratio`` (plain numbers only,
    so the scheduler's ``state_dict`` is JSON)."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup = warmup
        self.total = total
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def pick_precision(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (see :class:`~segpipe.models.training.config.TrainConfig`), or None
    for fp32."""
    if device.type != "cuda":
        if choice == "fp16":
            raise ConfigError("precision='fp16' needs CUDA; on the CPU use 'fp32', 'bf16' or 'auto'")
        return torch.bfloat16 if choice == "bf16" or (choice == "auto" and cpu_has_bf16()) else None
    if choice == "fp32":
        return None
    if choice == "bf16" or (choice == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def training_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """Where a run trains and its autocast dtype (None: fp32), decided before any data is read.

    ``device``: ``auto`` (the first CUDA GPU where there is one, else the CPU), ``cpu`` or ``cuda``. ``precision``
    ``auto`` gives bf16 autocast on a GPU that supports it and fp16 (with loss scaling) on one that does not; on the
    CPU bf16 where the CPU has bf16 instructions (:func:`~segpipe.core.runtime.cpu_has_bf16`), else fp32.

    Raises:
        ConfigError: ``cuda`` where torch sees no CUDA GPU (one line saying to use cpu or auto), or fp16 on the CPU.
    """
    target = torch.device(resolve_device(device))
    return target, pick_precision(precision, target)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weights with more than one dimension, none on biases and norm weights."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """Move ``average``'s weights and buffers towards ``model``'s: a <- a + (1 - d) * (m - a).

    ``d = min(decay, (1 + step) / (10 + step))`` (``step`` counts optimizer steps from 0), so the first steps
    are not dominated by the random initialisation. Integer buffers (batch-norm step counters) are copied.
    torch's ``AveragedModel`` has no such warm-up, hence these few lines.
    """
    d = min(decay, (1 + step) / (10 + step))
    for a, m in zip(average.state_dict().values(), model.state_dict().values(), strict=True):
        if a.dtype.is_floating_point:
            a.lerp_(m, 1 - d)
        else:
            a.copy_(m)
