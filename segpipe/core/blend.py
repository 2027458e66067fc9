"""Blend weights: how overlapping tile predictions become one. Pure numpy, no I/O.

- ``crop``: each tile keeps only its core; no overlap, no weights (exact when the halo covers the receptive
  field).
- ``cosine``: weight 1 over the middle of the tile input, tapering with a raised cosine over the outer
  ``2*halo`` pixels. Adjacent tiles overlap by exactly ``2*halo`` pixels and their tapers sum to 1 there (a
  partition of unity), so a prediction fades from one tile to the next without a seam.
- ``gaussian``: a Gaussian centred on the tile input with sigma = size / 8 (as MONAI's sliding window).

Weights never reach zero (floor :data:`MIN_WEIGHT`) so pixels at the scene edge, seen by one tile only, still
get a prediction.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Blend = Literal["crop", "cosine", "gaussian"]
BLENDS: tuple[str, ...] = ("crop", "cosine", "gaussian")
MIN_WEIGHT = 1e-3


def weights_1d(size: int, halo: int, blend: Blend) -> np.ndarray:
    """Weights along one axis of a tile input of ``size`` pixels (float64, shape (size,))."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    if blend == "crop":
        return np.ones(size)
    if blend == "cosine":
        taper = 2 * halo
        if taper == 0:
            return np.ones(size)
        distance = np.minimum(centres, size - centres)  # to the nearest edge, in pixels
        w = np.where(distance < taper, 0.5 - 0.5 * np.cos(np.pi * distance / taper), 1.0)
    elif blend == "gaussian":
        sigma = size / 8.0
        w = np.exp(-((centres - size / 2.0) ** 2) / (2.0 * sigma**2))
    else:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    return np.maximum(w, MIN_WEIGHT)


def weights_2d(size: int, halo: int, blend: Blend) -> np.ndarray:
    """Weights over a square tile input, (size, size) float32: the outer product of :func:`weights_1d`."""
    w = weights_1d(size, halo, blend)
    return np.outer(w, w).astype(np.float32)
