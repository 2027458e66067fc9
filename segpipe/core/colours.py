"""Colours: ``#RRGGBB`` text, colour tables that map colour-coded masks to class ids, colourised masks.

A class's colour is one ``#RRGGBB`` string (case-insensitive, ``#`` optional when parsing). Colour tables decode
colour-coded masks (training data, ground truth); :func:`rgba` and :func:`colourise` encode class ids for people
(the mask COG's colour table, quicklooks, explain).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from segpipe.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: What to do with a mask colour (or class id) that is not in the table: stop, or give the pixel the ignore index.
Unknown = Literal["error", "ignore"]


def parse_colour(colour: str) -> tuple[int, int, int]:
    """Parse ``"#RRGGBB"`` (case-insensitive, ``#`` optional) into an (r, g, b) tuple of 0-255 ints."""
    text = colour.strip().removeprefix("#")
    if len(text) != 6:
        raise ConfigError(f"expected a colour as '#RRGGBB', got {colour!r}")
    try:
        value = int(text, 16)
    except ValueError:
        raise ConfigError(f"expected a colour as '#RRGGBB' (hex digits), got {colour!r}") from None
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(3, ...) uint8 -> (...) int32 codes 0xRRGGBB."""
    return (rgb[0].astype(np.int32) << 16) | (rgb[1].astype(np.int32) << 8) | rgb[2].astype(np.int32)


def _hex(code: int) -> str:
    return f"#{code:06X}"


@dataclass(frozen=True)
class ColourTable:
    """Maps mask colours to class ids: ``colours[i]`` is the colour of class ``i``.

    Build one with :meth:`from_hex` (``ColourTable.from_hex(["#3C1098", ...])``).
    """

    colours: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if not self.colours:
            raise ConfigError("expected at least one colour in the colour table, got none")
        if len(self.colours) > 255:
            raise ConfigError(f"expected at most 255 classes in a colour table, got {len(self.colours)}")
        codes = [(r << 16) | (g << 8) | b for r, g, b in self.colours]
        if len(set(codes)) != len(codes):
            raise ConfigError(f"expected distinct colours in the colour table, got {self.hex_colours}")

    @classmethod
    def from_hex(cls, colours: Iterable[str]) -> ColourTable:
        """A table from ``"#RRGGBB"`` strings in class-id order."""
        return cls(tuple(parse_colour(c) for c in colours))

    @property
    def hex_colours(self) -> tuple[str, ...]:
        return tuple(_hex((r << 16) | (g << 8) | b) for r, g, b in self.colours)

    def __len__(self) -> int:
        return len(self.colours)

    def unknown_colours_error(self, codes: np.ndarray, counts: np.ndarray, *, source: str, fix: str) -> InputError:
        """The error for mask colours not in the table: ``codes`` (0xRRGGBB, distinct, ascending) with their pixel
        ``counts``; ``fix`` ends the advice ("Add the colour to the class table, or <fix>")."""
        listed = ", ".join(f"{_hex(int(c))} ({int(n)} px)" for c, n in zip(codes[:5], counts[:5], strict=True))
        more = f" and {len(codes) - 5} more" if len(codes) > 5 else ""
        return InputError(
            f"{source}: mask colour(s) not in the colour table: {listed}{more}; the table has "
            f"{', '.join(self.hex_colours)}. Add the colour to the class table, or {fix}"
        )

    def to_class_ids(
        self,
        rgb: np.ndarray,
        *,
        source: str = "<array>",
        unknown: Unknown = "error",
        ignore_index: int = 255,
        fix: str | None = None,
    ) -> np.ndarray:
        """Map a colour-coded mask to class ids.

        Args:
            rgb: (3, H, W) uint8 array, bands red, green, blue.
            source: Name of the file, for error messages.
            unknown: "error" raises on a colour not in the table; "ignore" gives those pixels
                ``ignore_index``.
            ignore_index: Value for unknown colours when ``unknown="ignore"``.
            fix: How the caller's user lets unknown colours through (the end of the error's advice), e.g.
                ``"pass --unknown ignore"`` for a command; default: the Python argument ``unknown='ignore'``.

        Returns:
            (H, W) uint8 class ids.
        """
        if rgb.ndim != 3 or rgb.shape[0] != 3:
            raise InputError(f"{source}: expected a (3, H, W) colour mask, got shape {rgb.shape}")
        codes = _pack(rgb)
        table = np.array([(r << 16) | (g << 8) | b for r, g, b in self.colours], dtype=np.int32)
        order = np.argsort(table)
        sorted_table = table[order]
        pos = np.clip(np.searchsorted(sorted_table, codes), 0, len(table) - 1)
        known = sorted_table[pos] == codes
        out = order[pos].astype(np.uint8)
        if not known.all():
            bad, counts = np.unique(codes[~known], return_counts=True)
            if unknown == "error":
                fix = fix or f"pass unknown='ignore' to give such pixels the ignore index {ignore_index}"
                raise self.unknown_colours_error(bad, counts, source=source, fix=fix)
            log.info(
                "%s: %d px of unknown colour(s) %s set to ignore index %d",
                source,
                int(counts.sum()),
                ", ".join(_hex(int(c)) for c in bad[:5]),
                ignore_index,
            )
            out[~known] = ignore_index
        return out


def rgba(colour: str) -> tuple[int, int, int, int]:
    """``"#3C1098"`` -> ``(60, 16, 152, 255)`` (opaque), as GDAL colour tables take it."""
    return (*parse_colour(colour), 255)


def hex_colour(rgb: Sequence[int]) -> str:
    """``(60, 16, 152)`` -> ``"#3C1098"``."""
    r, g, b = (int(c) for c in rgb[:3])
    return _hex((r << 16) | (g << 8) | b)


def colour_lut(colours: Sequence[str] | Mapping[int, Sequence[int]], nodata: int | None = 255) -> np.ndarray:
    """A (256, 3) uint8 lookup table class id -> RGB: from ``#RRGGBB`` per class id, or from a GDAL colour map
    ``{id: (r, g, b, a)}``. Ids without a colour, and ``nodata``, are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    items = colours.items() if isinstance(colours, Mapping) else enumerate(colours)
    for value, colour in items:
        if 0 <= value < 256:
            lut[value] = parse_colour(colour) if isinstance(colour, str) else tuple(colour)[:3]
    if nodata is not None:
        lut[nodata] = 0
    return lut


def colourise(mask: np.ndarray, colours: Sequence[str] | Mapping[int, Sequence[int]], nodata: int = 255) -> np.ndarray:
    """Class ids (H, W) -> RGB (H, W, 3) uint8 in the classes' colours (see :func:`colour_lut`); nodata is black."""
    return colour_lut(colours, nodata)[mask]
