"""The network of a training run and what trains it (:class:`Training`): the network built from the registry (or
from an ``init`` checkpoint), AdamW over its parameter groups, the (warm-up +) cosine schedule, the loss scaler, the
weighted cross-entropy and the weight average."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from segpipe.core.errors import ConfigError
from segpipe.core.tiles import validate_tiling
from segpipe.models.checkpoint import load_model
from segpipe.models.registry import build_model
from segpipe.models.training.data import Statistics
from segpipe.models.training.inputs import InitCheckpoint, Inputs
from segpipe.models.training.optim import WarmupCosine, parameter_groups

log = logging.getLogger(__name__)


@dataclass
class Training:
    """The network, its optimiser and what a step needs; ``kept`` is what is validated and saved."""

    model: nn.Module
    average: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    ignored_ids: torch.Tensor
    size_multiple: int
    device: torch.device
    autocast_dtype: torch.dtype | None

    @property
    def kept(self) -> nn.Module:
        return self.average if self.average is not None else self.model


def load_init_weights(model: nn.Module, init: InitCheckpoint) -> list[str]:
    """Copy the weights of ``init`` into ``model`` wherever names and shapes agree; return the names of the tensors
    left as they were (a class layer of another number of classes), with a warning naming them."""
    source = load_model(init.path).module.state_dict()  # checked: shapes against its metadata, finite values
    target = model.state_dict()
    fitting = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    fresh = sorted(set(target) - set(fitting))
    if fresh:
        log.warning(
            "--init %s: %d tensor(s) start fresh (the checkpoint has %d classes): %s",
            init.path,
            len(fresh),
            len(init.metadata.classes),
            ", ".join(fresh[:6]),
        )
    return fresh


def build_network(inputs: Inputs, device: torch.device) -> nn.Module:
    """The network of the run on ``device`` in channels-last layout (oneDNN's and cuDNN's convolutions run faster
    on it; benchmarks/bench_train_step.py), initialised from the seeded RNG or, with ``init``, from that checkpoint.

    Raises:
        ConfigError: ``tile_size`` or the checkpoint's inference tiling do not fit the network's size multiple.
    """
    config = inputs.config
    model = build_model(inputs.architecture, inputs.arguments)
    if inputs.init is not None:
        load_init_weights(model, inputs.init)
    size_multiple = int(getattr(model, "size_multiple", 1))
    if config.tile_size % size_multiple:
        raise ConfigError(
            f"expected tile_size to be a multiple of {size_multiple} for {inputs.architecture} "
            f"{inputs.arguments}, got {config.tile_size}"
        )
    try:
        validate_tiling(config.inference_tile_size, config.halo, size_multiple=size_multiple)
    except ConfigError as error:
        raise ConfigError(
            f"the inference tiling written into the checkpoint does not fit the network: {error} "
            "(set it with --inference-tile-size and --halo)"
        ) from None
    # torch's stubs for Module.to omit the memory_format keyword that it accepts
    return model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]


def setup(inputs: Inputs, stats: Statistics, device: torch.device, autocast_dtype: torch.dtype | None) -> Training:
    """The network, optimiser, schedule, loss scaler, loss and weight average of a run (after seeding)."""
    config = inputs.config
    model = build_network(inputs, device)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    total_steps = config.epochs * config.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_steps, total_steps, config.min_lr_ratio)
    )
    loss_fn = nn.CrossEntropyLoss(
        weight=None if stats.weights is None else torch.tensor(stats.weights, dtype=torch.float32, device=device),
        ignore_index=config.ignore_index,
    )
    # no new initialisation for the average: the RNG stream is unchanged
    average = copy.deepcopy(model).requires_grad_(False) if config.ema_decay else None
    return Training(
        model=model,
        average=average,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16),
        loss_fn=loss_fn,
        ignored_ids=torch.tensor(config.ignore_classes, dtype=torch.int64, device=device),
        size_multiple=int(getattr(model, "size_multiple", 1)),
        device=device,
        autocast_dtype=autocast_dtype,
    )
