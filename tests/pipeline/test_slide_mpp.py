"""``--mpp``: a microscopy image's level-0 pixel size stated by the user. A plain RGB strip TIFF (no pixel size, no
georeferencing) is read as a one-level slide (``openslide.ImageSlide``) with it, and by GDAL as before without it;
it replaces a slide's own pixel size; it is refused for a georeferenced scene and for values that are no pixel
size. The real kidney TIFF in ../shared/data/wsi runs end to end with it when present."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.tiles import Window
from segpipe.models.metadata import ModelMetadata
from segpipe.pipeline.read import describe_scene, open_source
from segpipe.pipeline.scene import Selection
from segpipe.pipeline.settings import RunSettings
from segpipe.pipeline.sources.slide import MAX_SLIDE_MPP
from tests.pipeline.test_slides import _run, write_geotiff, write_slide

WIDTH, HEIGHT = 401, 301  # odd: the grid at twice the pixel size rounds up
BLOBS = ((80, 100, 40), (200, 300, 30))  # (row, col, radius) of stained tissue on white glass


def write_plain(path: Path) -> Path:
    """A plain RGB strip TIFF (not tiled, uncompressed, no resolution tags): white with two pink/purple blobs."""
    rng = np.random.default_rng(3)
    image = (245 + rng.integers(0, 6, (HEIGHT, WIDTH, 3))).astype(np.uint8)
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    for row, col, radius in BLOBS:
        inside = (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
        stain = np.array([170, 80, 150]) + rng.integers(-25, 25, (int(inside.sum()), 3))
        image[inside] = np.clip(stain, 0, 255).astype(np.uint8)
    tifffile.imwrite(path, image, photometric="rgb")  # strips
    return path


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return write_plain(tmp_path / "plain.tif")


def _meta() -> ModelMetadata:
    data = json.loads((Path(__file__).parents[2] / "models" / "weights" / "default.json").read_text())
    return ModelMetadata.from_dict(data, source="x")


def test_a_plain_image_with_mpp_runs_as_a_slide_by_microns_per_pixel(
    plain: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    output, vector = tmp_path / "mask.ome.tif", tmp_path / "mask.geojson"
    summary = _run(plain, output, rgb_checkpoint, mpp=0.5, resolution="1um", vector=str(vector))
    width, height = math.ceil(WIDTH / 2), math.ceil(HEIGHT / 2)  # 1 um = 2 level-0 pixels of 0.5 um
    assert (summary["scene"]["width"], summary["scene"]["height"]) == (width, height) == (201, 151)
    slide = summary["fit"]["slide"]
    assert (slide["levels"], slide["factor"], slide["mpp"]) == (1, 2.0, [1.0, 1.0])
    assert (slide["mpp_option"], slide["stated_mpp"]) == (0.5, None)
    assert 0.03 < slide["tissue_share"] < 0.2  # otsu, the default for slides
    tiles = summary["tiles"]
    assert tiles["skipped_nodata"] > 0 and tiles["computed"] + tiles["skipped_nodata"] == tiles["total"]
    with tifffile.TiffFile(output) as tif:
        assert tif.is_ome and tif.series[0].shape == (height, width)
        physical = dict(re.findall(r'PhysicalSize([XY])="([^"]+)"', tif.ome_metadata or ""))
        assert float(physical["X"]) == 1.0 and float(physical["Y"]) == 1.0
        mask = tif.series[0].asarray()
    for row, col, _ in BLOBS:  # tissue classified where it is, glass nodata
        assert mask[row // 2, col // 2] != 255
    assert (mask[:, 170:] == 255).all() and (mask[130:, :] == 255).all()
    features = json.loads(vector.read_text())["features"]  # QuPath annotations in level-0 pixels
    assert features
    xs = [x for f in features for ring in _rings(f["geometry"]) for x, _ in ring]
    assert min(xs) >= 0 and max(xs) <= WIDTH + 1 and max(xs) > width  # level 0, not the mask's grid


def _rings(geometry: dict) -> list:  # type: ignore[type-arg]
    if geometry["type"] == "Polygon":
        return list(geometry["coordinates"])
    return [ring for polygon in geometry["coordinates"] for ring in polygon]


def test_without_mpp_a_plain_image_stays_with_gdal(plain: Path, tmp_path: Path) -> None:
    info = describe_scene(str(plain))
    assert (info.source, info.pyramid, info.georeferenced, info.width) == ("gdal", None, False, WIDTH)
    assert describe_scene(str(plain), Selection()).fingerprint == info.fingerprint
    assert Selection().to_attrs() == {"bands": None, "nodata": None, "resolution": None, "tissue": "none", "mpp": None}
    assert Selection(resolution=0.5, tissue="otsu").to_attrs() == {
        "bands": None,
        "nodata": None,
        "resolution": 0.5,
        "tissue": "otsu",
        "mpp": None,
    }
    chosen = Selection(resolution=1.0, tissue="otsu", mpp=0.5)
    assert Selection.from_attrs(chosen.to_attrs()) == chosen
    described = describe_scene(str(plain), mpp=0.5)  # the file as it states itself, read as a slide
    assert described.source == "slide" and described.pyramid is not None and described.pyramid.mpp is None
    assert described.selection == Selection() and described.fingerprint != info.fingerprint
    with open_source(str(plain), selection=Selection(mpp=0.5)) as src:  # one level, level 0 as it is
        assert (src.info.width, src.info.height, src.info.mpp) == (WIDTH, HEIGHT, (0.5, 0.5))
        data, valid = src.read(Window(WIDTH - 8, HEIGHT - 8, 16, 16))
    assert valid[:8, :8].all() and not valid[8:, :].any() and not valid[:, 8:].any()  # beyond the edge: nodata
    assert np.array_equal(data[:, :8, :8], np.moveaxis(tifffile.imread(plain)[-8:, -8:], -1, 0))


def test_mpp_replaces_what_a_slide_states(tmp_path: Path) -> None:
    from segpipe.pipeline.fit import fit_scene

    path = write_slide(tmp_path / "slide.tiff")  # 0.25 um per pixel, two levels (downsample 2)
    meta = _meta()
    stated = fit_scene(describe_scene(str(path)), meta, resolution="1um", tissue="none", compute=False)
    assert stated.slide is not None and stated.slide["factor"] == 4.0  # level 1 resampled by 2
    file = describe_scene(str(path), mpp=0.5)
    fit = fit_scene(file, meta, resolution="1um", tissue="none", mpp=0.5, compute=False)
    assert fit.slide is not None and (fit.slide["factor"], fit.slide["level"], fit.slide["resampled"]) == (
        2.0,
        1,
        False,
    )  # level 1 as it is
    assert (fit.slide["stated_mpp"], fit.slide["mpp"]) == ([0.25, 0.25], [1.0, 1.0])
    assert any("states 0.25 um per pixel; --mpp 0.5 replaces it" in w for w in fit.warnings)
    assert fit.scene.fingerprint != stated.scene.fingerprint
    with open_source(str(path), source=fit.scene.source, selection=fit.scene.selection) as src:  # as ingest opens
        assert src.info == fit.scene and src.plan.factor == 2.0
        assert src.info.pyramid is not None and src.info.pyramid.mpp == (0.5, 0.5)


def test_mpp_is_refused_for_a_georeferenced_scene_and_other_images(tmp_path: Path, rgb_checkpoint: Path) -> None:
    geotiff = write_geotiff(tmp_path / "scene.tif")
    with pytest.raises(InputError, match=r"georeferenced .* --mpp") as refused:
        _run(geotiff, tmp_path / "out.ome.tif", rgb_checkpoint, mpp=0.5)
    assert "\n" not in str(refused.value)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32), 200, dtype=np.uint8)).save(grey)
    with pytest.raises(InputError, match="not an 8-bit RGB image"):
        describe_scene(str(grey), mpp=0.5)
    with pytest.raises(InputError, match="at a URL"):
        describe_scene("s3://bucket/scene.tif", mpp=0.5)
    assert not (tmp_path / "out.ome.tif").exists()


@pytest.mark.parametrize("value", [0.0, -0.5, MAX_SLIDE_MPP * 1.01, float("nan"), float("inf")])
def test_bad_mpp_values_are_refused_with_one_line(value: float) -> None:
    with pytest.raises(ConfigError, match=r"^--mpp must be a pixel size in micrometres") as refused:
        RunSettings(input="a.tif", output="b.ome.tif", mpp=value)
    assert "\n" not in str(refused.value)
    assert RunSettings(input="a.tif", output="b.ome.tif", mpp=MAX_SLIDE_MPP).mpp == MAX_SLIDE_MPP


@pytest.mark.shared
def test_real_kidney_tiff_runs_by_microns_per_pixel_with_mpp(
    shared_data: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    path = shared_data / "wsi" / "kidney-48-5.tif"  # 1493 x 901 RGB strip TIFF; it states no pixel size
    assert describe_scene(str(path)).source == "gdal"  # as before, without --mpp
    output = tmp_path / "kidney.ome.tif"
    summary = _run(path, output, rgb_checkpoint, mpp=0.5, resolution="1um")  # 0.5: an assumed value
    assert (summary["scene"]["width"], summary["scene"]["height"]) == (747, 451)  # ceil(1493 / 2), ceil(901 / 2)
    assert summary["fit"]["slide"]["factor"] == 2.0
    assert 0 < summary["fit"]["slide"]["tissue_share"] < 0.05  # one small fragment on a large field of glass
    assert summary["tiles"]["skipped_nodata"] > summary["tiles"]["computed"] > 0
    with tifffile.TiffFile(output) as tif:
        assert tif.series[0].shape == (451, 747)
        assert 'PhysicalSizeX="1.0"' in (tif.ome_metadata or "")
