"""Ingest stage: copy a scene, region by region, into the work store's ``image`` and ``valid`` arrays.

Memory is bounded by ``workers x region`` pixels, never by the scene: every task (:func:`copy_region`) reads one
region (a block of chunks aligned to the store's chunk grid, at most ``region_size`` pixels square) through its own
:class:`~segpipe.pipeline.scene.SceneSource`, writes it, and returns only the number of valid pixels per chunk. The
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
from segpipe.pipeline.read import open_source
from segpipe.pipeline.scene import SceneInfo
from segpipe.pipeline.tasks import TaskRunner, Threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """Summary of an ingest: seconds spent, whether it was reused, the valid-pixel count and whether the pixels
    were copied into the work store (False: the segmenters read the scene in place, :func:`index_scene`)."""

    seconds: float
    reused: bool
    valid_pixels: int
    copied: bool = True


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
    return window, chunk_counts(ok, chunk_size)


def chunk_counts(ok: np.ndarray, chunk_size: int) -> np.ndarray:
    """The valid pixels of each ``chunk_size`` square of a region's (h, w) validity, (rows, cols) int64 (the
    squares of the last row and column clipped)."""
    rows, cols = math.ceil(ok.shape[0] / chunk_size), math.ceil(ok.shape[1] / chunk_size)
    counts = np.zeros((rows, cols), dtype=np.int64)
    for r in range(rows):
        for c in range(cols):
            counts[r, c] = int(ok[r * chunk_size : (r + 1) * chunk_size, c * chunk_size : (c + 1) * chunk_size].sum())
    return counts


def count_region(scene: SceneInfo, window: Window, chunk_size: int) -> tuple[Window, np.ndarray]:
    """The valid pixels of each chunk of one region of the scene, read but not copied: an indexing task for a scene
    the segmenters read in place (run like :func:`copy_region`)."""
    with (
        rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES),
        open_source(scene.path, source=scene.source, selection=scene.selection) as src,
    ):
        _, ok = src.read(window)
    return window, chunk_counts(ok, chunk_size)


#: Layouts read window by window, decoding only the blocks a window touches: GDAL's tiled drivers, and staged
#: arrays (:mod:`segpipe.pipeline.sources.array`, whose blocks are the dask chunks).
WINDOWED_DRIVERS = ("GTiff", "COG", "array")

#: Most pixels a tile read may decode per pixel it needs for the scene to be read in place (see
#: :func:`reads_in_place`): 512 px blocks around a 1088 px tile input decode 2.2 times its pixels.
MAX_OVERREAD = 4.0


def reads_in_place(scene: SceneInfo, input_size: int) -> bool:
    """Whether segmenters can read each tile's input (``input_size`` pixels square) from the scene itself cheaply:
    a GeoTIFF or COG (local or at a URL) whose blocks, tiles or strips, make a tile read decode at most
    :data:`MAX_OVERREAD` times the pixels it needs. Pure: decided from the scene's :class:`Layout`; False for a
    layout not known, other formats (JPEG, PNG, JPEG 2000, VRT) and whole-slide images."""
    layout = scene.layout
    if layout is None or layout.driver not in WINDOWED_DRIVERS or scene.pyramid is not None:
        return False
    rows, cols = layout.block
    needed = min(scene.height, input_size) * min(scene.width, input_size)
    decoded = min(scene.height, input_size + rows - 1) * min(scene.width, input_size + cols - 1)  # worst alignment
    return decoded <= MAX_OVERREAD * needed


def _reused(
    store: ws.WorkStore,
    expected: dict[str, Any],
    needs: str,
    scene: SceneInfo,
    start: float,
    progress: Callable[[int], Any] | None,
) -> IngestResult | None:
    """The result of a complete earlier ingest or index of the same scene, or None."""
    if store.attrs.get("ingest") != expected or needs not in store:
        return None
    total = int(np.asarray(store.array(ws.VALID_PIXELS)[...]).sum())
    if progress:
        progress(scene.pixels)
    return IngestResult(seconds=time.perf_counter() - start, reused=True, valid_pixels=total)


def index_scene(
    scene: SceneInfo,
    store: ws.WorkStore,
    *,
    chunk_size: int,
    workers: int = 2,
    progress: Callable[[int], Any] | None = None,
    session: TaskRunner | None = None,
) -> IngestResult:
    """Prepare ``store`` for a scene the segmenters read in place: the scene's description and its valid pixels
    per tile core (``valid_pixels``), no copy of its pixels. A scene whose layout says every pixel is valid
    (:attr:`Layout.all_valid`) is not read at all; others are read once, region by region (as :func:`ingest`,
    in bounded memory), for their validity alone. A complete earlier index of the same scene is reused.

    Args: as :func:`ingest`.
    """
    start = time.perf_counter()
    expected: dict[str, Any] = {
        "fingerprint": scene.fingerprint,
        "chunk_size": chunk_size,
        "complete": True,
        "copy": False,
    }
    found = _reused(store, expected, ws.VALID_PIXELS, scene, start, progress)
    if found is not None:
        return IngestResult(found.seconds, found.reused, found.valid_pixels, copied=False)
    store.set_attrs(scene=scene.to_attrs(), ingest={**expected, "complete": False})
    grid = TileGrid(scene.width, scene.height, chunk_size, 0)
    store.create_index_array(grid)
    if scene.layout is not None and scene.layout.all_valid:
        counts = np.array([t.core.area for t in grid], dtype=np.int64).reshape(grid.rows, grid.cols)
        if progress:
            progress(scene.pixels)
    else:
        counts = _count(scene, store, chunk_size, workers, progress, session, grid)
    store.array(ws.VALID_PIXELS)[...] = counts
    store.set_attrs(ingest=expected)
    return IngestResult(seconds=time.perf_counter() - start, reused=False, valid_pixels=int(counts.sum()), copied=False)


def _count(
    scene: SceneInfo,
    store: ws.WorkStore,
    chunk_size: int,
    workers: int,
    progress: Callable[[int], Any] | None,
    session: TaskRunner | None,
    grid: TileGrid,
) -> np.ndarray:
    region = max(chunk_size, (2048 // chunk_size) * chunk_size)
    items = [(scene, window, chunk_size) for window in regions(scene.width, scene.height, region)]
    counts = np.zeros((grid.rows, grid.cols), dtype=np.int64)

    def done(result: tuple[Window, np.ndarray]) -> None:
        if progress:
            progress(result[0].area)

    for window, block in (session or Threads()).map(count_region, items, workers=workers, progress=done):
        r0, c0 = window.row_off // chunk_size, window.col_off // chunk_size
        counts[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block
    return counts


def ingest(
    scene: SceneInfo,
    store: ws.WorkStore,
    *,
    chunk_size: int,
    workers: int = 2,
    region_size: int | None = None,
    progress: Callable[[int], Any] | None = None,
    session: TaskRunner | None = None,
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
    found = _reused(store, expected, ws.IMAGE, scene, start, progress)
    if found is not None:
        return found

    store.set_attrs(scene=scene.to_attrs(), ingest={**expected, "complete": False})
    region = region_size or max(chunk_size, (2048 // chunk_size) * chunk_size)
    if region % chunk_size:
        raise ValueError(f"region_size {region} must be a multiple of chunk_size {chunk_size}")
    store.create_scene_arrays(
        shape=(scene.count, scene.height, scene.width), dtype=scene.dtype, chunk=chunk_size, region=region
    )
    grid = TileGrid(scene.width, scene.height, chunk_size, 0)
    counts = np.zeros((grid.rows, grid.cols), dtype=np.int64)
    runner = session or Threads()
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
