"""Data sets: the scenes a dataset run (or a nightly deployment) segments, from the places teams keep them.

A source is one string, recognised in this order:

- ``stac-api+https://host/path`` (or ``--stac-api``): a STAC API item search (pystac-client), narrowed by
  collections, bbox, datetime and a CQL2 query (:class:`StacSearch`);
- a STAC document (a path or ``http(s)://`` URL ending in ``.json``): an ItemCollection, a static Catalog or
  Collection (walked with pystac, child catalogs included), or one Item;
- an object-storage prefix (``s3://bucket/scenes/``, ``gs://``, ``az://``): every raster under it;
- a glob (``/data/**/*.tif``, with ``*``, ``?`` or ``[``): its matches;
- a list file (a text file): one path or URL per line (``#`` comments);
- one raster file: a data set of one scene;
- a folder: its rasters (:data:`RASTER_SUFFIXES`), with ``recursive`` also those of its subfolders.

Whole-slide images are rasters like any other here (a folder of slides is a data set): their suffixes
(:data:`segpipe.pipeline.read.SLIDE_SUFFIXES`: ``.svs``, ``.ndpi``, ``.mrxs`` ...) are listed with the others, and
the source that reads each file is still chosen by its content. Two formats are several files: the DICOM files of
one folder are one slide (the first by name is opened, the scene's id is the folder's name), and the JPEG files a
Hamamatsu ``.vms`` names are parts of it, not scenes. A scene's id is the file's stem (without ``.ome`` for an
``.ome.tif``).

STAC items: the asset segmented is the one named by ``asset`` (a key), or the first with ``asset_role``, or, when
the model's bands are named and the item's assets carry ``eo:bands`` (``bands`` in STAC 1.1) with common names, the
asset that holds all of them, or one asset per band stacked in the model's band order (a GDAL VRT, written inline,
so that every worker opens it without a file). A :class:`SceneRef` keeps the item's id, datetime, geometry and link
for the STAC Item of the output.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pystac

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.location import Location
from segpipe.core.raster import gdal_path, open_raster
from segpipe.pipeline.scene import SLIDE_SUFFIXES
from segpipe.pipeline.settings import STAC_API_PREFIX, StacSearch

#: File suffixes taken as rasters in folders, prefixes and globs without a suffix of their own: images GDAL reads,
#: and whole-slide images (:data:`segpipe.pipeline.scene.SLIDE_SUFFIXES`).
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img", ".png", ".jpg", ".jpeg", *SLIDE_SUFFIXES)


@dataclass(frozen=True)
class SceneRef:
    """One scene of a data set.

    Attributes:
        id: A name unique in the data set (the file's stem, or the STAC item's id), used to name its outputs.
        href: What GDAL opens: a path, a URL, or an inline VRT that stacks STAC assets.
        source: Where the scene came from, for the output's STAC Item: the item's or the file's URL or path.
        item: The STAC item (its dict) the scene came from, or None.
    """

    id: str
    href: str
    source: str
    item: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class AssetChoice:
    """How to pick the asset of a STAC item: by key, by role, or by the model's band names."""

    key: str | None = None
    role: str | None = None
    bands: tuple[str, ...] = ()


def _is_raster_name(name: str) -> bool:
    return name.lower().endswith(RASTER_SUFFIXES)


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._") or "scene"


def _unique(refs: Iterable[SceneRef]) -> list[SceneRef]:
    """Refs with unique ids (a repeated stem gets ``-2``, ``-3`` ...), in a stable order."""
    seen: dict[str, int] = {}
    out = []
    for ref in refs:
        n = seen.get(ref.id, 0) + 1
        seen[ref.id] = n
        out.append(ref if n == 1 else SceneRef(f"{ref.id}-{n}", ref.href, ref.source, ref.item))
    return out


def _file_ref(path: str) -> SceneRef:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    stem = Path(name).stem
    if name.lower().endswith(".dcm"):  # one slide of DICOM files (see _whole_slides): named after its folder
        parent = path.rstrip("/").rsplit("/", 2)
        stem = parent[-2] if len(parent) > 2 else stem
    elif name.lower().endswith((".ome.tif", ".ome.tiff")):
        stem = stem.removesuffix(".ome").removesuffix(".OME")
    return SceneRef(_safe_id(stem), path, path)


