"""The whole-slide source: pyramidal microscopy slides through OpenSlide (openslide-python; the C library comes
from the ``openslide-bin`` wheel, so nothing is installed outside pip).

Why OpenSlide and not tifffile: OpenSlide reads every vendor format a pathology lab meets with one call,
``read_region`` (Aperio SVS with JPEG or JPEG 2000 tiles, Hamamatsu NDPI and VMS, MIRAX, Philips TIFF, Ventana
BIF, Leica SCN, DICOM WSI, generic tiled TIFF), handles their quirks (NDPI restart markers, MIRAX tile overlaps,
Aperio's separate label and macro images) and returns regions beyond the slide's edge as transparent. tifffile
reads the TIFF-based ones only (no MIRAX or DICOM) and would need imagecodecs for JPEG 2000; it is used here to
look at generic TIFF headers (:meth:`SlideSource.probe`) and to write slide masks
(:mod:`segpipe.pipeline.sinks.ometiff`). OpenSlide reads an OME-TIFF whose levels are SubIFDs as one level (level 0):
correct, only slower for previews.

Chosen by content: :meth:`SlideSource.probe` asks ``OpenSlide.detect_format``. Every vendor format is a slide; a
``generic-tiff`` (any tiled TIFF) is a slide only when it is 8-bit RGB, has no GeoTIFF tags and states a
microscope's pixel size (resolution tags of at most :data:`MAX_SLIDE_MPP` micrometres per pixel, or OME-XML):
GeoTIFFs, COGs and other rasters stay with GDAL.

What the pipeline sees: 3 bands (red, green, blue) of uint8; OpenSlide's alpha is validity (0 outside the
scanned area); the scene grid is the slide read at the selection's pixel size (:mod:`segpipe.core.pyramid`: a
level as it is, or a level resampled by the exact factor), its transform in level-0 pixels. With
``Selection.tissue == "otsu"`` only tissue is valid (:mod:`segpipe.core.tissue`): the saturation of a thumbnail of
about :data:`TISSUE_MPP` micrometres per pixel (read block by block, bounded memory) is thresholded once per
process and slide; background tiles are then skipped and written as nodata, as nodata tiles of any scene are.

``--mpp`` (``Selection.mpp``): the level-0 pixel size is the user's, whatever the file states (a slide that states
none or a wrong one), and :func:`segpipe.pipeline.read.open_source` brings every image here, not only what
:meth:`SlideSource.probe` accepts. A vendor slide, or a tiled TIFF that is 8-bit RGB, is read by OpenSlide as above
(without a pixel size of its own, or with its own replaced). A plain 8-bit RGB image that is not georeferenced
(a strip TIFF, PNG or JPEG that GDAL gives no CRS and an identity transform) is read as a one-level slide through
``openslide.ImageSlide``, openslide-python's wrapper of a PIL image (what ``openslide.open_slide`` falls back to;
its ``read_region`` pads beyond the edge with transparent pixels as OpenSlide does, and it states no properties).
PIL decodes such an image whole, in every reader that opens it (one per ingest region of 2048 pixels), so it suits
images of tens of megapixels; PIL's decompression-bomb limit applies (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485
pixels: PIL warns above it and refuses above twice it, which is refused here with one line). Larger images should
be tiled pyramidal TIFFs (``vips tiffsave in.tif out.tif --tile --pyramid``), which OpenSlide reads region by
region. A georeferenced scene, an image that is not 8-bit RGB, or a file at a URL is refused with one line.
"""

from __future__ import annotations

import hashlib
import logging
import math
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import openslide
import tifffile
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from segpipe.core.errors import InputError
from segpipe.core.pyramid import MAX_SLIDE_MPP, Pyramid, SlideRead, grid_size, plan_read
from segpipe.core.raster import identity, open_raster
from segpipe.core.tiles import Window
from segpipe.core.tissue import saturation, tissue_mask
from segpipe.pipeline.scene import SceneInfo, Selection

