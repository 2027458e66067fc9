"""Tiles read in place (``--ingest auto|never``) against the copy in the work store (``--ingest always``): the same
bytes for nodata, float NaN, band selections and probabilities; which scenes are read in place; a changed scene
refused; resume; and the segmenter's fast argmax and normalisation equal to the plain ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.files import sha256_file
from segpipe.core.pixels import normalise
from segpipe.core.tiles import TileGrid
from segpipe.pipeline.ingest import MAX_OVERREAD, reads_in_place
from segpipe.pipeline.merge import class_ids
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.scene import Layout, SceneInfo
from segpipe.pipeline.settings import RunSettings
from segpipe.pipeline.tile_reader import SceneTiles, StoreTiles


def _run(scene: Path, out: Path, model: Path | str, **options: object) -> dict:
    settings = RunSettings(input=str(scene), output=str(out), model=str(model), executor="local", **options)  # type: ignore[arg-type]
    return run_scene(settings)


def _float_scene(path: Path, *, tiled: bool = True) -> Path:
    """A 3-band float32 GeoTIFF, 200 x 150, 64 px tiles, with a NaN hole and a band-wise Inf."""
    rng = np.random.default_rng(3)
    data = rng.uniform(0, 255, (3, 150, 200)).astype(np.float32)
    data[:, 40:70, 50:120] = np.nan
    data[1, 100:110, 10:30] = np.inf
    data[:, 0:20, 150:200] = 0  # nodata under --nodata 0
    profile = {
        "driver": "GTiff",
        "width": 200,
        "height": 150,
        "count": 3,
        "dtype": "float32",
        "crs": "EPSG:32633",
        "transform": from_origin(500000, 4000000, 10, 10),
    }
    if tiled:
        profile.update(tiled=True, blockxsize=64, blockysize=64)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _both(
    scene: Path, tmp_path: Path, model: Path | str, *, probabilities: bool = False, **options: object
) -> tuple[dict, dict]:
    """Run the scene read in place and copied; assert every output file is byte-identical."""
    summaries = []
    for mode in ("never", "always"):
        folder = tmp_path / mode
        folder.mkdir()
        extra = {"probabilities": str(folder / "probs.tif")} if probabilities else {}
        summaries.append(_run(scene, folder / "mask.tif", model, ingest=mode, **options, **extra))
    names = sorted(p.name for p in (tmp_path / "never").glob("*.tif"))
    assert names == (["mask.tif", "probs.tif"] if probabilities else ["mask.tif"])
    for name in names:
        assert sha256_file(tmp_path / "never" / name) == sha256_file(tmp_path / "always" / name), name
    assert summaries[0]["scene_copied"] is False and summaries[1]["scene_copied"] is True
    return summaries[0], summaries[1]


def test_nodata_scene_in_place_equals_copy_with_probabilities(
    data_dir: Path, tmp_path: Path, rgb_checkpoint: Path
) -> None:
    in_place, copied = _both(data_dir / "RGB.byte.tif", tmp_path, rgb_checkpoint, probabilities=True)
    assert in_place["tiles"] == copied["tiles"]
    assert in_place["tiles"]["skipped_nodata"] > 0  # the count pass found the all-nodata corner tiles


def test_float_nan_scene_in_place_equals_copy(tmp_path: Path, rgb_checkpoint: Path) -> None:
    scene = _float_scene(tmp_path / "float.tif")
    _both(scene, tmp_path, rgb_checkpoint, scaling="none")
    with rasterio.open(tmp_path / "never" / "mask.tif") as out:
        assert (out.read(1)[40:70, 50:120] == 255).all(), "NaN stays nodata"


def test_band_selection_and_nodata_in_place_equal_copy(tmp_path: Path, rgb_checkpoint: Path) -> None:
    scene = _float_scene(tmp_path / "float.tif")
    _both(scene, tmp_path, rgb_checkpoint, bands="3,1,2", nodata=0.0, scaling="none")
    with rasterio.open(tmp_path / "never" / "mask.tif") as out:
        assert (out.read(1)[0:20, 150:200] == 255).all(), "--nodata 0 is nodata"


def test_auto_reads_tiled_scenes_in_place_and_copies_others(tmp_path: Path, rgb_checkpoint: Path) -> None:
    tiled = _float_scene(tmp_path / "tiled.tif")
    assert _run(tiled, tmp_path / "a.tif", rgb_checkpoint, scaling="none")["scene_copied"] is False
    png = tmp_path / "scene.png"
    with (
        rasterio.open(tiled) as src,
        rasterio.open(png, "w", driver="PNG", width=200, height=150, count=3, dtype="uint8") as dst,
    ):
        dst.write(np.nan_to_num(src.read()).astype(np.uint8))
    assert _run(png, tmp_path / "b.tif", rgb_checkpoint)["scene_copied"] is True
    cosine = _run(tiled, tmp_path / "c.tif", rgb_checkpoint, scaling="none", blend="cosine")
    assert cosine["scene_copied"] is True  # blending reads the copy's validity


def test_never_with_a_blend_is_refused() -> None:
    with pytest.raises(ConfigError, match="--ingest never"):
        RunSettings(input="a.tif", output="b.tif", ingest="never", blend="cosine")


def _layout(driver: str, rows: int, cols: int) -> SceneInfo:
    return SceneInfo(
        "s.tif",
        8192,
        8192,
        3,
        "uint8",
        None,
        (1, 0, 0, 0, 1, 0),
        None,
        ("",) * 3,
        False,
        "f",
        layout=Layout(driver, (rows, cols), True),
    )


def test_which_layouts_read_in_place() -> None:
    assert reads_in_place(_layout("GTiff", 512, 512), 1088)
    assert reads_in_place(_layout("COG", 256, 256), 1088)
    assert not reads_in_place(_layout("GTiff", 1, 8192), 1088), "full-width strips decode 7.5x the tile"
    assert not reads_in_place(_layout("JPEG", 8, 8192), 1088)
    assert not reads_in_place(_layout("VRT", 128, 128), 1088)
    no_layout = SceneInfo("s.tif", 10, 10, 1, "uint8", None, (1, 0, 0, 0, 1, 0), None, ("",), False, "f")
    assert not reads_in_place(no_layout, 1088)


@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    rows=st.integers(1, 4096),
    cols=st.integers(1, 4096),
    size=st.integers(16, 2048),
)
def test_in_place_only_when_the_overread_is_bounded(width: int, height: int, rows: int, cols: int, size: int) -> None:
    scene = SceneInfo(
        "s.tif",
        width,
        height,
        1,
        "uint8",
        None,
        (1, 0, 0, 0, 1, 0),
        None,
        ("",),
        False,
        "f",
        layout=Layout("GTiff", (rows, cols), True),
    )
    decoded = min(height, size + rows - 1) * min(width, size + cols - 1)
    needed = min(height, size) * min(width, size)
    assert reads_in_place(scene, size) == (decoded <= MAX_OVERREAD * needed)
    if rows <= size // 2 and cols <= size // 2:
        assert reads_in_place(scene, size), "blocks of at most half a tile always read in place"


def test_scene_reader_equals_store_reader(data_dir: Path, tmp_path: Path, rgb_checkpoint: Path) -> None:
    from segpipe.pipeline import store as ws
    from segpipe.pipeline.ingest import ingest

    scene = describe_scene(str(data_dir / "RGB.byte.tif"))
    store = ws.WorkStore(str(tmp_path / "s.zarr"))
    ingest(scene, store, chunk_size=128)
    grid = TileGrid(scene.width, scene.height, 128, 40)
    direct, copy = SceneTiles(scene), StoreTiles(store)
    try:
        for tile in grid:
            (a, va), (b, vb) = direct.read(tile), copy.read(tile)
            assert np.array_equal(a, b) and np.array_equal(va, vb)
    finally:
        direct.close()


def test_a_scene_changed_during_the_run_is_refused(tmp_path: Path) -> None:
    path = _float_scene(tmp_path / "scene.tif")
    scene = describe_scene(str(path))
    with rasterio.open(path, "r+") as dst:
        dst.write(np.zeros((3, 150, 200), np.float32))
    os.utime(path, (1, 1))  # another time: another identity
    reader = SceneTiles(scene)
    with pytest.raises(InputError, match="changed after the run started"):
        reader.read(TileGrid(200, 150, 64, 8).tile(0, 0))


def test_resume_in_place_reuses_done_tiles(data_dir: Path, tmp_path: Path, rgb_checkpoint: Path) -> None:
    work = tmp_path / "work"
    first = _run(data_dir / "RGB.byte.tif", tmp_path / "a.tif", rgb_checkpoint, work_dir=str(work), ingest="never")
    again = _run(data_dir / "RGB.byte.tif", tmp_path / "b.tif", rgb_checkpoint, work_dir=str(work), ingest="never")
    assert again["ingest_reused"] and again["tiles"]["computed"] == 0
    assert again["tiles"]["reused"] == first["tiles"]["computed"]
    assert sha256_file(tmp_path / "a.tif") == sha256_file(tmp_path / "b.tif")


@settings(max_examples=60, deadline=None)
@given(
    classes=st.integers(1, 9),
    side=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
    nan=st.booleans(),
)
def test_class_ids_equal_torch_argmax(classes: int, side: int, seed: int, ties: bool, nan: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, classes, side, side, generator=gen)
    if ties:
        scores = torch.round(scores)  # many equal maxima: the first one must win
    if nan:
        scores[0, classes - 1, 0, 0] = float("nan")
    expected = torch.argmax(scores, dim=1).to(torch.uint8)
    assert torch.equal(class_ids(scores), expected)


@given(
    pixels=st.lists(st.integers(0, 65535), min_size=12, max_size=12),
    mean=st.floats(-1000, 1000),
    std=st.floats(0.01, 1000),
    hole=st.booleans(),
)
def test_normalise_equals_the_plain_formula(pixels: list[int], mean: float, std: float, hole: bool) -> None:
    x = np.asarray(pixels, dtype=np.uint16).reshape(3, 2, 2)
    valid = np.ones((2, 2), np.uint8)
    if hole:
        valid[0, 1] = 0
    m = np.full((3, 1, 1), mean, np.float32)
    s = np.full((3, 1, 1), std, np.float32)
    plain = (x.astype(np.float32) - m) / s * valid[None].astype(np.float32)
    assert normalise(x, [mean] * 3, [std] * 3, valid).tobytes() == plain.tobytes()  # -0.0 and all
