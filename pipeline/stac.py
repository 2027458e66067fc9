"""STAC for the outputs of a data set: one Item per scene beside its mask, and one Collection for the data set.

The Item (``<scene>.item.json``) describes the mask COG (and the probabilities COG) with the projection, raster,
classification and file extensions (class ids, names and colours; nodata 255; SHA-256 multihash and size), links
to the source (the STAC item the scene came from, or its file) with ``derived_from``, and records the software and
model that made it (``processing:software``, ``segpipe:model``, ``segpipe:key``). The Collection
(``collection.json``) lists every item of the output folder, with their joint extent, and is rewritten atomically
at the end of each run. Hrefs inside the folder are relative, so the folder can be moved or served as it is.

A whole-slide image has no place on Earth: its Item has ``"geometry": null`` and no ``bbox`` (what STAC allows
for an item that is not georeferenced), no projection extension, and records the slide's pixel size instead
(``segpipe:slide``: micrometres per pixel of the mask and of level 0, level-0 pixels per mask pixel, level-0
size); its mask asset is the pyramidal OME-TIFF (``image/tiff``). The polygons of ``--vector-format`` are an
asset too (``polygons``: GeoPackage, GeoJSON or GeoParquet).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pystac
from affine import Affine
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.crs import CRS
from rasterio.warp import transform_geom

from segpipe.core.errors import SegpipeError
from segpipe.core.location import Location
from segpipe.core.version import VERSION
from segpipe.pipeline.scene import is_slide_name

PROCESSING_EXTENSION = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
COLLECTION_FILE = "collection.json"
#: Media types of the polygon files, by suffix.
VECTOR_MEDIA_TYPES = {
    ".gpkg": "application/geopackage+sqlite3",
    ".geojson": "application/geo+json",
    ".parquet": "application/vnd.apache.parquet",
}


def _footprint(scene: dict[str, Any]) -> tuple[dict[str, Any] | None, list[float] | None]:
    """GeoJSON polygon and bbox in WGS84 of a scene's grid (None for a scene without a CRS)."""
    if not scene.get("crs_wkt"):
        return None, None
    transform = Affine(*scene["transform"])
    w, h = scene["width"], scene["height"]
    ring = [transform @ corner for corner in ((0, 0), (w, 0), (w, h), (0, h), (0, 0))]
    polygon = {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}
    geometry = transform_geom(CRS.from_wkt(scene["crs_wkt"]), "EPSG:4326", polygon, precision=7)
    xs = [p[0] for p in geometry["coordinates"][0]]
    ys = [p[1] for p in geometry["coordinates"][0]]
    return dict(geometry), [min(xs), min(ys), max(xs), max(ys)]


def scene_item(
    summary: dict[str, Any],
    *,
    scene: dict[str, Any],
    item_id: str,
    folder: str,
    mask: str,
    probabilities: str | None,
    classes: Sequence[str],
    colours: Sequence[str],
    source: str,
    source_item: dict[str, Any] | None = None,
    vector: str | None = None,
) -> dict[str, Any]:
    """The STAC Item (a dict) of one scene's outputs.

    Args:
        summary: The run summary of the scene.
        scene: The scene's description (``SceneInfo.to_attrs()``).
        item_id: The item's id (the scene's id in the data set).
        folder: The output folder; asset hrefs are relative to it.
        mask: The mask COG (or a slide's OME-TIFF); ``probabilities`` the probabilities COG, or None.
        classes: Class names in class-id order; ``colours`` their ``#RRGGBB``.
        source: Where the scene came from (a STAC item's href, or the file's path or URL).
        source_item: The STAC item it came from, whose geometry and datetime the output keeps.
        vector: The polygons file, or None.
    """
    item = _item(summary, scene, item_id, source_item)
    slide = scene.get("pyramid")
    resolution = None if slide else abs(float(scene["transform"][0])) or None
    mask_classes = [
        Classification.create(value=i, description=name, name=_class_name(name), color_hint=colour.lstrip("#").upper())
        for i, (name, colour) in enumerate(zip(classes, colours, strict=True))
    ]
    _raster_asset(item, "mask", mask, folder, resolution=resolution, bands=1, classes=mask_classes)
    if probabilities:
        _raster_asset(item, "probabilities", probabilities, folder, resolution=resolution, bands=len(classes))
    if vector:
        _vector_asset(item, vector, folder, qupath=bool(slide))
    item.add_link(pystac.Link(rel="derived_from", target=source, media_type=_source_type(source, source_item)))
    item.add_link(pystac.Link(rel="collection", target=f"./{COLLECTION_FILE}", media_type=pystac.MediaType.JSON))
    data: dict[str, Any] = item.to_dict(include_self_link=False, transform_hrefs=False)
    data["collection"] = collection_id(folder)
    return data


