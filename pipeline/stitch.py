"""Stitch stage: blend overlapping tile predictions into the ``mask`` (and ``probabilities``), block by block.

The finalize step of the blending mergers (``cosine``, ``gaussian``; :mod:`segpipe.pipeline.merge`); with ``crop``
the segmenters write the mask directly.

For every tile core, the prediction is the weighted mean of the predictions of all tiles whose input window
covers it (itself and, with ``halo < tile_size``, its 8 neighbours), with the weights of
:mod:`segpipe.core.blend`; then argmax, and input nodata becomes 255. Work is cut into blocks of ``block x block``
tiles; a block reads the tile predictions of its neighbourhood once, so memory per thread is bounded by
``(block + 2)^2`` tiles, whatever the scene's size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.core.blend import Blend, weights_2d
from segpipe.core.tiles import Tile, TileGrid
from segpipe.pipeline import store as ws
from segpipe.pipeline.tasks import TaskRunner, Threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StitchResult:
    seconds: float
    tiles: int


def blend_core(
    tile: Tile, neighbours: dict[tuple[int, int], tuple[Tile, np.ndarray]], weights: np.ndarray
) -> np.ndarray:
    """Weighted mean of the neighbours' predictions over one tile core.

    Args:
        tile: The tile whose core is blended.
        neighbours: ``(row, col) -> (tile, probabilities (classes, S, S))`` of the tiles with predictions
            whose input windows overlap the core (must include ``tile`` itself).
        weights: (S, S) blend weights of one tile input.
    Returns:
        float32 probabilities (classes, core height, core width).
    """
    core = tile.core
    acc: np.ndarray | None = None
    total = np.zeros((core.height, core.width), dtype=np.float32)
    for other, probs in neighbours.values():
        overlap = other.input_window.intersection(core)
        if overlap is None:
            continue
        src = overlap.relative_to(other.input_window)
        dst = overlap.relative_to(core)
        w = weights[src.row_slice, src.col_slice]
        contribution = probs[:, src.row_slice, src.col_slice].astype(np.float32) * w
        if acc is None:
            acc = np.zeros((probs.shape[0], core.height, core.width), dtype=np.float32)
        acc[:, dst.row_slice, dst.col_slice] += contribution
        total[dst.row_slice, dst.col_slice] += w
    if acc is None:
        raise ValueError(f"no prediction covers tile ({tile.row}, {tile.col})")
    return acc / total


def stitch_block(
    store_ref: ws.WorkStore | str, grid: TileGrid, blend: Blend, origin: tuple[int, int], block: int
) -> int:
    """Blend the tile cores of one block of ``block x block`` tiles starting at tile ``origin`` (row, col): a stitch
    task, run by a thread of the driver or by a worker of a cluster. Returns the number of tiles in the block."""
    store = ws.opened(store_ref)
    tile_probs = store.array(ws.TILE_PROBABILITIES)
    valid = store.array(ws.VALID)
    mask = store.array(ws.MASK)
    probabilities = store.array(ws.PROBABILITIES) if ws.PROBABILITIES in store else None
    weights = weights_2d(grid.input_size, grid.halo, blend)
    reach = -(-grid.halo // grid.tile_size)
    r0, c0 = origin
    rows = range(r0, min(grid.rows, r0 + block))
    cols = range(c0, min(grid.cols, c0 + block))
    near_rows = slice(max(0, r0 - reach), min(grid.rows, rows.stop + reach))
    near_cols = slice(max(0, c0 - reach), min(grid.cols, cols.stop + reach))
    done = np.asarray(store.array(ws.DONE)[near_rows, near_cols]).astype(bool)
    needed = np.asarray(store.array(ws.VALID_PIXELS)[near_rows, near_cols]) > 0
    cache: dict[tuple[int, int], tuple[Tile, np.ndarray]] = {}
    for r in range(near_rows.start, near_rows.stop):
        for c in range(near_cols.start, near_cols.stop):
            if done[r - near_rows.start, c - near_cols.start]:
                cache[(r, c)] = (grid.tile(r, c), np.asarray(tile_probs[r, c]))
    count = 0
    for r in rows:
        for c in cols:
            count += 1
            if not needed[r - near_rows.start, c - near_cols.start]:
                continue  # all nodata: the mask keeps its fill value, 255
            tile = grid.tile(r, c)
            near = {(n.row, n.col): cache[(n.row, n.col)] for n in grid.neighbours(r, c) if (n.row, n.col) in cache}
            probs = blend_core(tile, near, weights)
            ok = np.asarray(valid[tile.core.row_slice, tile.core.col_slice]).astype(bool)
            classes = np.argmax(probs, axis=0).astype(np.uint8)
            mask[tile.core.row_slice, tile.core.col_slice] = np.where(ok, classes, ws.MASK_NODATA)
            if probabilities is not None:
                scaled = np.round(probs * ws.PROBABILITY_SCALE).astype(np.uint8)
                probabilities[:, tile.core.row_slice, tile.core.col_slice] = np.where(
                    ok[None], scaled, ws.PROBABILITY_NODATA
                )
    return count


def stitch(
    store: ws.WorkStore,
    grid: TileGrid,
    blend: Blend,
    *,
    workers: int = 2,
    block: int = 4,
    progress: Callable[[int], Any] | None = None,
    session: TaskRunner | None = None,
) -> StitchResult:
    """Blend ``tile_probabilities`` into ``mask`` (and ``probabilities`` when the store has it), block by block:
    on ``workers`` threads of this process, or on the workers of the session's cluster."""
    start = time.perf_counter()
    runner = session or Threads()
    ref: ws.WorkStore | str = store.url if runner.on_cluster else store
    origins = [(r, c) for r in range(0, grid.rows, block) for c in range(0, grid.cols, block)]
    items = [(ref, grid, blend, origin, block) for origin in origins]
    counts = runner.map(stitch_block, items, workers=workers, progress=progress)
    return StitchResult(seconds=time.perf_counter() - start, tiles=sum(counts))
