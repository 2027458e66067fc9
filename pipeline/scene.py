"""Scenes as the pipeline knows them: what a run reads of a file (:class:`Selection`), the description of what
it reads (:class:`SceneInfo`: size, bands, dtype, georeferencing, nodata, fingerprint), and what every scene source
is (:class:`SceneSource`: describe, read a window as ``(pixels, valid)``).

A run may read a :class:`Selection` of the file: some of its bands, in the model's order (``--bands``), a
nodata value that replaces the file's (``--nodata``) and, for a whole-slide image, the pixel size it is read at
(``--resolution``), whether only tissue is valid (``--tissue``) and the level-0 pixel size that replaces what the
file states (``--mpp``). A source opened with a selection describes and reads only that view; the view's
fingerprint differs from the file's, so work stores and output keys follow the selection.

The sources themselves are :mod:`segpipe.pipeline.sources` (one module per format, registered in one place);
:mod:`segpipe.pipeline.read` opens a scene with the source that reads it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from segpipe.core.errors import InputError
from segpipe.core.pyramid import Pyramid, plan_read
from segpipe.core.tiles import Window


@dataclass(frozen=True)
class Selection:
    """What a run reads of a file: which bands (1-based numbers, in the model's order; None: all, in order), the
    value that marks nodata in every band (None: the file's own nodata, mask or alpha) and, for a whole-slide image,
    the pixel size read (``resolution`` micrometres per pixel; None: level 0 as it is, see
    :mod:`segpipe.core.pyramid`), the tissue detection that makes background nodata (``tissue``: ``none`` or
    ``otsu``, see :mod:`segpipe.core.tissue`) and the level-0 pixel size that replaces the file's (``mpp``
    micrometres, ``--mpp``; None: what the file states). Sources of other scenes ignore ``resolution`` and
    ``tissue``, and refuse ``mpp``."""

    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    resolution: float | None = None
    tissue: str = "none"
    mpp: float | None = None

    @property
    def is_default(self) -> bool:
        return (
            self.bands is None
            and self.nodata is None
            and self.resolution is None
            and self.tissue == "none"
            and self.mpp is None
        )

    def invalid(self, pixels: np.ndarray) -> np.ndarray:
        """(h, w) bool: where every band equals :attr:`nodata` (NaN matches NaN)."""
        assert self.nodata is not None
        if math.isnan(self.nodata):
            return np.isnan(pixels).all(axis=0)
        return (pixels == self.nodata).all(axis=0)

    def to_attrs(self) -> dict[str, Any]:
        nodata = self.nodata
        return {
            "bands": list(self.bands) if self.bands is not None else None,
            "nodata": str(nodata) if nodata is not None and not math.isfinite(nodata) else nodata,
            "resolution": self.resolution,
            "tissue": self.tissue,
            "mpp": self.mpp,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Selection:
        bands, nodata = attrs["bands"], attrs["nodata"]
        resolution, mpp = attrs["resolution"], attrs["mpp"]
        return cls(
            tuple(int(b) for b in bands) if bands is not None else None,
            None if nodata is None else float(nodata),
            None if resolution is None else float(resolution),
            str(attrs["tissue"]),
            None if mpp is None else float(mpp),
        )


@dataclass(frozen=True)
class Layout:
    """How a file stores its pixels, for choosing how tiles are read (:func:`segpipe.pipeline.ingest.reads_in_place`).
    Known to the source that opened the file; not recorded in the work store, summaries or keys (it never changes
    what is computed).

    Attributes:
        driver: The GDAL driver (``GTiff``, ``COG``, ``JPEG`` ...).
        block: (rows, cols) of one block (tile or strip) GDAL decodes for any read touching it.
        all_valid: Every pixel is data: GDAL's masks say so for every band (no nodata, mask band or alpha) and the
            dtype is an integer (no NaN); so the valid pixels of a window are its area, without reading it.
    """

    driver: str
    block: tuple[int, int]
    all_valid: bool


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
        fingerprint: A sha256 of the source's identity (size, mtime, header); changes when the file changes (and
            with the selection).
        source: The name of the :class:`SceneSource` that reads it (see :data:`SOURCES`).
        colour_interpretations: Per band, GDAL's colour interpretation in lower case (``red``, ``gray`` ...).
        scales: Per band, the scale the product records for its values (1.0 where none).
        offsets: Per band, the offset the product records (0.0 where none): physical = value * scale + offset.
        selection: The bands and nodata of the file this describes (see :meth:`select`).
        pyramid: A whole-slide image's levels and pixel size (None for other scenes); its scene grid is then
            ``transform[0]`` level-0 pixels per pixel (the transform is in level-0 pixels, without a CRS).
        mpp: Micrometres per pixel (x, y) of this grid, for a slide that states its pixel size; else None.
        layout: How the file stores its pixels (None: not known, as after :meth:`from_attrs`); see :class:`Layout`.
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
    colour_interpretations: tuple[str, ...] = ()
    scales: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()
    selection: Selection = field(default_factory=Selection)
    pyramid: Pyramid | None = None
    mpp: tuple[float, float] | None = None
    layout: Layout | None = field(default=None, compare=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def select(self, selection: Selection) -> SceneInfo:
        """The description of a selection of this file's bands and nodata (pure; this must describe the whole
        file).

        Raises:
            InputError: a band number the file does not have.
        """
        if selection.is_default:
            return self
        if not self.selection.is_default:
            raise ValueError("select() applies to the description of a whole file")
        bands = selection.bands or tuple(range(1, self.count + 1))
        beyond = [b for b in bands if not 1 <= b <= self.count]
        if beyond:
            raise InputError(f"input {self.path!r} has {self.count} band(s), no band {beyond[0]}")

        def pick(values: tuple[Any, ...], fill: Any) -> tuple[Any, ...]:
            return tuple(values[b - 1] if b - 1 < len(values) else fill for b in bands)

        digest = hashlib.sha256(f"{self.fingerprint}|{selection.to_attrs()}".encode()).hexdigest()
        grid: dict[str, Any] = {}
        pyramid = self.pyramid
        if selection.mpp is not None:
            if pyramid is None:
                raise InputError(
                    f"input {self.path!r} is read by the {self.source} source, not as a microscopy image; --mpp "
                    "applies to whole-slide and plain microscopy images: leave it out for this scene"
                )
            pyramid = replace(pyramid, mpp=(selection.mpp, selection.mpp))  # --mpp: level 0's pixel size
            grid = {"pyramid": pyramid, "mpp": pyramid.mpp}
        if pyramid is not None and selection.resolution is not None:
            if pyramid.mpp is None:
                raise InputError(
                    f"slide {self.path!r} states no pixel size (microns per pixel), so it cannot be read at "
                    f"{selection.resolution:g} um per pixel; pass --resolution native, or state it with --mpp"
                )
            read = plan_read(pyramid, selection.resolution)
            f = read.factor
            grid.update(width=read.width, height=read.height, transform=(f, 0.0, 0.0, 0.0, f, 0.0))
            grid["mpp"] = read.mpp(pyramid)
        if self.layout is not None and selection.nodata is not None:  # validity now depends on the values
            grid["layout"] = replace(self.layout, all_valid=False)
        return replace(
            self,
            **grid,
            count=len(bands),
            nodata=selection.nodata if selection.nodata is not None else self.nodata,
            band_descriptions=pick(self.band_descriptions, ""),
            colour_interpretations=pick(self.colour_interpretations, ""),
            scales=pick(self.scales, 1.0),
            offsets=pick(self.offsets, 0.0),
            fingerprint=digest,
            selection=selection,
        )

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
            "colour_interpretations": list(self.colour_interpretations),
            "scales": list(self.scales),
            "offsets": list(self.offsets),
            "selection": self.selection.to_attrs(),
            "pyramid": self.pyramid.to_dict() if self.pyramid is not None else None,
            "mpp": list(self.mpp) if self.mpp else None,
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
            source=attrs["source"],
            colour_interpretations=tuple(attrs["colour_interpretations"]),
            scales=tuple(float(v) for v in attrs["scales"]),
            offsets=tuple(float(v) for v in attrs["offsets"]),
            selection=Selection.from_attrs(attrs["selection"]),
            pyramid=Pyramid.from_dict(attrs["pyramid"]) if attrs["pyramid"] else None,
            mpp=(float(attrs["mpp"][0]), float(attrs["mpp"][1])) if attrs["mpp"] else None,
        )


@runtime_checkable
class SceneSource(Protocol):
    """An open scene: its description and windows of its pixels (pixel coordinates of the scene, origin top-left).

    Implementations open (and validate) in their constructor ``Source(path, selection)``, describe and read only
    the selection's bands (with its nodata) when one is given, raise :class:`~segpipe.core.errors.InputError` for
    anything wrong with the scene, and are context managers.
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

    def __call__(self, path: str, selection: Selection = ...) -> SceneSource: ...


#: File suffixes of whole-slide formats that only OpenSlide reads (Aperio, Hamamatsu, Leica, MIRAX, Sakura,
#: Ventana, DICOM). Sources are chosen by content; these names serve listing data sets and refusing a slide at a
#: URL (OpenSlide reads local files only). Slides in ``.tif``/``.tiff`` are told from other TIFFs by content.
SLIDE_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


def is_slide_name(path: str) -> bool:
    """Whether ``path`` names a file of a whole-slide-only format (:data:`SLIDE_SUFFIXES`; a query string aside)."""
    return path.split("?", 1)[0].lower().endswith(SLIDE_SUFFIXES)
