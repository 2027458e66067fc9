"""Where a segmenter reads each tile's input: the scene itself, window by window, or the work store's copy of it.

The ingest stage decides (:func:`segpipe.pipeline.ingest.reads_in_place`) and records it in the store's ``ingest``
attribute (``copy: false`` for a scene read in place); :func:`tile_reader` gives the matching reader. Both return
the same pixels for a tile: the read window (tile + halo, clipped to the scene) with float nodata as 0, as ingest
stores it, mirror-padded at the scene edge (:func:`segpipe.core.tiles.pad_tile_input`).

A :class:`SceneTiles` reader is shared by the segmenter's reader threads: each thread opens the scene once
(a source handle is not safe across threads), checks that the file is still the one the run was planned on (its
fingerprint), and keeps it open until the reader is closed.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np
import rasterio

from segpipe.core.errors import InputError
from segpipe.core.raster import GDAL_CACHE_BYTES
from segpipe.core.tiles import Tile, pad_tile_input, read_tile_input
from segpipe.pipeline import store as ws
from segpipe.pipeline.read import open_source
from segpipe.pipeline.scene import SceneInfo, SceneSource


class TileReader(Protocol):
    """Reads tile inputs: ``(pixels (bands, S, S) in the scene's dtype, valid (S, S) uint8)``; thread-safe."""

    def read(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


class StoreTiles:
    """Tile inputs from the work store's ``image`` and ``valid`` (a scene that was copied by ingest)."""

    def __init__(self, store: ws.WorkStore) -> None:
        self.image = store.array(ws.IMAGE)
        self.valid = store.array(ws.VALID)

    def read(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        return read_tile_input(self.image, self.valid, tile)

    def close(self) -> None:
        pass


class SceneTiles:
    """Tile inputs read from the scene (its selection of bands and nodata), one open source per reader thread.

    Args:
        scene: The scene as the run planned it (path, source, selection and fingerprint).
    """

    def __init__(self, scene: SceneInfo) -> None:
        self.scene = scene
        self._local = threading.local()
        self._opened: list[SceneSource] = []
        self._lock = threading.Lock()

    def _source(self) -> SceneSource:
        src: SceneSource | None = getattr(self._local, "source", None)
        if src is None:
            scene = self.scene
            src = open_source(scene.path, source=scene.source, selection=scene.selection)
            if src.info.fingerprint != scene.fingerprint:
                src.close()
                raise InputError(
                    f"input {scene.path!r} changed after the run started (its size, time or header differ); run "
                    "again to segment the new version"
                )
            self._local.source = src
            with self._lock:
                self._opened.append(src)
        return src

    def read(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):  # per thread: GDAL's block cache stays small
            data, ok = self._source().read(tile.read)
        if np.issubdtype(data.dtype, np.floating):
            data = np.where(ok[None].astype(bool), data, 0).astype(data.dtype)  # as ingest stores it: no NaN/Inf
        return pad_tile_input(data, ok, tile)

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for src in opened:
            src.close()
        self._local = threading.local()


def reads_scene(store: ws.WorkStore) -> bool:
    """Whether the store's scene is read in place (its ``ingest`` attribute says it was not copied)."""
    ingest: dict[str, Any] = store.attrs.get("ingest") or {}
    return ingest.get("copy") is False


def tile_reader(store: ws.WorkStore) -> TileReader:
    """The reader of the store's tile inputs: the scene itself when it is read in place, else the store's copy."""
    if reads_scene(store):
        return SceneTiles(SceneInfo.from_attrs(store.attrs["scene"]))
    return StoreTiles(store)