def _item(
    summary: dict[str, Any], scene: dict[str, Any], item_id: str, source_item: dict[str, Any] | None
) -> pystac.Item:
    """The Item without assets: where and when (the source item's geometry and datetime, else the scene's
    footprint and now; a slide's pixel size instead of a place), what made it and its key."""
    geometry, bbox = _footprint(scene)
    when = dt.datetime.now(dt.UTC)
    if source_item is not None:
        geometry = source_item.get("geometry", geometry)
        bbox = source_item.get("bbox", bbox)
        stamp = source_item.get("properties", {}).get("datetime")
        if stamp:
            when = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    model = summary["model"]
    item = pystac.Item(
        id=item_id,
        geometry=geometry,
        bbox=bbox,
        datetime=when,
        properties={
            "created": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            "processing:software": {"segpipe": VERSION},
            "segpipe:model": {k: model[k] for k in ("name", "architecture", "sha256")},
            "segpipe:key": summary["key"]["digest"],
            "segpipe:class_shares": summary["class_histogram"],
        },
    )
    item.stac_extensions.append(PROCESSING_EXTENSION)
    slide = scene.get("pyramid")
    if slide:  # no CRS, no footprint: the pixel size is what places it
        item.properties["segpipe:slide"] = {
            "mpp": scene.get("mpp"),
            "level0_mpp": slide.get("mpp"),
            "level0_pixels_per_pixel": abs(float(scene["transform"][0])),
            "level0_size": slide["sizes"][0],
        }
    else:
        _projection(ProjectionExtension.ext(item, add_if_missing=True), scene)
    return item


def _raster_asset(
    item: pystac.Item,
    key: str,
    href: str,
    folder: str,
    *,
    resolution: float | None,
    bands: int,
    classes: list[Classification] | None = None,
) -> None:
    """Add the mask (``key`` ``mask``: class ids, their ``classes``) or the probabilities (probability x 254) as an
    asset: media type, raster bands (uint8, nodata 255) and, when it can be read, its checksum and size."""
    is_ome = href.lower().endswith((".ome.tif", ".ome.tiff"))
    is_mask = key == "mask"
    title = "class ids (255: nodata)" if is_mask else "per-class probability x 254 (255: nodata)"
    asset = pystac.Asset(
        href=_relative(href, folder),
        media_type=pystac.MediaType.TIFF if is_ome else pystac.MediaType.COG,
        title=title + (", pyramidal OME-TIFF" if is_ome else ""),
        roles=["data", "segmentation"] if is_mask else ["data", "probabilities"],
    )
    item.add_asset(key, asset)
    RasterExtension.ext(asset, add_if_missing=True).bands = [
        RasterBand.create(
            nodata=255, data_type=DataType.UINT8, spatial_resolution=resolution, scale=None if is_mask else 1 / 254
        )
        for _ in range(bands)
    ]
    if classes is not None:
        ClassificationExtension.ext(asset, add_if_missing=True).classes = classes
    _file_meta(asset, href)


def _vector_asset(item: pystac.Item, href: str, folder: str, *, qupath: bool) -> None:
    """Add the polygons as an asset (``qupath``: a slide's GeoJSON, QuPath's annotations in level-0 pixels)."""
    suffix = Path(href).suffix.lower()
    asset = pystac.Asset(
        href=_relative(href, folder),
        media_type=VECTOR_MEDIA_TYPES.get(suffix),
        title="polygons of the mask"
        + (" (QuPath annotations, level-0 pixels)" if qupath and suffix == ".geojson" else ""),
        roles=["data", "polygons"],
    )
    item.add_asset("polygons", asset)
    _file_meta(asset, href)


