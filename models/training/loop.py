"""Train a segmentation network on labelled images, validate on held-out folders, keep the best checkpoint.

``train(TrainConfig(...))`` resolves the run against its data (:mod:`segpipe.models.training.inputs`: the bands,
polygon labels, an ``init`` checkpoint), runs AdamW with a (warm-up +) cosine learning-rate schedule on random tiles
(:class:`~segpipe.models.data.TileDataset`), computes the validation confusion matrix on whole held-out images after
every epoch (:mod:`segpipe.models.training.validate`), and keeps the checkpoint with the best validation mIoU
(``<out_dir>/best.safetensors`` + ``.json``, with full metadata and provenance).

Fine-tuning. With ``init`` the network is the checkpoint's (architecture and arguments from its metadata) and starts
from its weights (:func:`~segpipe.models.training.model.build_network`); a checkpoint with another number of classes
gives all but its class layer, which starts fresh (a warning names those tensors).

Weight averaging. With ``ema_decay`` > 0 an exponential moving average of the weights (and of the batch-norm
statistics) is kept beside the trained weights (:func:`~segpipe.models.training.optim.ema_update`); it is what is
validated, kept as the best checkpoint and shipped, while the trained weights' validation mIoU is recorded beside
it (``raw_val_miou``).

Resume. After every epoch the whole training state is saved (:mod:`segpipe.models.training.resume`,
:mod:`segpipe.models.training.state`). Re-running the same configuration with ``resume=True`` continues after the
last completed epoch and, on the CPU, ends with bit-identical weights to an uninterrupted run.

Determinism. On the CPU a fixed seed and thread count give identical results. On CUDA, cuDNN autotuning and
atomics make runs close but not identical.

This module is the run's order of work; each job is a module of its own: what it feeds the network
(:mod:`~segpipe.models.training.data`), the network and its optimiser (:mod:`~segpipe.models.training.model`), the
steps (:mod:`~segpipe.models.training.step`), resuming (:mod:`~segpipe.models.training.resume`) and what is recorded
(:mod:`~segpipe.models.training.record`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import torch

from segpipe.core.runtime import retain_freed_memory
from segpipe.models.training.config import EpochRecord, TrainConfig, TrainResult
from segpipe.models.training.data import statistics, tile_batches
from segpipe.models.training.inputs import prepare
from segpipe.models.training.model import setup
from segpipe.models.training.optim import training_device
from segpipe.models.training.record import Progress, end_epoch, result
from segpipe.models.training.resume import check_resumable, existing_state, resume, save_epoch_state
from segpipe.models.training.step import train_epoch


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
    saved = existing_state(config)
    inputs = prepare(config)
    config = inputs.config
    fingerprint = config.fingerprint()
    if saved is not None:
        check_resumable(saved, fingerprint, config.out_dir)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stats = statistics(inputs)
    _set_up_runtime(config.seed, device)
    training = setup(inputs, stats, device, autocast_dtype)
    if saved is not None:
        resume(training, saved, progress, config)
    dataset, loader = tile_batches(inputs, stats, device)
    for epoch in range(progress.start_epoch, config.epochs):
        started = time.perf_counter()
        train_loss = train_epoch(training, dataset, loader, epoch, config)
        record = end_epoch(training, inputs, stats, progress, epoch, train_loss, time.perf_counter() - started)
        save_epoch_state(training, inputs, stats, progress, fingerprint, epoch)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return result(config, inputs, progress)


def _set_up_runtime(seed: int, device: torch.device) -> None:
    """Seed torch's, numpy's and Python's RNGs; on CUDA let cuDNN pick its fastest kernels, on the CPU let the heap
    reuse freed memory (:func:`~segpipe.core.runtime.retain_freed_memory`)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        retain_freed_memory()
