"""Export stage: the store's ``mask`` (or ``probabilities``) as a Cloud Optimized GeoTIFF on the scene's grid.

Window by window, the array is copied into a tiled GeoTIFF in the work directory (memory bounded by one
block); GDAL's COG driver then writes the final file with overviews (mode resampling for class ids, average
for probabilities), BigTIFF when needed, under a hidden temporary name next to the output, and the file is
renamed into place only when it is complete and valid. A failed or killed export never leaves a file at the
output path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import zarr
from affine import Affine
from rasterio._err import CPLE_BaseError  # GDAL errors that rasterio raises without wrapping them
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from pipeline import store as ws
from pipeline.read import GDAL_CACHE_BYTES, SceneInfo
from pipeline.tile import TileGrid
from segpipe.errors import OutputError

log = logging.getLogger(__name__)

BLOCK = 2048  # pixels per side of one export window (a multiple of the COG block size)


@dataclass(frozen=True)
class ExportResult:
    path: str
    seconds: float
    histogram: dict[int, int]
    bytes: int


def partial_path(output: str | Path) -> Path:
    """The hidden temporary name an output is written under before it is renamed into place."""
    out = Path(output)
    return out.with_name(f".{out.name}.segpipe-partial")


@contextlib.contextmanager
def atomic_output(output: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``output``; on success rename it to ``output``, on failure remove it."""
    tmp = partial_path(output)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def hex_to_rgba(colour: str) -> tuple[int, int, int, int]:
    """``"#3C1098"`` -> ``(60, 16, 152, 255)``."""
    value = colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16), 255


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
    group: zarr.Group,
    name: str,
    output: str | Path,
    *,
    scratch_dir: str | Path,
    class_names: Sequence[str],
    colours: Sequence[str] | None = None,
    workers: int = 2,
    progress: Callable[[int], Any] | None = None,
) -> ExportResult:
    """Write array ``name`` of the work store (``mask`` or ``probabilities``) as a COG at ``output``.

    Args:
        group: The work store.
        name: ``mask`` (one band of class ids, nodata 255, colour table) or ``probabilities`` (one band per
            class, probability x 254, nodata 255).
        output: Final path of the COG.
        scratch_dir: Where the intermediate tiled GeoTIFF goes (the work directory).
        class_names: Class names in class-id order (tags and band descriptions).
        colours: ``#RRGGBB`` per class, for the mask's colour table.
        workers: GDAL threads for compression and overviews.
        progress: Called with pixels copied.
    """
    start = time.perf_counter()
    scene = SceneInfo.from_attrs(ws.attrs(group)["scene"])
    array = ws.array(group, name)
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
                        table = {i: hex_to_rgba(c) for i, c in enumerate(colours)}
                        table[ws.MASK_NODATA] = (0, 0, 0, 0)
                        dst.write_colormap(1, table)
                    dst.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(names)})
                else:
                    for i, n in enumerate(names, start=1):
                        dst.set_band_description(i, n)
                    dst.scales = [1.0 / ws.PROBABILITY_SCALE] * count
                    dst.offsets = [0.0] * count
            with atomic_output(output) as tmp:
                rasterio.shutil.copy(
                    scratch,
                    tmp,
                    driver="COG",
                    COMPRESS="DEFLATE",
                    PREDICTOR="NO" if is_mask else "YES",
                    BLOCKSIZE="512",
                    BIGTIFF="IF_SAFER",
                    OVERVIEW_RESAMPLING="MODE" if is_mask else "AVERAGE",
                    NUM_THREADS=str(max(1, workers)),
                )
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
