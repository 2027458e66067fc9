"""Ingest stage: copy a scene, region by region, into the work store's ``image`` and ``valid`` arrays.

Memory is bounded by ``workers x region`` pixels, never by the scene: every task (:func:`copy_region`) reads one
region (a block of chunks aligned to the store's chunk grid, at most ``region_size`` pixels square) through its own
:class:`~segpipe.pipeline.read.SceneSource`, writes it, and returns only the number of valid pixels per chunk. The
tasks run on threads of this process, or on a cluster's workers (a :class:`~segpipe.pipeline.session.Session`).
A complete ingest is recorded in the store's attributes; a re-run with an unchanged source (same fingerprint and
chunk size) skips it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio

from segpipe.core.raster import GDAL_CACHE_BYTES
from segpipe.core.tiles import TileGrid, Window
from segpipe.pipeline import store as ws
from segpipe.pipeline.read import SceneInfo, open_source
from segpipe.pipeline.session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """Summary of an ingest: seconds spent, whether it was reused, and the valid-pixel count."""

    seconds: float
    reused: bool
    valid_pixels: int


def regions(width: int, height: int, region: int) -> list[Window]:
    """The windows ingest reads: the cores of a grid of ``region`` pixel squares (clipped at the scene edge)."""
    return [tile.core for tile in TileGrid(width, height, region, 0)]


def copy_region(
    scene: SceneInfo, store_ref: ws.WorkStore | str, window: Window, chunk_size: int
) -> tuple[Window, np.ndarray]:
    """Copy one region of the scene into the work store: an ingest task, run by a thread of the driver (given the
    store) or by a worker of a cluster (given its URL; it opens the scene and the store itself).

    Returns:
        ``(window, counts)``: the region and the valid pixels of each chunk in it, (rows, cols) int64.
    """
    store = ws.opened(store_ref)
    with (
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES),
        open_source(scene.path, source=scene.source, selection=scene.selection) as src,
    ):
        data, ok = src.read(window)
    if np.issubdtype(data.dtype, np.floating):
        data = np.where(ok[None].astype(bool), data, 0).astype(data.dtype)  # no NaN/Inf in the store
    store.array(ws.IMAGE)[:, window.row_slice, window.col_slice] = data
    store.array(ws.VALID)[window.row_slice, window.col_slice] = ok
    rows, cols = math.ceil(window.height / chunk_size), math.ceil(window.width / chunk_size)
    counts = np.zeros((rows, cols), dtype=np.int64)
    for r in range(rows):
        for c in range(cols):
            counts[r, c] = int(ok[r * chunk_size : (r + 1) * chunk_size, c * chunk_size : (c + 1) * chunk_size].sum())
    return window, counts


def ingest(
    scene: SceneInfo,
    store: ws.WorkStore,
    *,
    chunk_size: int,
    workers: int = 2,
    region_size: int | None = None,
    progress: Callable[[int], Any] | None = None,
    session: Session | None = None,
) -> IngestResult:
    """Copy the scene into ``store`` (``image``, ``valid``, ``valid_pixels``) or reuse a complete earlier one.

    Args:
        scene: The validated scene (see :func:`segpipe.pipeline.read.describe_scene`).
        store: The work store.
        chunk_size: Chunk side in pixels; the tile size, so a tile core is exactly one chunk.
        workers: Reader threads when the regions are copied in this process.
        region_size: Side in pixels of the region one task reads (a multiple of ``chunk_size``); default: the
            largest multiple of ``chunk_size`` not above 2048.
        progress: Called with the number of pixels written after each region.
        session: Where the region tasks run (on a cluster: its workers); None: threads of this process.
    """
    start = time.perf_counter()
    expected: dict[str, Any] = {"fingerprint": scene.fingerprint, "chunk_size": chunk_size, "complete": True}
    if store.attrs.get("ingest") == expected and ws.IMAGE in store:
        total = int(np.asarray(store.array(ws.VALID_PIXELS)[...]).sum())
        if progress:
            progress(scene.pixels)
        return IngestResult(seconds=time.perf_counter() - start, reused=True, valid_pixels=total)

    store.set_attrs(scene=scene.to_attrs(), ingest={**expected, "complete": False})
    region = region_size or max(chunk_size, (2048 // chunk_size) * chunk_size)
    if region % chunk_size:
        raise ValueError(f"region_size {region} must be a multiple of chunk_size {chunk_size}")
    store.create_scene_arrays(
        shape=(scene.count, scene.height, scene.width), dtype=scene.dtype, chunk=chunk_size, region=region
    )
    grid = TileGrid(scene.width, scene.height, chunk_size, 0)
    counts = np.zeros((grid.rows, grid.cols), dtype=np.int64)
    runner = session or Session(ray=False)
    ref: ws.WorkStore | str = store.url if runner.on_cluster else store
    items = [(scene, ref, window, chunk_size) for window in regions(scene.width, scene.height, region)]

    def done(result: tuple[Window, np.ndarray]) -> None:
        if progress:
            progress(result[0].area)

    for window, block in runner.map(copy_region, items, workers=workers, progress=done):
        r0, c0 = window.row_off // chunk_size, window.col_off // chunk_size
        counts[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block
    store.array(ws.VALID_PIXELS)[...] = counts
    store.set_attrs(ingest=expected)
    seconds = time.perf_counter() - start
    log.info("ingested %s (%dx%dx%d) in %.1f s", scene.path, scene.width, scene.height, scene.count, seconds)
    return IngestResult(seconds=seconds, reused=False, valid_pixels=int(counts.sum()))
