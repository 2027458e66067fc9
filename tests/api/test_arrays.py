"""segpipe.segment on xarray: numpy- and dask-backed DataArrays, a time series, an odc-stac load of a STAC
ItemCollection; masks as lazy, georeferenced xarray (segpipe.open_mask). The file path is the reference: the same
pixels give the same mask."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import rasterio

import segpipe

xr = pytest.importorskip("xarray")
rioxarray = pytest.importorskip("rioxarray")

SCENE = Path(__file__).resolve().parents[1] / "data" / "RGB.byte.tif"


@pytest.fixture
def options(rgb_checkpoint: Path, tmp_path: Path) -> dict[str, object]:
    return {"model": str(rgb_checkpoint), "executor": "local", "work_dir": str(tmp_path / "work")}


@pytest.fixture(scope="module")
def file_mask(rgb_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The mask of the scene run as a file (the reference)."""
    out = tmp_path_factory.mktemp("file") / "file.tif"
    segpipe.segment(SCENE, out, model=str(rgb_checkpoint), executor="local")
    with rasterio.open(out) as src:
        return src.read(1)


def test_a_numpy_array_gives_the_files_mask_on_the_files_grid(options: dict, file_mask: np.ndarray) -> None:
    array = rioxarray.open_rasterio(SCENE).load()  # numpy-backed
    ds = segpipe.segment(array, **options)
    assert ds["mask"].chunks is not None  # lazy: opened, not read
    assert np.array_equal(ds["mask"].values, file_mask)
    with rasterio.open(SCENE) as src:
        assert ds.rio.crs == src.crs
        assert tuple(ds["mask"].rio.transform())[:6] == tuple(src.transform)[:6]
        nodata = (src.read() == 0).all(axis=0)
    assert (ds["mask"].values[nodata] == 255).all() and ds["mask"].attrs["_FillValue"] == 255
    assert ds["mask"].attrs["class_names"] == ["class0", "class1", "class2"]
    assert ds["mask"].attrs["colours"][0] == "#e6194b"


def test_a_dask_time_series_gives_one_mask_per_step(options: dict, file_mask: np.ndarray) -> None:
    scene = rioxarray.open_rasterio(SCENE, chunks={"x": 200, "y": 200})  # chunks that do not fit the tiles
    holed = scene.where(scene.x > scene.x[300], 0).astype("uint8")  # the west part made nodata
    series = xr.concat([scene, holed], dim="time").assign_coords(
        time=[np.datetime64("2026-11-01"), np.datetime64("2026-11-15")]
    )
    series.attrs.update(scene.attrs)
    ds = segpipe.segment(series, **options)
    assert ds["mask"].dims == ("time", "y", "x")
    assert list(ds["time"].values) == list(series["time"].values)
    assert np.array_equal(ds["mask"].isel(time=0).values, file_mask)
    second = ds["mask"].isel(time=1).values
    assert (second[:, :300] == 255).all()
    assert np.array_equal(second[:, 301 + 16 :], file_mask[:, 301 + 16 :])  # beyond the halo: the same


def test_a_time_series_to_a_folder_writes_one_cog_per_step(options: dict, tmp_path: Path) -> None:
    scene = rioxarray.open_rasterio(SCENE, chunks={"x": 256, "y": 256})
    series = xr.concat([scene, scene], dim="time").assign_coords(time=[0, 1])
    series.attrs.update(scene.attrs)
    summaries = segpipe.segment(series, tmp_path / "masks", **options)
    assert [Path(s["output"]).name for s in summaries] == ["mask-0.tif", "mask-1.tif"]
    first, second = (segpipe.open_mask(s["output"])["mask"].values for s in summaries)
    assert np.array_equal(first, second)


