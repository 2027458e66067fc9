"""The work store: one zarr v3 group per scene run, and the names of what lives in it.

Layout (all arrays chunked on the tile grid, pixel axes last)::

    image                (bands, height, width)   scene dtype   the scene's pixels, written once by ingest
    valid                (height, width)          uint8         1 where the scene has data, 0 where nodata
    valid_pixels         (rows, cols)             int64         valid pixels per tile core (to skip tiles)
    done                 (rows, cols)             uint8         1 when a tile's results are written (resume)
    mask                 (height, width)          uint8         class ids, 255 = nodata; the final product
    probabilities        (classes, height, width) uint8         optional: probability x 254, 255 = nodata
    tile_probabilities   (rows, cols, classes, S, S) float16    blends only: softmax over each tile's input

Attributes: ``scene`` (the :class:`~pipeline.read.SceneInfo`), ``ingest`` (chunk size and completion), ``run``
(the inference key: model checksum, tile size, halo, blend). Writers: ingest tasks write disjoint image/valid
regions, each Ray actor writes only the chunks of its own tiles, stitch tasks write disjoint mask regions;
attributes and the small index arrays are written by the driver alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import BloscCodec

from segpipe.errors import OutputError

IMAGE = "image"
VALID = "valid"
VALID_PIXELS = "valid_pixels"
DONE = "done"
MASK = "mask"
PROBABILITIES = "probabilities"
TILE_PROBABILITIES = "tile_probabilities"

MASK_NODATA = 255
PROBABILITY_NODATA = 255
PROBABILITY_SCALE = 254  # probability p is stored as round(p * 254); 255 is nodata


def compressor(*, typesize: int | None = None) -> BloscCodec:
    """Blosc/zstd at a low level: fast to decompress, which is what tile reads need."""
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle" if typesize == 1 else "shuffle")


def open_store(path: str | Path, mode: str = "a") -> zarr.Group:
    """Open (or create) the work store group at ``path`` (a local path or an fsspec URL such as s3://...)."""
    try:
        return zarr.open_group(str(path), mode=mode)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot open work store {path}: {exc}; check the --work-dir") from None


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of the work store; a typed ``group[name]`` (which may also return a subgroup).

    Raises:
        KeyError: the store has no member ``name``.
        OutputError: ``name`` is a group, not an array (the work store is not one segpipe wrote).
    """
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise OutputError(
            f"work store {group.store_path} holds a group at {name!r} where an array was expected; "
            "delete the work store and run again"
        )
    return node


def attrs(group: zarr.Group) -> dict[str, Any]:
    """A copy of the work store's attributes as a plain dict (JSON values, so ``Any``)."""
    return dict(group.attrs)


def _path_key(path: str) -> bytes:
    """An absolute path as bytes for hashing; ``surrogatepass`` keeps file names that are not UTF-8 hashable."""
    return os.path.abspath(path).encode("utf-8", "surrogatepass")


def store_path(work_dir: str | Path, scene_path: str) -> Path:
    """The work store of a scene in a work directory: ``<work_dir>/<scene name>-<8 hex of its path>.zarr``.

    The name is always one plain entry of ``work_dir``: the scene's stem is cut to 64 characters of
    ``[A-Za-z0-9._-]`` (others become ``_``), so no input name (``..``, URLs, odd bytes) can lead elsewhere.
    """
    name = Path(scene_path.rstrip("/")).name or "scene"
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).stem)[:64].lstrip(".") or "scene"
    digest = hashlib.sha256(_path_key(scene_path)).hexdigest()[:8]
    return Path(work_dir) / f"{stem}-{digest}.zarr"


def run_key(**fields: Any) -> str:
    """A stable hash of the settings that determine inference results.

    The settings: model checksum, tile, halo, blend...
    """
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()


@contextlib.contextmanager
def exclusive_lock(target: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking advisory lock for ``target`` for the duration of the block.

    The lock file lives in the system temp directory (keyed by the target's absolute path), so nothing is left
    next to outputs; the kernel releases the lock if the process dies, so a killed run never blocks the next
    one.

    Raises:
        OutputError: another segpipe process holds the lock.
    """
    key = hashlib.sha256(_path_key(str(target))).hexdigest()[:24]
    lock_dir = Path(
        os.environ.get("SEGPIPE_LOCK_DIR", Path(os.environ.get("TMPDIR", "/tmp")) / "segpipe-locks")
    )
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_dir / f"{key}.lock", "w")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{what} {target} is in use by another segpipe run; "
                "wait for it to finish or choose another path"
            ) from None
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
