"""Tile-grid arithmetic: each pixel in exactly one core, halos clipped or padded correctly, any scene size."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.core.errors import ConfigError
from segpipe.core.tiles import TileGrid, Window, validate_tiling

grids = st.builds(
    TileGrid,
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    tile_size=st.integers(1, 64),
    halo=st.integers(0, 40),
).filter(lambda g: len(g) <= 400)  # any shape and remainder, but few enough tiles to check exhaustively


@given(grids)
@settings(max_examples=200, deadline=None)
def test_every_pixel_lies_in_exactly_one_core(grid: TileGrid) -> None:
    cover = np.zeros((grid.height, grid.width), dtype=np.int32)
    for tile in grid:
        cover[tile.core.row_slice, tile.core.col_slice] += 1
        assert tile.core.width >= 1 and tile.core.height >= 1
    assert (cover == 1).all()
    assert len(list(grid)) == grid.rows * grid.cols


@given(grids)
@settings(max_examples=200, deadline=None)
def test_read_window_is_input_window_clipped_and_padding_restores_it(grid: TileGrid) -> None:
    scene = Window(0, 0, grid.width, grid.height)
    for tile in grid:
        assert tile.input_window.width == tile.input_window.height == grid.input_size
        assert tile.read == tile.input_window.intersection(scene)
        p = tile.pad
        assert min(p.top, p.bottom, p.left, p.right) >= 0
        assert tile.read.width + p.left + p.right == grid.input_size
        assert tile.read.height + p.top + p.bottom == grid.input_size
        # padding only where the input window leaves the scene
        assert (p.left > 0) == (tile.input_window.col_off < 0)
        assert (p.top > 0) == (tile.input_window.row_off < 0)
        assert (p.right > 0) == (tile.input_window.col_off + grid.input_size > grid.width)
        assert (p.bottom > 0) == (tile.input_window.row_off + grid.input_size > grid.height)
        inner = tile.core_in_input
        assert inner.col_off == inner.row_off == grid.halo


@given(grids)
@settings(max_examples=100, deadline=None)
def test_mirror_padded_read_equals_the_mirror_padded_scene(grid: TileGrid) -> None:
    """Reading a clipped window and mirror-padding it equals cutting the input window out of the scene
    padded by the halo, within ``halo`` pixels of the scene (all that a model of receptive radius <= halo
    can see)."""
    from segpipe.core.tiles import read_tile_input

    rng = np.random.default_rng(0)
    scene = rng.integers(0, 255, size=(1, grid.height, grid.width), dtype=np.uint8)
    valid = np.ones((grid.height, grid.width), dtype=np.uint8)
    h = grid.halo
    padded = np.pad(scene, ((0, 0), (h, h), (h, h)), mode="reflect") if h else scene
    for tile in grid:
        pixels, ok = read_tile_input(scene, valid, tile)  # numpy arrays slice like zarr arrays
        assert pixels.shape == (1, grid.input_size, grid.input_size)
        w = tile.input_window
        rows = slice(w.row_off + h, min(w.row_off + h + w.height, grid.height + 2 * h))
        cols = slice(w.col_off + h, min(w.col_off + h + w.width, grid.width + 2 * h))
        expected = padded[:, rows, cols]
        assert (pixels[:, : expected.shape[1], : expected.shape[2]] == expected).all()
        assert ok.all()


@given(grids)
@settings(max_examples=100, deadline=None)
def test_neighbours_are_exactly_the_tiles_whose_input_covers_the_core(grid: TileGrid) -> None:
    for tile in grid:
        found = {(t.row, t.col) for t in grid.neighbours(tile.row, tile.col)}
        expected = {(t.row, t.col) for t in grid if t.input_window.intersection(tile.core) is not None}
        assert found == expected
        assert (tile.row, tile.col) in found


def test_one_pixel_scene() -> None:
    grid = TileGrid(1, 1, 16, 8)
    (tile,) = list(grid)
    assert tile.core == Window(0, 0, 1, 1)
    assert tile.pad.top == tile.pad.left == 8 and tile.pad.bottom == tile.pad.right == 23


@pytest.mark.parametrize(
    ("tile", "halo", "multiple", "fixed", "message"),
    [
        (64, 40, 1, None, "smaller than twice the halo"),
        (100, 16, 16, None, "tile size 100 is not a multiple of 16"),
        (64, 8, 16, None, "halo 8 is not a multiple of 16"),
        (20000, 0, 1, None, "absurdly large"),
        (128, 32, 16, 256, "fixed input of 256 pixels"),
        (0, 0, 1, None, "positive number"),
    ],
)
def test_validate_tiling_errors(tile: int, halo: int, multiple: int, fixed: int | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_tiling(tile, halo, size_multiple=multiple, input_size=fixed)


def test_bad_grid_arguments() -> None:
    with pytest.raises(ConfigError, match="width must be a positive integer, got 0"):
        TileGrid(0, 5, 4, 0)
    with pytest.raises(ConfigError, match="halo must be a non-negative integer"):
        TileGrid(5, 5, 4, -1)
