"""The COG sinks: the work store's ``mask`` and ``probabilities`` as Cloud Optimized GeoTIFFs.

Window by window, the array is copied into a tiled GeoTIFF in a local scratch folder (memory
bounded by one block); GDAL's COG driver then writes the final file with overviews (mode resampling for class
ids, average for probabilities), BigTIFF when needed, under a hidden temporary name next to the output, and the
file is renamed into place only when it is complete and valid. A failed or killed export never leaves a file at
the output path.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError  # GDAL errors that rasterio raises without wrapping them
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from segpipe.core.colours import rgba
from segpipe.core.errors import OutputError
from segpipe.core.files import atomic_output
from segpipe.core.raster import GDAL_CACHE_BYTES
from segpipe.core.tiles import TileGrid
from segpipe.pipeline import store as ws
from segpipe.pipeline.scene import SceneInfo
from segpipe.pipeline.sinks.base import ExportResult, build_and_deliver, check_output

log = logging.getLogger(__name__)

BLOCK = 2048  # pixels per side of one export window (a multiple of the COG block size)


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
    is_mask = name == ws.MASK
    scratch = Path(scratch_dir) / f".{Path(output).name}.export.tif"
    scratch.unlink(missing_ok=True)
    try:
        with warnings.catch_warnings(), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(scratch, "w", **_profile(scene, _bands(store, name), ws.MASK_NODATA)) as dst:
                histogram = _copy_windows(store.array(name), dst, scene, is_mask=is_mask, progress=progress)
                _describe(dst, class_names, colours, is_mask=is_mask)
            with atomic_output(output) as tmp:
                rasterio.shutil.copy(scratch, tmp, driver="COG", **_cog_options(creation, workers, is_mask=is_mask))
                _check_cog(tmp)
    except (OSError, CPLE_BaseError) as exc:  # GDAL's write errors come as either (disk full: both)
        raise OutputError(f"could not write {output}: {_reason(exc)}; check free space and permissions") from None
    finally:
        scratch.unlink(missing_ok=True)
    size = os.path.getsize(output)
    hist = {int(k): int(v) for k, v in enumerate(histogram) if v}
    return ExportResult(path=str(output), seconds=time.perf_counter() - start, histogram=hist, bytes=size)


def _bands(store: ws.WorkStore, name: str) -> int:
    return 1 if name == ws.MASK else int(store.array(name).shape[0])


def _copy_windows(
    array: Any, dst: Any, scene: SceneInfo, *, is_mask: bool, progress: Callable[[int], Any] | None
) -> np.ndarray:
    """Copy the array into the open GeoTIFF ``dst`` window by window (:data:`BLOCK` pixels a side); returns the
    histogram of class ids (256 bins; zeros for probabilities)."""
    histogram = np.zeros(256, dtype=np.int64)
    for window in (t.core for t in TileGrid(scene.width, scene.height, BLOCK, 0)):
        if is_mask:
            block = np.asarray(array[window.row_slice, window.col_slice])
            histogram += np.bincount(block.ravel(), minlength=256)
            block = block[None]
        else:
            block = np.asarray(array[:, window.row_slice, window.col_slice])
        dst.write(block, window=rasterio.windows.Window(window.col_off, window.row_off, window.width, window.height))
        if progress:
            progress(window.area)
    return histogram


def _describe(dst: Any, class_names: Sequence[str], colours: Sequence[str] | None, *, is_mask: bool) -> None:
    """Tags, band descriptions, and the mask's colour table (nodata transparent) or the probabilities' scale."""
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
        dst.scales = [1.0 / ws.PROBABILITY_SCALE] * dst.count
        dst.offsets = [0.0] * dst.count


def _cog_options(creation: Mapping[str, str] | None, workers: int, *, is_mask: bool) -> dict[str, str]:
    """GDAL's COG creation options: the defaults, ``creation`` (``--co``) over them, then what segpipe sets."""
    return {
        "COMPRESS": "DEFLATE",
        "PREDICTOR": "NO" if is_mask else "YES",
        "BLOCKSIZE": "512",
        "BIGTIFF": "IF_SAFER",
        **(creation or {}),
        "OVERVIEW_RESAMPLING": "MODE" if is_mask else "AVERAGE",
        "NUM_THREADS": str(max(1, workers)),
    }


def _reason(exc: BaseException) -> str:
    """The first line of GDAL's own message: rasterio's "Write failed. See previous exception" chains it."""
    cause = exc.__cause__ if isinstance(exc, rasterio.errors.RasterioError) and exc.__cause__ else exc
    return str(cause).splitlines()[0] if str(cause) else type(cause).__name__


def _check_cog(path: Path) -> None:
    """Raise if GDAL did not produce a valid COG (rio-cogeo's validator)."""
    from rio_cogeo.cogeo import cog_validate  # lazy: rio-cogeo takes 2.5 s to import; only an export needs it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        is_valid, errors, _ = cog_validate(str(path), quiet=True)
    if not is_valid:
        raise RuntimeError(f"GDAL wrote an invalid COG at {path}: {errors}")


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


