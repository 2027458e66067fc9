"""Pixel values: normalisation for a model (the one used in training, validation and inference) and a contrast
stretch for display. Pure numpy; layouts are (bands, H, W)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalise(
    pixels: np.ndarray,
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """``(x - mean) / std`` per band as float32 (bands, H, W), in the units of the model's metadata.

    Args:
        pixels: (bands, H, W) in any numeric dtype.
        mean: One value per band.
        std: One value per band (> 0).
        valid: Optional (H, W) mask; pixels where it is 0 become 0 (the band mean after normalisation).
    """
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    x = (pixels.astype(np.float32) - m) / s
    if valid is not None:
        x *= valid[None].astype(np.float32)
    return x


def stretch(image: np.ndarray) -> np.ndarray:
    """(bands, H, W) -> (H, W, 3) float32 in [0, 1] for display: a per-band 2-98 % stretch of the first three
    bands (or of the first, as grey)."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    out = np.empty(bands.shape, dtype=np.float32)
    for i, band in enumerate(bands.astype(np.float32)):
        lo, hi = np.percentile(band, (2, 98))
        out[i] = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1)
    return out.transpose(1, 2, 0)
