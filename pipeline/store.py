"""The work store: one zarr v3 group per scene run, at a URL; its schema, its lifecycle and its lock.

Layout (all arrays chunked on the tile grid, pixel axes last)::

    image                (bands, height, width)   scene dtype   the scene's pixels, written once by ingest
    valid                (height, width)          uint8         1 where the scene has data, 0 where nodata
    valid_pixels         (rows, cols)             int64         valid pixels per tile core (to skip tiles)
    done                 (rows, cols)             uint8         1 when a tile's results are written (resume)
    checksums            (rows, cols)             uint32        CRC-32 of what was written for each done tile
    mask                 (height, width)          uint8         class ids, 255 = nodata; the final product
    probabilities        (classes, height, width) uint8         optional: probability x 254, 255 = nodata
    tile_probabilities   (rows, cols, classes, S, S) float16    blends only: softmax over each tile's input

Attributes: ``scene`` (the :class:`~segpipe.pipeline.scene.SceneInfo`), ``ingest`` (chunk size and completion),
``run`` (the inference key: model checksum, tile size, halo, blend, and completion). Writers: ingest tasks write
disjoint image/valid regions, each segmenter writes only the chunks of its own tiles, stitch tasks write disjoint
mask regions; attributes and the small index arrays are written by the driver alone.

Lifecycle: :func:`work_area` gives the folder work stores live in (the user's ``--work-dir``, kept so a re-run
resumes, or the run's temporary local folder, removed afterwards, and by the next run if the process was killed);
:func:`store_url` names a scene's store in it. A work store is a local folder or a prefix on object storage
(``s3://bucket/work/scene-1a2b3c4d.zarr``, through obstore; see :mod:`segpipe.core.objects`); it is always named by
a URL string, so every stage and every worker, on any machine, opens it itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import ObjectStore

from segpipe.core.errors import OutputError
from segpipe.core.location import Location
from segpipe.core.locks import path_key
from segpipe.core.objects import store_for
from segpipe.core.tiles import TileGrid

log = logging.getLogger(__name__)

IMAGE = "image"
VALID = "valid"
VALID_PIXELS = "valid_pixels"
DONE = "done"
CHECKSUMS = "checksums"
MASK = "mask"
PROBABILITIES = "probabilities"
TILE_PROBABILITIES = "tile_probabilities"

MASK_NODATA = 255
PROBABILITY_NODATA = 255
PROBABILITY_SCALE = 254  # probability p is stored as round(p * 254); 255 is nodata

#: Scenes with more chunks than this group them into shards of one ingest region each.
SHARD_ABOVE_CHUNKS = 64


def compressor(*, typesize: int | None = None) -> BloscCodec:
    """Blosc/zstd at a low level: fast to decompress, which is what tile reads need."""
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle" if typesize == 1 else "shuffle")


class WorkStore:
    """One scene's work store: a zarr v3 group opened from a URL.

    Args:
        url: A local path (today), or a URL for the zarr storage backend.
        storage_options: Options for the storage backend (credentials, endpoint); None for local paths.
        mode: ``a`` (read/write, create if missing), ``r+`` (read/write, must exist) or ``r``.

    Raises:
        OutputError: the store cannot be opened or created.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None, mode: str = "a") -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        local = Location(self.url).is_local
        try:
            if not local:
                store = ObjectStore(store_for(self.url, prefix=True), read_only=mode == "r")
                self.group = zarr.open_group(store, mode=mode)  # type: ignore[arg-type]
            else:
                self.group = zarr.open_group(
                    self.url,
                    mode=mode,  # type: ignore[arg-type]
                    storage_options=self.storage_options or None,
                )
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot open work store {self.url}: {exc}; check the --work-dir") from None
        except Exception as exc:  # obstore's errors: credentials, endpoint, missing bucket (after its retries)
            if local:
                raise
            raise OutputError(
                f"cannot open work store {self.url}: {str(exc).splitlines()[0][:300]}; check the --work-dir URL, "
                "the credentials and the endpoint"
            ) from None

    @classmethod
    def from_group(cls, group: zarr.Group) -> WorkStore:
        """A work store around a group opened elsewhere (an in-memory store in tests); it cannot be reopened by
        other processes, so only the ``local`` executor and direct stage calls can use it."""
        store = cls.__new__(cls)
        store.url, store.storage_options, store.group = str(group.store_path), {}, group
        return store

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def array(self, name: str) -> zarr.Array:
        """The array ``name``.

        Raises:
            KeyError: the store has no member ``name``.
            OutputError: ``name`` is a group, not an array (the work store is not one segpipe wrote).
        """
        node = self.group[name]
        if not isinstance(node, zarr.Array):
            raise OutputError(
                f"work store {self.url} holds a group at {name!r} where an array was expected; "
                "delete the work store and run again"
            )
        return node

    @property
    def attrs(self) -> dict[str, Any]:
        """A copy of the store's attributes (JSON values)."""
        return dict(self.group.attrs)

    def set_attrs(self, **values: Any) -> None:
        """Update attributes (driver only)."""
        self.group.attrs.update(values)

    # --- schema ------------------------------------------------------------------------------------------

    def create_scene_arrays(self, *, shape: tuple[int, int, int], dtype: str, chunk: int, region: int) -> None:
        """Create ``image`` (bands, height, width), ``valid`` and ``valid_pixels``, replacing earlier ones.

        Large scenes are sharded: one shard per ingest region (a block of whole chunks, written whole by one
        task), so a 1-gigapixel scene is a few hundred files or objects instead of thousands; readers still
        fetch single chunks.
        """
        bands, height, width = shape
        grid = TileGrid(width, height, chunk, 0)
        sharded = len(grid) > SHARD_ABOVE_CHUNKS and region > chunk
        typesize = np.dtype(dtype).itemsize
        self.group.create_array(
            IMAGE,
            shape=(bands, height, width),
            chunks=(bands, chunk, chunk),
            shards=(bands, region, region) if sharded else None,
            dtype=dtype,
            compressors=compressor(typesize=typesize),
            fill_value=0,
            dimension_names=("band", "y", "x"),
            overwrite=True,
        )
        self.group.create_array(
            VALID,
            shape=(height, width),
            chunks=(chunk, chunk),
            shards=(region, region) if sharded else None,
            dtype="uint8",
            compressors=compressor(typesize=1),
            fill_value=0,
            dimension_names=("y", "x"),
            overwrite=True,
        )
        self.group.create_array(
            VALID_PIXELS,
            shape=(grid.rows, grid.cols),
            chunks=(grid.rows, grid.cols),
            dtype="int64",
            fill_value=0,
            overwrite=True,
        )

    def create_index_array(self, grid: TileGrid) -> None:
        """Create ``valid_pixels`` alone for a scene read in place, removing an earlier copy's ``image`` and
        ``valid`` (they would describe another version of the scene, or none that is used)."""
        for name in (IMAGE, VALID):
            if name in self.group:
                del self.group[name]
        self.group.create_array(
            VALID_PIXELS,
            shape=(grid.rows, grid.cols),
            chunks=(grid.rows, grid.cols),
            dtype="int64",
            fill_value=0,
            overwrite=True,
        )

    def prepare_run(
        self, key: str, grid: TileGrid, classes: int, *, probabilities: bool, tile_probabilities: bool
    ) -> bool:
        """Create the inference arrays unless the store already holds them for the same run key and the same
        version of the scene (the fingerprint its ingest recorded).

        Args:
            key: The run key (:meth:`segpipe.pipeline.recipe.Recipe.digest`); results stored under another key are
                discarded.
            grid: The tile grid (chunks of ``mask`` are its cores).
            classes: Number of output classes.
            probabilities: Create ``probabilities``.
            tile_probabilities: Create ``tile_probabilities`` (a blending merger).

        Returns:
            True when earlier results are reused, False when the arrays were (re)created.
        """
        scene = self.attrs["scene"]["fingerprint"]
        run = self.attrs.get("run", {})
        if run.get("key") == key and run.get("scene") == scene and DONE in self.group and CHECKSUMS in self.group:
            return True
        self._create_result_arrays(grid, classes, probabilities=probabilities, tile_probabilities=tile_probabilities)
        self.set_attrs(run={"key": key, "scene": scene, "complete": False})
        return False

    def _create_result_arrays(
        self, grid: TileGrid, classes: int, *, probabilities: bool, tile_probabilities: bool
    ) -> None:
        """(Re)create ``done``, ``checksums`` and ``mask``, and ``probabilities`` and ``tile_probabilities`` when
        asked (removing earlier ones that are not)."""
        t = grid.tile_size
        for name, dtype in ((DONE, "uint8"), (CHECKSUMS, "uint32")):
            self.group.create_array(
                name, shape=(grid.rows, grid.cols), chunks=(1, 1), dtype=dtype, fill_value=0, overwrite=True
            )
        self._create_pixels(MASK, (grid.height, grid.width), (t, t), MASK_NODATA, ("y", "x"))
        for name in (PROBABILITIES, TILE_PROBABILITIES):
            if name in self.group:
                del self.group[name]
        if probabilities:
            shape, chunks = (classes, grid.height, grid.width), (classes, t, t)
            self._create_pixels(PROBABILITIES, shape, chunks, PROBABILITY_NODATA, ("class", "y", "x"))
        if tile_probabilities:
            s = grid.input_size
            self.group.create_array(
                TILE_PROBABILITIES,
                shape=(grid.rows, grid.cols, classes, s, s),
                chunks=(1, 1, classes, s, s),
                dtype="float16",
                fill_value=0,
                compressors=compressor(typesize=2),
                overwrite=True,
            )

    def _create_pixels(
        self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], nodata: int, dims: tuple[str, ...]
    ) -> None:
        self.group.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype="uint8",
            fill_value=nodata,
            compressors=compressor(typesize=1),
            dimension_names=dims,
            overwrite=True,
        )

    def finish_run(self, key: str) -> None:
        """Record that every tile of the run ``key`` is written."""
        self.set_attrs(run={**self.attrs.get("run", {}), "key": key, "complete": True})