def _vms_parts(path: str) -> set[str]:
    """The files a Hamamatsu ``.vms`` index names (its JPEG parts, map and optimisation files), as paths."""
    base = Path(path).parent
    try:
        lines = Path(path).read_text(encoding="latin-1").splitlines()
    except OSError:
        return set()
    names = [line.split("=", 1)[1].strip() for line in lines if "=" in line and line.split("=", 1)[0].startswith(
        ("ImageFile", "MapFile", "OptimisationFile")
    )]  # fmt: skip
    return {str(base / name) for name in names if name}


def _whole_slides(paths: Sequence[str]) -> list[str]:
    """``paths`` (sorted) with the files that belong to another's slide left out: every DICOM file of a folder
    but the first, and the parts a ``.vms`` names."""
    parts: set[str] = set()
    for path in paths:
        if path.lower().endswith(".vms") and Location(path).is_local:
            parts |= _vms_parts(path)
    kept, dicom_folders = [], set()
    for path in paths:
        if path in parts:
            continue
        if path.lower().endswith(".dcm"):
            folder = path.rstrip("/").rsplit("/", 1)[0]
            if folder in dicom_folders:
                continue
            dicom_folders.add(folder)
        kept.append(path)
    return kept


#: GDAL virtual file systems that read from the network; every other ``/vsi`` path reads local files.
REMOTE_VSI = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "/vsiwebhdfs")


def is_remote_href(href: str) -> bool:
    """Whether an asset href names something on the network (http(s), object storage, a remote GDAL path), not a
    file of this machine (a path, ``file://``, a local ``/vsi`` path, an inline VRT)."""
    text = href.strip()
    if text.startswith(("http://", "https://")) or not Location(text).is_local:
        return True
    return text.startswith(REMOTE_VSI)


def check_items(items: Iterable[Any], source: str) -> None:
    """Refuse items that are not STAC Items as segpipe reads them: an object with a string ``id`` and ``assets``
    mapping keys to objects with a string ``href``.

    Raises:
        InputError: naming the source, the item and what is wrong with it.
    """
    for k, item in enumerate(items):
        named = isinstance(item, dict) and isinstance(item.get("id"), str)
        name = repr(item["id"]) if named else f"number {k + 1}"
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise InputError(f"STAC item {name} of {source!r} is malformed: it needs a string 'id'")
        assets = item.get("assets")
        if not isinstance(assets, dict) or not all(
            isinstance(a, dict) and isinstance(a.get("href"), str) for a in assets.values()
        ):
            raise InputError(
                f"STAC item {name} of {source!r} is malformed: 'assets' must map keys to objects with an 'href'"
            )


def check_assets(items: Iterable[dict[str, Any]], source: str, *, allow_local: bool) -> None:
    """Refuse a remote catalog or API (``source``) whose items name local files as assets: a catalog from
    elsewhere must not make this machine read (and segment, and publish the masks of) its own files, such as
    ``/etc/...`` or ``file://``. ``allow_local`` (``--allow-local-assets``) lets a trusted one.

    Raises:
        InputError: naming the item, the asset and the href.
    """
    if allow_local or not is_remote_href(source.removeprefix(STAC_API_PREFIX)):
        return
    for item in items:
        for key, asset in item.get("assets", {}).items():
            href = str(asset.get("href", ""))
            if href and not is_remote_href(href):
                raise InputError(
                    f"STAC item {item.get('id')!r} of the remote {source!r} names a local file as its asset "
                    f"{key!r} ({href[:120]!r}); a remote catalog may only name remote assets (pass "
                    "--allow-local-assets if you trust it)"
                )


