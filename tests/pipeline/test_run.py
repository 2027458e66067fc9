"""The whole job on real rasters (stages called directly, in-process segmenter): grids, nodata, bands,
re-runs, failures. The Prefect + Ray path is exercised by tests/test_cli.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from segpipe.core.errors import ModelError, OutputError
from segpipe.core.files import partial_path
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.settings import RunSettings


def run(scene: Path, output: Path, **options: object) -> dict:
    settings = RunSettings(input=str(scene), output=str(output), executor="local", **options)  # type: ignore[arg-type]
    return run_scene(settings)


def assert_same_grid(scene: Path, output: Path) -> None:
    with rasterio.open(scene) as src, rasterio.open(output) as out:
        assert (out.width, out.height) == (src.width, src.height)
        assert out.crs == src.crs
        assert out.transform == src.transform
        assert out.nodata == 255 and out.dtypes[0] == "uint8"
        invalid = src.dataset_mask() == 0
        mask = out.read(1)
        assert (mask[invalid] == 255).all(), "input nodata must be output nodata"
        assert (mask[~invalid] != 255).all(), "every valid pixel gets a class"
    assert cog_validate(str(output), quiet=True)[0]


def test_landsat_scene_keeps_its_grid_and_nodata(data_dir: Path, tmp_path: Path) -> None:
    scene = data_dir / "RGB.byte.tif"
    output = tmp_path / "mask.tif"
    summary = run(scene, output, probabilities=str(tmp_path / "probs.tif"))
    assert_same_grid(scene, output)
    with rasterio.open(output) as out:
        assert out.colormap(1)[0] == (0x3C, 0x10, 0x98, 255)  # building, the dataset's own colour
        assert out.tags()["CLASS_NAMES"].split(",")[0] == "building"
        assert out.overviews(1), "a COG has overviews"
    with rasterio.open(tmp_path / "probs.tif") as probs:
        assert probs.count == 6 and probs.descriptions[0] == "building"
        p = probs.read(masked=True).astype(np.float64) / 254
        assert np.allclose(p.sum(axis=0).compressed(), 1.0, atol=0.02)
    saved = json.loads((tmp_path / "mask.summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert summary["scene"] == {
        "width": 791,
        "height": 718,
        "bands": 3,
        "dtype": "uint8",
        "crs": "EPSG:32618",
        "georeferenced": True,
        "megapixels": 0.568,
    }
    assert sum(summary["class_histogram"].values()) == 791 * 718
    assert set(summary["seconds"]) == {"validate", "session", "ingest", "infer", "stitch", "export", "total", "wall"}
    assert summary["seconds"]["wall"] >= summary["seconds"]["total"]
    assert summary["tiles"]["blend"] == "crop"  # the default: no stitch pass
    work = summary["segmenter_seconds"]
    assert work["compute"] > 0 and work["busy"] >= work["compute"]
    assert work["waiting_for_reads"] >= 0 and work["waiting_for_writes"] >= 0


def test_crop_without_probabilities_gives_the_same_mask(data_dir: Path, tmp_path: Path) -> None:
    # without --probabilities the segmenters argmax the logits and skip the softmax: same classes
    scene = data_dir / "RGB.byte.tif"
    run(scene, tmp_path / "with.tif", probabilities=str(tmp_path / "probs.tif"))
    run(scene, tmp_path / "without.tif")
    with rasterio.open(tmp_path / "with.tif") as a, rasterio.open(tmp_path / "without.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))


def test_all_nodata_tiles_are_skipped_and_stay_nodata(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    scene = data_dir / "RGB.byte.tif"  # its rotated footprint leaves whole corners without data
    summary = run(scene, tmp_path / "m.tif", model=str(rgb_checkpoint), tile_size=64, halo=16, blend="crop")
    tiles = summary["tiles"]
    assert tiles["total"] == 13 * 12
    assert tiles["skipped_nodata"] > 0
    assert tiles["computed"] + tiles["skipped_nodata"] == tiles["total"]
    assert_same_grid(scene, tmp_path / "m.tif")


def test_sentinel2_int16_thirteen_bands(data_dir: Path, make_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bands = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
    model = make_checkpoint("s2", bands=bands, mean=(1500.0,) * 13, std=(1000.0,) * 13, classes=2)
    scene = data_dir / "Spain_7370579_S2Hand.tif"
    summary = run(scene, tmp_path / "water.tif", model=str(model), blend="gaussian")
    assert summary["scene"]["bands"] == 13 and summary["scene"]["dtype"] == "int16"
    assert_same_grid(scene, tmp_path / "water.tif")


def test_spacenet_uint16_panchromatic(data_dir: Path, make_checkpoint, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make_checkpoint("pan", bands=("pan",), mean=(400.0,), std=(200.0,), classes=2)
    scene = data_dir / "sample_geotiff.tif"
    run(scene, tmp_path / "buildings.tif", model=str(model), blend="cosine", tile_size=128, halo=32)
    assert_same_grid(scene, tmp_path / "buildings.tif")


def test_band_count_mismatch_names_both_counts(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"takes 3 band\(s\) \(red, green, blue\) but the scene .* has only 1 "):
        run(data_dir / "sample_geotiff.tif", tmp_path / "x.tif")
    assert list(tmp_path.iterdir()) == []


def test_unreferenced_image_warns_once_and_keeps_pixel_coordinates(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = next((data_dir / "dubai").glob("*.jpg"))
    with caplog.at_level(logging.WARNING):
        summary = run(image, tmp_path / "m.tif", model=str(rgb_checkpoint))
    warnings = [r for r in caplog.records if "no georeferencing" in r.getMessage()]
    assert len(warnings) == 1
    assert summary["scene"]["georeferenced"] is False and summary["scene"]["crs"] is None
    with rasterio.open(image) as src, rasterio.open(tmp_path / "m.tif") as out:
        assert (out.width, out.height) == (src.width, src.height)
        assert out.crs is None and out.transform.is_identity


def test_rerun_with_work_dir_reuses_everything_and_is_byte_identical(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    scene = data_dir / "RGB.byte.tif"
    work = tmp_path / "work"
    first = run(scene, tmp_path / "a.tif", model=str(rgb_checkpoint), work_dir=str(work), tile_size=128, halo=16)
    second = run(scene, tmp_path / "b.tif", model=str(rgb_checkpoint), work_dir=str(work), tile_size=128, halo=16)
    assert second["ingest_reused"] is True
    assert second["tiles"]["computed"] == 0
    assert second["tiles"]["reused"] == first["tiles"]["computed"] > 0
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    # a fresh work store gives the same bytes too
    run(scene, tmp_path / "c.tif", model=str(rgb_checkpoint), tile_size=128, halo=16)
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "c.tif").read_bytes()


def test_existing_output_is_refused_unless_overwrite(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "m.tif"
    output.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        run(data_dir / "RGB.byte.tif", output, model=str(rgb_checkpoint))
    assert output.read_bytes() == b"precious"
    run(data_dir / "RGB.byte.tif", output, model=str(rgb_checkpoint), overwrite=True, tile_size=128, halo=16)
    assert_same_grid(data_dir / "RGB.byte.tif", output)


def test_failed_export_leaves_nothing_next_to_the_output(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rasterio.shutil

    def disk_full(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"partial")  # GDAL got some way before the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rasterio.shutil, "copy", disk_full)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(OutputError, match="No space left on device"):
        run(data_dir / "RGB.byte.tif", out_dir / "m.tif", model=str(rgb_checkpoint), tile_size=128, halo=16)
    assert list(out_dir.iterdir()) == []
    assert not partial_path(out_dir / "m.tif").exists()


def test_large_scene_is_sharded_and_still_exact(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    """With small tiles the scene has more chunks than the sharding threshold: image and valid are sharded (one shard
    per ingest region), and the mask is identical to an unsharded run's."""
    from segpipe.pipeline import store as ws

    scene = data_dir / "RGB.byte.tif"
    options = {"model": str(rgb_checkpoint), "tile_size": 64, "halo": 16, "blend": "crop"}
    run(scene, tmp_path / "sharded.tif", work_dir=str(tmp_path / "w1"), **options)
    store = ws.WorkStore(str(next((tmp_path / "w1").glob("*.zarr"))), mode="r")
    assert store.array(ws.IMAGE).shards is not None
    threshold = ws.SHARD_ABOVE_CHUNKS
    try:
        ws.SHARD_ABOVE_CHUNKS = 10**9
        run(scene, tmp_path / "plain.tif", work_dir=str(tmp_path / "w2"), **options)
    finally:
        ws.SHARD_ABOVE_CHUNKS = threshold
    store = ws.WorkStore(str(next((tmp_path / "w2").glob("*.zarr"))), mode="r")
    assert store.array(ws.IMAGE).shards is None
    assert (tmp_path / "sharded.tif").read_bytes() == (tmp_path / "plain.tif").read_bytes()
