"""Train a segmentation network on labelled images, validate on held-out folders, keep the best checkpoint.

``train(TrainConfig(...))`` resolves the run against its data (:mod:`segpipe.models.training.inputs`: the bands,
polygon labels, an ``init`` checkpoint), runs AdamW with a (warm-up +) cosine learning-rate schedule on random tiles
(:class:`segpipe.models.data.TileDataset`), computes the validation confusion matrix on whole held-out images after
every epoch (:mod:`segpipe.models.training.validate`), and keeps the checkpoint with the best validation mIoU
(``<out_dir>/best.safetensors`` + ``.json``, with full metadata and provenance).

Fine-tuning. With ``init`` the network is the checkpoint's (architecture and arguments from its metadata) and starts
from its weights (:func:`build_network`); a checkpoint with another number of classes gives all but its class layer,
which starts fresh (a warning names those tensors).

Weight averaging. With ``ema_decay`` > 0 an exponential moving average of the weights (and of the batch-norm
statistics) is kept beside the trained weights (:func:`~segpipe.models.training.optim.ema_update`); it is what is
validated, kept as the best checkpoint and shipped, while the trained weights' validation mIoU is recorded beside
it (``raw_val_miou``).

Resume. After every epoch the whole training state is saved (:mod:`segpipe.models.training.state`). Re-running the
same configuration with ``resume=True`` continues after the last completed epoch and, on the CPU, ends with
bit-identical weights to an uninterrupted run.

Determinism. On the CPU a fixed seed and thread count give identical results. On CUDA, cuDNN autotuning and
atomics make runs close but not identical.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segpipe.core.errors import ConfigError, ModelError
from segpipe.core.metrics import EvaluationResult
from segpipe.core.pyramid import parse_resolution
from segpipe.core.runtime import retain_freed_memory
from segpipe.core.tiles import validate_tiling
from segpipe.models.data import TileDataset, band_statistics, class_weights, pixel_counts
from segpipe.models.losses import lovasz_softmax_loss, soft_dice_loss
from segpipe.models.metadata import ModelMetadata
from segpipe.models.training.config import EpochRecord, TrainConfig, TrainResult, fingerprint_changes
from segpipe.models.training.inputs import InitCheckpoint, Inputs, prepare
from segpipe.models.training.optim import WarmupCosine, ema_update, parameter_groups, training_device
from segpipe.models.training.state import load_state, record_from_json, restore, save_state
from segpipe.models.training.validate import validate

log = logging.getLogger(__name__)

Saved = tuple[dict[str, torch.Tensor], dict[str, Any]]


def _clean(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class Statistics:
    """Per-band normalisation (images' units), training pixels per class and the loss's class weights (or None)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    counts: np.ndarray
    weights: np.ndarray | None


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


@dataclass
class Progress:
    """Completed epochs, the best one so far and the time spent in earlier invocations (s)."""

    start_epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_miou: float = -math.inf
    best_iou: dict[str, float | None] = field(default_factory=dict)
    previous_seconds: float = 0.0
    previous_cpu: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)

    def elapsed(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds) over all invocations."""
        return (
            self.previous_seconds + time.perf_counter() - self.started,
            self.previous_cpu + time.process_time() - self.cpu_started,
        )


def train(config: TrainConfig, *, on_epoch_end: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Train on ``config.train_dirs``; see the module docstring.

    Args:
        config: The run's configuration.
        on_epoch_end: Called with each completed epoch's record, after its state is saved (an exception
            raised there stops training; the run can be resumed).

    Returns:
        The best checkpoint's path and scores, and the per-epoch history.

    Raises:
        ConfigError: inconsistent options, ``device='cuda'`` without a GPU, or ``out_dir`` holds another run's state.
        InputError: unreadable or inconsistent data.
        ModelError: an ``init`` checkpoint that does not fit the data.
    """
    progress = Progress()
    device, autocast_dtype = training_device(config.device, config.precision)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    saved = _existing_state(config)
    inputs = prepare(config)
    config = inputs.config
    fingerprint = config.fingerprint()
    if saved is not None:
        _check_resumable(saved, fingerprint, config.out_dir)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stats = _statistics(inputs)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        retain_freed_memory()
    training = _setup(inputs, stats, device, autocast_dtype)
    if saved is not None:
        _resume(training, saved, progress, config)
    dataset, loader = _loader(inputs, stats, device)
    for epoch in range(progress.start_epoch, config.epochs):
        started = time.perf_counter()
        train_loss = _train_epoch(training, dataset, loader, epoch, config)
        record = _end_epoch(training, inputs, stats, progress, epoch, train_loss, time.perf_counter() - started)
        _save_state(training, inputs, stats, progress, fingerprint, epoch)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return _result(config, inputs, progress)


