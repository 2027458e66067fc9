"""What a path names, by its text alone (no I/O, no GDAL): a URL or GDAL network path, or an inline VRT."""

from __future__ import annotations

#: Prefixes of paths GDAL reads over the network (URLs and GDAL's network file systems).
REMOTE_PREFIXES = ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/", "http://", "https://", "s3://", "gs://")


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL or GDAL network path (no local checks apply)."""
    return path.startswith(REMOTE_PREFIXES)


def is_inline(path: str) -> bool:
    """Whether ``path`` is an inline GDAL VRT (an XML document GDAL opens like a file name)."""
    return path.lstrip().startswith("<VRTDataset")
