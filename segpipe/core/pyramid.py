"""Resolution and pyramid geometry of whole-slide images: pure functions on small frozen values, no I/O.

A slide is a pyramid: level 0 at full resolution (``mpp`` micrometres per pixel) and coarser levels, each with the
downsample the reader states (OpenSlide's: level-0 pixels per level pixel, the mean of the two axes' ratios). A run
segments the slide on a *scene grid* of ``factor`` level-0 pixels per scene pixel, read from one level:

- The level read is the coarsest one at or just finer than the target pixel size (:func:`plan_read`).
- When the level is within :data:`SNAP` of the target it is read as it is: the scene grid *is* that level (its
  width and height, ``factor`` = its downsample). Otherwise the level is resampled by the exact factor
  ``target / level mpp`` (area average when shrinking, bilinear when enlarging).
- The scene grid of a resampled read has ``ceil(level-0 size / factor)`` pixels per axis (rounding up, so every
  level-0 pixel lies in exactly one scene pixel; the last row and column may reach past the slide's edge, which
  reads as nodata). Scene pixel ``(row, col)`` covers level-0 pixels ``[col * factor, (col + 1) * factor)`` by
  ``[row * factor, (row + 1) * factor)``: the mask maps back to level 0 by multiplying by ``factor``, nothing else
  (the mask's transform is ``(factor, 0, 0, 0, factor, 0)`` in level-0 pixels).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from segpipe.core.errors import ConfigError

#: Relative difference between a level's pixel size and the target within which the level is read as it is.
SNAP = 0.025

#: Units of a resolution: micrometres (slides) and metres (satellite and aerial imagery).
UNITS = ("um", "m")

#: The largest level-0 pixel size (micrometres) of a microscopy image: a generic TIFF whose pixels are larger is not
#: a microscope's (72 dpi is 353 um), and ``--mpp`` accepts no more.
MAX_SLIDE_MPP = 50.0

_RESOLUTION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(um|µm|μm|m)\s*$")


@dataclass(frozen=True)
class Resolution:
    """A pixel size: ``value`` ``unit`` per pixel (``um``: micrometres, for slides; ``m``: metres, for imagery)."""

    value: float
    unit: str = "um"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"resolution unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, int | float) or not self.value > 0:
            raise ConfigError(f"resolution must be a number > 0, got {self.value!r}")
        if not math.isfinite(self.value):
            raise ConfigError(f"resolution must be finite, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit}

    @classmethod
    def from_value(cls, value: Any) -> Resolution:
        """From ``{"value": 0.5, "unit": "um"}`` (model metadata) or a :class:`Resolution`."""
        if isinstance(value, Resolution):
            return value
        if not isinstance(value, dict) or not {"value"} <= set(value) <= {"value", "unit"}:
            raise ConfigError(f'resolution must be an object like {{"value": 0.5, "unit": "um"}}, got {value!r}')
        return cls(value["value"], value.get("unit", "um"))


def parse_resolution(text: str) -> Resolution | None:
    """``--resolution``: ``0.5um`` (also ``µm``), ``0.3m``, or ``native`` (None: the slide's level 0, no
    resampling).

    Raises:
        ConfigError: anything else, naming what is accepted.
    """
    if text.strip().lower() == "native":
        return None
    found = _RESOLUTION.match(text)
    if not found:
        raise ConfigError(
            f"--resolution must be a pixel size with its unit, such as 0.5um or 0.3m, or native, got {text!r}"
        )
    unit = "m" if found.group(2) == "m" else "um"
    return Resolution(float(found.group(1)), unit)


@dataclass(frozen=True)
class Pyramid:
    """A slide's levels as its reader states them.

    Attributes:
        sizes: (width, height) of each level, level 0 first.
        downsamples: Level-0 pixels per pixel of each level (1.0 for level 0).
        mpp: (x, y) micrometres per level-0 pixel, or None when the slide does not say.
    """

    sizes: tuple[tuple[int, int], ...]
    downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.downsamples):
            raise ValueError(f"a pyramid needs one downsample per level, got {self.sizes} and {self.downsamples}")

    @property
    def width(self) -> int:
        return self.sizes[0][0]

    @property
    def height(self) -> int:
        return self.sizes[0][1]

    def level_for(self, factor: float) -> int:
        """The coarsest level at or finer than ``factor`` level-0 pixels per pixel (within :data:`SNAP`)."""
        level = 0
        for i, downsample in enumerate(self.downsamples):
            if downsample <= factor * (1 + SNAP):
                level = i
        return level

    def to_dict(self) -> dict[str, Any]:
        return {
            "sizes": [list(s) for s in self.sizes],
            "downsamples": list(self.downsamples),
            "mpp": list(self.mpp) if self.mpp else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pyramid:
        mpp = data.get("mpp")
        return cls(
            tuple((int(w), int(h)) for w, h in data["sizes"]),
            tuple(float(d) for d in data["downsamples"]),
            (float(mpp[0]), float(mpp[1])) if mpp else None,
        )


@dataclass(frozen=True)
class SlideRead:
    """How a slide is read for a run (see the module docstring).

    Attributes:
        level: The pyramid level read.
        factor: Level-0 pixels per scene pixel (both axes).
        width: Scene grid width in pixels.
        height: Scene grid height in pixels.
        resampled: False when the scene grid is the level itself; True when the level is resampled.
    """

    level: int
    factor: float
    width: int
    height: int
    resampled: bool

    def mpp(self, pyramid: Pyramid) -> tuple[float, float] | None:
        """Micrometres per scene pixel (x, y), or None when the slide states no pixel size."""
        if pyramid.mpp is None:
            return None
        return (_tidy(pyramid.mpp[0] * self.factor), _tidy(pyramid.mpp[1] * self.factor))

    def to_level0(self, row: int, col: int) -> tuple[float, float]:
        """Level-0 (x, y) of the top-left corner of scene pixel (row, col)."""
        return (col * self.factor, row * self.factor)


def _tidy(value: float) -> float:
    """``value`` to 12 significant digits: 0.5 / 0.499 * 0.499 is 0.5, not 0.49999999999999994."""
    return float(f"{value:.12g}")


def grid_size(width0: int, height0: int, factor: float) -> tuple[int, int]:
    """Scene grid (width, height) of a resampled read: ``ceil(size / factor)`` per axis (a relative tolerance of
    1e-9 keeps an exact division from rounding up)."""
    return (
        max(1, math.ceil(width0 / factor * (1 - 1e-9))),
        max(1, math.ceil(height0 / factor * (1 - 1e-9))),
    )


def plan_read(pyramid: Pyramid, target_um: float | None) -> SlideRead:
    """The level and factor that read ``pyramid`` at ``target_um`` micrometres per pixel (None: level 0 as it is).

    Raises:
        ValueError: a target without the slide's pixel size (callers check first).
    """
    if target_um is None:
        return SlideRead(0, 1.0, pyramid.width, pyramid.height, False)
    if pyramid.mpp is None:
        raise ValueError("the slide states no pixel size; it can only be read at level 0")
    factor = target_um / pyramid.mpp[0]
    level = pyramid.level_for(factor)
    downsample = pyramid.downsamples[level]
    if abs(factor / downsample - 1) <= SNAP:
        width, height = pyramid.sizes[level]
        return SlideRead(level, downsample, width, height, False)
    width, height = grid_size(pyramid.width, pyramid.height, factor)
    return SlideRead(level, factor, width, height, True)
