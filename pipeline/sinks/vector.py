"""The ``vector`` sink: a mask's polygons (``--vector PATH``: ``.gpkg``, ``.geojson``, ``.parquet``), written after
the mask and read back from it block by block (:mod:`segpipe.pipeline.polygons`).

Formats: GeoPackage (pyogrio, the CRS as the layer's SRS) and GeoParquet 1.1 (pyarrow and WKB, the CRS as
PROJJSON; the GDAL that pyogrio's wheel ships lacks the Parquet driver) keep the mask's CRS. GeoJSON is RFC 7946
for a georeferenced mask: reprojected to WGS 84 longitude/latitude (GDAL's transformer), exteriors
counter-clockwise, 7 decimals (about 1 cm), as GDAL's ``RFC7946=YES`` writes it; a file in the mask's CRS is what
GeoPackage and GeoParquet are for. For a mask without a CRS, GeoJSON is QuPath's: every feature an annotation with
its classification (class name and ``[r, g, b]`` colour) in level-0 pixel coordinates. Every format is written
batch by batch under a hidden temporary name and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import shapely
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.warp import transform_geom

from segpipe.core.colours import parse_colour
from segpipe.core.errors import ConfigError, OutputError, SegpipeError
from segpipe.core.files import atomic_output
from segpipe.pipeline import store as ws
from segpipe.pipeline.polygons import BATCH, BLOCK, Feature, MaskClasses, MaskInfo, mask_features, read_mask_info
from segpipe.pipeline.scene import SceneInfo
from segpipe.pipeline.sinks.base import VECTOR, ExportResult, build_and_deliver, check_output

log = logging.getLogger(__name__)

#: File suffix -> format name.
FORMATS = {".gpkg": "GeoPackage", ".geojson": "GeoJSON", ".parquet": "GeoParquet"}
#: Decimals of RFC 7946 longitudes and latitudes (GDAL's default for RFC7946=YES; 1e-7 degree is about 1 cm).
WGS84_DECIMALS = 7


def _batches(items: Iterable[Feature]) -> Iterator[list[Feature]]:
    iterator = iter(items)
    while batch := list(islice(iterator, BATCH)):
        yield batch


def _columns(batch: Sequence[Feature], classes: MaskClasses) -> dict[str, np.ndarray]:
    return {
        "class_id": np.array([f.class_id for f in batch], dtype=np.int32),
        "class_name": np.array([classes.name(f.class_id) for f in batch], dtype=object),
        "colour": np.array([classes.colour(f.class_id) for f in batch], dtype=object),
        "area": np.array([f.area for f in batch], dtype=np.float64),
    }


def write_gpkg(path: Path, items: Iterable[Feature], info: MaskInfo, *, layer: str) -> Counter[int]:
    """GeoPackage, one layer of polygons in the mask's CRS; fields class_id, class_name, colour, area."""
    from pyogrio.raw import write as ogr_write  # lazy: pyogrio takes 1.6 s to import; only --vector .gpkg needs it

    def write(*args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # the hidden temporary name does not end in .gpkg; a slide's mask has no CRS (pixel coordinates)
            warnings.filterwarnings("ignore", "The filename extension should be", RuntimeWarning)
            warnings.filterwarnings("ignore", ".*non conformant file extension", RuntimeWarning)
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
            ogr_write(*args, **kwargs)

    counts: Counter[int] = Counter()
    first = True
    for batch in _batches(items):
        columns = _columns(batch, info.classes)
        geometry = shapely.to_wkb(np.array([f.geometry for f in batch], dtype=object))
        write(
            str(path),
            geometry,
            list(columns.values()),
            list(columns),
            layer=layer,
            driver="GPKG",
            geometry_type="Polygon",
            crs=info.crs_wkt,
            append=not first,
        )
        first = False
        counts.update(f.class_id for f in batch)
    if first:  # no polygon: an empty layer with the same fields
        empty = _columns([], info.classes)
        write(
            str(path),
            np.array([], dtype=object),
            list(empty.values()),
            list(empty),
            layer=layer,
            driver="GPKG",
            geometry_type="Polygon",
            crs=info.crs_wkt,
        )
    return counts


def geoparquet_metadata(crs_wkt: str | None) -> dict[str, Any]:
    """The ``geo`` metadata of a GeoParquet 1.1 file of WKB polygons in ``crs_wkt`` (PROJJSON; null: unknown, as
    for a mask without a CRS, whose coordinates are pixels)."""

    crs = CRS.from_wkt(crs_wkt).to_dict(projjson=True) if crs_wkt else None
    column = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs, "edges": "planar"}
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}


