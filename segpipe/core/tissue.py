"""Tissue detection on a slide's thumbnail: Otsu's threshold on HSV saturation, as histolab and tiatoolbox do.

Glass (background) is bright and grey, so its saturation is low; stained tissue is coloured. Otsu's threshold
splits the saturation histogram of the slide's scanned pixels in two; it is clamped to
[:data:`MIN_THRESHOLD`, :data:`MAX_THRESHOLD`] so that a field that is all tissue (or all glass), whose histogram
has no valley, is not split in the middle. The mask is then dilated by a few pixels, so that tissue edges (pale,
low in saturation) keep their context. Pure numpy; no I/O.
"""

from __future__ import annotations

import numpy as np

#: Otsu's threshold on saturation (0..255) is kept in this range: below, JPEG noise on glass would count as tissue;
#: above, pale tissue (fat, mucus) would count as glass.
MIN_THRESHOLD = 12
MAX_THRESHOLD = 40

#: Pixels of the tissue mask grid added around tissue.
DILATION = 2


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (h, w) uint8, 0..255, of an RGB (3, h, w) or (h, w, 3) uint8 image (bands first when the
    first axis has 3)."""
    bands = rgb if rgb.shape[0] == 3 and rgb.ndim == 3 else np.moveaxis(rgb, -1, 0)
    high = bands.max(axis=0).astype(np.int32)
    low = bands.min(axis=0).astype(np.int32)
    out = np.zeros(high.shape, dtype=np.uint8)
    np.floor_divide((high - low) * 255, high, out=out, where=high > 0, casting="unsafe")
    return out


def otsu(histogram: np.ndarray) -> int:
    """Otsu's threshold of a 256-bin histogram: the value t that maximises the between-class variance of
    ``< t`` and ``>= t`` (the middle of the empty valley between two peaks; 0 for an empty or one-valued
    histogram)."""
    counts = histogram.astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0
    levels = np.arange(counts.size, dtype=np.float64)
    weight_low = np.cumsum(counts)[:-1]
    weight_high = total - weight_low
    sum_low = np.cumsum(counts * levels)[:-1]
    mean_low = np.divide(sum_low, weight_low, out=np.zeros_like(sum_low), where=weight_low > 0)
    mean_high = np.divide(
        (counts * levels).sum() - sum_low, weight_high, out=np.zeros_like(sum_low), where=weight_high > 0
    )
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    if not between.any():
        return 0
    best = np.flatnonzero(between == between.max())  # a flat top (an empty valley): its middle
    return int(best[len(best) // 2]) + 1


def dilate(mask: np.ndarray, radius: int = DILATION) -> np.ndarray:
    """Binary dilation of a (h, w) bool mask by a square of side ``2 * radius + 1``."""
    out = mask.copy()
    if radius <= 0 or not mask.any():
        return out
    grown = np.pad(mask, radius)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= grown[dy : dy + h, dx : dx + w]
    return out


def threshold(histogram: np.ndarray) -> int:
    """The saturation above which a pixel is tissue: Otsu's, clamped (see the module docstring)."""
    return int(np.clip(otsu(histogram), MIN_THRESHOLD, MAX_THRESHOLD))


def tissue_mask(sat: np.ndarray, scanned: np.ndarray) -> tuple[np.ndarray, int]:
    """The tissue mask of a thumbnail's saturation (h, w) uint8 where ``scanned`` (h, w) bool: (mask, threshold)."""
    histogram = np.bincount(sat[scanned].ravel(), minlength=256)
    t = threshold(histogram)
    return dilate((sat >= t) & scanned) & scanned, t