def scenes_of(
    source: str,
    *,
    recursive: bool = False,
    asset: AssetChoice | None = None,
    search: StacSearch | None = None,
    allow_local_assets: bool = False,
) -> list[SceneRef]:
    """The scenes of a data set source (see the module docstring), sorted by id. A remote STAC catalog or API
    may name only remote assets unless ``allow_local_assets`` (:func:`check_assets`).

    Raises:
        ConfigError: the source is not one of the kinds above, or names nothing.
        InputError: a list file, STAC document or API cannot be read; a remote one names local files.
    """
    choice = asset or AssetChoice()
    if search is not None or source.startswith(STAC_API_PREFIX):
        search = search or StacSearch(source.removeprefix(STAC_API_PREFIX))
        items = _search(search)
        check_items(items, search.url)
        check_assets(items, search.url, allow_local=allow_local_assets)
        refs = [ref for item in items if (ref := item_ref(item, choice)) is not None]
    elif source.lower().endswith(".json"):
        items = stac_items(source)
        check_items(items, source)
        check_assets(items, source, allow_local=allow_local_assets)
        refs = [ref for item in items if (ref := item_ref(item, choice)) is not None]
    elif not Location(source).is_local:
        refs = [_file_ref(url) for url in _whole_slides(_list_prefix(source))]
    elif any(ch in source for ch in "*?["):
        found = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        refs = [_file_ref(p) for p in _whole_slides(found)]
    elif os.path.isfile(source) and not _is_raster_name(source):
        refs = [_file_ref(line) for line in _list_file(source)]
    elif os.path.isfile(source):
        refs = [_file_ref(source)]
    elif os.path.isdir(source):
        pattern = "**/*" if recursive else "*"
        found = sorted(str(p) for p in Path(source).glob(pattern) if p.is_file() and _is_raster_name(p.name))
        refs = [_file_ref(p) for p in _whole_slides(found)]
    else:
        raise ConfigError(
            f"input {source!r} is not a folder, a glob, a list file, an object-storage prefix, a STAC document "
            "(.json) or a STAC API (stac-api+https://...); check the path"
        )
    if not refs:
        raise ConfigError(f"input {source!r} holds no scene (looked for {', '.join(RASTER_SUFFIXES)})")
    return sorted(_unique(refs), key=lambda r: r.id)


def _list_file(path: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    base = Path(path).parent
    return [e if ("://" in e or os.path.isabs(e)) else str(base / e) for e in entries]


def _list_prefix(url: str) -> list[str]:
    """The rasters under an object-storage prefix (its subfolders included), sorted."""
    return [str(found) for found in Location(url).list(recursive=True) if _is_raster_name(found.name)]


#: Largest STAC document read (bytes): a catalog or item collection bigger than this is refused, not loaded.
MAX_STAC_BYTES = 64 * 2**20
#: Most items a data set takes from one STAC search or catalog (an API that pages forever stops here).
MAX_STAC_ITEMS = 100_000
#: Deepest chain of child catalogs walked.
MAX_CATALOG_DEPTH = 32


def _read_bytes(href: str) -> bytes:
    """At most :data:`MAX_STAC_BYTES` + 1 bytes of a local file, an http(s) URL or an object."""
    if href.startswith(("http://", "https://")):
        with urllib.request.urlopen(href, timeout=30) as response:
            return bytes(response.read(MAX_STAC_BYTES + 1))
    with Location(href).open() as f:
        return f.read(MAX_STAC_BYTES + 1)


def _read_json(href: str) -> dict[str, Any]:
    try:
        raw = _read_bytes(href)
        if len(raw) > MAX_STAC_BYTES:
            raise InputError(
                f"STAC document {href!r} is larger than {MAX_STAC_BYTES // 2**20} MiB; split it, or use a STAC API"
            )
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"STAC document {href!r} cannot be read ({exc}); check the path or URL") from None
    if not isinstance(data, dict):
        raise InputError(f"STAC document {href!r} is not a JSON object")
    return data


def stac_items(href: str) -> list[dict[str, Any]]:
    """The items of a STAC ItemCollection, Catalog or Collection (children walked), or the one Item, at ``href``;
    every asset href made absolute."""
    data = _read_json(href)
    kind = data.get("type")
    if kind == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise InputError(f"STAC document {href!r} is an ItemCollection without a 'features' list")
        if len(features) > MAX_STAC_ITEMS:
            raise InputError(f"STAC document {href!r} has more than {MAX_STAC_ITEMS} items; split it")
        check_items(features, href)
        try:
            items = [item.to_dict() for item in pystac.ItemCollection.from_dict(data, preserve_dict=False)]
        except Exception as exc:  # pystac's errors on items it cannot parse
            raise InputError(
                f"STAC document {href!r} has an item pystac cannot read ({type(exc).__name__}: {exc})"
            ) from None
        return [_absolute_assets(item, href) for item in items]
    if kind == "Feature":
        check_items([data], href)
        return [_absolute_assets(data, href)]
    if kind in ("Catalog", "Collection"):
        try:
            catalog = pystac.read_dict(data, href=href)
        except Exception as exc:  # pystac's STACError, KeyError, TypeError on malformed documents
            raise InputError(f"STAC document {href!r} is not a valid catalog ({type(exc).__name__}: {exc})") from None
        if not isinstance(catalog, pystac.Catalog):
            raise InputError(f"STAC document {href!r} is not a catalog")
        return _walk(catalog, href)
    raise InputError(
        f"STAC document {href!r} is a {kind!r}; give an ItemCollection, a Catalog, a Collection or an Item"
    )


