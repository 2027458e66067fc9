"""Pixel values: how a scene's values become a model's input (scaling, then normalisation, the same in training,
validation and inference) and a contrast stretch for display. Pure numpy; layouts are (bands, H, W).

A model states its input contract (:class:`segpipe.models.metadata.InputContract`): the values its ``mean`` and
``std`` refer to (a dtype and a range, e.g. uint8 in 0..255) and how a scene whose values do not fit is brought to
them (a :class:`Scaling`). A run turns the scaling into a :class:`PixelMap` for its scene (per band
``y = x * scale + offset``, then clipped to the range) once, from a bounded sample of the scene where a percentile
stretch needs one; segmenters apply it to every tile before normalising.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segpipe.core.errors import ConfigError

#: Scaling kinds: how a scene's values map to the model's input range (see :class:`Scaling`).
SCALINGS = ("refuse", "none", "linear", "minmax", "percentile", "product")


@dataclass(frozen=True)
class Scaling:
    """How scene values become model input values; written as text in metadata and on the command line.

    - ``refuse``: a scene whose values do not fit the model's input is refused (the default of a contract);
    - ``none``: the scene's values are used as they are;
    - ``linear:SCALE,OFFSET``: ``y = x * SCALE + OFFSET`` (e.g. Sentinel-2 L2A reflectance: ``linear:1e-4,-0.1``);
    - ``product``: the same with the scale and offset the product itself records per band (GDAL's band scale and
      offset), e.g. a reflectance product's quantification and offset;
    - ``minmax:MIN,MAX``: fixed scene values MIN..MAX map linearly onto the model's range, clipped;
    - ``percentile[:LOW,HIGH]``: per band, the LOW and HIGH percentiles (default 2, 98) of a sample of the scene's
      valid pixels map onto the model's range, clipped.
    """

    kind: str
    a: float | None = None
    b: float | None = None

    @classmethod
    def parse(cls, text: str) -> Scaling:
        """``"percentile:2,98"`` -> Scaling("percentile", 2.0, 98.0), and so on.

        Raises:
            ConfigError: an unknown kind or bad numbers, saying what is allowed.
        """
        kind, _, rest = text.strip().partition(":")
        kind = kind.lower()
        usage = (
            "none, linear:SCALE,OFFSET, product, minmax:MIN,MAX or percentile[:LOW,HIGH] (refuse in a model's contract)"
        )
        if kind not in SCALINGS:
            raise ConfigError(f"scaling {text!r} is not one of {usage}")
        numbers: list[float] = []
        if rest:
            try:
                numbers = [float(v) for v in rest.split(",")]
            except ValueError:
                raise ConfigError(f"scaling {text!r}: {rest!r} are not numbers; use {usage}") from None
            if len(numbers) != 2 or not all(math.isfinite(v) for v in numbers):
                raise ConfigError(f"scaling {text!r} needs two finite numbers after the colon; use {usage}")
        if kind in ("refuse", "none", "product"):
            if numbers:
                raise ConfigError(f"scaling {kind} takes no numbers, got {text!r}")
            return cls(kind)
        if kind == "percentile":
            low, high = numbers or [2.0, 98.0]
            if not 0 <= low < high <= 100:
                raise ConfigError(f"scaling {text!r}: percentiles must satisfy 0 <= LOW < HIGH <= 100")
            return cls(kind, low, high)
        if not numbers:
            raise ConfigError(
                f"scaling {kind} needs two numbers, e.g. {kind}:{'1e-4,-0.1' if kind == 'linear' else '0,3000'}"
            )
        if kind == "minmax" and not numbers[0] < numbers[1]:
            raise ConfigError(f"scaling {text!r}: MIN must be below MAX")
        if kind == "linear" and numbers[0] == 0:
            raise ConfigError(f"scaling {text!r}: SCALE must not be 0")
        return cls(kind, numbers[0], numbers[1])

    def __str__(self) -> str:
        if self.a is None or self.b is None:
            return self.kind
        return f"{self.kind}:{self.a:g},{self.b:g}"

    @property
    def needs_sample(self) -> bool:
        """Whether the map depends on the scene's values (a percentile stretch)."""
        return self.kind == "percentile"


