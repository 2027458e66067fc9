"""Training labels as polygons: a GeoJSON or GeoPackage file rasterised onto each training image's grid.

:func:`read_polygon_labels` reads the polygons once (pyogrio; only the class attribute), gives each a class id, and
:func:`rasterise_labels` burns those that overlap one image into an (H, W) uint8 class-id mask on that image's
pixel grid (its CRS, affine transform and size), reprojecting them from the file's CRS when it differs
(:func:`rasterio.warp.transform_geom`). A pixel is a polygon's when its centre lies inside it
(:func:`rasterio.features.rasterize`, ``all_touched=False``), so a polygon of area A m² on a grid of p x p m pixels
covers about A / p² pixels, to within its boundary pixels; where polygons overlap, the later one in the file wins.

Classes. With a class attribute (``field``), each polygon's value is a class name (matched exactly, then ignoring
case) or a class id (an integer, or text of digits). Without one, every polygon is class 1, and the pixels no
polygon covers get ``fill`` (class 0, the background, by default). A value that is no class is an
:class:`~segpipe.core.errors.InputError` naming the file, the attribute and the values, unless ``unknown="ignore"``:
then those polygons' pixels get ``ignore_index`` (left out of the loss and the metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.transform import Affine, array_bounds
from rasterio.warp import transform_bounds, transform_geom

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.raster import open_raster

log = logging.getLogger(__name__)

_POLYGONAL = (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON)


@dataclass(frozen=True)
class PolygonLabels:
    """The polygons of a label file with their class ids, indexed for lookups by area.

    Attributes:
        path: The file.
        crs: Its CRS, or None when the file states none.
        geometries: The polygons (shapely), in file order.
        class_ids: One uint8 class id (or the ignore index) per polygon.
        tree: A spatial index of ``geometries``.
    """

    path: Path
    crs: CRS | None
    geometries: np.ndarray
    class_ids: np.ndarray
    tree: shapely.STRtree


@dataclass(frozen=True)
class ImageGrid:
    """An image's pixel grid: CRS (None when not georeferenced), affine transform (pixel -> CRS units), size in px."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int


def image_grid(path: str | Path) -> ImageGrid:
    """The pixel grid of a raster file (read from its header only)."""
    with open_raster(str(path), role="image", hint="give a GeoTIFF image") as src:
        return ImageGrid(src.crs, src.transform, src.width, src.height)


def read_polygon_labels(
    path: str | Path,
    *,
    class_names: Sequence[str],
    field: str | None = None,
    layer: str | None = None,
    unknown: Literal["error", "ignore"] = "error",
    ignore_index: int = 255,
) -> PolygonLabels:
    """Read the polygons of ``path`` (GeoJSON or GeoPackage) and their class ids (see the module docstring).

    Raises:
        InputError: the file cannot be read, has no polygon, or a polygon's class is unknown (``unknown="error"``).
        ConfigError: ``field`` or ``layer`` is not in the file.
    """
    path = Path(path)
    meta, wkb, values = _read_layer(path, field, layer)
    geometries = shapely.from_wkb(wkb) if len(wkb) else np.empty(0, dtype=object)
    polygonal = ~shapely.is_missing(geometries) & np.isin(shapely.get_type_id(geometries), _POLYGONAL)
    polygonal &= ~shapely.is_empty(geometries)
    if not polygonal.any():
        raise InputError(f"{path}: no polygon in the label file ({len(geometries)} feature(s)); labels are polygons")
    if not polygonal.all():
        log.warning("%s: %d feature(s) that are not polygons are not used", path, int((~polygonal).sum()))
    geometries = geometries[polygonal]
    if values is None:
        ids = np.ones(len(geometries), dtype=np.uint8)
    else:
        ids = label_class_ids(
            values[polygonal],
            class_names,
            where=f"{path}: attribute {field!r}",
            unknown=unknown,
            ignore_index=ignore_index,
        )
    crs = CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
    return PolygonLabels(path, crs, geometries, ids, shapely.STRtree(geometries))