def _items(path: Path, days: list[int]) -> object:
    """A STAC ItemCollection of the real scene at ``path``, one Item per day (local hrefs, projection extension)."""
    import pystac
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        proj = {
            "proj:code": f"EPSG:{src.crs.to_epsg()}",
            "proj:shape": [src.height, src.width],
            "proj:transform": list(src.transform)[:6],
        }
        bands = [{"data_type": src.dtypes[0], "nodata": src.nodata}] * src.count
    geometry = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
    items = []
    for day in days:
        item = pystac.Item(
            f"scene-{day}",
            geometry,
            [w, s, e, n],
            dt.datetime(2026, 11, day, tzinfo=dt.UTC),
            proj,
            stac_extensions=[
                "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
                "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            ],
        )
        item.add_asset(
            "image",
            pystac.Asset(
                str(path), media_type=pystac.MediaType.GEOTIFF, roles=["data"], extra_fields={"raster:bands": bands}
            ),
        )
        items.append(item)
    return pystac.ItemCollection(items)


def test_an_odc_stac_load_of_an_item_collection(options: dict, file_mask: np.ndarray) -> None:
    odc_stac = pytest.importorskip("odc.stac")
    loaded = odc_stac.load(_items(SCENE, [1, 15]), bands=["image.1", "image.2", "image.3"], chunks={"x": 256, "y": 256})
    ds = segpipe.segment(loaded, bands="1,2,3", **options)  # a Dataset: its variables are the bands
    assert ds["mask"].sizes["time"] == 2
    for k in range(2):
        assert np.array_equal(ds["mask"].isel(time=k).values, file_mask)


def test_open_mask_is_lazy_and_writes_back_as_geotiff(options: dict, tmp_path: Path) -> None:
    summary = segpipe.segment(SCENE, tmp_path / "m.tif", probabilities=True, **options)
    ds = segpipe.open_mask(summary["output"])
    assert set(ds.data_vars) == {"mask", "probabilities"}
    assert ds["probabilities"].dims == ("class", "y", "x")
    assert list(ds["class"].values) == ["class0", "class1", "class2"]
    assert ds["mask"].data.npartitions >= 1 and ds["mask"].chunks is not None
    ds["mask"].rio.to_raster(tmp_path / "again.tif")
    with rasterio.open(tmp_path / "again.tif") as again, rasterio.open(summary["output"]) as first:
        assert again.crs == first.crs and again.transform.almost_equals(first.transform)  # rioxarray: from coords
        assert np.array_equal(again.read(1), first.read(1))
    probabilities = ds["probabilities"].values.astype(float)
    valid = ds["mask"].values != 255
    total = probabilities[:, valid].sum(axis=0) / 254  # probability x 254 per class: about 1 in sum
    assert np.allclose(total, 1, atol=0.02)


def test_a_warm_session_loads_the_model_once(options: dict, tmp_path: Path) -> None:
    array = rioxarray.open_rasterio(SCENE).load()
    with segpipe.Session(executor="local") as session:
        first = session.segment(array, **options)
        second = session.segment(SCENE, tmp_path / "f.tif", **options)
        assert len(session._pool.local_segmenters) == 1
    with rasterio.open(second["output"]) as src:
        assert np.array_equal(first["mask"].values, src.read(1))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda a: a.transpose("y", "x", "band"), "dims ('y', 'x', 'band')"),
        (lambda a: a.astype("complex64"), "dtype complex64"),
        (lambda a: a.isel(x=[0, 1, 3, 4, *list(range(5, 791))]), "not regularly spaced"),
    ],
    ids=["dims", "dtype", "irregular"],
)
def test_an_unusable_array_is_one_clear_error_and_writes_nothing(
    make: object, message: str, options: dict, tmp_path: Path
) -> None:
    array = make(rioxarray.open_rasterio(SCENE).load())  # type: ignore[operator]
    with pytest.raises(segpipe.InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        segpipe.segment(array, tmp_path / "out.tif", **options)
    assert not (tmp_path / "out.tif").exists()


def test_an_unknown_option_names_the_options(options: dict) -> None:
    with pytest.raises(segpipe.ConfigError, match="unknown option 'tilesize'"):
        segpipe.segment(SCENE, tilesize=64, **options)


COMPUTED: list[tuple[int, ...]] = []


def record(block: np.ndarray) -> np.ndarray:
    """A chunk function that notes the chunks computed (module level: pickled by reference, one list)."""
    COMPUTED.append(block.shape)
    return block


def test_staging_a_dask_array_computes_no_pixel(tmp_path: Path) -> None:
    import dask.array as da

    from segpipe.core.tiles import Window
    from segpipe.pipeline.sources.array import ArraySource, stage_array

    computed = COMPUTED
    computed.clear()
    scene = rioxarray.open_rasterio(SCENE, chunks={"band": -1, "x": 256, "y": 256})
    meta = np.empty((0, 0, 0), dtype=scene.dtype)  # else map_blocks calls record once to learn it
    watched = scene.copy(data=da.map_blocks(record, scene.data, dtype=scene.dtype, meta=meta))
    path = stage_array(watched, tmp_path)
    assert computed == []  # described, fingerprinted and staged from the graph alone
    with ArraySource(path) as src:
        pixels, _ = src.read(Window(300, 300, 40, 40))  # inside one chunk
    assert computed == [(3, 256, 256)]  # only the chunk the window touches
    assert np.array_equal(pixels, scene.values[:, 300:340, 300:340])


def test_sentinel2_band_names_choose_the_models_bands_as_for_the_file(tmp_path: Path) -> None:
    chip = SCENE.parent / "Spain_7370579_S2Hand.tif"  # 13 bands named B1..B12, int16 reflectance
    options = {"executor": "local", "scaling": "minmax:0,3000"}
    file_summary = segpipe.segment(chip, tmp_path / "file.tif", **options)
    ds = segpipe.segment(rioxarray.open_rasterio(chip, chunks={"x": 256, "y": 256}), work_dir=str(tmp_path), **options)
    with rasterio.open(file_summary["output"]) as src:
        assert np.array_equal(ds["mask"].values, src.read(1))


def test_a_dask_array_on_ray_segmenters_equals_in_process(options: dict, file_mask: np.ndarray) -> None:
    scene = rioxarray.open_rasterio(SCENE, chunks={"band": -1, "x": 128, "y": 128})
    ds = segpipe.segment(scene, **{**options, "executor": "ray", "workers": 1})
    assert np.array_equal(ds["mask"].values, file_mask)


def test_a_blended_array_run_equals_the_file_and_resumes_from_its_work_dir(
    rgb_checkpoint: Path, tmp_path: Path
) -> None:
    options = {"model": str(rgb_checkpoint), "executor": "local", "blend": "cosine", "work_dir": str(tmp_path / "w")}
    file_summary = segpipe.segment(SCENE, tmp_path / "file.tif", **options)
    array = rioxarray.open_rasterio(SCENE, chunks={"band": -1, "x": 300, "y": 300})
    first = segpipe.segment(array, tmp_path / "array.tif", **options)
    again = segpipe.segment(array, tmp_path / "again.tif", **options)  # same graph, same staged path: resumed
    assert not first["ingest_reused"] and again["ingest_reused"]
    assert again["tiles"]["reused"] == again["tiles"]["total"] - again["tiles"]["skipped_nodata"]
    with rasterio.open(file_summary["output"]) as f, rasterio.open(again["output"]) as a:
        assert np.array_equal(f.read(1), a.read(1))


def test_open_mask_refuses_a_file_segpipe_did_not_write(tmp_path: Path) -> None:
    with pytest.raises(segpipe.InputError, match="not a mask segpipe wrote"):
        segpipe.open_mask(SCENE)
    with pytest.raises(segpipe.InputError):
        segpipe.open_mask(tmp_path / "missing.tif")
