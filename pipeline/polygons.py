"""Polygons of a mask: ``--vector PATH`` (``.gpkg``, ``.geojson``, ``.parquet``), block by block, in bounded memory.

A mask (one uint8 band of class ids, nodata 255) is read in square blocks of ``block`` pixels and each block is
polygonised with GDAL's polygoniser (:func:`rasterio.features.shapes`, 4-connected, nodata excluded), in pixel
coordinates. A polygon that touches no inner block edge is final and is yielded at once. A polygon that touches one
was cut by it: a piece. Pieces are gathered into groups, not unioned: when a row of blocks is done, its pieces join
the groups they touch (same class; from the row above, only the pieces on its lower edge can), and a group that no
longer reaches the lower edge of the row is complete: its pieces are unioned once (:func:`shapely.union_all`) and
split into polygons (see :func:`merge_row`). Memory is thus bounded by one row of blocks and the pieces of the
polygons that cross its lower edge, not by the scene (only a polygon as large as the scene, which is written whole,
is held whole, as pieces), and each polygon is unioned once, so time grows with the pixels. Since the pieces are
unioned exactly (integer pixel coordinates) and every polygon is brought to one canonical form (collinear vertices
dropped, rings normalised), any block size gives the same polygons (``tests/pipeline/test_polygons.py``).

Units: polygonising works in the mask's pixels (x = column, y = row). The polygons are then mapped through the
mask's affine transform: a georeferenced mask's into CRS units, a slide's mask (no CRS) into level-0 pixels (its
transform is identity on level 0's grid, a scale when it was read at a coarser level; the run passes the scene's).
``simplify`` is a tolerance and ``min_area`` and the ``area`` property are areas in those units: metres and m² for a
projected CRS, level-0 pixels and pixels² for a slide.

The features are written by the ``vector`` sink (:mod:`segpipe.pipeline.sinks.vector`: GeoPackage, GeoJSON,
GeoParquet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window as RasterioWindow

from segpipe.core.colours import hex_colour
from segpipe.core.errors import ConfigError, InputError
from segpipe.core.raster import GDAL_CACHE_BYTES, open_raster
from segpipe.core.tiles import TileGrid, Window
from segpipe.pipeline import store as ws

log = logging.getLogger(__name__)

#: Pixels per side of one block read and polygonised at a time.
BLOCK = 2048
#: Features per batch handed to a writer.
BATCH = 8192
#: The colour of a class the mask gives none (QuPath needs one).
GREY = "#808080"

Polygoniser = Iterator[tuple[shapely.Polygon, int]]


# --- classes and features ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskClasses:
    """Class names and ``#RRGGBB`` colours by class id, as the mask COG records them.

    Attributes:
        names: Class names in class-id order.
        colours: ``#RRGGBB`` per class id (may be shorter than ``names``, or empty).
    """

    names: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()

    def name(self, class_id: int) -> str:
        """The class's name; its id as text when the mask names it not."""
        return self.names[class_id] if class_id < len(self.names) and self.names[class_id] else str(class_id)

    def colour(self, class_id: int) -> str:
        """The class's ``#RRGGBB`` colour; grey when the mask gives none."""
        return self.colours[class_id] if class_id < len(self.colours) else GREY

    @classmethod
    def from_mask(cls, src: Any) -> MaskClasses:
        """Read them from an open mask (a rasterio dataset): the band's ``CLASS_<id>`` tags (else the dataset's
        ``CLASS_NAMES``) and its colour table, both as :func:`segpipe.pipeline.sinks.cog.export_cog` writes them."""
        band = src.tags(1)
        ids = sorted(int(k[6:]) for k in band if k.startswith("CLASS_") and k[6:].isdigit())
        if ids:
            names = tuple(band.get(f"CLASS_{i}", str(i)) for i in range(ids[-1] + 1))
        else:
            names = tuple(n for n in src.tags().get("CLASS_NAMES", "").split(",") if n)
        try:
            table = src.colormap(1)
        except ValueError:  # no colour table
            return cls(names, ())
        count = max(len(names), 1 + max((i for i, c in table.items() if c[3] and i != ws.MASK_NODATA), default=-1))
        return cls(names, tuple(hex_colour(table.get(i, (128, 128, 128))) for i in range(count)))