def _save_state(
    training: Training, inputs: Inputs, stats: Statistics, progress: Progress, fingerprint: dict[str, Any], epoch: int
) -> None:
    """Write the resume state after ``epoch`` (0-based; :mod:`segpipe.models.training.state`)."""
    seconds, cpu_seconds = progress.elapsed()
    info = {
        "config": fingerprint,
        "epoch": epoch + 1,
        "history": [dataclasses.asdict(r) for r in progress.history],
        "best_epoch": progress.best_epoch,
        "best_miou": None if not inputs.val.images else _clean(progress.best_miou),
        "best_iou": progress.best_iou,
        "train_seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "mean": list(stats.mean),
        "std": list(stats.std),
    }
    t = training
    save_state(
        inputs.config.out_dir / "state",
        model=t.model,
        optimizer=t.optimizer,
        scheduler=t.scheduler,
        scaler=t.scaler,
        info=info,
        average=t.average,
    )


def _existing_state(config: TrainConfig) -> Saved | None:
    """The resume state in ``out_dir`` (None without one), refused without ``resume``."""
    state_dir = config.out_dir / "state"
    if not (state_dir / "last.json").exists():
        if config.resume:
            log.info("no training state in %s: starting from scratch", state_dir)
        return None
    if not config.resume:
        raise ConfigError(
            f"{config.out_dir} already holds a training state; pass resume=True to continue it, "
            f"or choose another out_dir (or delete {state_dir})"
        )
    return load_state(state_dir)


def _check_resumable(saved: Saved, fingerprint: dict[str, Any], out_dir: Path) -> None:
    diff = fingerprint_changes(saved[1]["config"], fingerprint)
    if diff:
        raise ConfigError(
            f"{out_dir} holds the state of a run with other settings ({', '.join(diff)}); "
            f"use the same settings to resume, or another out_dir"
        )


def _statistics(inputs: Inputs) -> Statistics:
    """Normalisation (the configuration's, else the training images'), class pixel counts and loss weights."""
    config = inputs.config
    if config.mean is None or config.std is None:
        mean, std = band_statistics(inputs.train.images)
    else:
        mean, std = config.mean, config.std
    counts = pixel_counts(inputs.train.masks, len(inputs.classes))
    weights = (
        class_weights(counts, config.class_weighting, exclude=config.ignore_classes)
        if config.class_weighting != "none"
        else None
    )
    log.info(
        "training on %d images (%d Mpx) from %d folders, validating on %d; bands %s; mean %s std %s; class weights %s",
        len(inputs.train.paths),
        int(counts.sum() // 1_000_000),
        len(config.train_dirs),
        len(inputs.val.paths),
        ", ".join(inputs.bands),
        np.round(mean, 2).tolist(),
        np.round(std, 2).tolist(),
        None if weights is None else np.round(weights, 3).tolist(),
    )
    return Statistics(tuple(mean), tuple(std), counts, weights)


def load_init_weights(model: nn.Module, init: InitCheckpoint) -> list[str]:
    """Copy the weights of ``init`` into ``model`` wherever names and shapes agree; return the names of the tensors
    left as they were (a class layer of another number of classes), with a warning naming them."""
    from segpipe.models.checkpoint import load_model

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
    from segpipe.models.registry import build_model

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


def _setup(inputs: Inputs, stats: Statistics, device: torch.device, autocast_dtype: torch.dtype | None) -> Training:
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


def _resume(training: Training, saved: Saved, progress: Progress, config: TrainConfig) -> None:
    """Restore weights, optimiser, schedule and RNG states, and the completed epochs, from the resume state."""
    tensors, data = saved
    t = training
    restore(
        tensors, data, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler, average=t.average
    )
    progress.start_epoch = int(data["epoch"])
    progress.history = [record_from_json(r) for r in data["history"]]
    progress.best_epoch = int(data["best_epoch"])
    progress.best_miou = -math.inf if data["best_miou"] is None else float(data["best_miou"])
    progress.best_iou = dict(data["best_iou"])
    progress.previous_seconds = float(data["train_seconds"])
    progress.previous_cpu = float(data["cpu_seconds"])
    best_path = config.out_dir / "best.safetensors"
    if progress.start_epoch > 0 and not best_path.exists():
        raise ModelError(
            f"{best_path} is missing but {config.out_dir / 'state'} says epoch {progress.start_epoch} is done; "
            f"delete {config.out_dir} to start over"
        )
    log.info("resuming after epoch %d of %d from %s", progress.start_epoch, config.epochs, config.out_dir / "state")


def _loader(inputs: Inputs, stats: Statistics, device: torch.device) -> tuple[TileDataset, DataLoader[Any]]:
    """The training tiles (see :class:`TileDataset`) and their batches; jitters clip to the images' value range."""
    config = inputs.config
    dtype = np.dtype(inputs.plan.dtype)
    value_range = (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)) if dtype.kind in "ui" else None
    dataset = TileDataset(
        inputs.train.images,
        inputs.train.masks,
        tile_size=config.tile_size,
        mean=stats.mean,
        std=stats.std,
        length=config.steps_per_epoch * config.batch_size,
        seed=config.seed,
        ignore_index=config.ignore_index,
        weight_by_area=config.sample_by_area,
        colour_jitter=config.colour_jitter,
        scale_jitter=config.scale_jitter,
        saturation_jitter=config.saturation_jitter,
        value_range=value_range,
    )
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=False,
        drop_last=True,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    return dataset, loader


