"""Read stage: scene sources, the seam through which every stage reads a scene's pixels.

A :class:`SceneSource` describes a scene (:class:`SceneInfo`: size, bands, dtype, georeferencing, nodata,
fingerprint) and reads windows of it as ``(pixels, valid)``. Sources are registered in :data:`SOURCES`, tried in
order by content (their ``probe``), not by file extension: the whole-slide source
(:mod:`segpipe.pipeline.sources.slide`, OpenSlide) takes the slides OpenSlide recognises, and the GDAL source
(:mod:`segpipe.pipeline.sources.gdal`) accepts what GDAL opens and comes last. A new input format is one module
in ``pipeline/sources/`` and one line in :data:`SOURCES`; the stages do not change.

Validation happens when a source opens, before any work starts, so a bad scene fails in seconds with one clear
message. Each open source is one handle: threads open their own.

A run may read a :class:`Selection` of the file: some of its bands, in the model's order (``--bands``), a
nodata value that replaces the file's (``--nodata``) and, for a whole-slide image, the pixel size it is read at
(``--resolution``), whether only tissue is valid (``--tissue``) and the level-0 pixel size that replaces what the
file states (``--mpp``). A source opened with a selection describes and reads only that view; the view's
fingerprint differs from the file's, so work stores and output keys follow the selection.

``--mpp`` also chooses the source: a selection with :attr:`Selection.mpp` is opened by the whole-slide source
whatever the probes say (:func:`open_source`), which reads a plain, not georeferenced RGB image (TIFF, PNG, JPEG)
as a one-level slide and refuses a georeferenced scene; without it, sources are chosen by content as above.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from segpipe.core.errors import InputError
from segpipe.core.pyramid import Pyramid, plan_read
from segpipe.core.tiles import Window

log = logging.getLogger(__name__)


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
        attrs: dict[str, Any] = {
            "bands": list(self.bands) if self.bands is not None else None,
            "nodata": str(nodata) if nodata is not None and not math.isfinite(nodata) else nodata,
        }
        if self.resolution is not None:  # only when set: the fingerprints of other selections stay as they were
            attrs["resolution"] = self.resolution
        if self.tissue != "none":
            attrs["tissue"] = self.tissue
        if self.mpp is not None:  # as resolution: other selections keep their fingerprints
            attrs["mpp"] = self.mpp
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any] | None) -> Selection:
        if not attrs:
            return cls()
        bands, nodata = attrs.get("bands"), attrs.get("nodata")
        resolution, mpp = attrs.get("resolution"), attrs.get("mpp")
        return cls(
            tuple(int(b) for b in bands) if bands is not None else None,
            None if nodata is None else float(nodata),
            None if resolution is None else float(resolution),
            str(attrs.get("tissue", "none")),
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
        attrs: dict[str, Any] = {
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
        }
        if self.pyramid is not None:  # only for slides: the attributes of other scenes stay as they were
            attrs.update(pyramid=self.pyramid.to_dict(), mpp=list(self.mpp) if self.mpp else None)
        return attrs

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
            colour_interpretations=tuple(attrs.get("colour_interpretations", ())),
            scales=tuple(float(v) for v in attrs.get("scales", ())),
            offsets=tuple(float(v) for v in attrs.get("offsets", ())),
            selection=Selection.from_attrs(attrs.get("selection")),
            pyramid=Pyramid.from_dict(attrs["pyramid"]) if attrs.get("pyramid") else None,
            mpp=(float(attrs["mpp"][0]), float(attrs["mpp"][1])) if attrs.get("mpp") else None,
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


def _remote_slide_problem(path: str) -> str | None:
    """Why a slide at a URL cannot be read, or None for a local path or a scene of another kind."""
    from segpipe.core.objects import is_object_url
    from segpipe.core.raster import is_remote

    if (is_remote(path) or is_object_url(path) or path.startswith("/vsi")) and is_slide_name(path):
        return (
            f"input {path!r} is a whole-slide image at a URL, but OpenSlide reads local files only; copy the slide "
            "to local disk, or on a cluster to shared storage mounted at the same path on every node, and give "
            "that path"
        )
    return None


#: Registered scene sources, ``name -> "module:Class"``, tried in this order; imported when first used.
SOURCES: dict[str, str] = {
    "array": "segpipe.pipeline.sources.array:ArraySource",
    "slide": "segpipe.pipeline.sources.slide:SlideSource",
    "gdal": "segpipe.pipeline.sources.gdal:GdalSource",
}


def source_type(name: str) -> SourceType:
    """The registered source class called ``name``."""
    if name not in SOURCES:
        raise InputError(f"unknown scene source {name!r}; registered: {', '.join(SOURCES)}")
    module, _, attribute = SOURCES[name].partition(":")
    found: SourceType = getattr(importlib.import_module(module), attribute)
    return found


def open_source(path: str, *, source: str | None = None, selection: Selection | None = None) -> SceneSource:
    """Open ``path`` (its ``selection``, default all bands) with the named source; else, for a selection with
    ``mpp`` (``--mpp``), with the whole-slide source (it reads a plain RGB image as a one-level slide, and says why
    when it cannot: a georeferenced scene, another kind of image); else with the first registered source whose
    ``probe`` accepts it.

    Raises:
        InputError: no source reads it, a whole-slide image is at a URL (OpenSlide reads local files only), or the
            scene is not usable (the source's message).
    """
    chosen = selection or Selection()
    problem = _remote_slide_problem(path)
    if problem:  # GDAL would read the TIFF inside some of them, labels and all, or fail with a codec error
        raise InputError(problem)
    if source is not None:
        return source_type(source)(path, chosen)
    if chosen.mpp is not None:  # a microscopy image, whatever it states: never a plain picture for GDAL
        return source_type("slide")(path, chosen)
    for name in SOURCES:
        kind = source_type(name)
        if kind.probe(path):
            return kind(path, chosen)
    raise InputError(
        f"input {path!r} is not a format segpipe reads; give a GeoTIFF, COG, JPEG, PNG or a whole-slide image"
    )


def describe_scene(path: str, selection: Selection | None = None, *, mpp: float | None = None) -> SceneInfo:
    """Open, validate and describe a scene (its ``selection``) without reading its pixels; a scene without
    georeferencing works, with one warning.

    Args:
        path: The scene.
        selection: What is read of it (None: the whole file).
        mpp: ``--mpp``: open it as a microscopy image of this level-0 pixel size (micrometres), with the
            whole-slide source (see :func:`open_source`). Without ``selection`` the description is still of the
            file as it states itself; the run's selection applies the pixel size
            (:func:`segpipe.pipeline.fit.fit_scene`).

    Raises:
        InputError: with a message saying what is wrong with the scene and what to do.
    """
    chosen = selection if mpp is None else replace(selection or Selection(), mpp=mpp)
    with open_source(path, selection=chosen) as src:
        info = src.info
        if selection is None and mpp is not None:
            info = src.file  # type: ignore[attr-defined]  # the whole-slide source's description of the file
    if not info.georeferenced and info.pyramid is None:  # a slide's grid is in microns, not a CRS
        log.warning("%s has no georeferencing (no CRS, identity transform): the mask keeps pixel coordinates", path)
    return info


def sample_scene(scene: SceneInfo, *, windows: int = 64, size: int = 128) -> tuple[np.ndarray, float]:
    """A bounded sample of a scene's pixels, for statistics (a percentile stretch, a nodata hint): ``windows``
    squares of ``size`` pixels spread evenly over the scene (:func:`segpipe.core.tiles.sample_windows`; at most
    ``windows * size**2`` pixels, 1 MP by default, whatever the scene's size).

    Returns:
        ``(values, zero_share)``: the valid pixels (bands, N) as float64, and the share of sampled pixels that are
        0 in every band and not nodata (a border that may be nodata without saying so).
    """
    from segpipe.core.tiles import sample_windows

    parts, zeros, total = [], 0, 0
    with open_source(scene.path, source=scene.source, selection=scene.selection) as src:
        for window in sample_windows(scene.width, scene.height, count=windows, size=size):
            pixels, ok = src.read(window)
            valid = ok.astype(bool)
            zeros += int(((pixels == 0).all(axis=0) & valid).sum())
            total += valid.size
            parts.append(pixels[:, valid].astype(np.float64))
    values = np.concatenate(parts, axis=1) if parts else np.zeros((scene.count, 0))
    return values, zeros / total if total else 0.0