@dataclass(frozen=True)
class Feature:
    """One output polygon.

    Attributes:
        geometry: The polygon, in CRS units (pixels for a mask without a CRS).
        class_id: Its class id in the mask.
        area: Its area in CRS units² (pixels²), as written (after any simplification).
    """

    geometry: shapely.Polygon
    class_id: int
    area: float


@dataclass(frozen=True)
class MaskInfo:
    """What the writers need to know of a mask: its grid and classes.

    Attributes:
        width: Pixels.
        height: Pixels.
        crs_wkt: The CRS as WKT; None for a mask without one (a slide: pixel coordinates).
        transform: Mask pixel -> CRS units (level-0 pixels for a slide's mask without a CRS).
        nodata: The value that is never a polygon (255 for segpipe's masks).
        classes: Names and colours.
    """

    width: int
    height: int
    crs_wkt: str | None
    transform: Affine
    nodata: int | None
    classes: MaskClasses = field(default_factory=MaskClasses)

    @property
    def georeferenced(self) -> bool:
        return self.crs_wkt is not None


def read_mask_info(path: str) -> MaskInfo:
    """The grid and classes of the mask at ``path`` (a local path or URL).

    Raises:
        InputError: it is not a mask (one uint8 band).
    """
    with open_raster(path, role="mask", hint="give a mask written by segpipe run") as src:
        if src.count != 1 or src.dtypes[0] != "uint8":
            raise InputError(f"{path!r} is not a mask (one uint8 band of class ids); it has {src.count} band(s)")
        return MaskInfo(
            width=src.width,
            height=src.height,
            crs_wkt=src.crs.to_wkt() if src.crs else None,
            transform=src.transform,
            nodata=int(src.nodata) if src.nodata is not None else None,
            classes=MaskClasses.from_mask(src),
        )


# --- polygonising, in pixels -------------------------------------------------------------------------------


def touches_inner_edge(bounds: np.ndarray, window: Window, width: int, height: int) -> np.ndarray:
    """Whether polygons with ``bounds`` ((N, 4) minx, miny, maxx, maxy in pixels), polygonised inside ``window``,
    touch one of its edges that is not the scene's edge (and so may go on in the next block); (N,) bool."""
    minx, miny, maxx, maxy = np.asarray(bounds, dtype=np.float64).reshape(-1, 4).T
    right, bottom = window.col_off + window.width, window.row_off + window.height
    return (
        ((window.col_off > 0) & (minx <= window.col_off))
        | ((right < width) & (maxx >= right))
        | ((window.row_off > 0) & (miny <= window.row_off))
        | ((bottom < height) & (maxy >= bottom))
    )


def canonical(polygons: Any) -> Any:
    """One form per shape (a polygon or an array of them): collinear vertices dropped (a former block edge leaves
    one) and the rings normalised (start vertex and orientation), so that equal areas give equal coordinates
    whatever the block size."""
    return shapely.normalize(shapely.simplify(polygons, 0.0))


def polygonise_block(data: np.ndarray, window: Window, *, nodata: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The 4-connected polygons of one block of class ids, in scene pixel coordinates, and their class ids (two
    (N,) arrays); ``nodata`` is never one. The polygons are built in one call from GDAL's rings."""
    valid = data != nodata if nodata is not None else None
    if valid is not None and not valid.any():
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
    offset = Affine.translation(window.col_off, window.row_off)
    coords: list[tuple[float, float]] = []
    ring_ends, polygon_ends, values = [0], [0], []
    for geometry, value in rasterio.features.shapes(data, mask=valid, connectivity=4, transform=offset):
        for ring in geometry["coordinates"]:
            coords.extend(ring)
            ring_ends.append(len(coords))
        polygon_ends.append(len(ring_ends) - 1)
        values.append(int(value))
    if not values:
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
    polygons = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON,
        np.asarray(coords, dtype=np.float64),
        (np.asarray(ring_ends, dtype=np.int64), np.asarray(polygon_ends, dtype=np.int64)),
    )
    return polygons, np.asarray(values, dtype=np.int64)


