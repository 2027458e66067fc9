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
    """Open a scene for reading; a remote URL gets ``retries`` attempts with exponential backoff between them.

    GDAL caches a failed remote open (``/vsicurl/``, ``/vsis3/``, ...) for the life of the process, so a plain
    second ``rasterio.open`` would fail at once without touching the network. The attempts are therefore made
    with GDAL's cache off for the URL's prefix (``CPL_VSIL_CURL_NON_CACHED``); nothing failed is left in the
    cache, and later opens (ingest) cache as usual.

    Raises:
        InputError: the file is missing, empty, not a raster, or unreachable.
    """
    remote = is_remote(path)
    if not remote:
        if not os.path.exists(path):
            raise InputError(f"input {path!r} does not exist; check the path")
        if os.path.isdir(path):
            raise InputError(
                f"input {path!r} is a directory; give a raster file (GeoTIFF, COG, JPEG, PNG, ...)"
            )
        if os.path.getsize(path) == 0:
            raise InputError(f"input {path!r} is an empty file (0 bytes); re-copy or re-download it")
    attempts = max(1, retries) if remote else 1
    options = _uncached_options(gdal_path(path)) if remote else {}
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings(), rasterio.Env(**options), _gdal_warnings_muted(remote):
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                dataset = rasterio.open(gdal_path(path))
            break
        except RasterioIOError as exc:
            if attempt == attempts:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if remote:
                    raise InputError(
                        f"input {path!r} could not be opened after {attempts} attempts ({reason}); "
                        "check the URL, the network and credentials"
                    ) from None
                raise InputError(
                    f"input {path!r} is not a raster GDAL can read ({reason}); "
                    "give a GeoTIFF, COG, JPEG or PNG"
                ) from None
            log.info("opening %s failed (attempt %d of %d): %s", path, attempt, attempts, exc)
            time.sleep(backoff_s * 2 ** (attempt - 1))
    try:
        yield dataset
    finally:
        dataset.close()


@contextmanager
def _gdal_warnings_muted(mute: bool) -> Iterator[None]:
    """Keep GDAL's warnings about a failed remote attempt (one per attempt, "HTTP response code ... 0") off the
    log: the error, or the retry message, says what happened."""
    logger = logging.getLogger("rasterio._env")
    level = logger.level
    if mute:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _uncached_options(vsi_path: str) -> dict[str, str]:
    """GDAL config that keeps ``vsi_path`` out of the /vsicurl/ cache (a colon-separated list of prefixes, so the
    prefix is cut at the first colon: ``/vsicurl/https``)."""
    prefix = vsi_path.split(":", 1)[0]
    existing = os.environ.get("CPL_VSIL_CURL_NON_CACHED")
    return {"CPL_VSIL_CURL_NON_CACHED": f"{existing}:{prefix}" if existing else prefix}


def _fingerprint(path: str, header: dict[str, Any]) -> str:
    digest = hashlib.sha256(repr(sorted(header.items())).encode())
    if not is_remote(path):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode("utf-8", "surrogatepass"))
    else:
        digest.update(path.encode("utf-8", "surrogatepass"))  # surrogates: names that are not UTF-8
    return digest.hexdigest()


#: GDAL's block cache while ingest and export run (``GDAL_CACHEMAX``). GDAL's default is 5 % of RAM, and the
#: cache fills with every decoded block, so a process's memory grew with the scene up to that. Reads are aligned
#: to the scene's blocks and every block is decoded once, so a small cache costs nothing. With it, segpipe's peak
#: in ``benchmarks/bench_pipeline.py`` went from +17 % to +4 % between 16.8 and 268 MP (ingest of 268 MP: 6.7-8.4 s
#: on 2 EPYC cores); tests/pipeline/test_gdal_cache.py checks the bound.
GDAL_CACHE_BYTES = 64 * 2**20

#: Largest block (strip or tile) a scene may have: a read decodes whole blocks, so this bounds a reader's memory.
#: GDAL serves uncompressed strips, and compressed single strips above ~20 MB, line by line (block height 1),
#: so a huge single-strip TIFF passes; a raster with giant tiles, or a strip GDAL cannot split, is refused.
MAX_BLOCK_BYTES = 256 * 2**20


def _block_bytes(src: rasterio.DatasetReader) -> int:
    """Bytes GDAL decodes to read one block of band 1 (all bands at once when pixel-interleaved)."""
    rows, cols = src.block_shapes[0]
    bands = 1 if src.interleaving is not None and src.interleaving.name == "band" else src.count
    return int(rows) * int(cols) * bands * np.dtype(src.dtypes[0]).itemsize


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
