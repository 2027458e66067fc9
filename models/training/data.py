"""What a training run feeds its network: the normalisation and class weights computed from its data
(:class:`Statistics`) and the batches of random training tiles (:func:`tile_batches`,
:class:`~segpipe.models.data.TileDataset`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from segpipe.models.data import TileDataset, band_statistics, class_weights, pixel_counts
from segpipe.models.training.inputs import Inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Statistics:
    """Per-band normalisation (images' units), training pixels per class and the loss's class weights (or None)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    counts: np.ndarray
    weights: np.ndarray | None


def statistics(inputs: Inputs) -> Statistics:
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


def tile_batches(inputs: Inputs, stats: Statistics, device: torch.device) -> tuple[TileDataset, DataLoader[Any]]:
    """The training tiles (see :class:`TileDataset`) and their batches: images (B, C, T, T) float32 normalised,
    masks (B, T, T) int64, T the tile size in pixels; jitters clip to the images' value range."""
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
