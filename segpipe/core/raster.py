"""Open rasters with GDAL (through rasterio): the one place where segpipe calls ``rasterio.open`` for reading.

Anything GDAL opens works: local paths, ``/vsicurl/`` URLs, ``https://`` and ``s3://``/``gs://`` URLs (mapped to
GDAL's /vsicurl/, /vsis3/, /vsigs/), plain TIFF, PNG and JPEG. A path that is missing, a directory, empty, or not
a raster is one :class:`~segpipe.core.errors.InputError` naming the file and what to do; a remote URL gets a few
attempts with backoff first. Rasters without georeferencing open without a warning (the caller decides).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from segpipe.core import objects
from segpipe.core.errors import InputError
from segpipe.core.objects import gdal_config
from segpipe.core.paths import is_inline, is_remote

log = logging.getLogger(__name__)


#: GDAL's block cache (``GDAL_CACHEMAX``) while a stage reads or writes a whole raster. GDAL's default is 5 % of
#: RAM and fills with every decoded block, so a process would grow with the scene; reads and writes are aligned
#: to blocks and decode each block once, so a small cache costs nothing (``tests/pipeline/test_gdal_cache.py``).
GDAL_CACHE_BYTES = 64 * 2**20


def gdal_path(path: str) -> str:
    """Map user-facing URLs to GDAL virtual file systems: ``s3://b/k`` -> ``/vsis3/b/k``, ``gs://`` ->
    ``/vsigs/``, ``https://`` -> ``/vsicurl/https://``; other paths unchanged."""
    for scheme, vsi in (("s3://", "/vsis3/"), ("gs://", "/vsigs/")):
        if path.startswith(scheme):
            return vsi + path[len(scheme) :]
    if path.startswith(("http://", "https://")):
        return "/vsicurl/" + path
    return path


def remote_env(path: str) -> contextlib.AbstractContextManager[Any]:
    """The GDAL environment every read of ``path`` needs: the object-storage endpoint of
    :func:`segpipe.core.objects.gdal_config` (nothing for local files)."""
    config = gdal_config(path)
    return rasterio.Env(**config) if config else contextlib.nullcontext()


def identity(path: str) -> str:
    """What changes when the bytes behind ``path`` change, without reading them: a local file's absolute path, size
    and modification time; an object's ETag and size; an HTTP resource's ETag, Last-Modified and length (a HEAD
    request); an inline VRT's XML and the identity of each of its sources."""
    if is_inline(path):
        sources = re.findall(r"<SourceFilename[^>]*>([^<]+)</SourceFilename>", path)
        return path + "|" + "|".join(identity(_unvsi(s)) for s in sources)
    if not is_remote(path):
        stat = os.stat(path)
        return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    url = _unvsi(path)
    if objects.is_object_url(url):
        meta = objects.head(url) or {}
        return f"{url}|{meta.get('e_tag')}|{meta.get('size')}"
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as answer:
                headers = answer.headers
                return f"{url}|{headers.get('ETag')}|{headers.get('Last-Modified')}|{headers.get('Content-Length')}"
        except OSError:
            return url
    return url


def _unvsi(path: str) -> str:
    for vsi, scheme in (("/vsis3/", "s3://"), ("/vsigs/", "gs://")):
        if path.startswith(vsi):
            return scheme + path[len(vsi) :]
    return path.removeprefix("/vsicurl/")


def check_local_file(path: str, role: str) -> None:
    """Raise InputError unless ``path`` is an existing, non-empty file (remote paths and inline VRTs are not
    checked)."""
    if is_remote(path) or is_inline(path):
        return
    if not os.path.exists(path):
        raise InputError(f"{role} {path!r} does not exist; check the path")
    if os.path.isdir(path):
        raise InputError(f"{role} {path!r} is a directory; give a raster file (GeoTIFF, COG, JPEG, PNG, ...)")
    if os.path.getsize(path) == 0:
        raise InputError(f"{role} {path!r} is an empty file (0 bytes); re-copy or re-download it")


@contextmanager
def open_raster(
    path: str,
    *,
    role: str = "input",
    hint: str = "give a GeoTIFF, COG, JPEG or PNG",
    retries: int = 3,
    backoff_s: float = 1.0,
) -> Iterator[rasterio.DatasetReader]:
    """Open a raster for reading; a remote URL gets ``retries`` attempts with exponential backoff between them.

    GDAL caches a failed remote open (``/vsicurl/``, ``/vsis3/``, ...) for the life of the process, so a plain
    second ``rasterio.open`` would fail at once without touching the network. The attempts are therefore made
    with GDAL's cache off for the URL's prefix (``CPL_VSIL_CURL_NON_CACHED``); nothing failed is left in the
    cache, and later opens cache as usual.

    Args:
        path: Local path, URL or GDAL path.
        role: What the raster is to the user ("input", "prediction", "ground truth", "image", ...), for messages.
        hint: What to give instead when the file is not a raster GDAL reads.
        retries: Attempts for a remote path.
        backoff_s: Seconds before the second attempt; doubled for each further one.

    Raises:
        InputError: the file is missing, empty, a directory, not a raster, or unreachable.
    """
    check_local_file(path, role)
    remote = is_remote(path)
    attempts = max(1, retries) if remote else 1
    options = {**_uncached_options(gdal_path(path)), **gdal_config(path)} if remote else {}
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
                        f"{role} {path!r} could not be opened after {attempts} attempts ({reason}); "
                        "check the URL, the network and credentials"
                    ) from None
                raise InputError(f"{role} {path!r} is not a raster GDAL can read ({reason}); {hint}") from None
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


def _uncached_options(vsi_path: str) -> dict[str, Any]:
    """GDAL config that keeps ``vsi_path`` out of the /vsicurl/ cache (a colon-separated list of prefixes, so the
    prefix is cut at the first colon: ``/vsicurl/https``)."""
    prefix = vsi_path.split(":", 1)[0]
    existing = os.environ.get("CPL_VSIL_CURL_NON_CACHED")
    return {"CPL_VSIL_CURL_NON_CACHED": f"{existing}:{prefix}" if existing else prefix}