def _walk(root: Any, href: str) -> list[dict[str, Any]]:
    """The items of a pystac catalog and its children, each catalog once: a child that links back up (a cycle),
    a chain deeper than :data:`MAX_CATALOG_DEPTH` or more than :data:`MAX_STAC_ITEMS` items is refused."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    pending = [(root, 0)]
    try:
        while pending:
            catalog, depth = pending.pop()
            where = catalog.get_self_href() or href
            if where in seen:
                raise InputError(f"STAC catalog {href!r} links back to {where!r} (a cycle); fix its child links")
            if depth > MAX_CATALOG_DEPTH:
                raise InputError(f"STAC catalog {href!r} nests catalogs deeper than {MAX_CATALOG_DEPTH}")
            seen.add(where)
            for item in catalog.get_items():
                item.make_asset_hrefs_absolute()
                found.append({**item.to_dict(), "_self": item.get_self_href()})
                if len(found) > MAX_STAC_ITEMS:
                    raise InputError(f"STAC catalog {href!r} has more than {MAX_STAC_ITEMS} items; split it")
            pending.extend((child, depth + 1) for child in catalog.get_children())
    except InputError:
        raise
    except Exception as exc:  # a child or item that pystac cannot read or parse
        raise InputError(f"STAC catalog {href!r} has a broken link or item ({type(exc).__name__}: {exc})") from None
    return found


def _absolute_assets(item: dict[str, Any], base: str) -> dict[str, Any]:
    folder = base.rsplit("/", 1)[0] if "/" in base else "."
    assets = {}
    for key, asset in item.get("assets", {}).items():
        href = str(asset.get("href", ""))
        if href and not ("://" in href or href.startswith("/")):
            href = f"{folder}/{href.removeprefix('./')}"
        assets[key] = {**asset, "href": href}
    return {
        **item,
        "assets": assets,
        "_self": base if item.get("type") == "Feature" and base.endswith(".json") else None,
    }


def _search(search: StacSearch) -> list[dict[str, Any]]:
    from pystac_client import Client  # lazy: pystac_client takes 0.3 s; only STAC API searches need it

    try:
        client = Client.open(search.url)
        result = client.search(
            collections=list(search.collections) or None,
            bbox=list(search.bbox) if search.bbox else None,
            datetime=search.datetime,
            query=search.query,
            max_items=search.max_items or MAX_STAC_ITEMS + 1,
        )
        items = [item.to_dict() for item in result.items()]
    except Exception as exc:  # pystac-client's API and HTTP errors
        raise InputError(
            f"STAC API {search.url} search failed ({str(exc).splitlines()[0][:200]}); check the URL"
        ) from None
    if search.max_items is None and len(items) > MAX_STAC_ITEMS:
        raise InputError(
            f"STAC API {search.url} gives more than {MAX_STAC_ITEMS} items for this search (or pages forever); "
            "narrow it with --collection, --bbox or --datetime"
        )
    for item in items:
        item["_self"] = next((link["href"] for link in item.get("links", []) if link.get("rel") == "self"), None)
    return items


def _band_names(asset: dict[str, Any]) -> list[str]:
    """Common names (else names) of an asset's bands, from ``eo:bands`` (STAC 1.0) or ``bands`` (STAC 1.1)."""
    bands = asset.get("eo:bands") or asset.get("bands") or []
    return [str(b.get("common_name") or b.get("eo:common_name") or b.get("name") or "") for b in bands]