def _loss(training: Training, logits: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Cross-entropy (weighted) plus the Dice and Lovasz terms the configuration asks for; logits (B, K, H, W)."""
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


def _step(training: Training, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, where: str) -> torch.Tensor:
    """One optimiser step on a batch: images (B, C, T, T) float32 normalised, masks (B, T, T) int64 class ids."""
    t = training
    x = x.to(t.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(t.device, non_blocking=True)
    if t.ignored_ids.numel():
        y = torch.where(torch.isin(y, t.ignored_ids), config.ignore_index, y)
    with torch.autocast(t.device.type, dtype=t.autocast_dtype or torch.float32, enabled=t.autocast_dtype is not None):
        logits = t.model(x)
    loss = _loss(t, logits, y, config)
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


def _train_epoch(
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
        loss = _step(training, x, y, config, f"epoch {epoch + 1} step {steps + 1}")
        if training.average is not None:
            ema_update(training.average, training.model, config.ema_decay, epoch * config.steps_per_epoch + steps)
        loss_sum += loss.to("cpu", torch.float64)
        steps += 1
        if steps % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}")
    bar.close()
    return loss_sum.item() / max(steps, 1)


def _validate(training: Training, inputs: Inputs, stats: Statistics, net: nn.Module) -> EvaluationResult:
    config = inputs.config
    return validate(
        net,
        inputs.val.images,
        inputs.val.masks,
        mean=stats.mean,
        std=stats.std,
        class_names=[n for n, _ in inputs.classes],
        ignore_index=config.ignore_index,
        ignore_classes=config.ignore_classes,
        size_multiple=training.size_multiple,
        window=config.val_tile_size,
        halo=config.halo,
        device=training.device,
        autocast_dtype=training.autocast_dtype,
    )


def _end_epoch(
    training: Training,
    inputs: Inputs,
    stats: Statistics,
    progress: Progress,
    epoch: int,
    train_loss: float,
    train_time: float,
) -> EpochRecord:
    """Validate, record the epoch, keep the checkpoint if it is the best so far, and log the epoch's line."""
    config = inputs.config
    result: EvaluationResult | None = None
    raw_miou: float | None = None
    val_started = time.perf_counter()
    if inputs.val.images:
        result = _validate(training, inputs, stats, training.kept)
        if training.average is not None:
            raw_miou = _clean(_validate(training, inputs, stats, training.model).miou)
    val_time = time.perf_counter() - val_started
    record = EpochRecord(
        epoch=epoch + 1,
        train_loss=train_loss,
        lr=float(training.optimizer.param_groups[0]["lr"]),
        seconds=round(train_time, 2),
        val_miou=None if result is None else _clean(result.miou),
        val_iou={} if result is None else result.per_class_iou(),
        val_seconds=round(val_time, 2),
        raw_val_miou=raw_miou,
    )
    progress.history.append(record)
    val_score = record.val_miou if record.val_miou is not None else -math.inf
    score = float(epoch) if result is None else val_score
    if result is None or progress.best_epoch == 0 or score > progress.best_miou:
        progress.best_epoch, progress.best_miou, progress.best_iou = epoch + 1, score, dict(record.val_iou)
        meta = _metadata(inputs, stats, training, progress, epoch + 1, result)
        from segpipe.models.checkpoint import save_checkpoint

        save_checkpoint(training.kept, meta, config.out_dir / "best.safetensors")
    iou_text = " ".join(f"{n} {v:.3f}" if v is not None else f"{n} -" for n, v in record.val_iou.items())
    log.info(
        "epoch %d/%d loss %.4f lr %.2e %.0f s%s%s%s",
        epoch + 1,
        config.epochs,
        train_loss,
        record.lr,
        train_time,
        "" if result is None else f" | val mIoU {record.val_miou:.4f} ({iou_text}) {val_time:.0f} s",
        "" if raw_miou is None else f" | trained weights {raw_miou:.4f}",
        " *best*" if progress.best_epoch == epoch + 1 else "",
    )
    return record


def _provenance(
    inputs: Inputs,
    stats: Statistics,
    training: Training,
    progress: Progress,
    epoch: int,
    result: EvaluationResult | None,
) -> dict[str, Any]:
    """How the weights were made: data, labels, bands read, recipe, scores, time and machine."""
    config = inputs.config
    seconds, cpu_seconds = progress.elapsed()
    device = training.device
    recipe = (
        "steps_per_epoch",
        "batch_size",
        "tile_size",
        "lr",
        "weight_decay",
        "class_weighting",
        "sample_by_area",
        "colour_jitter",
        "scale_jitter",
        "saturation_jitter",
        "dice_weight",
        "lovasz_weight",
        "ema_decay",
    )
    return {
        "trained": True,
        "data": [str(p) for p in config.train_dirs],
        "validation_data": [str(p) for p in config.val_dirs],
        "train_pairs": len(inputs.train.paths),
        "bands_read": list(inputs.plan.indexes),
        "labels": None if config.labels is None else str(config.labels),
        "label_field": config.label_field,
        "init": None if inputs.init is None else str(inputs.init.path),
        "epochs": epoch,
        "epochs_planned": config.epochs,
        **{name: getattr(config, name) for name in recipe},
        "class_weights": None if stats.weights is None else [round(float(w), 6) for w in stats.weights],
        "ignore_classes": [inputs.classes[i][0] for i in config.ignore_classes],
        "seed": config.seed,
        "val_iou": {} if result is None else result.per_class_iou(),
        "val_miou": None if result is None else _clean(result.miou),
        "train_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "torch_version": torch.__version__,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": "fp32" if training.autocast_dtype is None else str(training.autocast_dtype).removeprefix("torch."),
        "num_threads": torch.get_num_threads(),
    }


def _metadata(
    inputs: Inputs,
    stats: Statistics,
    training: Training,
    progress: Progress,
    epoch: int,
    result: EvaluationResult | None,
) -> ModelMetadata:
    """The checkpoint's metadata: network, classes, bands, normalisation, inference tiling and input contract."""
    from segpipe.models.checkpoint import ClassInfo
    from segpipe.models.metadata import input_contract

    config = inputs.config
    return ModelMetadata(
        architecture=inputs.architecture,
        arguments=dict(inputs.arguments),
        classes=tuple(ClassInfo(n, c.upper()) for n, c in inputs.classes),
        bands=inputs.bands,
        mean=tuple(float(v) for v in stats.mean),
        std=tuple(float(v) for v in stats.std),
        tile_size=config.inference_tile_size,
        halo=config.halo,
        size_multiple=training.size_multiple,
        input=input_contract(inputs.plan.dtype),
        provenance=_provenance(inputs, stats, training, progress, epoch, result),
        resolution=parse_resolution(config.resolution) if config.resolution else None,
    )


def _result(config: TrainConfig, inputs: Inputs, progress: Progress) -> TrainResult:
    finished_earlier = progress.start_epoch >= config.epochs
    total_seconds, total_cpu = (
        (progress.previous_seconds, progress.previous_cpu) if finished_earlier else (progress.elapsed())
    )
    return TrainResult(
        checkpoint=config.out_dir / "best.safetensors",
        state=config.out_dir / "state" / "last.safetensors",
        best_epoch=progress.best_epoch,
        best_miou=None if not inputs.val.images or progress.best_miou == -math.inf else progress.best_miou,
        per_class_iou=progress.best_iou,
        history=tuple(progress.history),
        train_seconds=round(total_seconds, 1),
        cpu_seconds=round(total_cpu, 1),
    )
