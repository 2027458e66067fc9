"""Property-based tests of the grid, blending, stitching and batching arithmetic, beyond tests/pipeline/test_tile.py
and test_blend.py: a blend of equal predictions is that prediction, blends are convex combinations (weights
normalise), stitch maps constant predictions to a constant mask with nodata exactly where the scene has none, and
batches are fixed and resumable."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segpipe.core.blend import BLENDS, MIN_WEIGHT, weights_2d
from segpipe.core.tiles import TileGrid
from segpipe.pipeline import store as ws
from segpipe.pipeline.ingest import regions as _regions
from segpipe.pipeline.stitch import blend_core, stitch
from segpipe.pipeline.tile import plan_tiles, work_units

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def grids(draw: st.DrawFn, max_side: int = 200, min_tile: int = 1) -> TileGrid:
    tile = draw(st.integers(min_tile, 48))
    halo = draw(st.integers(0, tile // 2))
    return TileGrid(draw(st.integers(1, max_side)), draw(st.integers(1, max_side)), tile, halo)


def _tile_inputs(grid: TileGrid, row: int, col: int, make: object) -> dict:
    return {(n.row, n.col): (n, make(n)) for n in grid.neighbours(row, col)}  # type: ignore[operator]


@given(grid=grids(), blend=st.sampled_from(BLENDS), data=st.data())
@FAST
def test_blending_equal_predictions_gives_that_prediction(grid: TileGrid, blend: str, data: st.DataObject) -> None:
    classes = data.draw(st.integers(1, 4))
    value = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=classes, max_size=classes)), dtype=np.float32)
    index = data.draw(st.integers(0, len(grid) - 1))
    tile = grid.tile_at(index)
    size = grid.input_size
    constant = np.broadcast_to(value[:, None, None], (classes, size, size))
    near = _tile_inputs(grid, tile.row, tile.col, lambda n: constant)
    blended = blend_core(tile, near, weights_2d(size, grid.halo, blend))  # type: ignore[arg-type]
    assert blended.shape == (classes, tile.core.height, tile.core.width)
    assert np.allclose(blended, value[:, None, None], rtol=1e-5, atol=1e-6)


@given(grid=grids(max_side=120), blend=st.sampled_from(BLENDS), seed=st.integers(0, 2**32 - 1), data=st.data())
@FAST
def test_blends_are_convex_combinations_of_the_tiles(
    grid: TileGrid, blend: str, seed: int, data: st.DataObject
) -> None:
    """Weights normalise: per pixel the blend lies between the tiles' smallest and largest prediction, and
    probabilities that sum to one still do."""
    rng = np.random.default_rng(seed)
    classes = data.draw(st.integers(1, 4))
    tile = grid.tile_at(data.draw(st.integers(0, len(grid) - 1)))
    size = grid.input_size

    def softmax(_: object) -> np.ndarray:
        p = rng.random((classes, size, size), dtype=np.float32) + 1e-3
        return p / p.sum(axis=0, keepdims=True)

    near = _tile_inputs(grid, tile.row, tile.col, softmax)
    blended = blend_core(tile, near, weights_2d(size, grid.halo, blend))  # type: ignore[arg-type]
    assert np.allclose(blended.sum(axis=0), 1.0, atol=1e-5)
    lows = np.full_like(blended, np.inf)
    highs = np.full_like(blended, -np.inf)
    for other, probs in near.values():
        overlap = other.input_window.intersection(tile.core)
        if overlap is None:
            continue
        src, dst = overlap.relative_to(other.input_window), overlap.relative_to(tile.core)
        part = probs[:, src.row_slice, src.col_slice]
        lows[:, dst.row_slice, dst.col_slice] = np.minimum(lows[:, dst.row_slice, dst.col_slice], part)
        highs[:, dst.row_slice, dst.col_slice] = np.maximum(highs[:, dst.row_slice, dst.col_slice], part)
    assert np.isfinite(lows).all(), "every core pixel is covered by its own tile at least"
    assert (blended >= lows - 1e-5).all() and (blended <= highs + 1e-5).all()


@given(size=st.integers(1, 300), halo=st.integers(0, 100), blend=st.sampled_from(BLENDS))
@FAST
def test_weights_are_positive_at_most_one_and_symmetric(size: int, halo: int, blend: str) -> None:
    w = weights_2d(size, halo, blend)  # type: ignore[arg-type]
    assert w.shape == (size, size) and np.isfinite(w).all()
    assert (w >= MIN_WEIGHT**2 * (1 - 1e-6)).all() and (w <= 1.0).all()
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])


@given(grid=grids(max_side=80, min_tile=8), blend=st.sampled_from(("cosine", "gaussian")), data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stitch_of_a_constant_prediction_is_that_class_and_nodata_where_the_scene_has_none(
    grid: TileGrid, blend: str, data: st.DataObject
) -> None:
    classes = data.draw(st.integers(2, 4))
    winner = data.draw(st.integers(0, classes - 1))
    seed = data.draw(st.integers(0, 2**32 - 1))
    valid = (np.random.default_rng(seed).random((grid.height, grid.width)) < 0.8).astype(np.uint8)
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    s = grid.input_size
    group.create_array(ws.VALID, data=valid, chunks=(grid.tile_size, grid.tile_size))
    counts = np.array([[valid[t.core.row_slice, t.core.col_slice].sum() for t in row] for row in _rows(grid)])
    group.create_array(ws.VALID_PIXELS, data=counts.astype(np.int64), chunks=counts.shape)
    group.create_array(ws.DONE, data=(counts > 0).astype(np.uint8), chunks=(1, 1))
    chunks = (grid.tile_size, grid.tile_size)
    group.create_array(ws.MASK, shape=valid.shape, dtype="uint8", fill_value=ws.MASK_NODATA, chunks=chunks)
    probs = np.full((grid.rows, grid.cols, classes, s, s), 0.1 / classes, dtype=np.float16)
    probs[:, :, winner] = 0.9
    group.create_array(ws.TILE_PROBABILITIES, data=probs, chunks=(1, 1, classes, s, s))
    stitch(ws.WorkStore.from_group(group), grid, blend, workers=1, block=2)  # type: ignore[arg-type]
    mask = np.asarray(group[ws.MASK][...])
    assert (mask[valid == 1] == winner).all() and (mask[valid == 0] == ws.MASK_NODATA).all()


def _rows(grid: TileGrid) -> list[list]:
    return [[grid.tile(r, c) for c in range(grid.cols)] for r in range(grid.rows)]


@given(
    rows=st.integers(1, 8),
    cols=st.integers(1, 8),
    batch=st.integers(1, 7),
    workers=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
@FAST
def test_batches_are_fixed_and_a_resume_redoes_only_unfinished_ones(
    rows: int, cols: int, batch: int, workers: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    grid = TileGrid(cols * 16, rows * 16, 16, 0)
    counts = (rng.random((rows, cols)) < 0.7).astype(np.int64) * 5
    done = (rng.random((rows, cols)) < 0.5).astype(np.uint8) * (counts > 0)
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    group.create_array(ws.VALID_PIXELS, data=counts, chunks=counts.shape)
    group.create_array(ws.DONE, data=done.astype(np.uint8), chunks=(1, 1))
    todo, skipped, reused = plan_tiles(ws.WorkStore.from_group(group), grid, batch)
    needed = [int(i) for i in np.flatnonzero(counts.ravel())]
    fixed = [needed[k : k + batch] for k in range(0, len(needed), batch)]  # independent of what is done
    flat_done = done.ravel()
    assert todo == [g for g in fixed if not all(flat_done[i] for i in g)]
    assert skipped == len(grid) - len(needed)
    assert reused == sum(len(g) for g in fixed if all(flat_done[i] for i in g))
    units = work_units(todo, workers)
    assert [g for unit in units for g in unit] == todo and all(1 <= len(u) <= 4 for u in units)


@given(width=st.integers(1, 3000), height=st.integers(1, 3000), region=st.integers(64, 2048))
@FAST
def test_ingest_regions_tile_the_scene(width: int, height: int, region: int) -> None:
    regions = _regions(width, height, region)
    assert sum(r.area for r in regions) == width * height
    assert all(r.col_off % region == 0 and r.row_off % region == 0 for r in regions)
    assert all(r.col_off + r.width <= width and r.row_off + r.height <= height for r in regions)


@given(grid=grids(max_side=300), data=st.data())
@FAST
def test_every_tile_input_is_the_full_size_with_its_core_at_the_halo(grid: TileGrid, data: st.DataObject) -> None:
    tile = grid.tile_at(data.draw(st.integers(0, len(grid) - 1)))
    p, r = tile.pad, tile.read
    assert r.width + p.left + p.right == r.height + p.top + p.bottom == grid.input_size
    inner = tile.core_in_input
    assert (inner.col_off, inner.row_off) == (grid.halo, grid.halo)
    assert (inner.width, inner.height) == (tile.core.width, tile.core.height)
    assert (tile.row, tile.col) == divmod(tile.row * grid.cols + tile.col, grid.cols)


WORK = Path(tempfile.gettempdir()) / "segpipe-work-dir-property"  # never created: store_url is pure


@given(name=st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_work_store_name_is_always_one_plain_entry_of_the_work_dir(name: str) -> None:
    path = Path(ws.store_url(WORK, name))
    assert path.parent == WORK
    assert path.name.endswith(".zarr") and not path.name.startswith(".")
    assert "/" not in path.name and "\x00" not in path.name and len(path.name.encode()) <= 255
    assert Path(ws.store_url(WORK, name)) == path
