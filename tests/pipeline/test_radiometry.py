"""Scenes as they come: bands matched by name or number, nodata set on the command line, values scaled to the
model's input contract, or one clear refusal. Pure rules first, then real scenes from tests/data."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.core.bands import match_bands, parse_bands, scene_band_names
from segpipe.core.errors import ConfigError, ModelError
from segpipe.core.pixels import PixelMap, Scaling, fits, pixel_map
from segpipe.core.tiles import fit_fixed_input, sample_windows
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.settings import RunSettings

S2_DESCRIPTIONS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
RGB = ("red", "green", "blue")
LOCAL = {"executor": "local", "tile_size": 64, "halo": 16}


# --- bands ---------------------------------------------------------------------------------------------------


def test_sentinel2_descriptions_name_their_bands_and_rgb_is_found_by_name() -> None:
    names = scene_band_names(S2_DESCRIPTIONS, ("gray",) + ("undefined",) * 12)
    assert names[1:4] == ("blue", "green", "red") and names[8] == "nir08" and names[11] == "swir16"
    assert match_bands(RGB, names, descriptions=S2_DESCRIPTIONS).indexes == (4, 3, 2)
    assert match_bands(RGB, names, descriptions=S2_DESCRIPTIONS, asked="red,green,blue").indexes == (4, 3, 2)
    assert match_bands(RGB, names, descriptions=S2_DESCRIPTIONS, asked="b4,b3,b2").indexes == (4, 3, 2)
    assert match_bands(("B4", "B8"), names, descriptions=S2_DESCRIPTIONS).indexes == (4, 8)  # the model's own names


def test_b_names_without_b8a_are_not_taken_for_sentinel2() -> None:
    """Landsat also calls its bands B1..B7, with other meanings (B5 is nir there): no guess without B8A."""
    assert scene_band_names(("B1", "B2", "B3", "B4", "B5"), ()) == ("", "", "", "", "")


def test_colour_interpretation_and_common_name_descriptions() -> None:
    assert scene_band_names(("", "", "", ""), ("red", "green", "blue", "alpha")) == (*RGB, "")
    assert scene_band_names(("Blue", "NIR", ""), ("gray", "undefined", "undefined")) == ("blue", "nir", "")
    names = scene_band_names(("", "", "", ""), ("red", "green", "blue", "undefined"))
    assert match_bands(RGB, names).indexes == (1, 2, 3)  # RGBN: the model's three by name


def test_unnamed_bands_in_order_only_when_the_counts_agree() -> None:
    assert match_bands(RGB, ("", "", "")).how == "order"
    with pytest.raises(ModelError, match=r"has only 1 \(1=unnamed\); choose a model trained on this imagery"):
        match_bands(RGB, ("",))
    with pytest.raises(ModelError, match=r"has 4 \(.*\); choose them with --bands, e.g. --bands N,N,N"):
        match_bands(RGB, ("", "", "", ""))


def test_bands_given_by_number_are_checked_against_known_names() -> None:
    names = ("red", "green", "blue")
    assert match_bands(RGB, names, asked="1,2,3").indexes == (1, 2, 3)
    with pytest.raises(ModelError, match="band 3 of the scene is 'blue' but the model's input there is 'red'"):
        match_bands(RGB, names, asked="3,2,1")
    assert match_bands(RGB, ("", "", ""), asked="3,2,1").indexes == (3, 2, 1)  # unnamed: the user knows


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must list band numbers"),
        ("1,,2", "must list band numbers"),
        ("1,1,2", "names a band twice"),
        ("0,1,2", "numbers start at 1"),
        ("red,2,blue", "all numbers or all names"),
    ],
)
def test_bad_band_lists_are_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_bands(text)


def test_band_lists_that_do_not_fit_the_scene_or_model() -> None:
    with pytest.raises(ConfigError, match=r"gives 2 band.s. but the model takes 3"):
        match_bands(RGB, ("", "", ""), asked="1,2")
    with pytest.raises(ConfigError, match=r"has 3 band.s., no band 5"):
        match_bands(RGB, ("", "", ""), asked="1,2,5")
    with pytest.raises(ConfigError, match="has no band named 'nir'"):
        match_bands(("red", "green", "nir"), RGB, asked="red,green,nir")


# --- scaling -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("percentile", Scaling("percentile", 2.0, 98.0)),
        ("percentile:1,99", Scaling("percentile", 1.0, 99.0)),
        ("linear:1e-4,-0.1", Scaling("linear", 1e-4, -0.1)),
        ("minmax:0,3000", Scaling("minmax", 0.0, 3000.0)),
        ("none", Scaling("none")),
        ("product", Scaling("product")),
    ],
)
def test_scalings_parse(text: str, expected: Scaling) -> None:
    assert Scaling.parse(text) == expected
    assert Scaling.parse(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stretch", "is not one of"),
        ("percentile:98,2", "0 <= LOW < HIGH <= 100"),
        ("minmax:5,5", "MIN must be below MAX"),
        ("minmax", "needs two numbers"),
        ("linear:0,1", "SCALE must not be 0"),
        ("linear:a,b", "are not numbers"),
        ("none:1,2", "takes no numbers"),
    ],
)
def test_bad_scalings_are_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Scaling.parse(text)


def test_a_percentile_stretch_maps_the_limits_onto_the_range_and_clips() -> None:
    rng = np.random.default_rng(0)
    sample = np.stack([rng.uniform(1000, 3000, 10_000), rng.uniform(-50, 50, 10_000)])
    mapped = pixel_map(Scaling.parse("percentile:2,98"), bands=2, value_range=(0.0, 255.0), sample=sample)
    assert isinstance(mapped, PixelMap)
    lo, hi = np.percentile(sample, (2, 98), axis=1)
    pixels = np.stack([lo, hi]).T.reshape(2, 1, 2)  # band k: its own low and high
    out = mapped.apply(pixels)
    assert np.allclose(out[:, 0, 0], 0.0, atol=1e-3) and np.allclose(out[:, 0, 1], 255.0, atol=1e-2)
    assert mapped.apply(np.full((2, 1, 1), 1e9))[:, 0, 0].tolist() == [255.0, 255.0]  # clipped


def test_linear_and_product_scalings() -> None:
    mapped = pixel_map(Scaling.parse("linear:1e-4,-0.1"), bands=1, value_range=(0.0, 1.0))
    assert mapped is not None and mapped.clip is None
    assert math.isclose(float(mapped.apply(np.array([[[3000]]], dtype=np.int16))[0, 0, 0]), 0.2, rel_tol=1e-5)
    product = pixel_map(Scaling.parse("product"), bands=2, value_range=(0, 1), product=((2.0, 1e-4), (0.0, -0.1)))
    assert product is not None and product.scale == (2.0, 1e-4)
    with pytest.raises(ConfigError, match="records no scale or offset"):
        pixel_map(Scaling.parse("product"), bands=1, value_range=(0, 1), product=((1.0,), (0.0,)))


def test_what_fits_a_contract() -> None:
    assert fits("uint8", (0, 255), "uint8")
    assert not fits("uint16", (0, 255), "uint8") and not fits("int16", (0, 255), "uint8")
    assert fits("uint8", (0, 65535), "uint16")  # every uint8 value is in the range
    assert not fits("float32", (0, 255), "uint8")


# --- fixed inputs and samples --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(input_size=st.integers(8, 1024), halo=st.integers(0, 200), tile=st.one_of(st.none(), st.integers(1, 1024)))
def test_a_fixed_input_is_always_filled_exactly_or_refused(input_size: int, halo: int, tile: int | None) -> None:
    try:
        tile_size, new_halo = fit_fixed_input(input_size, tile, halo)
    except ConfigError:
        too_big = tile is not None and tile + 2 * halo > input_size
        odd = tile is not None and (input_size - tile) % 2 == 1
        assert too_big or odd or (tile is None and input_size - 2 * halo < 1)
        return
    assert tile_size + 2 * new_halo == input_size and new_halo >= halo
    assert tile is None or tile_size == tile


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), size=st.integers(1, 300))
def test_sample_windows_lie_inside_the_scene_without_overlap(width: int, height: int, size: int) -> None:
    windows = sample_windows(width, height, count=64, size=size)
    assert 1 <= len(windows) <= 64
    for w in windows:
        assert w.col_off >= 0 and w.col_off + w.width <= width and w.row_off >= 0 and w.row_off + w.height <= height
    cells = set()
    for w in windows:
        cell = (w.col_off, w.row_off)
        assert cell not in cells
        cells.add(cell)
    if len(windows) > 1:
        xs = sorted({w.col_off for w in windows})
        assert all(b - a >= windows[0].width for a, b in itertools.pairwise(xs))


# --- real scenes ---------------------------------------------------------------------------------------------


def run(scene: Path, out: Path, **options: object) -> dict[str, object]:
    settings_ = RunSettings(input=str(scene), output=str(out), **{**LOCAL, **options})  # type: ignore[arg-type]
    return run_scene(settings_)


def test_nodata_given_on_the_command_line_stays_nodata(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    """RGB.byte.tif without its nodata tag: the zero border is segmented like land; with --nodata 0 it is nodata
    again, and the mask equals the one made from the tagged file."""
    untagged = tmp_path / "untagged.tif"
    with rasterio.open(data_dir / "RGB.byte.tif") as src:
        profile, data = {**src.profile, "nodata": None}, src.read()
    with rasterio.open(untagged, "w", **profile) as dst:
        dst.write(data)
    tagged = run(data_dir / "RGB.byte.tif", tmp_path / "tagged.tif", model=str(rgb_checkpoint))
    bare = run(untagged, tmp_path / "bare.tif", model=str(rgb_checkpoint))
    given_ = run(untagged, tmp_path / "given.tif", model=str(rgb_checkpoint), nodata=0.0)
    with rasterio.open(tmp_path / "tagged.tif") as a, rasterio.open(tmp_path / "given.tif") as b:
        assert np.array_equal(a.read(), b.read())
    with rasterio.open(tmp_path / "bare.tif") as m:
        assert int((m.read(1) == 255).sum()) == 0
    assert tagged["class_histogram"]["nodata"] == given_["class_histogram"]["nodata"] > 100_000  # type: ignore[index]
    assert bare["fit"]["nodata"] is None and given_["fit"]["nodata"] == 0.0  # type: ignore[index]


def test_sentinel2_bands_by_name_number_or_description_give_the_same_mask(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    scene = data_dir / "Spain_7370579_S2Hand.tif"
    masks = []
    for k, bands in enumerate((None, "red,green,blue", "4,3,2", "B4,B3,B2")):
        summary = run(scene, tmp_path / f"m{k}.tif", model=str(rgb_checkpoint), bands=bands)
        assert summary["fit"]["bands"] == [4, 3, 2]  # type: ignore[index]
        with rasterio.open(tmp_path / f"m{k}.tif") as src:
            masks.append(src.read())
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    with pytest.raises(ModelError, match="band 2 of the scene is 'blue' but the model's input there is 'red'"):
        run(scene, tmp_path / "wrong.tif", model=str(rgb_checkpoint), bands="2,3,4")
    assert not (tmp_path / "wrong.tif").exists()


def test_values_outside_the_contract_are_stretched_or_refused(
    data_dir: Path, make_checkpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    stretching = make_checkpoint(
        "u8s", bands=RGB, mean=(100.0,) * 3, std=(50.0,) * 3, contract=("uint8", (0.0, 255.0), "percentile:2,98")
    )
    refusing = make_checkpoint(
        "u8r", bands=RGB, mean=(100.0,) * 3, std=(50.0,) * 3, contract=("uint8", (0.0, 255.0), "refuse")
    )
    scene = data_dir / "Spain_7370579_S2Hand.tif"  # int16 reflectance
    with pytest.raises(ModelError) as refused:
        run(scene, tmp_path / "r.tif", model=str(refusing))
    assert str(refused.value) == (
        "the scene is int16 but the model takes uint8 values in 0..255; say how to scale it: --scaling percentile "
        "(a per-band stretch), --scaling minmax:MIN,MAX, --scaling linear:SCALE,OFFSET or --scaling product (the "
        "product's own scale and offset)"
    )
    assert list(tmp_path.iterdir()) == []
    with caplog.at_level("WARNING"):
        stretched = run(scene, tmp_path / "s.tif", model=str(stretching))
    assert any("scaled by percentile:2,98 as the model's input contract says" in r.getMessage() for r in caplog.records)
    fit = stretched["fit"]
    assert fit["scaling"] == "percentile:2,98" and fit["pixel_map"]["clip"] == [0.0, 255.0]  # type: ignore[index]
    asked = run(scene, tmp_path / "a.tif", model=str(refusing), scaling="percentile:2,98")
    with rasterio.open(tmp_path / "s.tif") as a, rasterio.open(tmp_path / "a.tif") as b:
        assert np.array_equal(a.read(), b.read())  # the same stretch, asked for or from the contract
    raw = run(scene, tmp_path / "n.tif", model=str(refusing), scaling="none")
    assert raw["fit"]["pixel_map"] is None and asked["key"] != raw["key"]  # type: ignore[index]


def test_a_zero_border_without_nodata_gets_a_hint(
    data_dir: Path, make_checkpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    model = make_checkpoint(
        "u8h", bands=RGB, mean=(100.0,) * 3, std=(50.0,) * 3, contract=("uint8", (0.0, 255.0), "percentile:2,98")
    )
    scene = tmp_path / "u16.tif"
    with rasterio.open(data_dir / "RGB.byte.tif") as src:
        profile, data = {**src.profile, "nodata": None, "dtype": "uint16"}, src.read().astype(np.uint16) * 40
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(data)
    with caplog.at_level("WARNING"):
        summary = run(scene, tmp_path / "m.tif", model=str(model))
    hints = [r.getMessage() for r in caplog.records if "pass --nodata 0" in r.getMessage()]
    assert len(hints) == 1 and "of the sampled pixels are 0 in every band" in hints[0]
    assert summary["fit"]["warnings"]  # type: ignore[index]
    fixed = run(scene, tmp_path / "n.tif", model=str(model), nodata=0.0)
    assert not any("pass --nodata" in w for w in fixed["fit"]["warnings"])  # type: ignore[index]


def test_a_summary_records_how_the_scene_was_read(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    shutil.copy(data_dir / "RGB.byte.tif", tmp_path / "a.tif")
    run(tmp_path / "a.tif", tmp_path / "m.tif", model=str(rgb_checkpoint))
    fit = json.loads((tmp_path / "m.summary.json").read_text())["fit"]
    assert fit == {
        "bands": [1, 2, 3],
        "bands_by": "names",
        "nodata": 0.0,
        "scaling": None,
        "pixel_map": None,
        "warnings": [],
    }