@dataclass
class Group:
    """Pieces of one class (pixel polygons cut by block edges) known to be connected: the parts of one polygon (or
    of a few that touch only at a corner, which the union splits again).

    Attributes:
        pieces: Every piece so far, in pixel coordinates.
        frontier: Those on the lower edge of the last row of blocks merged: only they can touch the next row.
    """

    pieces: list[shapely.Polygon]
    frontier: list[shapely.Polygon] = field(default_factory=list)

    def polygons(self) -> Any:
        """The polygons of a complete group: its pieces unioned once and split into connected parts, canonical.

        For a polygon as large as the mask this is the peak of memory: GEOS's working memory for the union and for
        :func:`canonical`'s simplification, each a few hundred bytes per vertex (about 250 MiB each for 735 000)."""
        merged = shapely.union_all(self.pieces) if len(self.pieces) > 1 else self.pieces[0]
        return canonical(shapely.get_parts(merged))


def merge_row(
    groups: list[Group], pieces: list[shapely.Polygon], bottom: int | None
) -> tuple[list[Group], list[Group]]:
    """Join one row of blocks' pieces of a class to that class's open groups: (groups still open, complete ones).

    Pieces that intersect (share an edge across a block boundary, or a corner) are connected, and so are a piece and
    a group whose frontier it intersects: union-find over these pairs (an STRtree finds them) merges lists, no
    geometry is unioned. A group is open while one of its pieces reaches ``bottom``, the row's lower edge in pixels
    (None: the mask's, where nothing goes on); else it is complete and unioned once by :meth:`Group.polygons`. Why
    groups and not a union per row: a polygon spanning the mask would be unioned again with every row, time
    quadratic in its size; here each polygon is unioned once, from its pieces. Memory: the open groups' pieces.
    """
    parent = list(range(len(groups) + len(pieces)))  # nodes: the groups, then the pieces

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if pieces:
        tree = shapely.STRtree(pieces)
        left, right = tree.query(pieces, predicate="intersects")
        pairs = list(zip((left + len(groups)).tolist(), (right + len(groups)).tolist(), strict=True))
        owners = [g for g, group in enumerate(groups) for _ in group.frontier]
        if owners:
            edge, found = tree.query([p for group in groups for p in group.frontier], predicate="intersects")
            pairs += zip([owners[i] for i in edge.tolist()], (found + len(groups)).tolist(), strict=True)
        for a, b in pairs:
            parent[find(a)] = find(b)
    reaches = shapely.bounds(pieces)[:, 3] >= bottom if pieces and bottom is not None else np.zeros(len(pieces), bool)
    merged: dict[int, Group] = {}
    for g in sorted(range(len(groups)), key=lambda g: -len(groups[g].pieces)):  # the largest list is extended
        if (root := find(g)) in merged:
            merged[root].pieces.extend(groups[g].pieces)
        else:
            merged[root] = Group(groups[g].pieces)
    for i, piece in enumerate(pieces):
        into = merged.setdefault(find(len(groups) + i), Group([]))
        into.pieces.append(piece)
        if reaches[i]:
            into.frontier.append(piece)
    still_open = [group for group in merged.values() if group.frontier]
    return still_open, [group for group in merged.values() if not group.frontier]