log = logging.getLogger(__name__)

#: GeoTIFF tags: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735)

#: Pixel size of the thumbnail the tissue mask is computed on (level-0 pixels x 32 when the slide has none).
TISSUE_MPP = 16.0
#: Longest side of the tissue mask, whatever the slide's size (bounds its memory: 16 MiB).
TISSUE_MAX_SIDE = 4096
#: Shortest long side of the tissue mask: a small slide (a field, a crop) gets a finer mask than TISSUE_MPP.
TISSUE_MIN_SIDE = 256

#: Output pixels per side of one resampled read (bounds a read's memory: the level region behind it is at most a
#: few times larger).
READ_BLOCK = 1024


def _is_local(path: str) -> bool:
    return not ("://" in path or path.startswith("/vsi")) and Path(path).exists()


def _generic_tiff_is_slide(path: str) -> bool:
    """Whether a tiled TIFF OpenSlide reads as ``generic-tiff`` is a slide (see the module docstring)."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tags = page.tags
            if any(code in tags for code in GEOTIFF_TAGS):
                return False
            if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4):
                return False
            if tif.is_ome:
                return True
            unit, xres = tags.get(296), tags.get(282)  # ResolutionUnit, XResolution
            if unit is None or xres is None or int(unit.value) not in (2, 3):
                return False
            numerator, denominator = xres.value
            per_unit = numerator / denominator if denominator else 0.0
            if per_unit <= 0:
                return False
            mpp = (25400.0 if int(unit.value) == 2 else 10000.0) / per_unit
            return mpp <= MAX_SLIDE_MPP
    except (OSError, ValueError, tifffile.TiffFileError):
        return False


def _georeferenced(path: str) -> bool:
    """Whether GDAL gives ``path`` a CRS or a transform other than the identity (as the GDAL source decides)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with open_raster(path) as src:
                return src.crs is not None or not src.transform.is_identity
    except InputError:
        return False  # not a raster GDAL reads: no georeferencing either


