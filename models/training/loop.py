"""Train a segmentation network on image/mask folders, validate on held-out folders, keep the best checkpoint.

``train(TrainConfig(...))`` runs AdamW with a (warm-up +) cosine learning-rate schedule on random tiles
(:class:`segpipe.models.data.TileDataset`), computes the validation confusion matrix on whole held-out images
after every epoch (:mod:`segpipe.models.training.validate`), and keeps the checkpoint with the best validation
mIoU (``<out_dir>/best.safetensors`` + ``.json``, with full metadata and provenance).

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
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segpipe.core.colours import ColourTable
from segpipe.core.errors import ConfigError, ModelError
from segpipe.core.metrics import EvaluationResult
from segpipe.core.pyramid import parse_resolution
from segpipe.core.runtime import resolve_device, retain_freed_memory
from segpipe.models.data import TileDataset, band_statistics, class_weights, load_folders, pixel_counts
from segpipe.models.losses import lovasz_softmax_loss, soft_dice_loss
from segpipe.models.training.config import EpochRecord, TrainConfig, TrainResult, fingerprint_changes
from segpipe.models.training.optim import WarmupCosine, ema_update, parameter_groups, pick_precision
from segpipe.models.training.state import load_state, record_from_json, restore, save_state
from segpipe.models.training.validate import validate

log = logging.getLogger(__name__)


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def train(config: TrainConfig, *, on_epoch_end: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Train ``config.architecture`` on ``config.train_dirs``; see the module docstring.

    Args:
        config: The run's configuration.
        on_epoch_end: Called with each completed epoch's record, after its state is saved (an exception
            raised there stops training; the run can be resumed).

    Returns:
        The best checkpoint's path and scores, and the per-epoch history.

    Raises:
        ConfigError: inconsistent options, or ``out_dir`` holds another run's state.
        InputError: unreadable or inconsistent data.
    """
    from segpipe.models.checkpoint import ClassInfo, ModelMetadata, save_checkpoint
    from segpipe.models.metadata import input_contract
    from segpipe.models.registry import build_model

    started, cpu_started = time.perf_counter(), time.process_time()
    device = torch.device(resolve_device(config.device))
    autocast_dtype = pick_precision(config.precision, device)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    out_dir = config.out_dir
    state_dir = out_dir / "state"
    best_path = out_dir / "best.safetensors"
    fingerprint = config.fingerprint()
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    if (state_dir / "last.json").exists():
        if not config.resume:
            raise ConfigError(
                f"{out_dir} already holds a training state; pass resume=True to continue it, "
                f"or choose another out_dir (or delete {state_dir})"
            )
        saved = load_state(state_dir)
        diff = fingerprint_changes(saved[1]["config"], fingerprint)
        if diff:
            raise ConfigError(
                f"{out_dir} holds the state of a run with other settings ({', '.join(diff)}); "
                f"use the same settings to resume, or another out_dir"
            )
    elif config.resume:
        log.info("no training state in %s: starting from scratch", state_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    class_names = [n for n, _ in config.classes]
    k = len(class_names)
    table = ColourTable.from_hex(c for _, c in config.classes)
    load_kw: dict[str, Any] = {
        "colour_table": table,
        "num_classes": k,
        "unknown": config.unknown_colours,
        "ignore_index": config.ignore_index,
    }
    images, masks, pairs = load_folders(config.train_dirs, **load_kw)
    val_images, val_masks, val_pairs = load_folders(config.val_dirs, **load_kw) if config.val_dirs else ([], [], [])
    if images[0].shape[0] != len(config.bands):
        raise ConfigError(
            f"expected {len(config.bands)} bands ({', '.join(config.bands)}) in the images, "
            f"got {images[0].shape[0]} in {pairs[0].image}"
        )
    if config.mean is None or config.std is None:
        mean, std = band_statistics(images)
    else:
        mean, std = config.mean, config.std
    counts = pixel_counts(masks, k)
    weights = (
        class_weights(counts, config.class_weighting, exclude=config.ignore_classes)
        if config.class_weighting != "none"
        else None
    )
    log.info(
        "training on %d pairs (%d Mpx) from %d folders, validating on %d pairs; mean %s std %s; class weights %s",
        len(pairs),
        int(counts.sum() // 1_000_000),
        len(config.train_dirs),
        len(val_pairs),
        np.round(mean, 2).tolist(),
        np.round(std, 2).tolist(),
        None if weights is None else np.round(weights, 3).tolist(),
    )

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        retain_freed_memory()
    # channels-last activations: oneDNN's convolutions (CPU) and cuDNN's (GPU) run faster on them
    # (benchmarks/bench_train_step.py); saved tensors are made contiguous again.
    model = build_model(config.architecture, config.arguments)
    # torch's stubs for Module.to omit the memory_format keyword that it accepts
    model = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    size_multiple = int(getattr(model, "size_multiple", 1))
    if config.tile_size % size_multiple:
        raise ConfigError(
            f"expected tile_size to be a multiple of {size_multiple} for {config.architecture} "
            f"{dict(config.arguments)}, got {config.tile_size}"
        )
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    total_steps = config.epochs * config.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_steps, total_steps, config.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss(
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device),
        ignore_index=config.ignore_index,
    )
    ignored_ids = torch.tensor(config.ignore_classes, dtype=torch.int64, device=device)
    average: nn.Module | None = None
    if config.ema_decay:
        average = copy.deepcopy(model).requires_grad_(False)  # no new initialisation: the RNG stream is unchanged
    kept = average if average is not None else model  # the weights validated, kept and shipped

    history: list[EpochRecord] = []
    best_epoch, best_miou, best_iou = 0, -math.inf, {}
    previous_seconds = previous_cpu = 0.0
    start_epoch = 0
    if saved is not None:
        tensors, data = saved
        restore(tensors, data, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, average=average)
        start_epoch = int(data["epoch"])
        history = [record_from_json(r) for r in data["history"]]
        best_epoch = int(data["best_epoch"])
        best_miou = -math.inf if data["best_miou"] is None else float(data["best_miou"])
        best_iou = dict(data["best_iou"])
        previous_seconds = float(data["train_seconds"])
        previous_cpu = float(data["cpu_seconds"])
        if start_epoch > 0 and not best_path.exists():
            raise ModelError(
                f"{best_path} is missing but {state_dir} says epoch {start_epoch} is done; "
                f"delete {out_dir} to start over"
            )
        log.info("resuming after epoch %d of %d from %s", start_epoch, config.epochs, state_dir)

    dataset = TileDataset(
        images,
        masks,
        tile_size=config.tile_size,
        mean=mean,
        std=std,
        length=config.steps_per_epoch * config.batch_size,
        seed=config.seed,
        ignore_index=config.ignore_index,
        weight_by_area=config.sample_by_area,
        colour_jitter=config.colour_jitter,
        scale_jitter=config.scale_jitter,
        saturation_jitter=config.saturation_jitter,
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

    def elapsed() -> tuple[float, float]:
        return (
            previous_seconds + time.perf_counter() - started,
            previous_cpu + time.process_time() - cpu_started,
        )

    def metadata(epoch: int, result: EvaluationResult | None) -> ModelMetadata:
        seconds, cpu_seconds = elapsed()
        provenance = {
            "trained": True,
            "data": [str(p) for p in config.train_dirs],
            "validation_data": [str(p) for p in config.val_dirs],
            "train_pairs": len(pairs),
            "epochs": epoch,
            "epochs_planned": config.epochs,
            "steps_per_epoch": config.steps_per_epoch,
            "batch_size": config.batch_size,
            "tile_size": config.tile_size,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "class_weighting": config.class_weighting,
            "sample_by_area": config.sample_by_area,
            "colour_jitter": config.colour_jitter,
            "scale_jitter": config.scale_jitter,
            "saturation_jitter": config.saturation_jitter,
            "dice_weight": config.dice_weight,
            "lovasz_weight": config.lovasz_weight,
            "ema_decay": config.ema_decay,
            "class_weights": None if weights is None else [round(float(w), 6) for w in weights],
            "ignore_classes": [class_names[i] for i in config.ignore_classes],
            "seed": config.seed,
            "val_iou": {} if result is None else result.per_class_iou(),
            "val_miou": None if result is None else _clean(result.miou),
            "train_seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "torch_version": torch.__version__,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "precision": "fp32" if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
            "num_threads": torch.get_num_threads(),
        }
        return ModelMetadata(
            architecture=config.architecture,
            arguments=dict(config.arguments),
            classes=tuple(ClassInfo(n, c.upper()) for n, c in config.classes),
            bands=config.bands,
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            tile_size=config.inference_tile_size,
            halo=config.halo,
            size_multiple=size_multiple,
            input=input_contract(images[0].dtype),
            provenance=provenance,
            resolution=parse_resolution(config.resolution) if config.resolution else None,
        )

    def validate_weights(net: nn.Module) -> EvaluationResult:
        return validate(
            net,
            val_images,
            val_masks,
            mean=mean,
            std=std,
            class_names=class_names,
            ignore_index=config.ignore_index,
            ignore_classes=config.ignore_classes,
            size_multiple=size_multiple,
            window=config.val_tile_size,
            halo=config.halo,
            device=device,
            autocast_dtype=autocast_dtype,
        )

    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        dataset.set_epoch(epoch)
        model.train()
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
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            if ignored_ids.numel():
                y = torch.where(torch.isin(y, ignored_ids), config.ignore_index, y)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if config.dice_weight:
                loss = loss + config.dice_weight * soft_dice_loss(
                    logits, y, ignore_index=config.ignore_index, exclude=config.ignore_classes
                )
            if config.lovasz_weight:
                loss = loss + config.lovasz_weight * lovasz_softmax_loss(
                    logits, y, ignore_index=config.ignore_index, exclude=config.ignore_classes
                )
            if not torch.isfinite(loss):
                raise ModelError(
                    f"loss is {loss.item()} at epoch {epoch + 1} step {steps + 1}; lower lr "
                    f"(now {config.lr}) or use precision='fp32'"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if average is not None:
                ema_update(average, model, config.ema_decay, epoch * config.steps_per_epoch + steps)
            loss_sum += loss.detach().to("cpu", torch.float64)
            steps += 1
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}")
        bar.close()
        train_loss = loss_sum.item() / max(steps, 1)
        train_time = time.perf_counter() - epoch_started
        result: EvaluationResult | None = None
        raw_miou: float | None = None
        val_started = time.perf_counter()
        if val_images:
            result = validate_weights(kept)
            if average is not None:
                raw_miou = _clean(validate_weights(model).miou)
        val_time = time.perf_counter() - val_started
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=train_loss,
            lr=float(optimizer.param_groups[0]["lr"]),
            seconds=round(train_time, 2),
            val_miou=None if result is None else _clean(result.miou),
            val_iou={} if result is None else result.per_class_iou(),
            val_seconds=round(val_time, 2),
            raw_val_miou=raw_miou,
        )
        history.append(record)
        val_score = record.val_miou if record.val_miou is not None else -math.inf
        score = float(epoch) if result is None else val_score
        if result is None or best_epoch == 0 or score > best_miou:
            best_epoch, best_miou, best_iou = epoch + 1, score, dict(record.val_iou)
            save_checkpoint(kept, metadata(epoch + 1, result), best_path)
        info = {
            "config": fingerprint,
            "epoch": epoch + 1,
            "history": [dataclasses.asdict(r) for r in history],
            "best_epoch": best_epoch,
            "best_miou": None if result is None else _clean(best_miou),
            "best_iou": best_iou,
            "train_seconds": elapsed()[0],
            "cpu_seconds": elapsed()[1],
            "mean": list(mean),
            "std": list(std),
        }
        save_state(
            state_dir, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, info=info, average=average
        )
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
            " *best*" if best_epoch == epoch + 1 else "",
        )
        if on_epoch_end is not None:
            on_epoch_end(record)

    total_seconds, total_cpu = elapsed() if start_epoch < config.epochs else (previous_seconds, previous_cpu)
    return TrainResult(
        checkpoint=best_path,
        state=state_dir / "last.safetensors",
        best_epoch=best_epoch,
        best_miou=None if not val_images or best_miou == -math.inf else best_miou,
        per_class_iou=best_iou,
        history=tuple(history),
        train_seconds=round(total_seconds, 1),
        cpu_seconds=round(total_cpu, 1),
    )