def polygonise(
    read: Callable[[Window], np.ndarray],
    width: int,
    height: int,
    *,
    block: int = BLOCK,
    nodata: int | None = ws.MASK_NODATA,
    progress: Callable[[int], Any] | None = None,
) -> Polygoniser:
    """The polygons of a mask, block by block: (polygon in pixel coordinates, class id), in canonical form.

    Polygons cut by block edges are merged (see the module docstring); the result does not depend on ``block``.

    Args:
        read: Returns the (height, width) class ids of a window of the mask.
        width: Mask width in pixels.
        height: Mask height in pixels.
        block: Pixels per side of one block (>= 1).
        nodata: The value that is never a polygon (None: every value is a class).
        progress: Called with the pixels of each block read.
    """
    if block < 1:
        raise ConfigError(f"block must be >= 1 pixel, got {block}")
    grid = TileGrid(width, height, block, 0)
    groups: dict[int, list[Group]] = {}  # class id -> open groups (pieces reaching the lower edge of the last row)
    for row in range(grid.rows):
        pieces: dict[int, list[shapely.Polygon]] = {}  # class id -> this row's polygons cut by a block edge
        for col in range(grid.cols):
            window = grid.tile(row, col).core
            polygons, values = polygonise_block(np.ascontiguousarray(read(window)), window, nodata=nodata)
            cut = touches_inner_edge(shapely.bounds(polygons), window, width, height)
            for polygon, value in zip(polygons[cut], values[cut].tolist(), strict=True):
                pieces.setdefault(value, []).append(polygon)
            yield from zip(canonical(polygons[~cut]), values[~cut].tolist(), strict=True)
            if progress:
                progress(window.area)
        bottom = min((row + 1) * block, height)
        carried: dict[int, list[Group]] = {}
        for value in sorted(groups.keys() | pieces.keys()):
            still_open, complete = merge_row(
                groups.get(value, []), pieces.get(value, []), bottom if bottom < height else None
            )
            if still_open:
                carried[value] = still_open
            for group in complete:
                yield from ((polygon, value) for polygon in group.polygons())
        groups = carried


# --- features, in CRS units --------------------------------------------------------------------------------


def to_crs_units(polygons: Any, transform: Affine) -> Any:
    """Map a polygon (or an array of them) from pixel coordinates (x = column, y = row) to CRS units through the
    affine ``transform``."""
    a, b, c, d, e, f = transform[:6]
    matrix = np.array([[a, d], [b, e]])
    return shapely.transform(polygons, lambda xy: xy @ matrix + (c, f))


def features(
    polygons: Iterable[tuple[shapely.Polygon, int]],
    *,
    transform: Affine | None,
    simplify: float = 0.0,
    min_area: float = 0.0,
) -> Iterator[Feature]:
    """Features from pixel polygons, a batch at a time.

    Args:
        polygons: (polygon in pixels, class id), as :func:`polygonise` yields them.
        transform: Pixel -> CRS transform; None keeps pixel coordinates (a mask without a CRS).
        simplify: Douglas-Peucker tolerance in CRS units (pixels without a CRS), topology-preserving within each
            polygon (rings neither cross nor vanish); 0 keeps every vertex. Neighbours are simplified apart, so
            their shared edges may part by up to ``simplify``.
        min_area: Polygons smaller than this, in CRS units² (pixels²) before simplification, are dropped.
    """
    iterator = iter(polygons)
    while batch := list(islice(iterator, BATCH)):
        geometries = np.empty(len(batch), dtype=object)
        geometries[:] = [g for g, _ in batch]
        values = [v for _, v in batch]
        if transform is not None:
            geometries = to_crs_units(geometries, transform)
        areas = shapely.area(geometries)
        keep = areas >= min_area
        if simplify > 0:
            geometries[keep] = shapely.simplify(geometries[keep], simplify, preserve_topology=True)
            areas[keep] = shapely.area(geometries[keep])
        for index in np.flatnonzero(keep).tolist():
            yield Feature(geometries[index], values[index], float(areas[index]))


def mask_features(
    path: str,
    *,
    block: int = BLOCK,
    simplify: float = 0.0,
    min_area: float = 0.0,
    transform: Affine | None = None,
    progress: Callable[[int], Any] | None = None,
) -> Iterator[Feature]:
    """The features of the mask at ``path``, read block by block (see :func:`polygonise` and :func:`features`).

    Args:
        transform: Mask pixel -> output coordinates; default the mask's own: into CRS units, or, for a slide's mask
            without a CRS, into level-0 pixels (identity when the mask is on level 0's grid, or has no transform).
    """
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), open_raster(path, role="mask") as src:
        nodata = int(src.nodata) if src.nodata is not None else None

        def read(window: Window) -> np.ndarray:
            return src.read(1, window=RasterioWindow(window.col_off, window.row_off, window.width, window.height))

        polygons = polygonise(read, src.width, src.height, block=block, nodata=nodata, progress=progress)
        transform = transform if transform is not None else src.transform
        mapping = None if transform.is_identity else transform
        yield from features(polygons, transform=mapping, simplify=simplify, min_area=min_area)
