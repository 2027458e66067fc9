"""Training that fits satellite users: input bands from the data, polygon labels, the run-default inference tiling,
the device and precision choice, and fine-tuning from a checkpoint (``init``). Every run is tiny (a few steps of a
4-channel, depth-2 network on 64 px tiles), on real data: the Sen1Floods11 Sentinel-2 chip and the SpaceNet
Atlanta image with its 43 building footprints."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
import torch
from rasterio.windows import Window
from safetensors.torch import load_file

from segpipe.core.errors import ConfigError, InputError, ModelError
from segpipe.models.data import image_bands
from segpipe.models.labels import image_grid, rasterise_labels, read_polygon_labels
from segpipe.models.training import TrainConfig, train
from segpipe.models.training import model as training_model
from segpipe.models.training.inputs import plan_bands, prepare

DATA = Path(__file__).resolve().parents[1] / "data"
S2 = DATA / "Spain_7370579_S2Hand.tif"
ATLANTA = DATA / "sample_geotiff.tif"
FOOTPRINTS = DATA / "spacenet" / "geotiff_labels.geojson"
WATER = (("land", "#A0A0A0"), ("water", "#0000FF"))
BUILDINGS = (("background", "#000000"), ("building", "#FF0000"))
TINY = {"architecture": "unet", "arguments": {"base_channels": 4, "depth": 2}}
QUICK: dict[str, Any] = {
    "epochs": 1,
    "steps_per_epoch": 2,
    "batch_size": 2,
    "tile_size": 64,
    "seed": 3,
    "device": "cpu",
    "precision": "fp32",
    "num_threads": 1,
    "progress": False,
    "val_tile_size": 256,
}


def write_tif(path: Path, data: np.ndarray, profile: dict[str, Any], descriptions: tuple[str, ...] = ()) -> Path:
    """A GeoTIFF of (C, H, W) ``data`` on ``profile``'s grid, its bands described by ``descriptions``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {**profile, "count": data.shape[0], "dtype": data.dtype.name, "height": data.shape[1], "width": data.shape[2]}
    with rasterio.open(path, "w", **kw) as dst:
        dst.write(data)
        for k, text in enumerate(descriptions):
            dst.set_band_description(k + 1, text)
    return path


def four_band_set(root: Path) -> tuple[Path, Path, Path]:
    """Sentinel-2 bands B2, B3, B4, B8 of the real chip (described blue, green, red, nir), cut into four 256 px
    chips with water masks from the NDWI (green - nir) / (green + nir) > 0: three to train on, one to validate;
    and the whole 512 px 4-band scene. Returns (train folder, validation folder, scene)."""
    with rasterio.open(S2) as src:
        pixels = src.read([2, 3, 4, 8])
        profile = {"driver": "GTiff", "crs": src.crs, "transform": src.transform, "nodata": src.nodata}
        transform = src.transform
    green, nir = pixels[1].astype(np.float64), pixels[3].astype(np.float64)
    water = ((green - nir) / np.maximum(green + nir, 1) > 0).astype(np.uint8)
    names = ("blue", "green", "red", "nir")
    for n, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        split = "val" if n == 3 else "train"
        window = Window(col * 256, row * 256, 256, 256)
        ys, xs = slice(row * 256, row * 256 + 256), slice(col * 256, col * 256 + 256)
        grid = {**profile, "transform": rasterio.windows.transform(window, transform)}
        write_tif(root / split / "images" / f"chip{n}.tif", pixels[:, ys, xs], grid, names)
        write_tif(root / split / "masks" / f"chip{n}.tif", water[None, ys, xs], {**grid, "nodata": None})
    scene = write_tif(root / "scene.tif", pixels, profile, names)
    return root / "train", root / "val", scene


@pytest.fixture(scope="module")
def s2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return four_band_set(tmp_path_factory.mktemp("s2"))