def _file_meta(asset: pystac.Asset, href: str) -> None:
    """The file extension's checksum (SHA-256 multihash) and size of an output that can be read."""
    try:
        data = Location(href).read_bytes()
    except SegpipeError:
        return
    file = FileExtension.ext(asset, add_if_missing=True)
    file.checksum, file.size = "1220" + hashlib.sha256(data).hexdigest(), len(data)


def _projection(proj: Any, scene: dict[str, Any]) -> None:
    """The projection extension's fields of a scene's grid (``proj:code`` null without a CRS)."""
    if scene.get("crs_wkt"):
        epsg = CRS.from_wkt(scene["crs_wkt"]).to_epsg()
        if epsg:
            proj.code = f"EPSG:{epsg}"
        else:
            proj.wkt2 = scene["crs_wkt"]
    else:
        proj.code = None
    proj.shape = [scene["height"], scene["width"]]
    proj.transform = list(scene["transform"])


def _class_name(name: str) -> str:
    """A class name as the classification extension's ``name`` field wants it: letters, digits, ``_`` and ``-``."""
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name) or "class"


def _source_type(source: str, item: dict[str, Any] | None) -> str | None:
    if item is not None or source.endswith(".json"):
        return "application/geo+json"
    return None if is_slide_name(source) else "image/tiff"  # a vendor's slide format has no registered type


def _relative(href: str, folder: str) -> str:
    prefix = folder.rstrip("/") + "/"
    return "./" + href[len(prefix) :] if href.startswith(prefix) else href


def collection_id(folder: str) -> str:
    """The id of a data set's collection: the output folder's name."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    return "".join(ch if ch.isalnum() or ch in "_-." else "-" for ch in name) or "segpipe"


def item_path(folder: str, scene_id: str) -> str:
    """Where a scene's STAC Item goes: ``<folder>/<scene>.item.json``."""
    return str(Location(folder).child(f"{scene_id}.item.json"))


def write_item(folder: str, scene_id: str, item: dict[str, Any]) -> None:
    """Write a scene's STAC Item beside its outputs, atomically: the last file of a scene's night (a scene without
    one is done again)."""
    Location(item_path(folder, scene_id)).write_json(item)


def read_items(folder: str) -> list[dict[str, Any]]:
    """Every STAC Item (``*.item.json``) of the output folder that reads as JSON, sorted by file name."""
    return [item for found in Location(folder).list(".item.json") if (item := found.read_json())]


def write_collection(folder: str, items: Sequence[dict[str, Any]], *, description: str) -> str:
    """Write ``collection.json`` of the output folder, listing ``items`` (every item of the folder), atomically;
    returns its path."""
    bboxes = [i["bbox"] for i in items if i.get("bbox")]
    spatial = (
        [[min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes), max(b[3] for b in bboxes)]]
        if bboxes
        else [[-180.0, -90.0, 180.0, 90.0]]
    )
    times = sorted(i["properties"]["datetime"] for i in items if i.get("properties", {}).get("datetime"))
    interval = [
        [
            dt.datetime.fromisoformat(times[0].replace("Z", "+00:00")) if times else None,
            dt.datetime.fromisoformat(times[-1].replace("Z", "+00:00")) if times else None,
        ]
    ]
    collection = pystac.Collection(
        id=collection_id(folder),
        description=description,
        extent=pystac.Extent(pystac.SpatialExtent(spatial), pystac.TemporalExtent(interval)),
        license="other",
    )
    data: dict[str, Any] = collection.to_dict(include_self_link=False, transform_hrefs=False)
    data["links"] = [
        link for link in data.get("links", []) if link.get("rel") not in ("root", "self", "item")
    ] + [
        {"rel": "root", "href": f"./{COLLECTION_FILE}", "type": "application/json"},
        *[
            {"rel": "item", "href": f"./{i['id']}.item.json", "type": "application/geo+json", "title": i["id"]}
            for i in sorted(items, key=lambda i: str(i["id"]))
        ],
    ]
    path = Location(folder).child(COLLECTION_FILE)
    path.write_json(data)
    return str(path)
