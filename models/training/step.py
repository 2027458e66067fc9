"""Optimiser steps: the loss of a batch (weighted cross-entropy plus the Dice and Lovasz terms asked for), one step
(:func:`step`) and one epoch of steps (:func:`train_epoch`), with the weight average updated after each step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segpipe.core.errors import ModelError
from segpipe.models.data import TileDataset
from segpipe.models.losses import lovasz_softmax_loss, soft_dice_loss
from segpipe.models.training.config import TrainConfig
from segpipe.models.training.model import Training
from segpipe.models.training.optim import ema_update


def batch_loss(training: Training, logits: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Cross-entropy (weighted) plus the Dice and Lovasz terms the configuration asks for; logits (B, K, H, W),
    masks (B, H, W) int64 class ids."""
    loss: torch.Tensor = training.loss_fn(logits.float(), y)
    if config.dice_weight:
        loss = loss + config.dice_weight * soft_dice_loss(
            logits, y, ignore_index=config.ignore_index, exclude=config.ignore_classes
        )
    if config.lovasz_weight:
        loss = loss + config.lovasz_weight * lovasz_softmax_loss(
            logits, y, ignore_index=config.ignore_index, exclude=config.ignore_classes
        )
    return loss


def step(training: Training, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, where: str) -> torch.Tensor:
    """One optimiser step on a batch: images (B, C, T, T) float32 normalised, masks (B, T, T) int64 class ids.

    Raises:
        ModelError: the loss is not finite (``where`` says at which epoch and step).
    """
    t = training
    x = x.to(t.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(t.device, non_blocking=True)
    if t.ignored_ids.numel():
        y = torch.where(torch.isin(y, t.ignored_ids), config.ignore_index, y)
    with torch.autocast(t.device.type, dtype=t.autocast_dtype or torch.float32, enabled=t.autocast_dtype is not None):
        logits = t.model(x)
    loss = batch_loss(t, logits, y, config)
    if not torch.isfinite(loss):
        raise ModelError(f"loss is {loss.item()} at {where}; lower lr (now {config.lr}) or use precision='fp32'")
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    if config.max_grad_norm is not None:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(t.model.parameters(), config.max_grad_norm)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    return loss.detach()


def train_epoch(
    training: Training, dataset: TileDataset, loader: DataLoader[Any], epoch: int, config: TrainConfig
) -> float:
    """Train one epoch (0-based); return its mean training loss."""
    dataset.set_epoch(epoch)
    training.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64)
    steps = 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not config.progress,
        leave=False,
        mininterval=5.0,
        dynamic_ncols=True,
    )
    for x, y in bar:
        loss = step(training, x, y, config, f"epoch {epoch + 1} step {steps + 1}")
        if training.average is not None:
            ema_update(training.average, training.model, config.ema_decay, epoch * config.steps_per_epoch + steps)
        loss_sum += loss.to("cpu", torch.float64)
        steps += 1
        if steps % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}")
    bar.close()
    return loss_sum.item() / max(steps, 1)