def opened(ref: WorkStore | str) -> WorkStore:
    """The work store ``ref`` names: opened from its URL (read/write, must exist), or as it is."""
    return WorkStore(ref, mode="r+") if isinstance(ref, str) else ref


# --- lifecycle ---------------------------------------------------------------------------------------------


def store_url(work_dir: str | Path, scene_path: str) -> str:
    """The work store of a scene in a work directory: ``<work_dir>/<scene name>-<8 hex of its path>.zarr``.

    The name is always one plain entry of ``work_dir``: the scene's stem is cut to 64 characters of
    ``[A-Za-z0-9._-]`` (others become ``_``), so no input name (``..``, URLs, odd bytes) can lead elsewhere.
    """
    name = Path(scene_path.rstrip("/")).name or "scene"
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).stem)[:64].lstrip(".") or "scene"
    digest = hashlib.sha256(path_key(scene_path)).hexdigest()[:8]
    return str(Location(work_dir).child(f"{stem}-{digest}.zarr"))


def work_area(work_dir: str | None, temporary: Path) -> str:
    """The folder (or object-storage prefix) work stores live in: ``work_dir`` (a local folder is created if
    missing; kept, so a re-run resumes), or the run's ``temporary`` local folder (see
    :func:`segpipe.core.files.temporary_folder`)."""
    if not work_dir:
        return str(temporary.resolve())
    folder = Location(work_dir)
    folder.make_folder()
    return str(folder if not folder.is_local else folder.path.resolve())


def lock(url: str) -> contextlib.AbstractContextManager[None]:
    """The single-writer lock of the work store at ``url`` (:meth:`segpipe.core.location.Location.lock`)."""
    return Location(url).lock("work store")