@dataclass(frozen=True)
class PixelMap:
    """Per band ``y = x * scale + offset`` as float32, then clipped to ``clip`` (low, high) when given; small and
    picklable, computed once per scene (:func:`pixel_map`) and applied to every tile (:meth:`apply`).

    Attributes:
        scale: One factor per band (the model's band order).
        offset: One offset per band, in the model's input units.
        clip: The model's input range, or None (a linear scaling is not clipped).
        scaling: The scaling it came from, as text (recorded in the summary).
    """

    scale: tuple[float, ...]
    offset: tuple[float, ...]
    clip: tuple[float, float] | None
    scaling: str

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """(bands, H, W) in the scene's units -> float32 in the model's input units."""
        a = np.asarray(self.scale, dtype=np.float32).reshape(-1, 1, 1)
        b = np.asarray(self.offset, dtype=np.float32).reshape(-1, 1, 1)
        y = pixels.astype(np.float32) * a + b
        if self.clip is not None:
            np.clip(y, self.clip[0], self.clip[1], out=y)
        return y

    def to_dict(self) -> dict[str, object]:
        return {
            "scaling": self.scaling,
            "scale": [round(v, 9) for v in self.scale],
            "offset": [round(v, 6) for v in self.offset],
            "clip": list(self.clip) if self.clip else None,
        }


def fits(dtype: str, value_range: tuple[float, float], expected_dtype: str) -> bool:
    """Whether a scene of ``dtype`` can be fed to a model expecting ``expected_dtype`` values in ``value_range``
    as they are: the same dtype, or an integer dtype whose every value lies in the range."""
    if np.dtype(dtype) == np.dtype(expected_dtype):
        return True
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(np.dtype(dtype))
        return value_range[0] <= info.min and info.max <= value_range[1]
    return False


def pixel_map(
    scaling: Scaling,
    *,
    bands: int,
    value_range: tuple[float, float],
    sample: np.ndarray | None = None,
    product: tuple[Sequence[float], Sequence[float]] | None = None,
) -> PixelMap | None:
    """The map a scaling gives for one scene; None for ``none`` (values used as they are).

    Args:
        scaling: How to map (not ``refuse``: the caller refuses).
        bands: Number of bands (in the model's order).
        value_range: The model's input range (low, high).
        sample: (bands, N) valid pixel values of the scene, for ``percentile``.
        product: (scales, offsets) per band as the product records them, for ``product``.

    Raises:
        ConfigError: ``product`` without the product's scales, or a sample without valid pixels.
    """
    low, high = value_range
    if scaling.kind == "none":
        return None
    if scaling.kind == "refuse":
        raise ValueError("a refused scaling has no pixel map")
    if scaling.kind == "linear":
        assert scaling.a is not None and scaling.b is not None
        return PixelMap((scaling.a,) * bands, (scaling.b,) * bands, None, str(scaling))
    if scaling.kind == "product":
        if product is None or (all(s == 1 for s in product[0]) and all(o == 0 for o in product[1])):
            raise ConfigError(
                "--scaling product: the scene records no scale or offset for its bands; give them with "
                "--scaling linear:SCALE,OFFSET"
            )
        return PixelMap(tuple(map(float, product[0])), tuple(map(float, product[1])), None, str(scaling))
    if scaling.kind == "minmax":
        assert scaling.a is not None and scaling.b is not None
        lows, highs = [scaling.a] * bands, [scaling.b] * bands
    else:
        if sample is None or sample.size == 0:
            raise ConfigError(
                "--scaling percentile: the scene has no valid pixels to compute percentiles from; check --nodata"
            )
        assert scaling.a is not None and scaling.b is not None
        limits = np.percentile(sample.astype(np.float64), (scaling.a, scaling.b), axis=1)
        lows, highs = list(limits[0]), list(limits[1])
    scale, offset = [], []
    for lo, hi in zip(lows, highs, strict=True):
        span = hi - lo if hi > lo else 1.0  # a constant band maps to the bottom of the range
        scale.append((high - low) / span)
        offset.append(low - lo * (high - low) / span)
    return PixelMap(tuple(scale), tuple(offset), (low, high), str(scaling))


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
    x = pixels.astype(np.float32)  # a new array: the subtraction and division below work in place
    np.subtract(x, m, out=x)
    np.divide(x, s, out=x)
    if valid is not None and not valid.all():  # times 1 is the identity; times 0 keeps the sign (-0.0) as before
        x *= valid[None].astype(np.float32)
    return x


def stretch(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(bands, H, W) -> (H, W, 3) float32 in [0, 1] for display: a per-band 2-98 % stretch of the first three
    bands (or of the first, as grey), its percentiles taken over the ``valid`` (H, W) pixels when given."""
    bands = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    out = np.empty(bands.shape, dtype=np.float32)
    keep = valid.astype(bool) if valid is not None and valid.any() else None
    for i, band in enumerate(bands.astype(np.float32)):
        lo, hi = np.percentile(band[keep] if keep is not None else band, (2, 98))
        out[i] = np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1)
    return out.transpose(1, 2, 0)
