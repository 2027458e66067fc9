"""Ingest stage: copy a scene, window by window, into the work store's ``image`` and ``valid`` arrays.

Memory is bounded by ``workers x region`` pixels, never by the scene: every task reads one region (a block of
chunks aligned to the store's chunk grid, at most ``region_size`` pixels square) through its own rasterio
handle, writes it, and returns only the number of valid pixels per chunk. A complete ingest is recorded in the
store's attributes; a re-run with an unchanged source (same fingerprint and chunk size) skips it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import zarr
from rasterio._err import CPLE_BaseError  # GDAL errors that rasterio raises without wrapping them
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window as RioWindow

from pipeline import store as ws
from pipeline.read import GDAL_CACHE_BYTES, SceneInfo, gdal_path
from pipeline.tile import TileGrid, Window
from segpipe.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """Summary of an ingest: seconds spent, whether it was reused, and the valid-pixel count."""

    seconds: float
    reused: bool
    valid_pixels: int


def _regions(width: int, height: int, region: int) -> list[Window]:
    grid = TileGrid(width, height, region, 0)
    return [tile.core for tile in grid]


def valid_mask(src: rasterio.DatasetReader, window: RioWindow, data: np.ndarray) -> np.ndarray:
    """1 where a pixel has data: GDAL's dataset mask (nodata, alpha, internal masks) and finite in every band.

    Args:
        src: The open scene.
        window: The window ``data`` was read from.
        data: Pixels of that window, (bands, rows, cols).
    Returns:
        uint8 array (rows, cols).
    """
    mask = src.dataset_mask(window=window) > 0
    if np.issubdtype(data.dtype, np.floating):
        mask &= np.isfinite(data).all(axis=0)
    return mask.astype(np.uint8)


SHARD_ABOVE_CHUNKS = 64  # scenes with more chunks than this group them into shards of one region each


def _create_arrays(group: zarr.Group, scene: SceneInfo, chunk: int, region: int) -> None:
    """Create ``image``, ``valid`` and ``valid_pixels``.

    Large scenes are sharded: one shard per ingest region (a block of whole chunks, written whole by one task), so
    a 1-gigapixel scene is a few hundred files or objects instead of thousands; readers still fetch single chunks.
    """
    typesize = np.dtype(scene.dtype).itemsize
    grid = TileGrid(scene.width, scene.height, chunk, 0)
    sharded = len(grid) > SHARD_ABOVE_CHUNKS and region > chunk
    group.create_array(
        ws.IMAGE,
        shape=(scene.count, scene.height, scene.width),
        chunks=(scene.count, chunk, chunk),
        shards=(scene.count, region, region) if sharded else None,
        dtype=scene.dtype,
        compressors=ws.compressor(typesize=typesize),
        fill_value=0,
        dimension_names=("band", "y", "x"),
        overwrite=True,
    )
    group.create_array(
        ws.VALID,
        shape=(scene.height, scene.width),
        chunks=(chunk, chunk),
        shards=(region, region) if sharded else None,
        dtype="uint8",
        compressors=ws.compressor(typesize=1),
        fill_value=0,
        dimension_names=("y", "x"),
        overwrite=True,
    )
    group.create_array(
        ws.VALID_PIXELS,
        shape=(grid.rows, grid.cols),
        chunks=(grid.rows, grid.cols),
        dtype="int64",
        fill_value=0,
        overwrite=True,
    )


def ingest(
    scene: SceneInfo,
    group: zarr.Group,
    *,
    chunk_size: int,
    workers: int = 2,
    region_size: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> IngestResult:
    """Copy the scene into ``group`` (``image``, ``valid``, ``valid_pixels``) or reuse a complete earlier one.

    Args:
        scene: The validated scene (see :func:`pipeline.read.describe_scene`).
        group: The work store.
        chunk_size: Chunk side in pixels; the tile size, so a tile core is exactly one chunk.
        workers: Reader threads (each has its own rasterio handle).
        region_size: Side in pixels of the region one task reads (a multiple of ``chunk_size``); default: the
            largest multiple of ``chunk_size`` not above 2048.
        progress: Called with the number of pixels written after each region.
    """
    start = time.perf_counter()
    attrs = ws.attrs(group)
    expected: dict[str, Any] = {"fingerprint": scene.fingerprint, "chunk_size": chunk_size, "complete": True}
    if attrs.get("ingest") == expected and ws.IMAGE in group:
        total = int(np.asarray(ws.array(group, ws.VALID_PIXELS)[...]).sum())
        if progress:
            progress(scene.pixels)
        return IngestResult(seconds=time.perf_counter() - start, reused=True, valid_pixels=total)

    group.attrs.update({"scene": scene.to_attrs(), "ingest": {**expected, "complete": False}})
    region = region_size or max(chunk_size, (2048 // chunk_size) * chunk_size)
    if region % chunk_size:
        raise ValueError(f"region_size {region} must be a multiple of chunk_size {chunk_size}")
    _create_arrays(group, scene, chunk_size, region)
    image, valid = ws.array(group, ws.IMAGE), ws.array(group, ws.VALID)
    grid = TileGrid(scene.width, scene.height, chunk_size, 0)
    counts = np.zeros((grid.rows, grid.cols), dtype=np.int64)
    local = threading.local()
    handles: list[rasterio.DatasetReader] = []
    lock = threading.Lock()

    def dataset() -> rasterio.DatasetReader:
        if not hasattr(local, "src"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                local.src = rasterio.open(gdal_path(scene.path))
            with lock:
                handles.append(local.src)
        return local.src

    def copy(window: Window) -> None:
        src = dataset()
        rio_window = RioWindow(window.col_off, window.row_off, window.width, window.height)
        try:
            data = src.read(window=rio_window)
            ok = valid_mask(src, rio_window, data)
        except (rasterio.errors.RasterioError, CPLE_BaseError) as exc:
            # rasterio's "Read failed. See previous exception for details." chains GDAL's own reason
            reason = str(exc.__cause__ or exc).splitlines()[0] if str(exc.__cause__ or exc) else type(exc).__name__
            raise InputError(
                f"input {scene.path!r} could not be read at pixels x {window.col_off}-{window.col_off + window.width}, "
                f"y {window.row_off}-{window.row_off + window.height} ({reason}); the file is truncated or corrupt"
            ) from None
        if np.issubdtype(data.dtype, np.floating):
            data = np.where(ok[None].astype(bool), data, 0).astype(data.dtype)  # no NaN/Inf in the store
        image[:, window.row_slice, window.col_slice] = data
        valid[window.row_slice, window.col_slice] = ok
        r0, c0 = window.row_off // chunk_size, window.col_off // chunk_size
        for r in range(math.ceil(window.height / chunk_size)):
            for c in range(math.ceil(window.width / chunk_size)):
                block = ok[r * chunk_size : (r + 1) * chunk_size, c * chunk_size : (c + 1) * chunk_size]
                counts[r0 + r, c0 + c] = int(block.sum())
        if progress:
            progress(window.area)

    try:
        with (
            rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES),
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ingest") as pool,
        ):
            for _ in pool.map(copy, _regions(scene.width, scene.height, region)):
                pass
    finally:
        for handle in handles:
            handle.close()
    ws.array(group, ws.VALID_PIXELS)[...] = counts
    group.attrs["ingest"] = expected
    seconds = time.perf_counter() - start
    log.info("ingested %s (%dx%dx%d) in %.1f s", scene.path, scene.width, scene.height, scene.count, seconds)
    return IngestResult(seconds=seconds, reused=False, valid_pixels=int(counts.sum()))
