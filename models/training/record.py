"""What a training run records: its progress over epochs (:class:`Progress`), each epoch's validation and record
(:func:`end_epoch`), the best checkpoint with its metadata and provenance, and the run's result (:func:`result`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from segpipe.core.metrics import EvaluationResult
from segpipe.core.pyramid import parse_resolution
from segpipe.models.checkpoint import save_checkpoint
from segpipe.models.metadata import ClassInfo, ModelMetadata, input_contract
from segpipe.models.training.config import EpochRecord, TrainConfig, TrainResult
from segpipe.models.training.data import Statistics
from segpipe.models.training.inputs import Inputs
from segpipe.models.training.model import Training
from segpipe.models.training.validate import validate

log = logging.getLogger(__name__)

#: Settings of the recipe recorded in a checkpoint's provenance, as the configuration gives them.
RECIPE = (
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


def finite(value: float | None) -> float | None:
    """``value`` as a float, None for None or NaN (a score without pixels to score)."""
    return None if value is None or math.isnan(value) else float(value)


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


def end_epoch(
    training: Training,
    inputs: Inputs,
    stats: Statistics,
    progress: Progress,
    epoch: int,
    train_loss: float,
    train_time: float,
) -> EpochRecord:
    """Validate, record the epoch (0-based), keep the checkpoint if it is the best so far, and log the epoch's
    line."""
    val_started = time.perf_counter()
    result, raw_miou = _validation(training, inputs, stats)
    val_time = time.perf_counter() - val_started
    record = EpochRecord(
        epoch=epoch + 1,
        train_loss=train_loss,
        lr=float(training.optimizer.param_groups[0]["lr"]),
        seconds=round(train_time, 2),
        val_miou=None if result is None else finite(result.miou),
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
        save_checkpoint(training.kept, meta, inputs.config.out_dir / "best.safetensors")
    _log_epoch(record, inputs.config, progress, result is not None, train_time, val_time)
    return record


def _validation(training: Training, inputs: Inputs, stats: Statistics) -> tuple[EvaluationResult | None, float | None]:
    """The kept weights' validation result and, with a weight average, the trained weights' mIoU (None, None
    without validation data)."""
    if not inputs.val.images:
        return None, None
    result = _validate(training, inputs, stats, training.kept)
    raw_miou = finite(_validate(training, inputs, stats, training.model).miou) if training.average is not None else None
    return result, raw_miou


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


def _log_epoch(
    record: EpochRecord,
    config: TrainConfig,
    progress: Progress,
    validated: bool,
    train_time: float,
    val_time: float,
) -> None:
    iou_text = " ".join(f"{n} {v:.3f}" if v is not None else f"{n} -" for n, v in record.val_iou.items())
    log.info(
        "epoch %d/%d loss %.4f lr %.2e %.0f s%s%s%s",
        record.epoch,
        config.epochs,
        record.train_loss,
        record.lr,
        train_time,
        "" if not validated else f" | val mIoU {record.val_miou:.4f} ({iou_text}) {val_time:.0f} s",
        "" if record.raw_val_miou is None else f" | trained weights {record.raw_val_miou:.4f}",
        " *best*" if progress.best_epoch == record.epoch else "",
    )


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
        **{name: getattr(config, name) for name in RECIPE},
        "class_weights": None if stats.weights is None else [round(float(w), 6) for w in stats.weights],
        "ignore_classes": [inputs.classes[i][0] for i in config.ignore_classes],
        "seed": config.seed,
        "val_iou": {} if result is None else result.per_class_iou(),
        "val_miou": None if result is None else finite(result.miou),
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


def result(config: TrainConfig, inputs: Inputs, progress: Progress) -> TrainResult:
    """The run's result: the best checkpoint, its scores, the history and the time over all invocations."""
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
