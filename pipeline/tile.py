"""Tile stage: which tiles of the grid need compute, and in which fixed batches and calls.

The grid itself is pure geometry (:mod:`segpipe.core.tiles`); this module reads the work store's per-tile counts
(``valid_pixels``, ``done``) to decide what is left to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from segpipe.core.tiles import TileGrid
from segpipe.pipeline import store as ws


class TilePlan(NamedTuple):
    """What inference has to do.

    Attributes:
        batches: Fixed batches of flat tile indices (raster order) that still need compute.
        skipped_nodata: Tiles whose core holds no valid pixel (never computed; their mask stays nodata).
        reused: Tiles already done in the store (a resumed run).
    """

    batches: list[list[int]]
    skipped_nodata: int
    reused: int


def plan_tiles(store: ws.WorkStore, grid: TileGrid, batch_size: int) -> TilePlan:
    """Fixed batches of tile indices to compute, in raster order.

    Tiles whose core holds no valid pixel are skipped. Batches are formed from all tiles that need compute,
    before looking at what is done, so a resumed run forms exactly the same batches (and identical bytes);
    batches already fully done are dropped.
    """
    counts = np.asarray(store.array(ws.VALID_PIXELS)[...])
    if counts.shape != (grid.rows, grid.cols):
        raise ValueError(f"valid_pixels has shape {counts.shape}, expected {(grid.rows, grid.cols)}")
    needed = [int(i) for i in np.flatnonzero(counts.ravel() > 0)]
    skipped = len(grid) - len(needed)
    done = np.asarray(store.array(ws.DONE)[...]).ravel()
    batches = [needed[k : k + batch_size] for k in range(0, len(needed), batch_size)]
    todo = [b for b in batches if not all(done[i] for i in b)]
    reused = sum(len(b) for b in batches) - sum(len(b) for b in todo)
    return TilePlan(todo, skipped, reused)


def work_units(batches: Sequence[list[int]], workers: int, max_batches: int = 4) -> list[list[list[int]]]:
    """Cut the batches into calls of a few batches each: enough per call to overlap I/O with compute, small
    enough that every worker gets several calls (load balance) and a crash recomputes little."""
    per_call = max(1, min(max_batches, len(batches) // max(1, workers * 4)))
    return [list(batches[k : k + per_call]) for k in range(0, len(batches), per_call)]
