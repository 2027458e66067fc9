"""Export stage: sinks, the seam through which a run's results leave the work store.

A :class:`Sink` is one output of a run (the mask COG, the probabilities COG): it checks its path before any work
starts and writes itself from the work store after inference. Sinks are registered in :data:`SINKS` by kind and
file suffix; a new output format is one class and one entry there, and the run does not change.

The COG sinks: window by window, the array is copied into a tiled GeoTIFF in a local scratch folder (memory
bounded by one block); GDAL's COG driver then writes the final file with overviews (mode resampling for class
ids, average for probabilities), BigTIFF when needed, under a hidden temporary name next to the output, and the
file is renamed into place only when it is complete and valid. A failed or killed export never leaves a file at
the output path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError  # GDAL errors that rasterio raises without wrapping them
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from segpipe.core import objects
from segpipe.core.colours import rgba
from segpipe.core.errors import ConfigError, OutputError
from segpipe.core.files import atomic_output
from segpipe.core.objects import ObjectUrl, is_object_url
from segpipe.core.raster import GDAL_CACHE_BYTES
from segpipe.core.tiles import TileGrid
from segpipe.pipeline import store as ws
from segpipe.pipeline.read import SceneInfo

log = logging.getLogger(__name__)

BLOCK = 2048  # pixels per side of one export window (a multiple of the COG block size)


@dataclass(frozen=True)
class ExportResult:
    path: str
    seconds: float
    histogram: dict[int, int]
    bytes: int


def _profile(scene: SceneInfo, count: int, nodata: int) -> dict[str, Any]:
    return {
        "driver": "GTiff",
        "width": scene.width,
        "height": scene.height,
        "count": count,
        "dtype": "uint8",
        "crs": CRS.from_wkt(scene.crs_wkt) if scene.crs_wkt else None,
        "transform": Affine(*scene.transform),
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "ZSTD",
        "zstd_level": 1,
        "bigtiff": "IF_SAFER",
    }


def export_cog(
    store: ws.WorkStore,
    name: str,
    output: str | Path,
    *,
    scratch_dir: str | Path,
    class_names: Sequence[str],
    colours: Sequence[str] | None = None,
    workers: int = 2,
    progress: Callable[[int], Any] | None = None,
    creation: Mapping[str, str] | None = None,
) -> ExportResult:
    """Write array ``name`` of the work store (``mask`` or ``probabilities``) as a COG at ``output``.

    Args:
        store: The work store.
        name: ``mask`` (one band of class ids, nodata 255, colour table) or ``probabilities`` (one band per
            class, probability x 254, nodata 255).
        output: Final path of the COG.
        scratch_dir: A local folder for the intermediate tiled GeoTIFF.
        class_names: Class names in class-id order (tags and band descriptions).
        colours: ``#RRGGBB`` per class, for the mask's colour table.
        workers: GDAL threads for compression and overviews.
        progress: Called with pixels copied.
        creation: COG creation options (``--co``: COMPRESS, LEVEL, PREDICTOR, BLOCKSIZE, BIGTIFF) over the
            defaults (DEFLATE, no predictor for a mask, 512 px blocks).
    """
    start = time.perf_counter()
    scene = SceneInfo.from_attrs(store.attrs["scene"])
    array = store.array(name)
    is_mask = name == ws.MASK
    count = 1 if is_mask else int(array.shape[0])
    scratch = Path(scratch_dir) / f".{Path(output).name}.export.tif"
    scratch.unlink(missing_ok=True)
    histogram = np.zeros(256, dtype=np.int64)
    try:
        with warnings.catch_warnings(), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(scratch, "w", **_profile(scene, count, ws.MASK_NODATA)) as dst:
                for window in (t.core for t in TileGrid(scene.width, scene.height, BLOCK, 0)):
                    if is_mask:
                        block = np.asarray(array[window.row_slice, window.col_slice])
                        histogram += np.bincount(block.ravel(), minlength=256)
                        block = block[None]
                    else:
                        block = np.asarray(array[:, window.row_slice, window.col_slice])
                    dst.write(
                        block,
                        window=rasterio.windows.Window(
                            window.col_off, window.row_off, window.width, window.height
                        ),
                    )
                    if progress:
                        progress(window.area)
                names = list(class_names)
                dst.update_tags(CLASS_NAMES=",".join(names), SOFTWARE="segpipe")
                if is_mask:
                    dst.set_band_description(1, "class")
                    if colours:
                        table = {i: rgba(c) for i, c in enumerate(colours)}
                        table[ws.MASK_NODATA] = (0, 0, 0, 0)
                        dst.write_colormap(1, table)
                    dst.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(names)})
                else:
                    for i, n in enumerate(names, start=1):
                        dst.set_band_description(i, n)
                    dst.scales = [1.0 / ws.PROBABILITY_SCALE] * count
                    dst.offsets = [0.0] * count
            with atomic_output(output) as tmp:
                options = {
                    "COMPRESS": "DEFLATE",
                    "PREDICTOR": "NO" if is_mask else "YES",
                    "BLOCKSIZE": "512",
                    "BIGTIFF": "IF_SAFER",
                    **(creation or {}),
                    "OVERVIEW_RESAMPLING": "MODE" if is_mask else "AVERAGE",
                    "NUM_THREADS": str(max(1, workers)),
                }
                rasterio.shutil.copy(scratch, tmp, driver="COG", **options)
                _check_cog(tmp)
    except (OSError, CPLE_BaseError) as exc:  # GDAL's write errors come as either (disk full: both)
        raise OutputError(f"could not write {output}: {_reason(exc)}; check free space and permissions") from None
    finally:
        scratch.unlink(missing_ok=True)
    size = os.path.getsize(output)
    hist = {int(k): int(v) for k, v in enumerate(histogram) if v}
    return ExportResult(path=str(output), seconds=time.perf_counter() - start, histogram=hist, bytes=size)


def _reason(exc: BaseException) -> str:
    """The first line of GDAL's own message: rasterio's "Write failed. See previous exception" chains it."""
    cause = exc.__cause__ if isinstance(exc, rasterio.errors.RasterioError) and exc.__cause__ else exc
    return str(cause).splitlines()[0] if str(cause) else type(cause).__name__


def _check_cog(path: Path) -> None:
    """Raise if GDAL did not produce a valid COG (rio-cogeo's validator)."""
    from rio_cogeo.cogeo import cog_validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        is_valid, errors, _ = cog_validate(str(path), quiet=True)
    if not is_valid:
        raise RuntimeError(f"GDAL wrote an invalid COG at {path}: {errors}")


# --- sinks -------------------------------------------------------------------------------------------------


@runtime_checkable
class Sink(Protocol):
    """One output of a run, written from the work store after inference."""

    #: What it holds: ``mask`` or ``probabilities``.
    kind: ClassVar[str]

    @property
    def path(self) -> str:
        """Where it goes."""
        ...

    def check(self, *, overwrite: bool) -> None:
        """Raise a SegpipeError now, before any work, if the output cannot be written."""
        ...

    def write(
        self,
        store: ws.WorkStore,
        *,
        class_names: Sequence[str],
        colours: Sequence[str],
        scratch_dir: Path,
        workers: int,
        progress: Callable[[int], Any] | None = None,
    ) -> ExportResult:
        """Write the output from ``store``, atomically."""
        ...


def check_object_output(url: str, what: str, *, overwrite: bool) -> None:
    """Raise OutputError unless an object can be written at ``url`` (tried for real: a probe object is written next
    to it and deleted) and, without ``overwrite``, none exists there yet."""
    parsed = ObjectUrl.parse(url)
    if not parsed.key or parsed.key.endswith("/"):
        raise OutputError(f"{what} {url!r} names no object; give a key such as {parsed.child('mask.tif')}")
    if objects.head(url) is not None and not overwrite:
        raise OutputError(f"{what} {url!r} already exists; pass --overwrite to replace it")
    probe = str(parsed.parent.child(f".segpipe-write-test-{uuid.uuid4().hex[:12]}"))
    try:
        objects.write_bytes(probe, b"")
    except OutputError as exc:
        raise OutputError(f"cannot write {what} {url!r}: {exc}") from None
    objects.delete(probe)


def remove_output(path: str) -> None:
    """Remove an output a failed run wrote (a local file or an object); nothing happens when it is not there."""
    if is_object_url(path):
        objects.delete(path)
    else:
        Path(path).unlink(missing_ok=True)


def check_local_output(path: str, what: str, *, overwrite: bool) -> None:
    """Raise OutputError unless ``path`` can be written as a new (or, with ``overwrite``, a replaced) file."""
    out = Path(path)
    if out.is_dir():
        raise OutputError(f"{what} {path!r} is a directory; give a file name such as {out / 'mask.tif'}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"the directory of {what} {path!r}, {parent}, is a file; give a path in a directory")
    if not parent.is_dir():
        raise OutputError(f"the directory of {what} {path!r} does not exist; create {parent} first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path!r}: directory {parent} is not writable")
    try:  # os.access says yes to root everywhere, and to read-only mounts, /proc and /sys: try for real
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".segpipe-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write {what} {path!r}: directory {parent} is not writable ({exc.strerror or exc})"
        ) from None
    if out.exists() and not overwrite:
        raise OutputError(f"{what} {path!r} already exists; pass --overwrite to replace it")


def check_output(path: str, what: str, *, overwrite: bool) -> None:
    """Refuse ``path`` (named ``what`` in messages) before any work when it exists and ``overwrite`` is off, or
    when it cannot be written: a local path or an object-storage URL."""
    if is_object_url(path):
        check_object_output(path, what, overwrite=overwrite)
    else:
        check_local_output(path, what, overwrite=overwrite)


def build_and_deliver(path: str, scratch: Path, build: Callable[[Path], ExportResult]) -> ExportResult:
    """``build(target)`` writes a complete output file at ``target``: ``path`` itself when it is local (the
    builder writes atomically), else ``scratch`` in the local scratch folder, uploaded as one object only when
    complete and removed afterwards, so a failed build or upload leaves nothing at ``path``."""
    if not is_object_url(path):
        return build(Path(path))
    try:
        result = build(scratch)
        objects.upload_file(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
    return dataclasses.replace(result, path=path)


@dataclass(frozen=True)
class CogSink:
    """The work store's ``mask`` (or ``probabilities``) as a Cloud Optimized GeoTIFF; see :func:`export_cog`.

    ``path`` is a local path or an object-storage URL; for a URL the COG is built and validated in the local scratch
    folder and uploaded as one object only when complete (see :func:`segpipe.core.objects.upload_file`).
    """

    path: str
    #: The option that names it, for messages.
    what: str = "output"
    #: COG creation options (``--co``, checked by :func:`segpipe.core.cog.parse_cog_options`) over the defaults.
    creation: tuple[tuple[str, str], ...] = ()
    kind: ClassVar[str] = ws.MASK

    def check(self, *, overwrite: bool) -> None:
        check_output(self.path, self.what, overwrite=overwrite)

    def write(
        self,
        store: ws.WorkStore,
        *,
        class_names: Sequence[str],
        colours: Sequence[str],
        scratch_dir: Path,
        workers: int,
        progress: Callable[[int], Any] | None = None,
    ) -> ExportResult:
        return build_and_deliver(
            self.path,
            Path(scratch_dir) / f"{self.kind}{self.scratch_suffix}",
            lambda target: self.build(
                store,
                target,
                scratch_dir=scratch_dir,
                class_names=class_names,
                colours=colours,
                workers=workers,
                progress=progress,
            ),
        )

    #: The suffix of the file built in the scratch folder for an object-storage URL.
    scratch_suffix: ClassVar[str] = ".tif"

    def build(
        self,
        store: ws.WorkStore,
        target: Path,
        *,
        scratch_dir: Path,
        class_names: Sequence[str],
        colours: Sequence[str],
        workers: int,
        progress: Callable[[int], Any] | None,
    ) -> ExportResult:
        """Write the complete file at ``target`` (a local path); subclasses write other formats."""
        return export_cog(
            store,
            self.kind,
            target,
            scratch_dir=scratch_dir,
            class_names=class_names,
            colours=colours,
            workers=workers,
            progress=progress,
            creation=dict(self.creation),
        )


@dataclass(frozen=True)
class ProbabilitiesCogSink(CogSink):
    """Per-class probabilities (probability x 254, nodata 255) as a Cloud Optimized GeoTIFF, one band per class."""

    what: str = "--probabilities"
    kind: ClassVar[str] = ws.PROBABILITIES


def _ome_tiff_sink(path: str, **options: Any) -> Sink:
    """A whole-slide mask as a pyramidal OME-TIFF (:mod:`segpipe.pipeline.ometiff`, imported when asked for)."""
    from segpipe.pipeline.ometiff import OmeTiffSink

    return OmeTiffSink(path, **options)


#: Registered sinks: kind -> file suffix -> sink class (constructed with the path and the sink's own options).
#: A module of another output kind registers its own (``polygons`` registers ``vector``).
SINKS: dict[str, dict[str, Callable[..., Sink]]] = {
    ws.MASK: {".tif": CogSink, ".tiff": CogSink, ".ome.tif": _ome_tiff_sink, ".ome.tiff": _ome_tiff_sink},
    ws.PROBABILITIES: {".tif": ProbabilitiesCogSink, ".tiff": ProbabilitiesCogSink},
}


def sink_for(kind: str, path: str, **options: Any) -> Sink:
    """The sink that writes ``kind`` to ``path``, chosen by the path's suffix; ``options`` go to its constructor.

    Raises:
        ConfigError: no sink writes that suffix.
    """
    by_suffix = SINKS[kind]
    name = Path(path).name.lower()  # the longest registered suffix that matches: .ome.tif before .tif
    suffix = max((s for s in by_suffix if name.endswith(s)), key=len, default=Path(path).suffix.lower())
    if suffix not in by_suffix:
        what = "output" if kind == ws.MASK else f"--{kind}"
        first = next(iter(by_suffix.values()))
        written = getattr(first, "written_as", "it is written as a Cloud Optimized GeoTIFF")
        raise ConfigError(f"{what} {path!r} must end in {' or '.join(by_suffix)} ({written})")
    return by_suffix[suffix](path, **options)
