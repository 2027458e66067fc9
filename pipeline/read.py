"""Read stage: scene sources, the seam through which every stage reads a scene's pixels.

A :class:`SceneSource` describes a scene (:class:`SceneInfo`: size, bands, dtype, georeferencing, nodata,
fingerprint) and reads windows of it as ``(pixels, valid)``. Sources are registered in :data:`SOURCES`, tried in
order by content (their ``probe``), not by file extension; the GDAL source (:mod:`segpipe.pipeline.sources.gdal`)
accepts what GDAL opens and comes last. A new input format is one module in ``pipeline/sources/`` and one line in
:data:`SOURCES`; the stages do not change.

Validation happens when a source opens, before any work starts, so a bad scene fails in seconds with one clear
message. Each open source is one handle: threads open their own.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from segpipe.core.errors import InputError
from segpipe.core.tiles import Window

log = logging.getLogger(__name__)


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
        source: The name of the :class:`SceneSource` that reads it (see :data:`SOURCES`).
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
    source: str = "gdal"

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
            "source": self.source,
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
            source=attrs.get("source", "gdal"),
        )


@runtime_checkable
class SceneSource(Protocol):
    """An open scene: its description and windows of its pixels (pixel coordinates of the scene, origin top-left).

    Implementations open (and validate) in their constructor ``Source(path)``, raise
    :class:`~segpipe.core.errors.InputError` for anything wrong with the scene, and are context managers.
    """

    #: Registry name, recorded in :attr:`SceneInfo.source`.
    name: str

    @property
    def info(self) -> SceneInfo:
        """The scene's description."""
        ...

    def read(self, window: Window, *, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and validity of ``window``.

        Args:
            window: Pixels of the scene (must lie inside it).
            out_shape: (height, width) to resample the window to (averaging; for previews), or None for full
                resolution.

        Returns:
            ``(pixels, valid)``: (bands, h, w) in the scene's dtype, and (h, w) uint8, 1 where there is data.
        """
        ...

    def close(self) -> None:
        """Release the handle."""
        ...

    def __enter__(self) -> SceneSource: ...

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class SourceType(Protocol):
    """What :data:`SOURCES` holds: a class whose ``probe(path)`` says whether it reads ``path`` (by content, cheaply)
    and whose constructor opens it."""

    name: str

    def probe(self, path: str) -> bool: ...

    def __call__(self, path: str) -> SceneSource: ...


#: Registered scene sources, ``name -> "module:Class"``, tried in this order; imported when first used.
SOURCES: dict[str, str] = {
    "gdal": "segpipe.pipeline.sources.gdal:GdalSource",
}


def source_type(name: str) -> SourceType:
    """The registered source class called ``name``."""
    if name not in SOURCES:
        raise InputError(f"unknown scene source {name!r}; registered: {', '.join(SOURCES)}")
    module, _, attribute = SOURCES[name].partition(":")
    found: SourceType = getattr(importlib.import_module(module), attribute)
    return found


def open_source(path: str, *, source: str | None = None) -> SceneSource:
    """Open ``path`` with the named source, or with the first registered source whose ``probe`` accepts it.

    Raises:
        InputError: no source reads it, or the scene is not usable (the source's message).
    """
    if source is not None:
        return source_type(source)(path)
    for name in SOURCES:
        kind = source_type(name)
        if kind.probe(path):
            return kind(path)
    raise InputError(f"input {path!r} is not a format segpipe reads; give a GeoTIFF, COG, JPEG or PNG")


def describe_scene(path: str) -> SceneInfo:
    """Open, validate and describe a scene without reading its pixels; a scene without georeferencing works,
    with one warning.

    Raises:
        InputError: with a message saying what is wrong with the scene and what to do.
    """
    with open_source(path) as src:
        info = src.info
    if not info.georeferenced:
        log.warning("%s has no georeferencing (no CRS, identity transform): the mask keeps pixel coordinates", path)
    return info
