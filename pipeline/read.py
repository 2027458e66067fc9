"""Read stage: open a scene with rasterio, validate it, and describe its grid.

Anything GDAL opens works: local paths, ``/vsicurl/`` URLs, ``s3://`` (through GDAL's /vsis3/), plain TIFF,
PNG and JPEG. Validation happens here, before any work starts, so a bad scene fails in seconds with one clear
message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from segpipe.errors import InputError

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
REMOTE_PREFIXES = ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/", "http://", "https://", "s3://", "gs://")


@dataclass(frozen=True)
class SceneInfo:
    """What the pipeline needs to know of a scene; small and JSON-serialisable via :meth:`to_attrs`.

    Attributes:
        path: The path or URL as given.
        width: Width in pixels.
        height: Height in pixels.
        count: Number of bands.
        dtype: Numpy dtype name of the pixels.
        crs_wkt: The CRS as WKT, or None for a scene without georeferencing.
        transform: The affine pixel-to-CRS transform (a, b, c, d, e, f), in CRS units per pixel.
        nodata: The nodata value, or None.
        band_descriptions: One description per band ("" where the file has none).
        georeferenced: False when the file has neither CRS nor a non-identity transform.
        fingerprint: A sha256 of the source's identity (size, mtime, header); changes when the file changes.
    """

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None
    band_descriptions: tuple[str, ...]
    georeferenced: bool
    fingerprint: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def to_attrs(self) -> dict[str, Any]:
        nodata = self.nodata
        if nodata is not None and not np.isfinite(nodata):
            nodata_json: float | str | None = str(nodata)  # JSON has no NaN
        else:
            nodata_json = nodata
        return {
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "dtype": self.dtype,
            "crs_wkt": self.crs_wkt,
            "transform": list(self.transform),
            "nodata": nodata_json,
            "band_descriptions": list(self.band_descriptions),
            "georeferenced": self.georeferenced,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> SceneInfo:
        nodata = attrs["nodata"]
        return cls(
            path=attrs["path"],
            width=int(attrs["width"]),
            height=int(attrs["height"]),
            count=int(attrs["count"]),
            dtype=attrs["dtype"],
            crs_wkt=attrs["crs_wkt"],
            transform=tuple(attrs["transform"]),
            nodata=None if nodata is None else float(nodata),
            band_descriptions=tuple(attrs["band_descriptions"]),
            georeferenced=bool(attrs["georeferenced"]),
            fingerprint=attrs["fingerprint"],
        )


def gdal_path(path: str) -> str:
    """Map user-facing URLs to GDAL virtual file systems.

    ``s3://b/k`` -> ``/vsis3/b/k``, ``https://`` -> /vsicurl/.
    """
    for scheme, vsi in (("s3://", "/vsis3/"), ("gs://", "/vsigs/")):
        if path.startswith(scheme):
            return vsi + path[len(scheme) :]
    if path.startswith(("http://", "https://")):
        return "/vsicurl/" + path
    return path


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


@contextmanager
def open_scene(path: str, *, retries: int = 3, backoff_s: float = 1.0) -> Iterator[rasterio.DatasetReader]:
    """Open a scene for reading; a remote URL is retried ``retries`` times with exponential backoff.

    Raises:
        InputError: the file is missing, empty, not a raster, or unreachable.
    """
    if not is_remote(path):
        if not os.path.exists(path):
            raise InputError(f"input {path!r} does not exist; check the path")
        if os.path.isdir(path):
            raise InputError(
                f"input {path!r} is a directory; give a raster file (GeoTIFF, COG, JPEG, PNG, ...)"
            )
        if os.path.getsize(path) == 0:
            raise InputError(f"input {path!r} is an empty file (0 bytes); re-copy or re-download it")
    attempts = retries if is_remote(path) else 1
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                dataset = rasterio.open(gdal_path(path))
            break
        except RasterioIOError as exc:
            if attempt == attempts:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if is_remote(path):
                    raise InputError(
                        f"input {path!r} could not be opened after {attempts} attempts ({reason}); "
                        "check the URL, the network and credentials"
                    ) from None
                raise InputError(
                    f"input {path!r} is not a raster GDAL can read ({reason}); "
                    "give a GeoTIFF, COG, JPEG or PNG"
                ) from None
            time.sleep(backoff_s * 2 ** (attempt - 1))
    try:
        yield dataset
    finally:
        dataset.close()


def _fingerprint(path: str, header: dict[str, Any]) -> str:
    digest = hashlib.sha256(repr(sorted(header.items())).encode())
    if not is_remote(path):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    else:
        digest.update(path.encode())
    return digest.hexdigest()


def describe_scene(path: str) -> SceneInfo:
    """Open, validate and describe a scene without reading its pixels.

    Raises:
        InputError: with a message saying what is wrong with the scene and what to do.
    """
    with open_scene(path) as src:
        if src.count < 1:
            raise InputError(f"input {path!r} has no raster bands")
        dtypes = set(src.dtypes)
        if len(dtypes) > 1:
            raise InputError(
                f"input {path!r} mixes band data types {sorted(dtypes)}; convert to one type first"
            )
        dtype = src.dtypes[0]
        if dtype not in SUPPORTED_DTYPES:
            raise InputError(
                f"input {path!r} has data type {dtype}, which segpipe cannot segment; "
                f"supported: {', '.join(SUPPORTED_DTYPES)}"
            )
        transform = src.transform
        crs = src.crs
        georeferenced = crs is not None or not transform.is_identity
        if not georeferenced:
            log.warning(
                "%s has no georeferencing (no CRS, identity transform): the mask keeps pixel coordinates",
                path,
            )
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
            georeferenced=georeferenced,
            fingerprint=_fingerprint(path, header),
        )
