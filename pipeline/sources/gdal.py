"""The GDAL scene source: anything GDAL opens (GeoTIFF, COG, JPEG 2000, VRT, PNG, JPEG; local paths, ``/vsicurl/``,
``https://``, ``s3://`` and ``gs://`` URLs), through rasterio.

Validation on open: one data type for all bands, a supported one, and blocks small enough to read in bounded
memory (:data:`MAX_BLOCK_BYTES`). Validity (:meth:`GdalSource.read`) is GDAL's dataset mask (nodata, alpha,
internal masks) and, for floating-point scenes, finite values in every band. With a selection's nodata, validity
is instead "not that value in every selected band" (and finite): the value replaces the file's nodata.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL errors that rasterio raises without wrapping them
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window as RioWindow

from segpipe.core.errors import InputError
from segpipe.core.raster import identity, open_raster, remote_env
from segpipe.core.tiles import Window
from segpipe.pipeline.scene import Layout, SceneInfo, Selection

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

#: Largest block (strip or tile) a scene may have: a read decodes whole blocks, so this bounds a reader's memory.
#: GDAL serves uncompressed strips, and compressed single strips above ~20 MB, line by line (block height 1),
#: so a huge single-strip TIFF passes; a raster with giant tiles, or a strip GDAL cannot split, is refused.
MAX_BLOCK_BYTES = 256 * 2**20


def _fingerprint(path: str, header: dict[str, Any]) -> str:
    """SHA-256 of the scene's header and of what identifies its bytes (:func:`segpipe.core.raster.identity`)."""
    digest = hashlib.sha256(repr(sorted(header.items())).encode())
    digest.update(identity(path).encode("utf-8", "surrogatepass"))  # surrogates: names that are not UTF-8
    return digest.hexdigest()


def _block_bytes(src: rasterio.DatasetReader) -> int:
    """Bytes GDAL decodes to read one block of band 1 (all bands at once when pixel-interleaved)."""
    rows, cols = src.block_shapes[0]
    bands = 1 if src.interleaving is not None and src.interleaving.name == "band" else src.count
    return int(rows) * int(cols) * bands * np.dtype(src.dtypes[0]).itemsize


def describe(path: str, src: rasterio.DatasetReader) -> SceneInfo:
    """Validate an open dataset and describe it.

    Raises:
        InputError: with a message saying what is wrong with the scene and what to do.
    """
    if src.count < 1:
        raise InputError(f"input {path!r} has no raster bands")
    dtypes = set(src.dtypes)
    if len(dtypes) > 1:
        raise InputError(f"input {path!r} mixes band data types {sorted(dtypes)}; convert to one type first")
    dtype = src.dtypes[0]
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"input {path!r} has data type {dtype}, which segpipe cannot segment; "
            f"supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    block_bytes = _block_bytes(src)
    if block_bytes > MAX_BLOCK_BYTES:
        rows, cols = src.block_shapes[0]
        raise InputError(
            f"input {path!r} is stored in blocks of {cols}x{rows} pixels ({block_bytes / 2**20:.0f} MiB each) "
            f"and GDAL decodes a whole block for any read, more than the {MAX_BLOCK_BYTES // 2**20} MiB segpipe "
            "allows; "
            "re-tile it first: gdal_translate -co TILED=YES -co COMPRESS=DEFLATE INPUT TILED.tif"
        )
    transform = src.transform
    crs = src.crs
    header = {
        "width": src.width,
        "height": src.height,
        "count": src.count,
        "dtype": dtype,
        "crs": crs.to_wkt() if crs else None,
        "transform": tuple(transform)[:6],
        "nodata": src.nodata,
    }
    return SceneInfo(
        path=path,
        width=src.width,
        height=src.height,
        count=src.count,
        dtype=dtype,
        crs_wkt=crs.to_wkt() if crs else None,
        transform=tuple(transform)[:6],
        nodata=src.nodata,
        band_descriptions=tuple(d or "" for d in src.descriptions),
        georeferenced=crs is not None or not transform.is_identity,
        fingerprint=_fingerprint(path, header),
        source=GdalSource.name,
        colour_interpretations=tuple(c.name.lower() for c in src.colorinterp),
        scales=tuple(float(v) for v in src.scales),
        offsets=tuple(float(v) for v in src.offsets),
        layout=Layout(
            driver=str(src.driver),
            block=(int(src.block_shapes[0][0]), int(src.block_shapes[0][1])),
            all_valid=np.issubdtype(np.dtype(dtype), np.integer)
            and all(flags == [MaskFlags.all_valid] for flags in src.mask_flag_enums),
        ),
    )


class GdalSource:
    """A scene opened with GDAL; see the module docstring.

    Args:
        path: Local path, URL or GDAL path (remote opens are retried, see
            :func:`segpipe.core.raster.open_raster`).
        selection: The bands read (in this order) and the nodata value that replaces the file's.

    Raises:
        InputError: the scene is missing, unreadable or not usable, or has no band the selection names.
    """

    name = "gdal"

    @classmethod
    def probe(cls, path: str) -> bool:
        """GDAL is the fallback: it is asked last and accepts every path (errors come from opening)."""
        return True

    def __init__(self, path: str, selection: Selection | None = None) -> None:
        self._stack = ExitStack()
        self.dataset = self._stack.enter_context(open_raster(path))
        self.selection = selection or Selection()
        try:
            self._info = describe(path, self.dataset).select(self.selection)
        except (RasterioError, CPLE_BaseError) as exc:  # GDAL opened it but cannot describe it (corrupt GeoTIFF keys)
            self._stack.close()
            raise InputError(f"input {path!r} has a header GDAL cannot read ({exc}); re-export the scene") from None
        except BaseException:
            self._stack.close()
            raise

    @property
    def info(self) -> SceneInfo:
        return self._info

    def read(self, window: Window, *, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (bands, h, w) and validity (h, w) uint8 of ``window``, at full resolution or resampled to
        ``out_shape`` (average for pixels; GDAL reads overviews when there are any).

        Raises:
            InputError: GDAL cannot decode the window (a truncated or corrupt file).
        """
        rio_window = RioWindow(window.col_off, window.row_off, window.width, window.height)
        try:
            with remote_env(self._info.path):
                data, mask = self._read(rio_window, out_shape)
        except (rasterio.errors.RasterioError, CPLE_BaseError) as exc:
            # rasterio's "Read failed. See previous exception for details." chains GDAL's own reason
            cause = exc.__cause__ or exc
            reason = str(cause).splitlines()[0] if str(cause) else type(exc).__name__
            raise InputError(
                f"input {self._info.path!r} could not be read at pixels x {window.col_off}-"
                f"{window.col_off + window.width}, y {window.row_off}-{window.row_off + window.height} ({reason}); "
                "the file is truncated or corrupt"
            ) from None
        if np.issubdtype(data.dtype, np.floating):
            mask &= np.isfinite(data).all(axis=0)
        return data, mask.astype(np.uint8)

    def _read(self, rio_window: RioWindow, out_shape: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        src, selection = self.dataset, self.selection
        indexes = list(selection.bands) if selection.bands is not None else None
        if out_shape is None:
            data = src.read(indexes, window=rio_window)
        else:
            data = src.read(
                indexes, window=rio_window, out_shape=(self._info.count, *out_shape), resampling=Resampling.average
            )
        if selection.nodata is not None:
            return data, ~selection.invalid(data)
        if out_shape is None:
            return data, src.dataset_mask(window=rio_window) > 0
        return data, src.dataset_mask(window=rio_window, out_shape=out_shape) > 0

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> GdalSource:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