def write_parquet(path: Path, items: Iterable[Feature], info: MaskInfo) -> Counter[int]:
    """GeoParquet 1.1 (WKB geometry column, CRS as PROJJSON), one row group per batch."""
    import pyarrow as pa  # lazy: the optional parquet extra
    import pyarrow.parquet as pq  # lazy: the optional parquet extra

    schema = pa.schema(
        [
            ("class_id", pa.int32()),
            ("class_name", pa.string()),
            ("colour", pa.string()),
            ("area", pa.float64()),
            ("geometry", pa.binary()),
        ],
        metadata={"geo": json.dumps(geoparquet_metadata(info.crs_wkt))},
    )
    counts: Counter[int] = Counter()
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        for batch in _batches(items):
            columns: dict[str, Any] = dict(_columns(batch, info.classes))
            columns["geometry"] = shapely.to_wkb(np.array([f.geometry for f in batch], dtype=object))
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
            counts.update(f.class_id for f in batch)
    return counts


def _wgs84(batch: Sequence[Feature], crs_wkt: str) -> list[shapely.Polygon]:
    """The polygons of ``batch`` in WGS 84 longitude/latitude, exteriors counter-clockwise, 7 decimals."""

    mapped = transform_geom(CRS.from_wkt(crs_wkt), "EPSG:4326", [shapely.geometry.mapping(f.geometry) for f in batch])
    polygons = [shapely.geometry.shape(m) for m in mapped]
    rounded = shapely.transform(np.array(polygons, dtype=object), lambda xy: np.round(xy, WGS84_DECIMALS))
    return [shapely.geometry.polygon.orient(p, 1.0) if p.geom_type == "Polygon" else p for p in rounded]


def qupath_feature(geometry: dict[str, Any], name: str, colour: str, area: float, class_id: int) -> dict[str, Any]:
    """One QuPath annotation (GeoJSON Feature): classification name and ``[r, g, b]`` colour, area in pixels²."""
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": list(parse_colour(colour))},
            "measurements": {"Area px^2": area, "class id": class_id},
        },
    }


def write_geojson(path: Path, items: Iterable[Feature], info: MaskInfo) -> Counter[int]:
    """GeoJSON, streamed feature by feature: RFC 7946 (WGS 84) for a georeferenced mask, QuPath's annotations in
    pixel coordinates for a mask without a CRS (see the module docstring)."""
    counts: Counter[int] = Counter()
    classes = info.classes
    with open(path, "w", encoding="utf-8") as out:
        out.write('{"type": "FeatureCollection", "features": [')
        separator = "\n"
        for batch in _batches(items):
            if info.crs_wkt is not None:
                geometries = _wgs84(batch, info.crs_wkt)
                rows = (
                    {
                        "type": "Feature",
                        "geometry": json.loads(shapely.to_geojson(g)),
                        "properties": {
                            "class_id": f.class_id,
                            "class_name": classes.name(f.class_id),
                            "colour": classes.colour(f.class_id),
                            "area": f.area,
                        },
                    }
                    for f, g in zip(batch, geometries, strict=True)
                )
            else:
                rows = (
                    qupath_feature(
                        json.loads(shapely.to_geojson(f.geometry)),
                        classes.name(f.class_id),
                        classes.colour(f.class_id),
                        f.area,
                        f.class_id,
                    )
                    for f in batch
                )
            for row in rows:
                out.write(separator + json.dumps(row, separators=(",", ":")))
                separator = ",\n"
            counts.update(f.class_id for f in batch)
        out.write("\n]}\n")
    return counts


def write_features(path: Path, items: Iterable[Feature], info: MaskInfo, *, suffix: str, layer: str) -> Counter[int]:
    """Write ``items`` to ``path`` in the format of ``suffix``; returns the features per class id."""
    if suffix == ".gpkg":
        return write_gpkg(path, items, info, layer=layer)
    if suffix == ".parquet":
        return write_parquet(path, items, info)
    if suffix == ".geojson":
        return write_geojson(path, items, info)
    raise ConfigError(f"--vector must end in {', '.join(FORMATS)}, got {suffix!r}")


def _library_write_errors() -> tuple[type[Exception], ...]:
    """The write errors of pyogrio and pyarrow, which do not subclass OSError."""
    from pyogrio import errors  # lazy: pyogrio takes 1.6 s to import; only --vector needs it

    found: list[type[Exception]] = [
        errors.DataSourceError,
        errors.DataLayerError,
        errors.FieldError,
        errors.FeatureError,
        errors.GeometryError,
        errors.CRSError,
    ]
    try:
        import pyarrow  # lazy: the optional parquet extra
    except ImportError:  # the parquet extra is not installed: the sink refused .parquet before the run
        return tuple(found)
    return (*found, pyarrow.ArrowException)


