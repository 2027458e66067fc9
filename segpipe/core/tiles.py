"""Tile-grid arithmetic: pure functions on small frozen value types, and reading one tile's input from arrays.

All sizes and offsets are in **pixels** of the scene grid (column = x, row = y), origin top-left.

A scene of ``width x height`` pixels is cut into a grid of square *cores* of ``tile_size`` pixels; the last
row and column of cores are clipped at the scene edge, so every pixel lies in exactly one core. Each tile is
read with a *halo* of ``halo`` pixels of context on every side. Where the halo leaves the scene, the read
window is clipped and the missing margin is filled by mirror padding (see :attr:`Tile.pad`), so every model
input has the same size ``tile_size + 2 * halo``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Window:
    """A rectangle of pixels: ``[row_off, row_off + height) x [col_off, col_off + width)``."""

    col_off: int
    row_off: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width < 0 or self.height < 0:
            raise ValueError(f"window size must be >= 0, got {self.width}x{self.height}")

    @property
    def row_slice(self) -> slice:
        return slice(self.row_off, self.row_off + self.height)

    @property
    def col_slice(self) -> slice:
        return slice(self.col_off, self.col_off + self.width)

    @property
    def area(self) -> int:
        return self.width * self.height

    def intersection(self, other: Window) -> Window | None:
        """The overlap of two windows, or None if they do not overlap."""
        c0, r0 = max(self.col_off, other.col_off), max(self.row_off, other.row_off)
        c1 = min(self.col_off + self.width, other.col_off + other.width)
        r1 = min(self.row_off + self.height, other.row_off + other.height)
        if c1 <= c0 or r1 <= r0:
            return None
        return Window(c0, r0, c1 - c0, r1 - r0)

    def relative_to(self, outer: Window) -> Window:
        """This window in the pixel coordinates of ``outer`` (whose top-left becomes 0, 0)."""
        return Window(self.col_off - outer.col_off, self.row_off - outer.row_off, self.width, self.height)


@dataclass(frozen=True, slots=True)
class Padding:
    """Pixels of mirror padding to add on each side of a clipped read window."""

    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0


@dataclass(frozen=True, slots=True)
class Tile:
    """One unit of inference.

    Attributes:
        row: Tile row index in the grid.
        col: Tile column index in the grid.
        core: The pixels this tile is responsible for (scene coordinates; clipped at the scene edge).
        read: The core grown by the halo and clipped to the scene (scene coordinates).
        pad: Mirror padding that grows ``read`` to the full model input of ``tile_size + 2*halo`` pixels.
        input_window: The unclipped window ``core origin - halo``, size ``tile_size + 2*halo``, which may
            extend beyond the scene; the model input covers exactly this window.
    """

    row: int
    col: int
    core: Window
    read: Window
    pad: Padding
    input_window: Window

    @property
    def core_in_input(self) -> Window:
        """The core in the pixel coordinates of the model input (top-left of the input is 0, 0)."""
        return self.core.relative_to(self.input_window)


@dataclass(frozen=True, slots=True)
class TileGrid:
    """A scene's tile grid.

    Args:
        width: Scene width in pixels (>= 1).
        height: Scene height in pixels (>= 1).
        tile_size: Core size in pixels (>= 1).
        halo: Context margin in pixels around every core (>= 0).
    """

    width: int
    height: int
    tile_size: int
    halo: int

    def __post_init__(self) -> None:
        for name in ("width", "height", "tile_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.halo, int) or self.halo < 0:
            raise ConfigError(f"halo must be a non-negative integer, got {self.halo!r}")

    @property
    def rows(self) -> int:
        """Number of tile rows."""
        return -(-self.height // self.tile_size)

    @property
    def cols(self) -> int:
        """Number of tile columns."""
        return -(-self.width // self.tile_size)

    @property
    def input_size(self) -> int:
        """Side of every model input in pixels: ``tile_size + 2 * halo``."""
        return self.tile_size + 2 * self.halo

    def __len__(self) -> int:
        return self.rows * self.cols

    def tile(self, row: int, col: int) -> Tile:
        """The tile at grid position (row, col)."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) outside a {self.rows}x{self.cols} grid")
        t, h = self.tile_size, self.halo
        x0, y0 = col * t, row * t
        core = Window(x0, y0, min(t, self.width - x0), min(t, self.height - y0))
        input_window = Window(x0 - h, y0 - h, t + 2 * h, t + 2 * h)
        scene = Window(0, 0, self.width, self.height)
        read = input_window.intersection(scene)
        assert read is not None  # the core is inside the scene and inside the input window
        pad = Padding(
            top=read.row_off - input_window.row_off,
            left=read.col_off - input_window.col_off,
            bottom=(input_window.row_off + input_window.height) - (read.row_off + read.height),
            right=(input_window.col_off + input_window.width) - (read.col_off + read.width),
        )
        return Tile(row, col, core, read, pad, input_window)

    def tile_at(self, index: int) -> Tile:
        """The tile with flat (row-major) index ``index``."""
        return self.tile(*divmod(index, self.cols))

    def __iter__(self) -> Iterator[Tile]:
        for index in range(len(self)):
            yield self.tile_at(index)

    def neighbours(self, row: int, col: int) -> list[Tile]:
        """Tiles whose input window overlaps the core of tile (row, col), itself included.

        With ``halo < tile_size`` these are at most the 3x3 block around it; larger halos reach further.
        """
        reach = -(-self.halo // self.tile_size)
        core = self.tile(row, col).core
        found = []
        for r in range(max(0, row - reach), min(self.rows, row + reach + 1)):
            for c in range(max(0, col - reach), min(self.cols, col + reach + 1)):
                other = self.tile(r, c)
                if other.input_window.intersection(core) is not None:
                    found.append(other)
        return found


def validate_tiling(tile_size: int, halo: int, *, size_multiple: int = 1, input_size: int | None = None) -> None:
    """Check tile size and halo against what a model accepts; raise ConfigError saying how to fix them.

    Args:
        tile_size: Core size in pixels.
        halo: Halo in pixels.
        size_multiple: The model's input height and width must be multiples of this (e.g. 16 for a depth-4
            U-Net). Tile size and halo must both be multiples of it, so that every tile is aligned with the
            model's down-sampling grid and tiled inference matches whole-image inference. Not checked for a
            fixed input size, which the network takes as it is.
        input_size: A fixed model input size (e.g. an ONNX export); then ``tile_size + 2*halo`` must equal it
            (:func:`fit_fixed_input` chooses them).
    """
    if tile_size < 1:
        raise ConfigError(f"tile size must be a positive number of pixels, got {tile_size}")
    if halo < 0:
        raise ConfigError(f"halo must be >= 0 pixels, got {halo}")
    if tile_size > 16384:
        raise ConfigError(f"tile size {tile_size} is absurdly large (max 16384 pixels); use 256-2048")
    if halo * 2 > tile_size:
        raise ConfigError(
            f"tile size {tile_size} is smaller than twice the halo ({halo}): most compute would be spent on "
            f"context; use --tile-size >= {2 * halo} or a smaller --halo"
        )
    for name, value in (("tile size", tile_size), ("halo", halo)):
        if input_size is None and value % size_multiple:
            raise ConfigError(
                f"{name} {value} is not a multiple of {size_multiple}, which the model requires; "
                f"use {max(size_multiple, value // size_multiple * size_multiple)}"
            )
    if input_size is not None and tile_size + 2 * halo != input_size:
        raise ConfigError(
            f"the model takes a fixed input of {input_size} pixels but "
            f"tile size {tile_size} + 2 x halo {halo} = {tile_size + 2 * halo}; "
            f"choose tile size and halo so that tile_size + 2*halo = {input_size}"
        )


def fit_fixed_input(input_size: int, tile_size: int | None, halo: int) -> tuple[int, int]:
    """(tile size, halo) for a model that takes only ``input_size`` x ``input_size`` pixels.

    Without a tile size, the tile is what the input leaves after the halo: ``input_size - 2 * halo``. With one, a
    tile that leaves room gets a wider halo, ``(input_size - tile_size) / 2`` (more context, never less).

    Raises:
        ConfigError: the tile and halo do not fit in the input, or leave an odd margin.
    """
    if tile_size is None:
        tile_size = input_size - 2 * halo
        if tile_size < 1:
            raise ConfigError(
                f"the model takes a fixed input of {input_size} pixels, which a halo of {halo} leaves no tile in; "
                f"use --halo {max(0, input_size // 4)} or less"
            )
        return tile_size, halo
    side = tile_size + 2 * halo
    if side > input_size:
        raise ConfigError(
            f"the model takes a fixed input of {input_size} pixels but tile size {tile_size} + 2 x halo {halo} = "
            f"{side}; use --tile-size {max(1, input_size - 2 * halo)} or less (or leave it out)"
        )
    if (input_size - tile_size) % 2:
        raise ConfigError(
            f"the model takes a fixed input of {input_size} pixels: tile size {tile_size} leaves an odd margin; use "
            f"--tile-size {tile_size - 1} or {tile_size + 1}"
        )
    return tile_size, (input_size - tile_size) // 2


def sample_windows(width: int, height: int, *, count: int = 64, size: int = 128) -> list[Window]:
    """About ``count`` windows of ``size`` x ``size`` pixels (smaller where the scene is), spread evenly over a
    ``width`` x ``height`` scene on a regular grid, inside it, without overlap when the scene has room (a
    deterministic sample for statistics)."""
    side = max(1, math.isqrt(count))
    w, h = min(size, width), min(size, height)
    cols = max(1, min(side, width // w))
    rows = max(1, min(side, height // h))
    windows = []
    for r in range(rows):
        for c in range(cols):
            row = (height - h) * r // max(rows - 1, 1) if rows > 1 else (height - h) // 2
            col = (width - w) * c // max(cols - 1, 1) if cols > 1 else (width - w) // 2
            windows.append(Window(col, row, w, h))
    return windows


def read_tile_input(image: Any, valid: Any, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """A tile's model input from arrays of the scene (zarr arrays of the work store, or numpy arrays), mirror-padded
    (numpy's ``reflect``) to the full input size where the input window leaves the scene.

    Args:
        image: (bands, height, width) pixels of the whole scene, indexed lazily.
        valid: (height, width) validity mask of the same scene (1 where there is data).
        tile: The tile (see :meth:`TileGrid.tile`).

    Returns:
        ``(pixels, valid)``: pixels (bands, S, S) in the array's dtype and a (S, S) validity mask, where
        S = tile_size + 2 * halo.
    """
    r = tile.read
    data, ok = np.asarray(image[:, r.row_slice, r.col_slice]), np.asarray(valid[r.row_slice, r.col_slice])
    return pad_tile_input(data, ok, tile)


def pad_tile_input(data: np.ndarray, ok: np.ndarray, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """A tile's model input from the pixels (bands, h, w) and validity (h, w) of its read window
    (:attr:`Tile.read`), mirror-padded (numpy's ``reflect``) to (bands, S, S) and (S, S) where it leaves the scene."""
    p = tile.pad
    if p.top or p.bottom or p.left or p.right:
        data = np.pad(data, ((0, 0), (p.top, p.bottom), (p.left, p.right)), mode="reflect")
        ok = np.pad(ok, ((p.top, p.bottom), (p.left, p.right)), mode="reflect")
    return data, ok
