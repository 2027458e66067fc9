"""Polygons of a mask (``--vector``): the SpaceNet footprints round trip, block-size invariance, nodata, the three
formats with their CRS (or QuPath's pixel coordinates), simplify and min-area, errors, and a run that writes them."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import rasterio.windows
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from shapely.geometry import shape

from segpipe.core.errors import ConfigError, OutputError
from segpipe.core.files import partial_path
from segpipe.pipeline import polygons as pg
from segpipe.pipeline.settings import RunSettings
from segpipe.pipeline.sinks import sink_for
from segpipe.pipeline.sinks import vector as vs
from tests.cluster.conftest import S3_ENV, S3Server

DATA = Path(__file__).resolve().parents[1] / "data"
SCENE = DATA / "sample_geotiff.tif"  # SpaceNet Atlanta, 900x900 px, 0.5 m, EPSG:32616
FOOTPRINTS = DATA / "spacenet" / "geotiff_labels.geojson"  # its 43 building footprints
CLASSES = pg.MaskClasses(("background", "building"), ("#000000", "#FF0000"))


def footprints() -> list[shapely.Polygon]:
    return [shape(f["geometry"]) for f in json.loads(FOOTPRINTS.read_text())["features"]]


def write_mask(path: Path, mask: np.ndarray, *, crs: CRS | None, transform: rasterio.Affine) -> Path:
    """A mask as the export writes it: uint8, nodata 255, class names in the band's tags, a colour table."""
    profile = {
        "driver": "GTiff",
        "width": mask.shape[1],
        "height": mask.shape[0],
        "count": 1,
        "dtype": "uint8",
        "nodata": 255,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    if crs is not None:
        profile["crs"] = crs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dst = rasterio.open(path, "w", **profile)
    with dst:
        dst.write(mask, 1)
        dst.update_tags(CLASS_NAMES=",".join(CLASSES.names))
        dst.update_tags(1, **{f"CLASS_{i}": n for i, n in enumerate(CLASSES.names)})
        dst.write_colormap(1, {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 255: (0, 0, 0, 0)})
    return path


@pytest.fixture(scope="module")
def spacenet_mask(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The footprints rasterised onto the scene's grid (building 1, background 0; pixel-centre rule)."""
    with rasterio.open(SCENE) as src:
        crs, transform, shape_ = src.crs, src.transform, src.shape
    mask = rasterio.features.rasterize(
        [(g, 1) for g in footprints()], out_shape=shape_, transform=transform, fill=0, dtype="uint8"
    )
    return write_mask(tmp_path_factory.mktemp("spacenet") / "mask.tif", mask, crs=crs, transform=transform)


def by_class(items: Iterable[pg.Feature]) -> list[tuple[int, bytes]]:
    """Features as sorted (class id, WKB): equal lists are equal polygons, vertex for vertex."""
    return sorted((f.class_id, shapely.to_wkb(f.geometry)) for f in items)


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return float(a.intersection(b).area / a.union(b).area)


# --- the SpaceNet round trip -------------------------------------------------------------------------------


def test_spacenet_footprints_come_back_from_their_mask(spacenet_mask: Path) -> None:
    """Rasterised at 0.5 m and polygonised back, every footprint is matched: the symmetric difference lies within
    half a pixel diagonal (0.354 m) of its outline, which is all rasterising can move (a pixel is in when its
    centre is), so IoU >= (A - P r) / (A + P r) for area A and perimeter P; measured IoU min 0.842 (a 28 m²
    footprint), mean 0.955, median 0.963."""
    fps = footprints()
    assert len(fps) == 43
    items = list(pg.mask_features(str(spacenet_mask), block=256))
    buildings = [f.geometry for f in items if f.class_id == 1]
    with rasterio.open(spacenet_mask) as src:
        pixels = int((src.read(1) == 1).sum())
    assert sum(f.area for f in items if f.class_id == 1) == pytest.approx(pixels * 0.25), "area in m², 0.25 per px"
    tree = shapely.STRtree(buildings)
    r = 0.5 * np.sqrt(2) / 2
    ious = []
    for i, fp in enumerate(fps):
        near = [buildings[j] for j in tree.query(fp, predicate="intersects")]
        mine = [p for p in near if p.intersection(fp).area > 0.5 * p.area]
        assert mine, f"footprint {i} has no polygon"
        got = shapely.union_all(mine)
        ious.append(iou(fp, got))
        outside_band = fp.symmetric_difference(got).difference(fp.boundary.buffer(r)).area
        assert outside_band < 1e-6, f"footprint {i}: {outside_band} m² differ farther than half a pixel diagonal"
        bound = (fp.area - fp.length * r) / (fp.area + fp.length * r)
        assert ious[-1] >= bound, f"footprint {i} ({fp.area:.1f} m²): IoU {ious[-1]:.3f} < {bound:.3f}"
    figures = f"IoU over 43 footprints: min {min(ious):.3f}, mean {np.mean(ious):.3f}, median {np.median(ious):.3f}"
    assert min(ious) > 0.84 and np.mean(ious) > 0.95 and np.median(ious) > 0.96, figures


@pytest.mark.parametrize("block", [37, 128, 300, 900])
def test_any_block_size_gives_the_same_polygons(spacenet_mask: Path, tmp_path: Path, block: int) -> None:
    """With nodata and two classes, polygons cut by block edges are merged into exactly the polygons of one block."""
    with rasterio.open(spacenet_mask) as src:
        mask, crs, transform = src.read(1), src.crs, src.transform
    mask[400:470, 100:650] = 255  # nodata across blocks and buildings
    path = write_mask(tmp_path / "mask.tif", mask, crs=crs, transform=transform)
    whole = by_class(pg.mask_features(str(path), block=900))
    assert by_class(pg.mask_features(str(path), block=block)) == whole
    assert {c for c, _ in whole} == {0, 1}


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 20),
    width=st.integers(1, 20),
    cell=st.integers(1, 4),
    classes=st.integers(1, 3),
    block=st.integers(2, 7),
    seed=st.integers(0, 2**16),
)
def test_random_masks_give_the_same_polygons_for_any_block(
    height: int, width: int, cell: int, classes: int, block: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, (height // cell + 1, width // cell + 1))
    mask = np.kron(coarse, np.ones((cell, cell), dtype=np.int64))[:height, :width].astype(np.uint8)
    mask[rng.random((height, width)) < 0.1] = 255

    def polygons(size: int) -> list[tuple[int, bytes]]:
        found = pg.polygonise(lambda w: mask[w.row_slice, w.col_slice], width, height, block=size)
        return sorted((v, shapely.to_wkb(p)) for p, v in found)

    whole = polygons(max(width, height))
    assert polygons(block) == whole
    for value in range(classes):  # the polygons tile each class's pixels exactly
        area = sum(shapely.from_wkb(w).area for v, w in whole if v == value)
        assert area == (mask == value).sum()


def test_nodata_is_never_a_polygon(tmp_path: Path) -> None:
    mask = np.full((60, 80), 255, dtype=np.uint8)
    mask[10:30, 10:50] = 1
    mask[35:50, 20:70] = 0
    path = write_mask(tmp_path / "mask.tif", mask, crs=None, transform=rasterio.Affine.identity())
    items = list(pg.mask_features(str(path), block=16))
    assert sorted((f.class_id, f.area) for f in items) == [(0, 750.0), (1, 800.0)]
    nodata = shapely.union_all([shape(g) for g, _ in rasterio.features.shapes(mask, mask=mask == 255)])
    assert shapely.union_all([f.geometry for f in items]).intersection(nodata).area == 0
    blank = np.full((20, 20), 255, np.uint8)
    empty = write_mask(tmp_path / "empty.tif", blank, crs=None, transform=rasterio.Affine.identity())
    result = vs.write_vector(str(empty), tmp_path / "empty.gpkg")
    assert result.features == 0 and pyogrio.read_info(tmp_path / "empty.gpkg")["features"] == 0


# --- formats -----------------------------------------------------------------------------------------------


def test_geopackage_keeps_the_crs_and_the_classes(spacenet_mask: Path, tmp_path: Path) -> None:
    out = tmp_path / "buildings.gpkg"
    result = vs.write_vector(str(spacenet_mask), out, block=300)
    info = pyogrio.read_info(out)
    assert info["crs"] == "EPSG:32616" and info["geometry_type"] == "Polygon"
    assert info["features"] == result.features == sum(result.histogram.values())
    assert list(info["fields"]) == ["class_id", "class_name", "colour", "area"]
    assert result.format == "GeoPackage" and result.histogram[1] == 44  # one footprint is cut in two by a 1-px neck
    _, _, geometry, fields = pyogrio.raw.read(out)
    names = dict(zip(fields[0], fields[1], strict=True))
    assert names == {0: "background", 1: "building"}
    colours = dict(zip(fields[0], fields[2], strict=True))
    assert colours == {0: "#000000", 1: "#FF0000"}, "from the mask's colour table"
    got = shapely.from_wkb(geometry)
    assert np.allclose(shapely.area(got), fields[3])
    assert not list(tmp_path.glob(".*")), "no temporary file is left"


def test_geoparquet_keeps_the_crs(spacenet_mask: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "buildings.parquet"
    result = vs.write_vector(str(spacenet_mask), out)
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    column = geo["columns"]["geometry"]
    assert geo["primary_column"] == "geometry" and column["encoding"] == "WKB"
    assert column["crs"]["id"] == {"authority": "EPSG", "code": 32616}
    table = pq.read_table(out)
    assert table.num_rows == result.features
    expected = by_class(pg.mask_features(str(spacenet_mask)))
    got = sorted(zip(table["class_id"].to_pylist(), table["geometry"].to_pylist(), strict=True))
    assert got == expected


def test_geojson_of_a_georeferenced_mask_is_rfc7946(spacenet_mask: Path, tmp_path: Path) -> None:
    """WGS 84 longitude/latitude (Atlanta), no crs member, exteriors counter-clockwise, and the same polygons."""
    out = tmp_path / "buildings.geojson"
    result = vs.write_vector(str(spacenet_mask), out)
    collection = json.loads(out.read_text())
    assert "crs" not in collection and len(collection["features"]) == result.features
    feature = next(f for f in collection["features"] if f["properties"]["class_name"] == "building")
    assert feature["properties"]["colour"] == "#FF0000" and feature["properties"]["class_id"] == 1
    polygon = shape(feature["geometry"])
    lon, lat = polygon.exterior.coords[0]
    assert -84.5 < lon < -84.3 and 33.6 < lat < 33.8
    assert polygon.exterior.is_ccw
    assert pyogrio.read_info(out)["crs"] == "EPSG:4326"
    with rasterio.open(spacenet_mask) as src:
        back = rasterio.warp.transform_geom("EPSG:4326", src.crs, feature["geometry"])
    original = [f.geometry for f in pg.mask_features(str(spacenet_mask)) if f.geometry.intersects(shape(back))]
    closest = min(shapely.hausdorff_distance(shape(back), g) for g in original)
    assert closest < 0.02, "back in UTM, every vertex within 2 cm (7 decimals of a degree are about 1 cm)"


def test_qupath_geojson_for_a_mask_without_crs(tmp_path: Path) -> None:
    """A slide's mask (no CRS): QuPath annotations with class name and colour, in level-0 pixel coordinates."""
    mask = np.zeros((300, 500), dtype=np.uint8)
    mask[100:200, 50:450] = 1
    mask[:20, :] = 255
    path = write_mask(tmp_path / "slide.mask.tif", mask, crs=None, transform=rasterio.Affine.identity())
    out = tmp_path / "slide.geojson"
    vs.write_vector(str(path), out, block=64)
    collection = json.loads(out.read_text())
    assert collection["type"] == "FeatureCollection"
    by_name = {f["properties"]["classification"]["name"]: f for f in collection["features"]}
    assert set(by_name) == {"background", "building"}
    tumour = by_name["building"]
    assert tumour["properties"]["objectType"] == "annotation"
    assert tumour["properties"]["classification"]["color"] == [255, 0, 0]
    assert shape(tumour["geometry"]).equals(shapely.box(50, 100, 450, 200)), "pixel coordinates, y down"
    assert tumour["properties"]["measurements"]["Area px^2"] == 400 * 100
    assert shape(by_name["background"]["geometry"]).bounds == (0.0, 20.0, 500.0, 300.0)
    # read at half resolution, the slide's mask maps back onto level 0 through its transform (x2)
    half = write_mask(tmp_path / "half.mask.tif", mask, crs=None, transform=rasterio.Affine.scale(2.0))
    vs.write_vector(str(half), tmp_path / "half.geojson", block=64)
    features = json.loads((tmp_path / "half.geojson").read_text())["features"]
    building = next(f for f in features if f["properties"]["classification"]["name"] == "building")
    assert shape(building["geometry"]).equals(shapely.box(100, 200, 900, 400)), "level-0 pixel coordinates"
    assert building["properties"]["measurements"]["Area px^2"] == 800 * 200


def test_min_area_and_simplify(spacenet_mask: Path) -> None:
    """``min_area`` (m²) drops small polygons; ``simplify`` (m) drops vertices, each polygon valid and within the
    tolerance of the exact one."""
    exact = [f for f in pg.mask_features(str(spacenet_mask)) if f.class_id == 1]
    large = [f for f in pg.mask_features(str(spacenet_mask), min_area=50.0) if f.class_id == 1]
    assert 0 < len(large) < len(exact)
    assert sorted(f.area for f in large) == sorted(f.area for f in exact if f.area >= 50.0)
    simple = [f for f in pg.mask_features(str(spacenet_mask), simplify=0.6) if f.class_id == 1]
    assert len(simple) == len(exact)
    vertices = sum(shapely.get_num_coordinates(f.geometry) for f in simple)
    assert vertices < 0.6 * sum(shapely.get_num_coordinates(f.geometry) for f in exact)
    for s, e in zip(simple, exact, strict=True):  # the same order: only the geometry differs
        # GEOS keeps every dropped vertex within the tolerance of the edge that replaced it; the Hausdorff distance
        # between the rings may exceed it by a hair (0.60025 m here)
        assert s.geometry.is_valid and shapely.hausdorff_distance(s.geometry, e.geometry) <= 0.6 * 1.01
        assert s.area == pytest.approx(s.geometry.area)


def test_a_bad_suffix_is_one_config_error_naming_vector() -> None:
    with pytest.raises(ConfigError, match=r"--vector 'out.shp' must end in \.gpkg or \.geojson or \.parquet"):
        sink_for(vs.VECTOR, "out.shp")
    with pytest.raises(ConfigError, match="--vector-simplify"):
        RunSettings(input="in.tif", output="out.tif", vector_simplify=1.0)
    with pytest.raises(ConfigError, match="--vector-min-area must be a number >= 0"):
        RunSettings(input="in.tif", output="out.tif", vector="out.gpkg", vector_min_area=-1.0)


def test_a_failed_write_leaves_nothing(spacenet_mask: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills after a few batches are in: an OutputError, and neither the file nor its temporary."""
    out = tmp_path / "buildings.gpkg"
    monkeypatch.setattr(pg, "BATCH", 10)
    monkeypatch.setattr(vs, "BATCH", 10)
    real = vs.write_gpkg
    calls = []

    def write_then_fail(path: Path, items: Iterable[pg.Feature], info: pg.MaskInfo, *, layer: str) -> object:
        def failing() -> Iterable[pg.Feature]:
            for i, item in enumerate(items):
                calls.append(i)
                if i == 25:
                    raise OSError(28, "No space left on device")
                yield item

        return real(path, failing(), info, layer=layer)

    monkeypatch.setattr(vs, "write_gpkg", write_then_fail)
    with pytest.raises(OutputError, match="No space left on device"):
        vs.write_vector(str(spacenet_mask), out)
    assert len(calls) == 26 and not out.exists() and not partial_path(out).exists()
    assert not list(tmp_path.iterdir())


# --- a run -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The top-left 256x192 corner of the Landsat scene (the same transform), nodata included."""
    path = tmp_path_factory.mktemp("scene") / "corner.tif"
    with rasterio.open(DATA / "RGB.byte.tif") as src:
        window = rasterio.windows.Window(0, 0, 256, 192)
        profile = {**src.profile, "width": 256, "height": 192, "transform": src.transform}
        for key in ("blockxsize", "blockysize", "tiled"):
            profile.pop(key, None)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
    return path


def test_a_run_writes_polygons_of_its_mask(small_scene: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    from segpipe.pipeline.run import run_scene

    output, vector = tmp_path / "mask.tif", tmp_path / "mask.gpkg"
    settings = RunSettings(
        input=str(small_scene), output=str(output), vector=str(vector), model=str(rgb_checkpoint), executor="local"
    )
    summary = run_scene(settings)
    info = pyogrio.read_info(vector)
    assert summary["vector"]["path"] == str(vector) and summary["vector"]["format"] == "GeoPackage"
    assert summary["vector"]["features"] == info["features"] > 0
    assert info["crs"] == "EPSG:32618"
    with rasterio.open(output) as src:
        mask, pixel_area = src.read(1), abs(src.transform.determinant)
    _, _, geometry, fields = pyogrio.raw.read(vector)
    areas = shapely.area(shapely.from_wkb(geometry))
    names = summary["class_histogram"]
    for class_id, name in enumerate(("class0", "class1", "class2")):
        assert areas[fields[0] == class_id].sum() == pytest.approx(pixel_area * (mask == class_id).sum())
        assert summary["vector"]["features_per_class"].get(name, 0) == int((fields[0] == class_id).sum())
        assert name not in names or names[name] == int((mask == class_id).sum())
    assert (mask == 255).any(), "the corner has nodata, which no polygon covers"


def test_a_run_whose_polygons_fail_leaves_no_output(
    small_scene: Path, rgb_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.pipeline.run import run_scene

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vs, "write_features", full)
    output, vector = tmp_path / "mask.tif", tmp_path / "mask.geojson"
    settings = RunSettings(
        input=str(small_scene), output=str(output), vector=str(vector), model=str(rgb_checkpoint), executor="local"
    )
    with pytest.raises(OutputError, match=r"could not write .*mask\.geojson"):
        run_scene(settings)
    assert not list(tmp_path.iterdir()), "neither the mask, nor the polygons, nor a summary"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 with the environment pointing at it (as tests/cluster's fixture)."""
    server = S3Server()
    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": server.url}.items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()


def test_polygons_on_object_storage(small_scene: Path, rgb_checkpoint: Path, s3: S3Server) -> None:
    """OUTPUT and --vector on S3 (moto's server): the polygons are read back from the uploaded mask through GDAL
    and uploaded as one object."""
    from segpipe.core import objects
    from segpipe.pipeline.run import run_scene

    s3.bucket("out")
    settings = RunSettings(
        input=str(small_scene),
        output="s3://out/x/mask.tif",
        vector="s3://out/x/mask.geojson",
        model=str(rgb_checkpoint),
        executor="local",
    )
    summary = run_scene(settings)
    collection = json.loads(objects.read_bytes("s3://out/x/mask.geojson"))
    assert summary["vector"]["path"] == "s3://out/x/mask.geojson"
    assert len(collection["features"]) == summary["vector"]["features"] > 0
    with pytest.raises(OutputError, match=r"--vector 's3://other/mask\.gpkg' is not beside OUTPUT"):
        run_scene(dataclasses.replace(settings, vector="s3://other/mask.gpkg", overwrite=True))