@dataclass(frozen=True)
class VectorResult(ExportResult):
    """An :class:`~segpipe.pipeline.sinks.base.ExportResult` whose ``histogram`` counts features per class id.

    Attributes:
        features: Features written.
        format: ``GeoPackage``, ``GeoJSON`` or ``GeoParquet``.
    """

    features: int = 0
    format: str = ""


def write_vector(
    mask: str,
    output: str | Path,
    *,
    block: int = BLOCK,
    simplify: float = 0.0,
    min_area: float = 0.0,
    classes: MaskClasses | None = None,
    transform: Affine | None = None,
    progress: Callable[[int], Any] | None = None,
) -> VectorResult:
    """Polygonise the mask at ``mask`` into the local file ``output`` (its suffix names the format), atomically.

    Args:
        mask: The mask COG (a local path or URL).
        output: The vector file: ``.gpkg``, ``.geojson`` or ``.parquet``.
        block: Pixels per side of one block read.
        simplify: Tolerance in CRS units (pixels without a CRS); 0: none.
        min_area: Smallest polygon kept, in CRS units² (pixels²).
        classes: Names and colours; default: the mask's own (its tags and colour table).
        transform: Mask pixel -> output coordinates; default the mask's own (see :func:`mask_features`).
        progress: Called with pixels read.

    Raises:
        ConfigError: an unknown suffix.
        OutputError: the file cannot be written; nothing is left at ``output``.
    """
    start = time.perf_counter()
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--vector {str(output)!r} must end in {', '.join(FORMATS)} ({', '.join(FORMATS.values())})")
    info = read_mask_info(mask)
    if classes is not None:
        info = dataclasses.replace(info, classes=classes)
    items = mask_features(
        mask, block=block, simplify=simplify, min_area=min_area, transform=transform, progress=progress
    )
    try:
        with atomic_output(output) as tmp:
            counts = write_features(tmp, items, info, suffix=suffix, layer=Path(output).stem)
    except SegpipeError:
        raise
    except (OSError, CPLE_BaseError, *_library_write_errors()) as exc:
        raise OutputError(f"could not write {output}: {exc}; check free space and permissions") from None
    total = sum(counts.values())
    log.info("%s: %d polygons (%s)", output, total, FORMATS[suffix])
    return VectorResult(
        path=str(output),
        seconds=time.perf_counter() - start,
        histogram=dict(sorted(counts.items())),
        bytes=Path(output).stat().st_size,
        features=total,
        format=FORMATS[suffix],
    )


# --- the sink ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorSink:
    """The mask's polygons (``--vector``), written after the mask COG and read back from it block by block.

    ``path`` is a local path or an object-storage URL; for a URL the file is written in the local scratch folder and
    uploaded as one object when complete.
    """

    path: str
    #: The mask COG it polygonises (the run's OUTPUT).
    mask: str = ""
    simplify: float = 0.0
    min_area: float = 0.0
    block: int = BLOCK
    what: str = "--vector"
    kind: ClassVar[str] = VECTOR
    #: For :func:`segpipe.pipeline.sinks.sink_for`'s message on a wrong suffix.
    written_as: ClassVar[str] = "GeoPackage, GeoJSON or GeoParquet, by the suffix"

    def check(self, *, overwrite: bool) -> None:
        if Path(self.path).suffix.lower() == ".parquet":
            try:
                import pyarrow.parquet  # noqa: F401  # lazy: the optional parquet extra, checked before work
            except ImportError:
                raise ConfigError(
                    f"--vector {self.path!r}: GeoParquet needs pyarrow; pip install 'segpipe[parquet]', or give a "
                    ".gpkg path"
                ) from None
        check_output(self.path, self.what, overwrite=overwrite)

    def write(
        self,
        store: ws.WorkStore,
        *,
        class_names: Sequence[str],
        colours: Sequence[str],
        scratch_dir: Path,
        workers: int,
        progress: Callable[[int], Any] | None = None,
    ) -> ExportResult:
        if not self.mask:
            raise ConfigError("the vector output needs the mask it polygonises (VectorSink.mask)")
        mask = self.mask
        scene = SceneInfo.from_attrs(store.attrs["scene"])
        return build_and_deliver(
            self.path,
            Path(scratch_dir) / f"{VECTOR}{Path(self.path).suffix.lower()}",
            lambda target: write_vector(
                mask,
                target,
                block=self.block,
                simplify=self.simplify,
                min_area=self.min_area,
                classes=MaskClasses(tuple(class_names), tuple(colours)),
                # a slide's mask may be on a coarser grid than level 0 and, as an OME-TIFF, know nothing of it
                transform=None if scene.crs_wkt else Affine(*scene.transform),
                progress=progress,
            ),
        )