def item_ref(item: dict[str, Any], choice: AssetChoice) -> SceneRef | None:
    """The scene of one STAC item, or None when no asset fits (the item is left out of the data set).

    Raises:
        ConfigError: the asset key asked for is missing from the item.
    """
    assets: dict[str, dict[str, Any]] = item.get("assets", {})
    ident = _safe_id(str(item.get("id", "item")))
    source = item.get("_self") or next(
        (link["href"] for link in item.get("links", []) if link.get("rel") == "self"), f"stac-item:{item.get('id')}"
    )
    clean = {k: v for k, v in item.items() if k != "_self"}
    if choice.key is not None:
        if choice.key not in assets:
            raise ConfigError(f"STAC item {item.get('id')!r} has no asset {choice.key!r}; it has {sorted(assets)}")
        return SceneRef(ident, _band_vrt_or_href(assets[choice.key], choice.bands), str(source), clean)
    if choice.role is not None:
        for asset in assets.values():
            if choice.role in asset.get("roles", []):
                return SceneRef(ident, _band_vrt_or_href(asset, choice.bands), str(source), clean)
        return None
    wanted = [b for b in choice.bands if b]
    if wanted:
        for asset in assets.values():
            names = _band_names(asset)
            if set(wanted) <= set(names):
                return SceneRef(ident, _band_vrt_or_href(asset, choice.bands), str(source), clean)
        single = {}
        for asset in assets.values():
            names = _band_names(asset)
            if len(names) == 1 and names[0] in wanted:
                single[names[0]] = asset
        if set(wanted) <= set(single):
            return SceneRef(ident, stacked_vrt([(single[b]["href"], 1) for b in wanted]), str(source), clean)
    for asset in assets.values():  # no band names to go by: the first data asset that is a raster
        if "data" in asset.get("roles", ["data"]) and _is_raster_name(str(asset.get("href", "")).split("?")[0]):
            return SceneRef(ident, str(asset["href"]), str(source), clean)
    return None


def _band_vrt_or_href(asset: dict[str, Any], wanted: Sequence[str]) -> str:
    """The asset's href, or a VRT of its bands in the model's order when its band names say they differ."""
    names = _band_names(asset)
    if not wanted or not names or names[: len(wanted)] == list(wanted) or not set(wanted) <= set(names):
        return str(asset["href"])
    return stacked_vrt([(str(asset["href"]), names.index(b) + 1) for b in wanted])


def stacked_vrt(bands: Sequence[tuple[str, int]]) -> str:
    """An inline GDAL VRT (an XML string GDAL opens like a file name) whose band k is band ``bands[k][1]`` of raster
    ``bands[k][0]``, with that band's nodata value; every source must share one grid (size, CRS, transform), which
    is read from the sources.

    Raises:
        InputError: a source cannot be opened, or the sources' grids differ.
    """
    grids = []
    nodata = []
    for href, index in bands:
        with open_raster(href, role="STAC asset") as src:
            grids.append(
                (src.width, src.height, src.crs.to_wkt() if src.crs else "", tuple(src.transform)[:6], src.dtypes[0])
            )
            nodata.append(src.nodatavals[index - 1])
    width, height, crs, transform, dtype = grids[0]
    if any(g[:4] != grids[0][:4] for g in grids):
        raise InputError(f"STAC assets {[h for h, _ in bands]} are not on one grid; segpipe stacks only aligned bands")
    gdal_types = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
                  "float32": "Float32", "float64": "Float64", "int8": "Int8"}  # fmt: skip
    a, b, c, d, e, f = transform
    parts = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">']
    if crs:
        parts.append(f"<SRS>{escape(crs)}</SRS>")
    parts.append(f"<GeoTransform>{c!r}, {a!r}, {b!r}, {f!r}, {d!r}, {e!r}</GeoTransform>")
    for k, ((href, index), missing) in enumerate(zip(bands, nodata, strict=True), start=1):
        parts.append(
            f'<VRTRasterBand dataType="{gdal_types.get(dtype, "Float64")}" band="{k}">'
            + (f"<NoDataValue>{missing!r}</NoDataValue>" if missing is not None else "")
            + f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(gdal_path(href))}</SourceFilename>'
            f"<SourceBand>{index}</SourceBand></SimpleSource></VRTRasterBand>"
        )
    parts.append("</VRTDataset>")
    return "".join(parts)


def matches(ref: SceneRef, pattern: str) -> bool:
    """Whether a scene's id matches a shell pattern (for ``--only``)."""
    return fnmatch.fnmatch(ref.id, pattern)
