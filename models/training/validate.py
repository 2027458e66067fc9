"""Validation during training: whole held-out images predicted tile by tile, the way the pipeline predicts a scene
(a :class:`~segpipe.core.tiles.TileGrid`, each tile read with its halo and mirror-padded at the image edge by
:func:`~segpipe.core.tiles.read_tile_input`, normalised by :func:`~segpipe.core.pixels.normalise`, the argmax of its
core kept), and scored with :mod:`segpipe.core.metrics`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from segpipe.core.errors import ConfigError
from segpipe.core.metrics import EvaluationResult, confusion_matrix
from segpipe.core.pixels import normalise
from segpipe.core.tiles import TileGrid, read_tile_input


def prediction_grid(width: int, height: int, *, size_multiple: int, window: int, halo: int) -> TileGrid:
    """The tile grid :func:`predict_image` uses for an image of ``width`` x ``height`` pixels.

    An image that fits in one ``window`` is one tile (its long side rounded up to ``size_multiple``, no halo);
    a larger one is cut into cores of ``window - 2 * halo`` pixels rounded down to ``size_multiple``, each read
    with ``halo`` (rounded up to ``size_multiple``) of context, so tiles stay aligned with the network's pooling.
    """
    m = max(size_multiple, 1)
    if max(width, height) <= window:
        return TileGrid(width, height, -(-max(width, height) // m) * m, 0)
    core = (window - 2 * halo) // m * m
    if core < 1:
        raise ConfigError(
            f"expected window > 2 * halo + size_multiple, got window {window}, halo {halo} and "
            f"size_multiple {size_multiple}"
        )
    return TileGrid(width, height, core, -(-halo // m) * m)


def predict_image(
    model: nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    size_multiple: int = 1,
    window: int = 1024,
    halo: int = 64,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Class ids (H, W) uint8 of one whole (C, H, W) image in the units of ``mean`` and ``std``, predicted tile by
    tile on the grid of :func:`prediction_grid`."""
    device = torch.device(device)
    _, h, w = image.shape
    grid = prediction_grid(w, h, size_multiple=size_multiple, window=window, halo=halo)
    valid = np.ones((h, w), dtype=np.uint8)
    out = np.empty((h, w), dtype=np.uint8)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for tile in grid:
                pixels, _ = read_tile_input(image, valid, tile)
                x = torch.from_numpy(normalise(pixels, mean, std))[None].to(device)
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    logits = model(x)
                labels = logits[0].argmax(0).to("cpu", torch.uint8).numpy()
                core = tile.core_in_input
                out[tile.core.row_slice, tile.core.col_slice] = labels[core.row_slice, core.col_slice]
    finally:
        model.train(was_training)
    return out


def validate(
    model: nn.Module,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    ignore_index: int = 255,
    ignore_classes: Sequence[int] = (),
    size_multiple: int = 1,
    window: int = 1024,
    halo: int = 64,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> EvaluationResult:
    """Confusion matrix and metrics of ``model`` on whole images (pixels at ``ignore_index`` or of
    ``ignore_classes`` in the mask are skipped; ignored classes are left out of the mIoU)."""
    k = len(class_names)
    total = np.zeros((k, k), dtype=np.int64)
    skipped = 0
    for image, mask in zip(images, masks, strict=True):
        pred = predict_image(
            model,
            image,
            mean,
            std,
            size_multiple=size_multiple,
            window=window,
            halo=halo,
            device=device,
            autocast_dtype=autocast_dtype,
        )
        valid = (mask != ignore_index) & ~np.isin(mask, list(ignore_classes))
        skipped += int((~valid).sum())
        total += confusion_matrix(mask, pred, k, valid=valid)
    return EvaluationResult.from_confusion(
        total, class_names=class_names, ignored=ignore_classes, ignored_pixels=skipped
    )
