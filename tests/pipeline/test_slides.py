"""Whole-slide images: the OpenSlide source chosen by content, resolution and level choice, tissue-only compute,
the pyramidal OME-TIFF mask. Small slides are written here with tifffile; the real ones in ../shared/data/wsi are
used when present."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segpipe.core.errors import ConfigError, InputError
from segpipe.core.pyramid import Pyramid, Resolution, grid_size, parse_resolution, plan_read
from segpipe.core.tiles import Window
from segpipe.core.tissue import dilate, otsu, saturation, threshold
from segpipe.models.metadata import ModelMetadata
from segpipe.pipeline.read import describe_scene, open_source
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.scene import Selection
from segpipe.pipeline.settings import RunSettings
from segpipe.pipeline.sinks import sink_for

MPP = 0.25
WIDTH, HEIGHT = 640, 448  # level 0 of the synthetic slide; level 1 is half of it
TISSUE = (slice(64, 192), slice(96, 288))  # rows, columns of level 0 holding stained tissue; glass elsewhere


def _image() -> np.ndarray:
    """Level 0: bright grey glass, a pink/purple 'tissue' block, and a red marker square at (32..48, 16..32)."""
    rng = np.random.default_rng(1)
    image = np.full((HEIGHT, WIDTH, 3), 238, dtype=np.uint8)
    image += rng.integers(0, 4, image.shape, dtype=np.uint8)
    tissue = np.array([180, 90, 160], dtype=np.int16) + rng.integers(-20, 20, (128, 192, 3))
    image[TISSUE] = np.clip(tissue, 0, 255).astype(np.uint8)
    image[32:48, 16:32] = (230, 30, 30)
    return image


def write_slide(path: Path, *, mpp: float | None = MPP, levels: int = 2) -> Path:
    """A tiled pyramidal RGB TIFF with resolution tags in centimetres (what OpenSlide's generic-tiff reads)."""
    image = _image()
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            step = 2**level
            resolution = (1e4 / (mpp * step),) * 2 if mpp else None
            tif.write(
                image[::step, ::step],
                tile=(128, 128),
                photometric="rgb",
                compression="zlib",
                resolution=resolution,
                resolutionunit="CENTIMETER" if mpp else None,
                subfiletype=1 if level else 0,
            )
    return path


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    return write_slide(tmp_path / "slide.tiff")


def write_geotiff(path: Path) -> Path:
    """A tiled RGB uint8 GeoTIFF with overviews: a pyramidal tiled TIFF that must still go to GDAL."""
    import rasterio
    from rasterio.transform import from_origin

    profile = {
        "driver": "GTiff",
        "width": 512,
        "height": 512,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32631",
        "transform": from_origin(500000, 5000000, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((3, 512, 512), 120, dtype=np.uint8))
        dst.build_overviews([2, 4])
    return path


def _run(scene: Path, output: Path, checkpoint: Path, **options: object) -> dict:  # type: ignore[type-arg]
    settings = RunSettings(
        input=str(scene), output=str(output), model=str(checkpoint), executor="local", device="cpu", **options
    )  # type: ignore[arg-type]
    return run_scene(settings)


# --- pure geometry -------------------------------------------------------------------------------------------


PYRAMID = Pyramid(((40000, 30000), (10000, 7500), (2500, 1875)), (1.0, 4.0, 16.0), (0.25, 0.25))


@pytest.mark.parametrize(
    ("target", "level", "factor", "resampled", "size"),
    [
        (None, 0, 1.0, False, (40000, 30000)),
        (0.25, 0, 1.0, False, (40000, 30000)),
        (0.5, 0, 2.0, True, (20000, 15000)),  # between levels 0 and 1: level 0, halved
        (1.0, 1, 4.0, False, (10000, 7500)),  # a level: read as it is
        (1.02, 1, 4.0, False, (10000, 7500)),  # within 2.5 %: the level as it is
        (2.0, 1, 8.0, True, (5000, 3750)),
        (3.0, 1, 12.0, True, (3334, 2500)),  # ceil(40000 / 12)
        (8.0, 2, 32.0, True, (1250, 938)),  # coarser than every level: the coarsest, shrunk
        (0.2, 0, 0.8, True, (50000, 37500)),  # finer than level 0: enlarged
    ],
)
def test_level_is_at_or_just_finer_than_the_target_and_resampled_by_the_exact_factor(
    target: float | None, level: int, factor: float, resampled: bool, size: tuple[int, int]
) -> None:
    read = plan_read(PYRAMID, target)
    assert (read.level, read.resampled, (read.width, read.height)) == (level, resampled, size)
    assert read.factor == pytest.approx(factor, rel=1e-12)
    if target is not None:
        assert read.mpp(PYRAMID) == pytest.approx((0.25 * factor, 0.25 * factor))


@pytest.mark.parametrize(("width0", "mpp", "target"), [(4443, 0.499, 1.0), (2220, 0.499, 0.5), (2967, 0.2527, 0.5)])
def test_grid_rounds_up_so_every_level0_pixel_lies_in_exactly_one_mask_pixel(
    width0: int, mpp: float, target: float
) -> None:
    factor = target / mpp
    width, _ = grid_size(width0, width0, factor)
    # mask pixel i covers level-0 [i * factor, (i + 1) * factor): the last one starts inside the slide and reaches
    # its edge; none lies wholly beyond it
    assert (width - 1) * factor < width0 <= width * factor
    xs = np.arange(width0 + 1, dtype=float)  # level-0 pixel edges, the slide's right edge last
    cols = np.floor(xs / factor).astype(int)  # the mask pixel each edge lies in
    assert np.all((cols * factor <= xs) & (xs < (cols + 1) * factor)) and cols[-1] == width - 1
    assert grid_size(4000, 3000, 4.0) == (1000, 750)  # an exact division does not round up


def test_resolution_option_and_metadata_field() -> None:
    assert parse_resolution("0.5um") == Resolution(0.5, "um")
    assert parse_resolution("0.5 µm") == Resolution(0.5, "um")
    assert parse_resolution("0.3m") == Resolution(0.3, "m")
    assert parse_resolution("native") is None
    for bad in ("0.5", "fast", "-1um", "0um"):
        with pytest.raises(ConfigError):
            parse_resolution(bad)
    with pytest.raises(ConfigError, match="--resolution"):
        RunSettings(input="a.svs", output="b.ome.tif", resolution="half")
    data = json.loads((Path(__file__).parents[2] / "models" / "weights" / "default.json").read_text())
    assert ModelMetadata.from_dict(data, source="x").resolution is None  # the aerial model states none for slides
    meta = ModelMetadata.from_dict({**data, "resolution": {"value": 0.5, "unit": "um"}}, source="x")
    assert meta.resolution == Resolution(0.5, "um")
    assert ModelMetadata.from_dict(meta.to_dict(), source="x") == meta
    with pytest.raises(Exception, match="resolution"):
        ModelMetadata.from_dict({**data, "resolution": {"value": 0.5, "unit": "inch"}}, source="x")


def test_otsu_on_saturation_separates_glass_from_stain() -> None:
    glass = np.full((3, 20, 20), 235, dtype=np.uint8)
    stain = np.zeros((3, 20, 20), dtype=np.uint8)
    stain[:] = np.array([180, 90, 160], dtype=np.uint8)[:, None, None]
    sat = saturation(np.concatenate([glass, stain], axis=2))
    assert sat[:, :20].max() == 0 and sat[:, 20:].min() == 127
    histogram = np.bincount(sat.ravel(), minlength=256)
    assert otsu(histogram) == 64  # the middle of the empty valley
    assert threshold(histogram) == 40  # clamped: a valley far from glass keeps pale tissue
    assert threshold(np.bincount(np.full(10, 90), minlength=256)) == 12  # one value: no valley, the lower clamp
    grown = dilate(np.pad(np.ones((1, 1), dtype=bool), 3), 2)
    assert grown.sum() == 25


# --- the source --------------------------------------------------------------------------------------------


def test_a_slide_is_chosen_by_content_and_a_geotiff_still_goes_to_gdal(slide: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "slide.bin"
    renamed.write_bytes(slide.read_bytes())
    for path in (slide, renamed):
        info = describe_scene(str(path))
        assert (info.source, info.width, info.height, info.count, info.dtype) == ("slide", WIDTH, HEIGHT, 3, "uint8")
        assert info.mpp == pytest.approx((MPP, MPP))
        assert info.pyramid is not None and info.pyramid.sizes == ((WIDTH, HEIGHT), (WIDTH // 2, HEIGHT // 2))
    geotiff = write_geotiff(tmp_path / "scene.tif")
    assert describe_scene(str(geotiff)).source == "gdal"
    plain = write_slide(tmp_path / "plain.tif", mpp=None)  # a tiled RGB TIFF with no pixel size: not a slide
    assert describe_scene(str(plain)).source == "gdal"


def test_a_slide_read_at_a_coarser_resolution_matches_the_level0_pixels(slide: Path) -> None:
    image = _image()
    # 1 um = 4 level-0 pixels: level 1 (2x) resampled by exactly 2
    with open_source(str(slide), selection=Selection(resolution=1.0)) as src:
        info = src.info
        assert (info.width, info.height) == (WIDTH // 4, HEIGHT // 4)
        assert info.transform[0] == 4.0 and info.mpp == (1.0, 1.0)
        assert (src.plan.level, src.plan.resampled) == (1, True)
        data, valid = src.read(Window(0, 0, info.width, info.height))
    assert valid.all()
    level1 = image[::2, ::2]  # what write_slide stored as level 1
    expected = level1.reshape(HEIGHT // 4, 2, WIDTH // 4, 2, 3).mean(axis=(1, 3))  # 2 x 2 averages, aligned
    assert np.abs(data.transpose(1, 2, 0).astype(float) - expected).max() <= 1  # rounding only
    assert tuple(data[:, 9, 5]) == (230, 30, 30)
    # 0.5 um: level 1 as it is (no resampling), pixel for pixel
    with open_source(str(slide), selection=Selection(resolution=0.5)) as src:
        assert (src.plan.level, src.plan.resampled, src.info.width) == (1, False, WIDTH // 2)
        data, _ = src.read(Window(8, 16, 8, 8))
    assert np.array_equal(data.transpose(1, 2, 0), image[::2, ::2][16:24, 8:16])


def test_tissue_mask_makes_glass_nodata(slide: Path) -> None:
    with open_source(str(slide), selection=Selection(tissue="otsu")) as src:
        _, valid = src.read(Window(0, 0, WIDTH, HEIGHT))
        share = src.tissue.share  # type: ignore[attr-defined]
    rows, cols = TISSUE
    assert valid[rows, cols].all()  # all tissue is valid
    assert not valid[400:, :].any() and not valid[:, 500:].any()  # glass far from tissue is not
    assert 0.05 < share < 0.3


def test_run_skips_background_tiles_and_writes_an_aligned_pyramidal_ome_tiff(
    slide: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    import openslide

    output = tmp_path / "mask.ome.tif"
    summary = _run(slide, output, rgb_checkpoint, resolution="0.5um")  # level 1, 320 x 224
    tiles = summary["tiles"]
    assert summary["fit"]["slide"]["level"] == 1 and summary["fit"]["slide"]["mpp"] == [0.5, 0.5]
    assert tiles["skipped_nodata"] > 0 and tiles["computed"] + tiles["skipped_nodata"] == tiles["total"]
    assert 0.05 < summary["fit"]["slide"]["tissue_share"] < 0.3
    with tifffile.TiffFile(output) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.shape == (HEIGHT // 2, WIDTH // 2)
        assert len(series.levels) >= 1
        mask = series.asarray()
        physical = dict(re.findall(r'PhysicalSize([XY])="([^"]+)"', tif.ome_metadata or ""))
        assert float(physical["X"]) == pytest.approx(0.5) and float(physical["Y"]) == pytest.approx(0.5)
        assert "class:0" in (tif.ome_metadata or "")
        assert tif.pages.first.colormap is not None
    # aligned: mask pixel (r, c) x 0.5 um = level-0 pixel (2r, 2c) x 0.25 um; tissue is classified, glass is nodata
    rows, cols = TISSUE
    assert (mask[rows.start // 2 : rows.stop // 2, cols.start // 2 : cols.stop // 2] != 255).all()
    assert (mask[200:, :] == 255).all() and (mask[:, 250:] == 255).all()
    with openslide.OpenSlide(str(output)) as reopened:  # OpenSlide opens it (level 0) with its pixel size
        assert reopened.dimensions == (WIDTH // 2, HEIGHT // 2)
        assert float(reopened.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)


def write_ome_pyramid(path: Path, *, mpp: float = MPP) -> Path:
    """An OME-TIFF pyramid as tifffile and Bio-Formats write it: OME-XML with the pixel size, level 1 in a SubIFD."""
    image = _image()
    options = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        tif.write(image, subifds=1, resolution=(1e4 / mpp,) * 2, metadata=metadata, **options)  # type: ignore[arg-type]
        tif.write(image[::2, ::2], subfiletype=1, resolution=(1e4 / (2 * mpp),) * 2, **options)  # type: ignore[arg-type]
    return path


def test_a_generated_ome_tiff_pyramid_runs_by_microns_per_pixel(rgb_checkpoint: Path, tmp_path: Path) -> None:
    """OpenSlide reads an OME-TIFF's SubIFD pyramid as one level: read at 0.5 um it is level 0 resampled by 2."""
    source = write_ome_pyramid(tmp_path / "pyramid.ome.tif")
    output = tmp_path / "mask.ome.tif"
    summary = _run(source, output, rgb_checkpoint, resolution="0.5um")
    assert summary["fit"]["slide"]["mpp"] == [0.5, 0.5] and summary["tiles"]["skipped_nodata"] > 0
    with tifffile.TiffFile(output) as tif:
        assert tif.series[0].shape == (HEIGHT // 2, WIDTH // 2)
        physical = dict(re.findall(r'PhysicalSize([XY])="([^"]+)"', tif.ome_metadata or ""))
        assert float(physical["X"]) == pytest.approx(0.5)
        mask = tif.series[0].asarray()
    rows, cols = TISSUE
    assert (mask[rows.start // 2 : rows.stop // 2, cols.start // 2 : cols.stop // 2] != 255).all()
    assert (mask[200:, :] == 255).all()


def test_tissue_none_computes_every_tile(slide: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    summary = _run(slide, tmp_path / "all.ome.tif", rgb_checkpoint, tissue="none")
    assert summary["tiles"]["skipped_nodata"] == 0
    assert any("no resolution" in w for w in summary["fit"]["warnings"])  # level 0, with a warning


def test_ome_tif_suffix_chooses_the_slide_sink(tmp_path: Path) -> None:
    assert type(sink_for("mask", str(tmp_path / "a.ome.tif"))).__name__ == "OmeTiffSink"
    assert type(sink_for("mask", str(tmp_path / "a.OME.TIFF"))).__name__ == "OmeTiffSink"
    assert type(sink_for("mask", str(tmp_path / "a.tif"))).__name__ == "CogSink"


def test_resolution_for_a_slide_without_pixel_size_is_refused(tmp_path: Path) -> None:
    from segpipe.pipeline.fit import fit_scene

    path = write_slide(tmp_path / "nompp.tiff", mpp=None)
    ome = tmp_path / "nompp.ome.tif"  # OME-XML makes it a slide, without a pixel size
    with tifffile.TiffWriter(ome, ome=True) as tif:
        tif.write(_image(), tile=(128, 128), photometric="rgb", metadata={"axes": "YXS"})
    info = describe_scene(str(ome))
    assert info.source == "slide" and info.mpp is None
    data = json.loads((Path(__file__).parents[2] / "models" / "weights" / "default.json").read_text())
    meta = ModelMetadata.from_dict(data, source="x")
    with pytest.raises(InputError, match="no pixel size"):
        fit_scene(info, meta, resolution="0.5um", compute=False)
    fit = fit_scene(info, meta, resolution="native", compute=False)
    assert (fit.scene.width, fit.scene.height) == (WIDTH, HEIGHT)
    assert describe_scene(str(path)).source == "gdal"


# --- real slides (../shared/data/wsi) ------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "size", "mpp", "levels"),
    [
        ("cmu_small_region.svs", (2220, 2967), 0.499, 1),  # Aperio, JPEG
        ("tcga-cr-7395-01a-01-ts1.svs", (4443, 3567), None, 2),  # Aperio, JPEG 2000 (GDAL lacks the codec)
    ],
)
def test_real_svs_opens_by_content(
    shared_data: Path, tmp_path: Path, name: str, size: tuple[int, int], mpp: float | None, levels: int
) -> None:
    path = shared_data / "wsi" / name
    renamed = tmp_path / "slide.bin"
    renamed.symlink_to(path)
    for candidate in (path, renamed):
        info = describe_scene(str(candidate))
        assert info.source == "slide" and (info.width, info.height) == size
        assert info.pyramid is not None and len(info.pyramid.sizes) == levels
        assert (info.mpp[0] if info.mpp else None) == (pytest.approx(mpp) if mpp else None)
    with open_source(str(path)) as src:
        data, valid = src.read(Window(size[0] // 2, size[1] // 2, 64, 64))
    assert valid.all() and data.std() > 5  # decoded tissue, not a blank


@pytest.mark.shared
def test_quicklook_of_an_svs_shows_the_main_image_not_the_macro(shared_data: Path) -> None:
    from segpipe.pipeline.quicklook import read_scene_preview

    preview = read_scene_preview(str(shared_data / "wsi" / "cmu_small_region.svs"), 512)
    # the main image is 2220 x 2967 (portrait); the macro image GDAL showed is 1280 x 431 (landscape)
    assert preview.shape[:2] == (512, round(2220 * 512 / 2967))


@pytest.mark.shared
def test_real_svs_run_at_the_model_resolution_maps_back_to_level0(
    shared_data: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    output = tmp_path / "cmu.ome.tif"
    summary = _run(shared_data / "wsi" / "cmu_small_region.svs", output, rgb_checkpoint, resolution="1um")
    factor = 1.0 / 0.499
    width, height = math.ceil(2220 / factor), math.ceil(2967 / factor)
    assert (summary["scene"]["width"], summary["scene"]["height"]) == (width, height) == (1108, 1481)
    assert summary["fit"]["slide"]["factor"] == pytest.approx(factor)
    assert summary["tiles"]["skipped_nodata"] > 0
    with tifffile.TiffFile(output) as tif:
        assert tif.series[0].shape == (height, width)
        assert 'PhysicalSizeX="1.0"' in (tif.ome_metadata or "")
