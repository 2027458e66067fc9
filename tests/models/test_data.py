"""Tests for segpipe.models.data: mask decoding (RGB, paletted, class ids), pairs, tile sampling, splits, weights."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

from segpipe.core.colours import ColourTable, parse_colour
from segpipe.core.errors import ConfigError, InputError
from segpipe.models.data import (
    SamplePair,
    TileDataset,
    band_statistics,
    class_weights,
    find_sample_pairs,
    load_folders,
    load_pair,
    pixel_counts,
    read_image,
    read_mask,
    split_folders,
)
from segpipe.models.dubai import DEFAULT_VALIDATION_TILE, DUBAI_CLASSES

TESTS_DATA = Path(__file__).resolve().parents[1] / "data" / "dubai"
REAL_IMAGE = TESTS_DATA / "image_part_005.jpg"
REAL_MASK = TESTS_DATA / "image_part_005.png"
#: Pixels per class of the real mask (README.md): building, land, road, vegetation, water, unlabeled.
REAL_COUNTS = [24943, 89738, 33972, 46346, 82441, 0]
SHARED_DUBAI = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "dubai-aerial"

TABLE = ColourTable.from_hex(c for _, c in DUBAI_CLASSES)


@pytest.fixture(autouse=True)
def _quiet_georef() -> None:
    warnings.simplefilter("ignore", NotGeoreferencedWarning)


@pytest.fixture
def shared_dubai() -> Path:
    if not SHARED_DUBAI.is_dir():
        pytest.skip(f"real Dubai data not found at {SHARED_DUBAI.resolve()} (../shared/data is absent)")
    return SHARED_DUBAI


def write_png(path: Path, data: np.ndarray, colormap: Mapping[int, tuple[int, ...]] | None = None) -> Path:
    bands = data if data.ndim == 3 else data[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="PNG",
        width=bands.shape[2],
        height=bands.shape[1],
        count=bands.shape[0],
        dtype="uint8",
    ) as dst:
        dst.write(bands)
        if colormap is not None:
            dst.write_colormap(1, colormap)
    return path


def colours_of(ids: np.ndarray) -> np.ndarray:
    return np.array(TABLE.colours, dtype=np.uint8)[ids].transpose(2, 0, 1)


# --- colours and masks --------------------------------------------------------------------------------


def test_parse_colour() -> None:
    assert parse_colour("#3C1098") == (0x3C, 0x10, 0x98)
    assert parse_colour("fedd3a") == (0xFE, 0xDD, 0x3A)
    with pytest.raises(ConfigError, match="RRGGBB"):
        parse_colour("#12345")
    with pytest.raises(ConfigError, match="distinct"):
        ColourTable.from_hex(["#000000", "#000000"])


def test_real_paletted_mask_maps_colours_to_classes() -> None:
    mask = read_mask(REAL_MASK, colour_table=TABLE)
    assert mask.shape == (544, 510) and mask.dtype == np.uint8
    assert np.bincount(mask.ravel(), minlength=6).tolist() == REAL_COUNTS
    # the same class ids through an independent path: palette index -> RGB -> table, by hand
    with rasterio.open(REAL_MASK) as src:
        index, colormap = src.read(1), src.colormap(1)
    codes = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(TABLE.colours)}
    by_hand = np.vectorize(lambda v: codes[(colormap[v][0] << 16) | (colormap[v][1] << 8) | colormap[v][2]])
    np.testing.assert_array_equal(mask, by_hand(index))


def test_real_mask_with_shuffled_palette_and_as_rgb(tmp_path: Path) -> None:
    """Palette indices are not class ids: the same picture with another palette order gives the same ids."""
    ids = read_mask(REAL_MASK, colour_table=TABLE)
    order = np.array([4, 2, 0, 3, 1])  # class c is stored as palette index order[c]
    palette = {int(order[c]): (*TABLE.colours[c], 255) for c in range(5)}
    palette[5] = (255, 255, 255, 255)
    shuffled = write_png(tmp_path / "shuffled.png", order[ids].astype(np.uint8), palette)
    np.testing.assert_array_equal(read_mask(shuffled, colour_table=TABLE), ids)
    rgb = write_png(tmp_path / "rgb.png", colours_of(ids))
    np.testing.assert_array_equal(read_mask(rgb, colour_table=TABLE), ids)


def test_unknown_colour_is_an_error_or_ignored(tmp_path: Path) -> None:
    ids = np.zeros((6, 7), dtype=np.uint8)
    rgb = colours_of(ids).copy()
    rgb[:, 2, 3] = 0  # black: not a class
    path = write_png(tmp_path / "m.png", rgb)
    with pytest.raises(InputError, match=r"m\.png.*#000000 \(1 px\)"):
        read_mask(path, colour_table=TABLE)
    mask = read_mask(path, colour_table=TABLE, unknown="ignore", ignore_index=250)
    assert mask[2, 3] == 250 and (mask == 0).sum() == 41


def test_unknown_palette_colour_only_matters_if_used(tmp_path: Path) -> None:
    palette = {0: (*TABLE.colours[1], 255), 1: (1, 2, 3, 255), 2: (255, 255, 255, 255)}
    unused = write_png(tmp_path / "ok.png", np.zeros((3, 3), np.uint8), palette)
    assert (read_mask(unused, colour_table=TABLE) == 1).all()
    used = write_png(tmp_path / "bad.png", np.ones((3, 3), np.uint8), palette)
    with pytest.raises(InputError, match="#010203"):
        read_mask(used, colour_table=TABLE)


def test_class_id_masks(tmp_path: Path) -> None:
    ids = np.array([[0, 1, 2], [5, 255, 3]], dtype=np.uint8)
    path = write_png(tmp_path / "ids.png", ids)
    np.testing.assert_array_equal(read_mask(path, colour_table=None, num_classes=6), ids)
    with pytest.raises(InputError, match=r"class id\(s\) \[5\] outside 0\.\.4"):
        read_mask(path, colour_table=None, num_classes=5)
    assert read_mask(path, colour_table=None, num_classes=5, unknown="ignore")[1, 0] == 255
    with pytest.raises(ConfigError, match="num_classes"):
        read_mask(path, colour_table=None)
    with pytest.raises(ConfigError, match="colour table"):
        read_mask(write_png(tmp_path / "rgb.png", colours_of(ids % 6)), colour_table=None)


# --- pairs and folders -------------------------------------------------------------------------------


def make_folder(root: Path, names: list[str], size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in names:
        h, w = size
        write_png(root / "images" / f"{name}.png", rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        write_png(root / "masks" / f"{name}.png", colours_of(rng.integers(0, 5, (h, w))))
    return root


def test_find_and_load_pairs(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "tile-a", ["b", "a"])
    pairs = find_sample_pairs(folder)
    assert [p.image.name for p in pairs] == ["a.png", "b.png"]
    images, masks, found = load_folders([folder], colour_table=TABLE)
    assert found == pairs and images[0].shape == (3, 40, 48) and masks[0].shape == (40, 48)


def test_real_pair_loads() -> None:
    image, mask = load_pair(SamplePair(REAL_IMAGE, REAL_MASK), colour_table=TABLE)
    assert image.shape == (3, 544, 510) and image.dtype == np.uint8 and mask.shape == (544, 510)


def test_missing_mask_and_size_mismatch(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "t", ["a"])
    write_png(folder / "images" / "lonely.png", np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(InputError, match=r"no mask .* lonely\.png"):
        find_sample_pairs(folder)
    write_png(folder / "masks" / "lonely.png", colours_of(np.zeros((4, 5), np.int64)))
    with pytest.raises(InputError, match=r"lonely\.png is 4x4 px but its mask .* is 5x4 px"):
        load_folders([folder], colour_table=TABLE)
    with pytest.raises(InputError, match="images/"):
        find_sample_pairs(tmp_path / "nowhere")
    with pytest.raises(InputError, match="band"):
        read_image(folder / "images" / "a.png", bands=[4])


def test_split_folders_holds_out_whole_folders(tmp_path: Path) -> None:
    for name in ("tile-1", "tile-2", "tile-3"):
        make_folder(tmp_path / name, ["x"], size=(8, 8))
    train, val = split_folders(tmp_path)
    assert DEFAULT_VALIDATION_TILE == "tile-1"
    assert [p.name for p in train] == ["tile-2", "tile-3"] and [p.name for p in val] == ["tile-1"]
    train, val = split_folders([tmp_path / "tile-3", tmp_path / "tile-2"], validation="tile-3")
    assert [p.name for p in train] == ["tile-2"] and [p.name for p in val] == ["tile-3"]
    with pytest.raises(ConfigError, match="tile-9"):
        split_folders(tmp_path, validation="tile-9")


# --- statistics and weights ---------------------------------------------------------------------------


def test_pixel_counts_and_class_weights() -> None:
    masks = [np.array([[0, 0, 0, 1], [1, 2, 255, 3]], dtype=np.uint8)]
    counts = pixel_counts(masks, 4)
    assert counts.tolist() == [3, 2, 1, 1]
    freq = np.array([3, 2, 1]) / 6
    w = class_weights(counts, "median_frequency", exclude=[3])
    expected = np.median(freq) / freq
    expected /= (expected * freq).sum()
    np.testing.assert_allclose(w[:3], expected)
    assert w[3] == 0
    w = class_weights(counts, "inverse_sqrt")
    assert w[0] < w[1] < w[2] == w[3]
    assert float((w * counts / counts.sum()).sum()) == pytest.approx(1.0)
    capped = class_weights(np.array([10_000, 1]), "median_frequency", max_ratio=10)
    assert capped[1] / capped[0] == pytest.approx(10)


def test_band_statistics() -> None:
    images = [
        np.full((2, 2, 2), 10, np.uint8),
        np.stack([np.full((1, 2), 30, np.uint8), np.zeros((1, 2), np.uint8)]),
    ]
    mean, std = band_statistics(images)
    assert mean == pytest.approx((50 / 3, 20 / 3))
    assert std[0] == pytest.approx(np.std([10, 10, 10, 10, 30, 30]))


# --- tile sampling --------------------------------------------------------------------------------------


def pattern_pair(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose pixels encode their own position, and a mask that is a function of the image."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy % 251, xx % 251, (yy * 7 + xx * 3) % 256]).astype(np.uint8)
    mask = ((image[0].astype(int) + 2 * image[1]) % 5).astype(np.uint8)
    return image, mask


def test_tiles_are_deterministic_and_aligned() -> None:
    image, mask = pattern_pair(50, 70)
    ds = TileDataset([image], [mask], tile_size=16, mean=(0, 0, 0), std=(1, 1, 1), length=64, seed=3)
    a = [ds[i] for i in range(8)]
    again = TileDataset([image], [mask], tile_size=16, mean=(0, 0, 0), std=(1, 1, 1), length=64, seed=3)
    for (x1, y1), (x2, y2) in zip(a, [again[i] for i in range(8)], strict=True):
        assert x1.equal(x2) and y1.equal(y2)
    ds.set_epoch(1)
    assert not all(x.equal(ds[i][0]) for i, (x, _) in enumerate(a))
    orientations = set()
    for i in range(64):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and y.shape == (16, 16) and y.dtype.is_floating_point is False
        xs = x.numpy().round().astype(int)
        # the mask still belongs to its pixels after rotations and flips
        np.testing.assert_array_equal(y.numpy(), (xs[0] + 2 * xs[1]) % 5)
        orientations.add((int(np.sign(xs[0, -1, 0] - xs[0, 0, 0])), int(np.sign(xs[1, 0, -1] - xs[1, 0, 0]))))
    assert len(orientations) > 2  # rotations and flips happen


def test_tiles_are_normalised_and_small_images_padded() -> None:
    image = np.full((3, 5, 6), 100, np.uint8)
    mask = np.ones((5, 6), np.uint8)
    ds = TileDataset(
        [image],
        [mask],
        tile_size=8,
        mean=(50, 50, 50),
        std=(25, 25, 25),
        length=4,
        augment=False,
        ignore_index=200,
    )
    x, y = ds[0]
    assert x[:, :5, :6].eq(2.0).all() and x[:, 5:, :].eq(0).all()
    assert y[:5, :6].eq(1).all() and y[5:, :].eq(200).all() and y[:, 6:].eq(200).all()


def test_area_weighted_sampling() -> None:
    small, big = pattern_pair(16, 16), pattern_pair(160, 160)
    ds = TileDataset(
        [small[0], big[0]],
        [np.zeros((16, 16), np.uint8), np.ones((160, 160), np.uint8)],
        tile_size=16,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        length=400,
    )
    picks = [int(ds[i][1][0, 0]) for i in range(400)]
    assert 0 < picks.count(0) < 20  # ~1 % of the area


def test_dataset_rejects_bad_input() -> None:
    image, mask = pattern_pair(8, 8)
    with pytest.raises(ConfigError, match="mean and std"):
        TileDataset([image], [mask], tile_size=4, mean=(0,), std=(1,), length=1)
    with pytest.raises(InputError, match="does not fit"):
        TileDataset([image], [mask[:4]], tile_size=4, mean=(0, 0, 0), std=(1, 1, 1), length=1)


# --- the real data ----------------------------------------------------------------------------------------


@pytest.mark.shared
def test_all_real_dubai_folders_load(shared_dubai: Path) -> None:
    """Every Dubai mask maps to the six classes, except a few pure black pixels (not a class)."""
    train, val = split_folders(shared_dubai)
    assert [p.name for p in val] == ["tile-1"] and len(train) == 6
    _, masks, pairs = load_folders([*train, *val], colour_table=TABLE, unknown="ignore")
    assert len(pairs) == 63
    total = sum(m.size for m in masks)
    black = sum(int((m == 255).sum()) for m in masks)
    assert 0 < black < 1e-4 * total
    counts = pixel_counts(masks, 6)
    assert (counts > 0).all()
    with pytest.raises(InputError, match="#000000"):
        load_folders([shared_dubai / "tile-7"], colour_table=TABLE)


@pytest.mark.shared
def test_real_rgb_mask_matches_palette_path(shared_dubai: Path, tmp_path: Path) -> None:
    """An RGB-coded real mask (tile-1) read directly equals its class ids written back as a palette."""
    rgb_mask = shared_dubai / "tile-1" / "masks" / "image_part_001.png"
    ids = read_mask(rgb_mask, colour_table=TABLE)
    palette = {c: (*TABLE.colours[c], 255) for c in range(6)}
    copy = write_png(tmp_path / "pal.png", ids, palette)
    np.testing.assert_array_equal(read_mask(copy, colour_table=TABLE), ids)
    assert set(np.unique(ids).tolist()) <= set(range(6))


def test_colour_jitter_changes_colours_not_geometry() -> None:
    image, mask = pattern_pair(40, 40)
    kw = {"tile_size": 16, "mean": (0, 0, 0), "std": (1, 1, 1), "length": 8, "seed": 1}
    plain = TileDataset([image], [mask], **kw)  # type: ignore[arg-type]
    jittered = TileDataset([image], [mask], colour_jitter=0.2, **kw)  # type: ignore[arg-type]
    for i in range(8):
        (x0, y0), (x1, y1) = plain[i], jittered[i]
        assert y0.equal(y1) and not x0.equal(x1)
        assert x1.min() >= 0 and x1.max() <= 255
    with pytest.raises(ConfigError, match="colour_jitter"):
        TileDataset([image], [mask], colour_jitter=1.5, **kw)  # type: ignore[arg-type]


def test_saturation_jitter_moves_pixels_along_their_grey_axis() -> None:
    """Each tile's pixels move towards or away from their grey value by one factor in [1 - q, 1 + q]."""
    rng = np.random.default_rng(5)
    image = rng.integers(60, 200, size=(3, 40, 40)).astype(np.uint8)
    mask = np.zeros((40, 40), dtype=np.uint8)
    kw = {"tile_size": 40, "mean": (0, 0, 0), "std": (1, 1, 1), "length": 30, "seed": 2, "augment": False}
    plain = TileDataset([image], [mask], **kw)  # type: ignore[arg-type]
    jittered = TileDataset([image], [mask], saturation_jitter=0.8, **kw)  # type: ignore[arg-type]
    factors = []
    for i in range(30):
        (x0, y0), (x1, y1) = plain[i], jittered[i]
        assert y0.equal(y1)
        grey0, grey1 = x0.mean(0), x1.mean(0)
        unclipped = (x1 > 0).all(0) & (x1 < 255).all(0)
        torch.testing.assert_close(grey1[unclipped], grey0[unclipped], atol=1e-3, rtol=0)  # grey kept
        apart = unclipped & ((x0 - grey0).abs() > 1).all(0)  # pixels that have a colour to scale
        ratio = (x1 - grey1)[:, apart] / (x0 - grey0)[:, apart]
        factor = float(ratio.median())
        torch.testing.assert_close(ratio, torch.full_like(ratio, factor), atol=1e-3, rtol=1e-3)
        factors.append(factor)
    assert 0.2 - 1e-6 <= min(factors) < 0.5 and 1.5 < max(factors) <= 1.8 + 1e-6
    grey = TileDataset([image[:1]], [mask], **{**kw, "mean": (0,), "std": (1,)}, saturation_jitter=1.0)  # type: ignore[arg-type]
    assert grey[0][0].equal(torch.from_numpy(image[:1].astype(np.float32)))  # one band: nothing to desaturate
    with pytest.raises(ConfigError, match="saturation_jitter"):
        TileDataset([image], [mask], saturation_jitter=1.5, **kw)  # type: ignore[arg-type]


