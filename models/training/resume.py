"""Resuming a training run: whether ``out_dir`` holds a state to continue (:func:`existing_state`, refused without
``resume`` or with other settings), restoring it into the run (:func:`resume`), and saving it after every epoch
(:func:`save_epoch_state`). The state's files are :mod:`segpipe.models.training.state`'s."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from segpipe.core.errors import ConfigError, ModelError
from segpipe.models.training.config import TrainConfig, fingerprint_changes
from segpipe.models.training.data import Statistics
from segpipe.models.training.inputs import Inputs
from segpipe.models.training.model import Training
from segpipe.models.training.record import Progress, finite
from segpipe.models.training.state import load_state, record_from_json, restore, save_state

log = logging.getLogger(__name__)

#: A saved state: its tensors by name and its JSON.
Saved = tuple[dict[str, torch.Tensor], dict[str, Any]]


def existing_state(config: TrainConfig) -> Saved | None:
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


def check_resumable(saved: Saved, fingerprint: dict[str, Any], out_dir: Path) -> None:
    """Raise ConfigError when the saved state is that of a run with other settings than ``fingerprint``'s."""
    diff = fingerprint_changes(saved[1]["config"], fingerprint)
    if diff:
        raise ConfigError(
            f"{out_dir} holds the state of a run with other settings ({', '.join(diff)}); "
            f"use the same settings to resume, or another out_dir"
        )


def resume(training: Training, saved: Saved, progress: Progress, config: TrainConfig) -> None:
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


def save_epoch_state(
    training: Training, inputs: Inputs, stats: Statistics, progress: Progress, fingerprint: dict[str, Any], epoch: int
) -> None:
    """Write the resume state after ``epoch`` (0-based; :mod:`segpipe.models.training.state`)."""
    seconds, cpu_seconds = progress.elapsed()
    info = {
        "config": fingerprint,
        "epoch": epoch + 1,
        "history": [dataclasses.asdict(r) for r in progress.history],
        "best_epoch": progress.best_epoch,
        "best_miou": None if not inputs.val.images else finite(progress.best_miou),
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