@pytest.fixture(scope="module")
def atlanta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding the SpaceNet Atlanta image alone (its labels are the footprints' polygons)."""
    root = tmp_path_factory.mktemp("atlanta")
    (root / "images").mkdir()
    (root / "images" / ATLANTA.name).symlink_to(ATLANTA)
    return root


@pytest.fixture(scope="module")
def s2_run(s2: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of a short run on the 4-band chips (40 steps of 4 tiles: under a second, water IoU ~0.8)."""
    out = tmp_path_factory.mktemp("s2run")
    quick = {**QUICK, "steps_per_epoch": 40, "batch_size": 4, "lr": 1e-2}
    config = TrainConfig(train_dirs=(s2[0],), val_dirs=(s2[1],), out_dir=out, classes=WATER, **TINY, **quick)
    return train(config).checkpoint


# --- bands --------------------------------------------------------------------------------------------------


def test_four_band_run_records_its_bands_and_segments_a_four_band_scene(
    s2: tuple[Path, Path, Path], s2_run: Path, tmp_path: Path
) -> None:
    from segpipe.cli import main
    from segpipe.models.checkpoint import load_model

    meta = load_model(s2_run).metadata
    assert meta.arguments["in_channels"] == 4 and meta.bands == ("blue", "green", "red", "nir")
    assert len(meta.mean) == len(meta.std) == 4 and meta.mean[3] > meta.mean[2]  # nir is bright on land
    assert meta.input is not None and (meta.input.dtype, meta.input.range) == ("int16", (-32768.0, 32767.0))
    assert meta.provenance["bands_read"] == [1, 2, 3, 4] and [c.name for c in meta.classes] == ["land", "water"]

    out = tmp_path / "water.tif"
    assert main(["run", str(s2[2]), str(out), "--model", str(s2_run), "--no-prefect", "--executor", "local"]) == 0
    with rasterio.open(out) as mask:
        predicted = mask.read(1) == 1
        assert (mask.width, mask.height) == (512, 512)
    with rasterio.open(s2[2]) as scene:  # the NDWI water of the whole scene (three quarters trained on)
        green, nir = scene.read(2).astype(np.float64), scene.read(4).astype(np.float64)
    water = (green - nir) / np.maximum(green + nir, 1) > 0
    assert (predicted & water).sum() / (predicted | water).sum() > 0.6  # the bands reach the network in order
    fit = json.loads(out.with_name("water.summary.json").read_text())["fit"]
    assert fit["bands"] == [1, 2, 3, 4] and fit["bands_by"] == "names"


def test_bands_are_picked_and_named_from_the_files(s2: tuple[Path, Path, Path], tmp_path: Path) -> None:
    thirteen = image_bands(S2)  # descriptions B1..B12 with B8A: Sentinel-2's names give common names
    for select in ("B2,B3,B4,B8", "blue,green,red,nir", "2,3,4,8"):
        plan = plan_bands([thirteen, thirteen], select=select, names=None)
        assert plan.indexes == (2, 3, 4, 8) and plan.names == ("blue", "green", "red", "nir"), select
    assert plan_bands([thirteen], select=None, names=None).names[8] == "nir08"
    named = plan_bands([thirteen], select="4,3,2", names=("r", "g", "b"))
    assert named.names == ("r", "g", "b")
    with pytest.raises(ConfigError, match="--band-names gives 2 name"):
        plan_bands([thirteen], select="4,3,2", names=("r", "g"))
    with pytest.raises(ConfigError, match="no band named 'swir99'"):
        plan_bands([thirteen], select="red,swir99", names=None)
    chip = image_bands(s2[0] / "images" / "chip0.tif")
    with pytest.raises(InputError, match=r"Spain_7370579_S2Hand.tif has 13 int16 band\(s\) but .*chip0.tif has 4"):
        plan_bands([chip, thirteen], select=None, names=None)
    unnamed = write_tif(tmp_path / "u4.tif", np.zeros((4, 8, 8), np.uint16), {"driver": "GTiff"})
    assert plan_bands([image_bands(unnamed)], select=None, names=None).names == ("band1", "band2", "band3", "band4")
    three = write_tif(
        tmp_path / "u3.tif", np.zeros((3, 8, 8), np.uint16), {"driver": "GTiff", "photometric": "minisblack"}
    )
    assert plan_bands([image_bands(three)], select=None, names=None).names == ("red", "green", "blue")
    other = write_tif(
        tmp_path / "o.tif", np.zeros((4, 8, 8), np.int16), {"driver": "GTiff"}, ("nir", "red", "green", "blue")
    )
    with pytest.raises(InputError, match=r"band 1 of .*o.tif is 'nir' but that of .*chip0.tif is 'blue'"):
        plan_bands([chip, image_bands(other)], select=None, names=None)


def test_images_that_disagree_stop_the_run_naming_the_image(s2: tuple[Path, Path, Path], tmp_path: Path) -> None:
    train_dir = tmp_path / "mixed"
    for kind in ("images", "masks"):
        (train_dir / kind).mkdir(parents=True)
        for name in ("chip0.tif", "chip1.tif"):
            (train_dir / kind / name).symlink_to(s2[0] / kind / name)
    with rasterio.open(S2) as src:  # a 13-band chip among the 4-band ones
        write_tif(train_dir / "images" / "chip9.tif", src.read(window=Window(0, 0, 256, 256)), {"driver": "GTiff"})
    (train_dir / "masks" / "chip9.tif").symlink_to(s2[0] / "masks" / "chip0.tif")
    config = TrainConfig(train_dirs=(train_dir,), out_dir=tmp_path / "run", classes=WATER, **TINY, **QUICK)
    with pytest.raises(InputError, match=r"chip9.tif has 13 int16 band\(s\) but .*chip0.tif has 4 int16"):
        train(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"in_channels'\] is 3 but the run trains on 4 band"):
        prepare(dataclasses.replace(config, train_dirs=(s2[0],), arguments={"in_channels": 3}))
    with pytest.raises(ConfigError, match=r"colour_jitter 0.1 draws offsets in 8-bit units"):
        prepare(dataclasses.replace(config, train_dirs=(s2[0],), colour_jitter=0.1))


# --- polygon labels -----------------------------------------------------------------------------------------


def footprints() -> tuple[np.ndarray, float, float]:
    """The 43 footprints (shapely, EPSG:32616), their total area and perimeter (m², m)."""
    from pyogrio.raw import read

    geometries = shapely.from_wkb(read(FOOTPRINTS, columns=[])[2])
    return geometries, float(shapely.union_all(geometries).area), float(shapely.length(geometries).sum())


def write_gpkg(path: Path, geometries: np.ndarray, values: np.ndarray, crs: str) -> Path:
    from pyogrio.raw import write

    write(path, shapely.to_wkb(geometries), [values], fields=["class"], geometry_type="Polygon", crs=crs, driver="GPKG")
    return path


def test_polygons_rasterise_to_their_area_in_any_crs(tmp_path: Path) -> None:
    geometries, area, perimeter = footprints()
    grid = image_grid(ATLANTA)
    labels = read_polygon_labels(FOOTPRINTS, class_names=[n for n, _ in BUILDINGS])
    mask = rasterise_labels(labels, grid)
    counts = np.bincount(mask.ravel(), minlength=2)
    pixel = 0.5  # m
    # a pixel is a polygon's when its centre is inside: the count is the area to within the boundary pixels
    assert abs(counts[1] - area / pixel**2) < 0.05 * perimeter / pixel, (counts, area / pixel**2)
    assert abs(counts[1] - area / pixel**2) / (area / pixel**2) < 0.002
    assert counts[0] + counts[1] == 900 * 900 and counts[1] == 33818  # as docs/training.md says (33837 expected)

    # the same footprints in WGS84 in a GeoPackage, classed by name: reprojected onto the image's grid
    from rasterio.warp import transform_geom

    wgs84 = np.array(
        [
            shapely.geometry.shape(g)
            for g in transform_geom("EPSG:32616", "EPSG:4326", [shapely.geometry.mapping(g) for g in geometries])
        ]
    )
    named = write_gpkg(tmp_path / "named.gpkg", wgs84, np.array(["Building"] * len(wgs84), dtype=object), "EPSG:4326")
    again = rasterise_labels(read_polygon_labels(named, class_names=["background", "building"], field="class"), grid)
    assert (again != mask).sum() <= 5  # pixel centres on a reprojected edge
    # classed by id, with one polygon of an unknown class
    ids = np.array([1] * (len(wgs84) - 1) + [7], dtype=np.int32)
    by_id = write_gpkg(tmp_path / "ids.gpkg", wgs84, ids, "EPSG:4326")
    with pytest.raises(
        InputError, match=r"1 polygon\(s\) have values that are no class \(7\).*--unknown-colours ignore"
    ):
        read_polygon_labels(by_id, class_names=["background", "building"], field="class")
    kept = read_polygon_labels(by_id, class_names=["background", "building"], field="class", unknown="ignore")
    assert kept.class_ids.tolist() == [1] * (len(wgs84) - 1) + [255]
    with pytest.raises(ConfigError, match=r"--label-field 'kind'.* has the attributes class"):
        read_polygon_labels(by_id, class_names=["background", "building"], field="kind")


def test_a_building_model_trains_on_the_footprints(atlanta: Path, tmp_path: Path) -> None:
    from segpipe.models.checkpoint import load_model

    config = TrainConfig(
        train_dirs=(atlanta,), out_dir=tmp_path / "run", classes=BUILDINGS, labels=FOOTPRINTS, **TINY, **QUICK
    )
    inputs = prepare(config)
    counts = np.bincount(inputs.train.masks[0].ravel(), minlength=2)
    assert (
        counts.tolist()
        == np.bincount(
            rasterise_labels(read_polygon_labels(FOOTPRINTS, class_names=["b", "x"]), image_grid(ATLANTA)).ravel()
        ).tolist()
    )
    result = train(config)
    meta = load_model(result.checkpoint).metadata
    assert [c.name for c in meta.classes] == ["background", "building"] and meta.arguments["in_channels"] == 1
    assert meta.bands == ("band1",) and meta.input is not None and meta.input.dtype == "uint16"
    assert meta.provenance["labels"] == str(FOOTPRINTS) and meta.provenance["train_pairs"] == 1
    assert np.isfinite(result.history[0].train_loss)
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    (plain / "images" / "x.png").write_bytes((DATA / "dubai" / "image_part_005.png").read_bytes())
    with pytest.raises(InputError, match=r"x.png is not georeferenced"):
        prepare(dataclasses.replace(config, train_dirs=(plain,), bands=("p",), select_bands="1"))
    with pytest.raises(ConfigError, match="give --labels FILE too"):
        TrainConfig(train_dirs=(atlanta,), out_dir=tmp_path, label_field="class")


# --- inference tiling written into new checkpoints ------------------------------------------------------------


def test_new_checkpoints_get_the_run_default_tile_and_halo(
    s2_run: Path, s2: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from segpipe.models.checkpoint import default_model_path, read_metadata

    shipped = read_metadata(default_model_path().with_suffix(".json"))
    meta = json.loads(s2_run.with_suffix(".json").read_text())
    assert (meta["tile_size"], meta["halo"]) == (shipped.tile_size, shipped.halo) == (1024, 32)
    deep = TrainConfig(
        train_dirs=(s2[0],),
        out_dir=tmp_path / "deep",
        classes=WATER,
        architecture="unet",
        arguments={"base_channels": 2, "depth": 6},
        **{**QUICK, "tile_size": 64},
    )
    with pytest.raises(ConfigError, match=r"inference tiling .* halo 32 is not a multiple of 64.*--halo"):
        train(deep)
    assert not (tmp_path / "deep" / "best.safetensors").exists()


# --- device and precision -------------------------------------------------------------------------------------


def test_device_and_autocast_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from segpipe.models.training import optim
    from segpipe.models.training.optim import training_device

    monkeypatch.setattr(optim, "cpu_has_bf16", lambda: False)
    assert training_device("cpu", "auto") == (torch.device("cpu"), None)
    monkeypatch.setattr(optim, "cpu_has_bf16", lambda: True)
    assert training_device("cpu", "auto") == (torch.device("cpu"), torch.bfloat16)
    assert training_device("cpu", "fp32") == (torch.device("cpu"), None)
    with pytest.raises(ConfigError, match="fp16' needs CUDA"):
        training_device("cpu", "fp16")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda was asked for but there is no CUDA GPU"):
        training_device("cuda", "auto")
    assert training_device("auto", "fp32")[0] == torch.device("cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_device("cuda", "auto") == (torch.device("cuda"), torch.bfloat16)
    assert training_device("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    assert training_device("cuda", "fp32") == (torch.device("cuda"), None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or T4
    assert training_device("cuda", "auto") == (torch.device("cuda"), torch.float16)


def test_train_device_cuda_without_a_gpu_is_one_line(
    s2: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from segpipe.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["train", str(s2[0]), "--out", str(tmp_path / "run"), "--device", "cuda"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [
        "error: --device cuda was asked for but there is no CUDA GPU; use --device cpu or auto"
    ]
    assert not (tmp_path / "run").exists()


# --- fine-tuning -----------------------------------------------------------------------------------------------


def test_init_starts_from_the_checkpoint_weights(
    s2: tuple[Path, Path, Path], s2_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.models.checkpoint import load_model

    built: list[dict[str, torch.Tensor]] = []
    original = training_model.build_network

    def keeping(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = original(*args, **kwargs)
        built.append(copy.deepcopy(model.state_dict()))  # as the first step will find it
        return model

    monkeypatch.setattr(training_model, "build_network", keeping)
    config = TrainConfig(train_dirs=(s2[0],), out_dir=tmp_path / "ft", init=s2_run, **QUICK)
    result = train(config)
    weights = load_file(str(s2_run))
    assert set(built[0]) == set(weights) and all(torch.equal(built[0][k], weights[k]) for k in weights)
    before, after = load_model(s2_run).metadata, load_model(result.checkpoint).metadata
    assert (after.architecture, dict(after.arguments), after.bands) == (
        before.architecture,
        dict(before.arguments),
        before.bands,
    )
    assert (after.mean, after.std, after.classes) == (before.mean, before.std, before.classes)
    assert after.provenance["init"] == str(s2_run.resolve())

    # another class table: all but the class layer come from the checkpoint
    three = (*WATER, ("cloud", "#FFFFFF"))
    train(dataclasses.replace(config, out_dir=tmp_path / "three", classes=three))
    fresh = [k for k in weights if not torch.equal(built[1][k], weights[k])]
    assert fresh and all(built[1][k].shape[0] == 3 for k in fresh) and len(fresh) <= 2


def test_init_refuses_a_checkpoint_that_does_not_fit(s2: tuple[Path, Path, Path], s2_run: Path, tmp_path: Path) -> None:
    config = TrainConfig(train_dirs=(s2[0],), out_dir=tmp_path / "ft", init=s2_run, **QUICK)
    with pytest.raises(ModelError, match=r"takes 4 band\(s\) \(blue, green, red, nir\) but the run trains on 3"):
        prepare(dataclasses.replace(config, select_bands="1,2,3"))
    with pytest.raises(ModelError, match=r"input band 1 is 'red'.*--bands blue,green,red,nir"):
        prepare(dataclasses.replace(config, select_bands="red,green,blue,nir"))
    with pytest.raises(ConfigError, match="is a unet but --architecture is attention_unet"):
        prepare(dataclasses.replace(config, architecture="attention_unet"))
    with pytest.raises(ConfigError, match="has base_channels=4 but the run asks for base_channels=8"):
        prepare(dataclasses.replace(config, arguments={"base_channels": 8}))
    with pytest.raises(ModelError, match="takes 3 band"):  # the shipped RGB model on 4-band data
        prepare(dataclasses.replace(config, init=Path("default")))
    rgb = write_tif(
        tmp_path / "rgb" / "images" / "a.tif",
        np.zeros((3, 64, 64), np.uint16),
        {"driver": "GTiff", "photometric": "rgb"},
    )
    write_tif(tmp_path / "rgb" / "masks" / "a.tif", np.zeros((1, 64, 64), np.uint8), {"driver": "GTiff"})
    with pytest.raises(ModelError, match=r"trained on uint8 values .* but the images are uint16"):
        prepare(dataclasses.replace(config, train_dirs=(rgb.parents[1],), init=Path("default")))