def _read_layer(path: Path, field: str | None, layer: str | None) -> tuple[dict[str, Any], np.ndarray, Any]:
    """(layer metadata, WKB geometries, the field's values or None) of one layer of a vector file."""
    import pyogrio  # lazy: 0.5-0.8 s; only a run with --labels reads polygons
    from pyogrio.raw import read  # lazy: as pyogrio above

    if not path.is_file():
        raise InputError(f"label file {path} does not exist; check the path")
    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
    except Exception as error:  # pyogrio raises DataSourceError and others for unreadable files
        raise InputError(
            f"{path}: not a vector file GDAL reads ({str(error)[:200]}); give GeoJSON or GeoPackage"
        ) from None
    if layer is not None and layer not in layers:
        raise ConfigError(f"--label-layer {layer!r}: {path} has the layer(s) {', '.join(layers)}")
    name = layer if layer is not None else layers[0]
    if layer is None and len(layers) > 1:
        log.warning("%s has %d layers; reading %r (--label-layer to choose)", path, len(layers), name)
    fields = [str(f) for f in pyogrio.read_info(path, layer=name)["fields"]]
    if field is not None and field not in fields:
        raise ConfigError(f"--label-field {field!r}: layer {name!r} of {path} has the attributes {', '.join(fields)}")
    meta, _, wkb, data = read(path, layer=name, columns=[field] if field is not None else [])
    return meta, wkb, data[0] if field is not None else None


def label_class_ids(
    values: np.ndarray,
    class_names: Sequence[str],
    *,
    where: str,
    unknown: Literal["error", "ignore"] = "error",
    ignore_index: int = 255,
) -> np.ndarray:
    """uint8 class ids of attribute ``values``: class names (exact, else ignoring case) or ids 0..k-1 (integers or
    text of digits); unknown values (None included) raise InputError naming ``where``, or get ``ignore_index``."""
    k = len(class_names)
    exact = {name: i for i, name in enumerate(class_names)}
    folded = {name.lower(): i for i, name in enumerate(class_names)}
    out = np.empty(len(values), dtype=np.uint8)
    odd: list[Any] = []
    for n, value in enumerate(values):
        found = _class_id(value, exact, folded, k)
        if found is None:
            odd.append(value.item() if isinstance(value, np.generic) else value)
            found = ignore_index
        out[n] = found
    if odd and unknown == "error":
        shown = ", ".join(sorted({repr(v) for v in odd})[:5])
        raise InputError(
            f"{where}: {len(odd)} polygon(s) have values that are no class ({shown}); expected class names "
            f"({', '.join(class_names)}) or ids 0..{k - 1}; fix the labels or pass --unknown-colours ignore"
        )
    if odd:
        log.info("%s: %d polygon(s) of unknown class left out (ignore index %d)", where, len(odd), ignore_index)
    return out


def _class_id(value: Any, exact: dict[str, int], folded: dict[str, int], k: int) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer) or (isinstance(value, float | np.floating) and float(value).is_integer()):
        number = int(value)
        return number if 0 <= number < k else None
    if isinstance(value, str):
        text = value.strip()
        if text in exact:
            return exact[text]
        if text.lower() in folded:
            return folded[text.lower()]
        if text.isdigit() and int(text) < k:
            return int(text)
    return None


def rasterise_labels(labels: PolygonLabels, grid: ImageGrid, *, fill: int = 0, where: str = "the image") -> np.ndarray:
    """The (H, W) uint8 class ids of ``grid``'s pixels: the polygons of ``labels`` that overlap it, reprojected to
    its CRS, burnt in file order over ``fill`` (pixel centres inside a polygon take its class).

    Raises:
        InputError: the image is not georeferenced, or the file and the image have no CRS to relate them by.
    """
    if grid.crs is None or grid.transform == Affine.identity():
        raise InputError(
            f"{where} is not georeferenced (no CRS or transform); polygon labels need georeferenced images "
            "(GeoTIFF), or give masks/ beside images/"
        )
    if labels.crs is None:
        raise InputError(f"{labels.path} states no CRS; write it with one (e.g. ogr2ogr -a_srs EPSG:XXXX)")
    west, south, east, north = array_bounds(grid.height, grid.width, grid.transform)
    if labels.crs != grid.crs:
        west, south, east, north = transform_bounds(grid.crs, labels.crs, west, south, east, north, densify_pts=21)
    hits = np.sort(labels.tree.query(shapely.box(west, south, east, north)))
    out = np.full((grid.height, grid.width), fill, dtype=np.uint8)
    if not len(hits):
        log.warning("%s: no polygon of %s overlaps it; all its pixels are class %d", where, labels.path, fill)
        return out
    shapes: list[Any] = [shapely.geometry.mapping(g) for g in labels.geometries[hits]]
    if labels.crs != grid.crs:
        shapes = transform_geom(labels.crs, grid.crs, shapes)
    burnt = zip(shapes, (int(i) for i in labels.class_ids[hits]), strict=True)
    return rasterize(burnt, out=out, transform=grid.transform, all_touched=False)