def _tiff_is_rgb(path: str) -> bool:
    """Whether the first page of a TIFF is 8-bit RGB (or RGBA)."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return bool(page.dtype == np.uint8 and page.samplesperpixel in (3, 4))
    except (OSError, ValueError, tifffile.TiffFileError):
        return False


def _open_slide(path: str, mpp: float | None) -> openslide.AbstractSlide:
    """The reader of ``path``: OpenSlide; with ``mpp`` (``--mpp``) also a plain image through PIL (see the module
    docstring).

    Raises:
        InputError: OpenSlide cannot open it; with ``mpp``: a file at a URL, a georeferenced scene, an image that
            is not 8-bit RGB or that PIL refuses.
    """
    if mpp is None:
        try:
            return openslide.OpenSlide(path)
        except (openslide.OpenSlideError, OSError) as exc:
            raise InputError(f"slide {path!r} cannot be opened by OpenSlide ({exc}); is it complete?") from None
    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except (openslide.OpenSlideError, OSError, ValueError):
        vendor = None
    if vendor in (None, "generic-tiff") and _georeferenced(path):
        raise InputError(
            f"input {path!r} is georeferenced (it has a CRS or a geotransform); --mpp states the pixel size of a "
            "microscopy image: leave it out for this scene"
        )
    if vendor is not None:
        if vendor == "generic-tiff" and not _tiff_is_rgb(path):
            raise InputError(f"input {path!r} is not an 8-bit RGB image; --mpp reads 8-bit RGB microscopy images")
        return _open_slide(path, None)
    try:
        with Image.open(path) as image:
            mode, kind = image.mode, image.format
    except Image.DecompressionBombError:
        raise InputError(
            f"input {path!r} is larger than PIL's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels for a plain "
            "image, which it decodes whole; convert it to a tiled pyramidal TIFF (vips tiffsave IN OUT.tif --tile "
            "--pyramid), which is read region by region"
        ) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"input {path!r} is neither a slide OpenSlide reads nor an image PIL reads ({exc})") from None
    if mode not in ("RGB", "RGBA") or (kind == "TIFF" and not _tiff_is_rgb(path)):  # PIL reads 16-bit RGB as 8
        raise InputError(f"input {path!r} is not an 8-bit RGB image ({kind} {mode}); --mpp reads 8-bit RGB images")
    return openslide.ImageSlide(path)


def _mpp(slide: openslide.AbstractSlide) -> tuple[float, float] | None:
    props = slide.properties
    try:
        mpp = (float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y]))
    except (KeyError, ValueError):
        return None
    return mpp if all(math.isfinite(v) and v > 0 for v in mpp) else None


def read_box(
    slide: openslide.AbstractSlide,
    pyramid: Pyramid,
    level: int,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
) -> np.ndarray:
    """RGBA (h, w, 4) uint8 of the level-0 ``box`` (x0, y0, x1, y1; floats) resampled to ``size`` (w, h) from
    ``level``: area average when shrinking, bilinear when enlarging (Pillow's ``resize`` with a box, which weighs
    each output pixel over its exact source interval, so adjacent reads agree). Outside the slide: transparent."""
    downsample = pyramid.downsamples[level]
    lx0, ly0, lx1, ly1 = (v / downsample for v in box)
    rx0, ry0 = math.floor(lx0) - 1, math.floor(ly0) - 1
    rx1, ry1 = math.ceil(lx1) + 1, math.ceil(ly1) + 1
    location = (round(rx0 * downsample), round(ry0 * downsample))
    ox, oy = location[0] / downsample, location[1] / downsample  # where OpenSlide starts the level region
    region = slide.read_region(location, level, (rx1 - rx0, ry1 - ry0))
    shrink = (lx1 - lx0) >= size[0]
    resized = region.resize(
        size,
        Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR,
        box=(lx0 - ox, ly0 - oy, lx1 - ox, ly1 - oy),
    )
    return np.asarray(resized)


@dataclass(frozen=True)
class TissueMap:
    """A slide's tissue mask: (h, w) bool on a grid of ``factor`` level-0 pixels per pixel, the saturation
    threshold used, and the share of the scanned area that is tissue."""

    mask: np.ndarray
    factor: float
    threshold: int
    share: float

    def lookup(self, x0: float, y0: float, fx: float, fy: float, width: int, height: int) -> np.ndarray:
        """(height, width) bool: the mask at the centres of a grid's pixels (``fx`` x ``fy`` level-0 pixels each,
        the first one's corner at level-0 (x0, y0))."""
        rows = np.clip(((y0 + (np.arange(height) + 0.5) * fy) // self.factor).astype(np.int64), 0, None)
        cols = np.clip(((x0 + (np.arange(width) + 0.5) * fx) // self.factor).astype(np.int64), 0, None)
        rows = np.minimum(rows, self.mask.shape[0] - 1)
        cols = np.minimum(cols, self.mask.shape[1] - 1)
        return self.mask[np.ix_(rows, cols)]


_tissue_lock = threading.Lock()
_tissue_cache: dict[tuple[str, str, float | None], TissueMap] = {}


def tissue_map(path: str, fingerprint: str, mpp: float | None = None) -> TissueMap:
    """The tissue mask of the slide at ``path`` (its level-0 pixel size ``mpp`` when ``--mpp`` states it),
    computed once per process (keyed by its fingerprint)."""
    key = (path, fingerprint, mpp)
    with _tissue_lock:
        if key not in _tissue_cache:
            if len(_tissue_cache) >= 8:
                _tissue_cache.pop(next(iter(_tissue_cache)))
            _tissue_cache[key] = _compute_tissue(path, mpp)
        return _tissue_cache[key]


def _compute_tissue(path: str, mpp_asked: float | None) -> TissueMap:
    slide = _open_slide(path, mpp_asked)
    try:
        pyramid = _pyramid(slide, mpp_asked)
        mpp = pyramid.mpp
        side = max(pyramid.width, pyramid.height)
        factor = min(TISSUE_MPP / mpp[0] if mpp else 32.0, side / TISSUE_MIN_SIDE)
        factor = max(1.0, factor, side / TISSUE_MAX_SIDE)
        width, height = grid_size(pyramid.width, pyramid.height, factor)
        level = pyramid.level_for(factor)
        sat = np.zeros((height, width), dtype=np.uint8)
        scanned = np.zeros((height, width), dtype=bool)
        for row in range(0, height, READ_BLOCK):
            for col in range(0, width, READ_BLOCK):
                w, h = min(READ_BLOCK, width - col), min(READ_BLOCK, height - row)
                box = (col * factor, row * factor, (col + w) * factor, (row + h) * factor)
                rgba = read_box(slide, pyramid, level, box, (w, h))
                sat[row : row + h, col : col + w] = saturation(rgba[..., :3])
                scanned[row : row + h, col : col + w] = rgba[..., 3] > 127
    finally:
        slide.close()
    mask, threshold = tissue_mask(sat, scanned)
    share = float(mask.sum() / scanned.sum()) if scanned.any() else 0.0
    log.info("%s: tissue %.1f%% of the slide (saturation >= %d)", path, 100 * share, threshold)
    return TissueMap(mask, factor, threshold, share)


def _pyramid(slide: openslide.AbstractSlide, mpp: float | None = None) -> Pyramid:
    """The slide's levels, with level 0's pixel size ``mpp`` (``--mpp``) or else the one the slide states."""
    return Pyramid(
        tuple((int(w), int(h)) for w, h in slide.level_dimensions),
        tuple(float(d) for d in slide.level_downsamples),
        (mpp, mpp) if mpp is not None else _mpp(slide),
    )


class SlideSource:
    """A whole-slide image opened with OpenSlide; see the module docstring.

    Args:
        path: A local path (OpenSlide reads local files only).
        selection: Bands, nodata, pixel size, tissue detection and ``--mpp`` (see
            :class:`~segpipe.pipeline.scene.Selection`); with ``mpp``, a plain RGB image is read too.

    Raises:
        InputError: OpenSlide cannot open the slide, or the selection asks for what it cannot give.
    """

    name = "slide"

    @classmethod
    def probe(cls, path: str) -> bool:
        """Whether OpenSlide recognises ``path`` as a slide by its content (see the module docstring)."""
        if not _is_local(path):
            return False
        try:
            vendor = openslide.OpenSlide.detect_format(path)
        except (openslide.OpenSlideError, OSError, ValueError):
            return False
        if vendor is None:
            return False
        return vendor != "generic-tiff" or _generic_tiff_is_slide(path)

    def __init__(self, path: str, selection: Selection | None = None) -> None:
        self.selection = selection or Selection()
        if self.selection.mpp is not None and ("://" in path or path.startswith("/vsi")):
            raise InputError(
                f"input {path!r} is at a URL; --mpp reads microscopy images, and those only from local files"
            )
        if not Path(path).exists():  # a Ray worker on a node that does not mount the driver's slide
            raise InputError(
                f"slide {path!r} is not on {socket.gethostname()}; OpenSlide reads local files only: on a cluster "
                "of several machines, put the slide on shared storage mounted at the same path on every node"
            )
        self.slide = _open_slide(path, self.selection.mpp)
        try:
            self.vendor = str(self.slide.properties.get(openslide.PROPERTY_NAME_VENDOR, ""))
            self._file = self._describe(path, _pyramid(self.slide))  # the file as it states itself
            self._info = self._file.select(self.selection)
            assert self._info.pyramid is not None
            self.pyramid = self._info.pyramid  # with --mpp: its pixel size
            self.plan: SlideRead = plan_read(self.pyramid, self.selection.resolution if self.pyramid.mpp else None)
        except BaseException:
            self.slide.close()
            raise

    def _describe(self, path: str, pyramid: Pyramid) -> SceneInfo:
        header = {
            "sizes": pyramid.sizes,
            "downsamples": pyramid.downsamples,
            "mpp": pyramid.mpp,
            "vendor": self.vendor,
            "quickhash": self.slide.properties.get("openslide.quickhash-1"),
        }
        digest = hashlib.sha256(repr(sorted(header.items())).encode())
        digest.update(identity(path).encode("utf-8", "surrogatepass"))
        return SceneInfo(
            path=path,
            width=pyramid.width,
            height=pyramid.height,
            count=3,
            dtype="uint8",
            crs_wkt=None,
            transform=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            nodata=None,
            band_descriptions=("", "", ""),
            georeferenced=False,
            fingerprint=digest.hexdigest(),
            source=self.name,
            colour_interpretations=("red", "green", "blue"),
            scales=(1.0, 1.0, 1.0),
            offsets=(0.0, 0.0, 0.0),
            pyramid=pyramid,
            mpp=pyramid.mpp,
        )

    @property
    def info(self) -> SceneInfo:
        return self._info

    @property
    def file(self) -> SceneInfo:
        """The description of the whole file as it states itself (no selection, no ``--mpp``)."""
        return self._file

    @property
    def tissue(self) -> TissueMap | None:
        """The slide's tissue mask when the selection asks for one."""
        if self.selection.tissue != "otsu":
            return None
        return tissue_map(self._info.path, self._file.fingerprint, self.selection.mpp)

    def read(self, window: Window, *, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (bands, h, w) uint8 and validity (h, w) uint8 of ``window`` of the scene grid, or of the same
        area resampled to ``out_shape`` (read from the pyramid level that suits it: previews).

        Raises:
            InputError: OpenSlide cannot decode the region (a truncated or corrupt file).
        """
        factor = self.plan.factor
        fx = fy = factor
        height, width = window.height, window.width
        level = self.plan.level
        if out_shape is not None:
            height, width = out_shape
            fx, fy = factor * window.width / width, factor * window.height / height
            level = self.pyramid.level_for(min(fx, fy))
        x0, y0 = window.col_off * factor, window.row_off * factor
        try:
            if out_shape is None and not self.plan.resampled:
                ds = self.pyramid.downsamples[level]  # the scene grid is this level: read it as it is
                location = (round(window.col_off * ds), round(window.row_off * ds))
                rgba = np.asarray(self.slide.read_region(location, level, (width, height)))
            else:
                rgba = np.empty((height, width, 4), dtype=np.uint8)
                for row in range(0, height, READ_BLOCK):
                    for col in range(0, width, READ_BLOCK):
                        w, h = min(READ_BLOCK, width - col), min(READ_BLOCK, height - row)
                        bx, by = x0 + col * fx, y0 + row * fy
                        box = (bx, by, bx + w * fx, by + h * fy)
                        rgba[row : row + h, col : col + w] = read_box(self.slide, self.pyramid, level, box, (w, h))
        except openslide.OpenSlideError as exc:
            raise InputError(
                f"slide {self._info.path!r} could not be read at pixels x {window.col_off}-"
                f"{window.col_off + window.width}, y {window.row_off}-{window.row_off + window.height} ({exc}); "
                "the file is truncated or corrupt"
            ) from None
        data = np.ascontiguousarray(np.moveaxis(rgba[..., :3], -1, 0))
        valid = rgba[..., 3] > 127
        selection = self.selection
        if selection.bands is not None:
            data = data[[b - 1 for b in selection.bands]]
        if selection.nodata is not None:
            valid &= ~selection.invalid(data)
        tissue = self.tissue
        if tissue is not None:
            valid &= tissue.lookup(x0, y0, fx, fy, width, height)
        return data, valid.astype(np.uint8)

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> SlideSource:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