def _ramp_pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bands: 0.1 x column, 0.1 x row, 0 (ramps); mask: class ids of 24 px blocks (5 classes)."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = (((yy // 24) + (xx // 24)) % 5).astype(np.uint8)
    image = np.stack([0.1 * xx, 0.1 * yy, np.zeros_like(xx, dtype=np.float64)]).astype(np.float32)
    return image, mask


def test_scale_jitter_zooms_image_and_mask_together() -> None:
    """Each tile covers 1/(1+s)..1+s times its size; image and mask are resampled at the same pixel centres."""
    image, mask = _ramp_pair(600)
    kw = {"tile_size": 64, "mean": (0, 0, 0), "std": (1, 1, 1), "length": 40, "seed": 3}
    zoomed = TileDataset([image], [mask], scale_jitter=0.5, **kw)  # type: ignore[arg-type]
    slopes, agree = [], []
    for i in range(40):
        x, y = zoomed[i]
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(range(5))  # nearest: labels, never blends
        # The ramps say which image pixel each tile pixel samples; the mask must hold that pixel's class.
        col, row = (np.rint(x[b].numpy() / 0.1).astype(int) for b in (0, 1))
        expected = ((row // 24) + (col // 24)) % 5
        agree.append((expected == y.numpy())[2:-2, 2:-2].mean())
        # The ramp's slope per tile pixel is 0.1 x the zoom factor (rotations only move it between axes).
        gy, gx = np.gradient(x[0].numpy())
        slopes.append(float(np.median(np.abs(gx) + np.abs(gy))) / 0.1)
    assert np.mean(agree) > 0.995, np.mean(agree)
    assert 1 / 1.5 - 0.01 <= min(slopes) < 0.8 and 1.25 < max(slopes) <= 1.5 + 0.01
    again = TileDataset([image], [mask], scale_jitter=0.5, **kw)  # type: ignore[arg-type]
    assert all(again[i][0].equal(zoomed[i][0]) and again[i][1].equal(zoomed[i][1]) for i in range(5))


def test_scale_jitter_pads_small_images_with_ignore() -> None:
    image, mask = _ramp_pair(50)
    ds = TileDataset([image], [mask], tile_size=48, mean=(0, 0, 0), std=(1, 1, 1), length=30, seed=0, scale_jitter=0.5)
    labels = set().union(*(set(ds[i][1].unique().tolist()) for i in range(30)))
    assert 255 in labels and labels - {255} <= set(range(5))
    with pytest.raises(ConfigError, match="scale_jitter"):
        TileDataset([image], [mask], tile_size=48, mean=(0, 0, 0), std=(1, 1, 1), length=1, scale_jitter=1.5)
